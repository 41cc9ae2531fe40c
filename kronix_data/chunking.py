"""Cut data into chunk payloads and restore them: a DataFrame by rows, a range by bounds, anything else by items.

Pure: nothing here touches the database.  :func:`kronix_data.batches.enqueue_chunks`
(``driver.map``) pushes the chunks as jobs of one batch, whose id
(:func:`default_batch_id`, :func:`frame_batch_id`, :func:`range_batch_id`) is a
hash of what is enqueued, so re-running the same cell enqueues nothing.

Payloads are plain JSON, so a worker in another process (or on another
machine, with another pandas) can read them:

- DataFrame, ``chunk_format="parquet"`` (the default): ``{"chunk": n, "start": i,
  "stop": j, "format": "parquet"}``, the rows themselves as zstd Parquet bytes
  under ``"parquet"`` (:mod:`kronix_data.columnar`), which ``enqueue_chunks``
  stores in the ``<table>_data`` side table and the worker puts back in the
  payload when it runs the job.
- DataFrame, ``chunk_format="json"``: ``{"chunk": n, "start": i, "stop": j, "frame": {"columns", "index",
  "data"}, "dtypes": {"columns": [...], "index": "..."}}`` — ``frame`` is
  pandas' ``orient="split"`` layout (rows as lists, dates as ISO text, missing
  values as null, floats exact), ``dtypes`` lets :func:`as_frame` restore them.
- range: ``{"chunk": n, "start": a, "stop": b}`` (plus ``"step"`` when not 1),
  never materialised.
- any other iterable of JSON values (file paths, dates, ids):
  ``{"chunk": n, "items": [...]}``, dates and timestamps as ISO text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from datetime import date, datetime, time as clock_time
from itertools import islice
from typing import Any

import numpy as np
import pandas as pd

from .columnar import frame_to_parquet, parquet_to_frame
from .errors import InvalidInputError
from .job import MAX_BATCH_ID_LENGTH

#: How a DataFrame's chunks are stored: zstd Parquet bytes beside the row (default), or rows in the JSON payload.
CHUNK_FORMATS = ("parquet", "json")

#: How many characters of the job name a generated batch id keeps (readable, yet short).
_NAME_PART = 64


def chunks(data: Any, chunk_size: int, chunk_format: str = "parquet", *, first: int = 0
           ) -> Iterator[dict[str, Any]]:
    """The chunk payloads of ``data``, in order (pure: nothing is written).

    Parameters
    ----------
    data
        A ``pandas.DataFrame`` (cut by rows), a ``range`` (cut into sub-ranges),
        or any other iterable of JSON-able values (lists, numpy arrays, Series,
        generators of paths or dates).
    chunk_size
        Rows, range members or items per chunk (the last chunk may be smaller).
    chunk_format
        For a DataFrame: ``"parquet"`` (its rows as Parquet bytes under the
        payload's ``"parquet"`` key) or ``"json"`` (rows in the payload).
    first
        The chunk to start at, for a DataFrame or a range (cut from there, not
        from the start: ``map`` cuts them window by window).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if chunk_format not in CHUNK_FORMATS:
        raise InvalidInputError(f"chunk_format must be one of {CHUNK_FORMATS}, got {chunk_format!r}")
    chunk_size = int(chunk_size)
    if isinstance(data, pd.DataFrame):
        if chunk_format == "parquet":
            return _parquet_chunks(data, chunk_size, first)
        return _frame_chunks(data, chunk_size, first)
    if isinstance(data, range):
        return _range_chunks(data, chunk_size, first)
    if first:
        raise InvalidInputError(f"only a DataFrame or a range can be cut from chunk {first}, "
                                f"not a {type(data).__name__}")
    if isinstance(data, (str, bytes, bytearray)):
        raise InvalidInputError(f"data is a {type(data).__name__}, which would be cut into characters; "
                        "pass a list of them instead, e.g. [path]")
    if isinstance(data, Mapping):
        raise InvalidInputError("data is a mapping, which would be cut into its keys; pass list(data.items()) "
                        "or a DataFrame instead")
    if not isinstance(data, Iterable):
        raise InvalidInputError(f"data must be a DataFrame, a range or an iterable, got {type(data).__name__}")
    return _item_chunks(data, chunk_size)


def _range_chunks(data: range, chunk_size: int, first: int = 0) -> Iterator[dict[str, Any]]:
    for n, start in enumerate(range(first * chunk_size, len(data), chunk_size), first):
        part = data[start:start + chunk_size]  # a range again: nothing is materialised
        payload = {"chunk": n, "start": part.start, "stop": part.stop}
        if part.step != 1:
            payload["step"] = part.step
        yield payload


def _item_chunks(data: Iterable[Any], chunk_size: int) -> Iterator[dict[str, Any]]:
    iterator, position, n = iter(data), 0, 0
    while batch := list(islice(iterator, chunk_size)):
        items = [_json_value(item, f"item {position + i} of data") for i, item in enumerate(batch)]
        yield {"chunk": n, "items": items}
        position += len(batch)
        n += 1


def _json_value(value: Any, where: str) -> Any:
    """``value`` as plain JSON data: dates as ISO text, numpy scalars as Python numbers."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"{where} is {value!r}, which JSON cannot hold; drop it or use None")
        return value
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, (datetime, date, clock_time)):  # pd.Timestamp is a datetime
        return value.isoformat()
    if isinstance(value, np.datetime64):
        return None if np.isnat(value) else pd.Timestamp(value).isoformat()
    if isinstance(value, np.generic):
        return _json_value(value.item(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise InvalidInputError(f"{where} is a dict with non-str keys; JSON objects need str keys")
        return {key: _json_value(item, f"{where}[{key!r}]") for key, item in value.items()}
    raise InvalidInputError(f"{where} has type {type(value).__name__}, which is not JSON; "
                    "convert it to str, a number, a list or a dict first")


# -- DataFrames ---------------------------------------------------------------


def _parquet_chunks(frame: pd.DataFrame, chunk_size: int, first: int = 0) -> Iterator[dict[str, Any]]:
    if isinstance(frame.columns, pd.MultiIndex) or isinstance(frame.index, pd.MultiIndex):
        raise InvalidInputError("DataFrames with a MultiIndex cannot be chunked; reset_index() or flatten the columns first")
    return _parquet_parts(frame, chunk_size, first)


def _parquet_parts(frame: pd.DataFrame, chunk_size: int, first: int) -> Iterator[dict[str, Any]]:
    for n, start in enumerate(range(first * chunk_size, len(frame), chunk_size), start=first):
        part = frame.iloc[start:start + chunk_size]
        yield {"chunk": n, "start": start, "stop": start + len(part), "format": "parquet",
               "parquet": frame_to_parquet(part, f"chunk {n} (rows {start}..{start + len(part)})")}


def _frame_chunks(frame: pd.DataFrame, chunk_size: int, first: int = 0) -> Iterator[dict[str, Any]]:
    if isinstance(frame.columns, pd.MultiIndex) or isinstance(frame.index, pd.MultiIndex):
        raise InvalidInputError("DataFrames with a MultiIndex cannot be chunked; reset_index() or flatten the columns first")
    for label in frame.columns:
        if isinstance(label, bool) or not isinstance(label, (str, int, np.integer)):
            raise InvalidInputError(f"column label {label!r} must be a str or an int to travel as JSON")
    columns = [label if isinstance(label, str) else int(label) for label in frame.columns]
    dtypes = {"columns": [_dtype_spec(dtype) for dtype in frame.dtypes], "index": str(frame.index.dtype),
              "index_name": frame.index.name if isinstance(frame.index.name, str) else None}
    for n, start in enumerate(range(first * chunk_size, len(frame), chunk_size), first):
        part = frame.iloc[start:start + chunk_size]
        values = [_column_values(part.iloc[:, i], f"column {columns[i]!r}, rows {start}..")
                  for i in range(part.shape[1])]
        index = _column_values(part.index.to_series(), "the index")
        yield {"chunk": n, "start": start, "stop": start + len(part),
               # Rows as tuples: JSON arrays all the same, and 5x quicker to build than lists.
               "frame": {"columns": columns, "index": index, "data": list(zip(*values)) if values
                         else [[] for _ in index]},
               "dtypes": dtypes}


def _dtype_spec(dtype: Any) -> str | dict[str, Any]:
    """A dtype as JSON: its name, or for a categorical its categories too (so chunks concatenate)."""
    if isinstance(dtype, pd.CategoricalDtype):
        categories = dtype.categories.tolist()
        if all(isinstance(value, (str, int, float)) and not isinstance(value, bool) for value in categories):
            return {"category": categories, "ordered": bool(dtype.ordered)}
    return str(dtype)


def _column_values(series: pd.Series, where: str) -> list[Any]:
    """One column as JSON values, vectorised where pandas can (exact floats, not to_json's 10 digits)."""
    dtype = series.dtype
    missing = series.isna().to_numpy()
    if isinstance(dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(dtype):
        utc = series.dt.tz_convert("UTC").dt.tz_localize(None) if isinstance(dtype, pd.DatetimeTZDtype) else series
        text = np.datetime_as_string(utc.to_numpy(dtype="datetime64[us]"), unit="us")
        if isinstance(dtype, pd.DatetimeTZDtype):
            text = np.char.add(text, "+00:00")
        return [None if gap else value for value, gap in zip(text.tolist(), missing)] if missing.any() \
            else text.tolist()
    if pd.api.types.is_timedelta64_dtype(dtype):  # as seconds: exact to the microsecond
        seconds = series.dt.total_seconds().tolist()
        return [None if gap else value for value, gap in zip(seconds, missing)]
    if pd.api.types.is_float_dtype(dtype) and not isinstance(dtype, pd.api.extensions.ExtensionDtype):
        array = series.to_numpy()
        if np.isinf(array).any():
            raise InvalidInputError(f"{where} holds infinity, which JSON cannot hold")
        values = array.tolist()
        return [None if gap else value for value, gap in zip(values, missing)] if missing.any() else values
    if (pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)) and not missing.any():
        return series.to_numpy().tolist()
    values = series.astype(object).tolist()
    return [None if gap else value if type(value) is str else _json_value(value, where)
            for value, gap in zip(values, missing)]


def as_frame(payload: Mapping[str, Any]) -> pd.DataFrame:
    """The DataFrame of a chunk payload made by :func:`chunks`, with its dtypes and index restored.

    Call it in the task: ``def clean(payload): frame = as_frame(payload); ...`` (or let the task take the
    frame: ``@task(frame=True)``).  A Parquet chunk's bytes are read by pyarrow alone (no code runs);
    a JSON one (``chunk_format="json"``, or stored by an earlier release) is rebuilt from its rows.
    """
    if isinstance(payload, Mapping) and payload.get("format") == "parquet":
        data = payload.get("parquet")
        if data is None:
            raise InvalidInputError(f"chunk {payload.get('chunk')!r} is stored as Parquet in the data table, "
                                    "but its bytes were not fetched (or are missing): run it through a worker "
                                    "or driver.pop(), which read them")
        return parquet_to_frame(data, f"the Parquet data of chunk {payload.get('chunk')!r}")
    if not isinstance(payload, Mapping) or "frame" not in payload:
        keys = sorted(payload) if isinstance(payload, Mapping) else type(payload).__name__
        raise InvalidInputError(f"as_frame takes the payload of a DataFrame chunk (with a 'frame' key), got {keys}")
    split = payload["frame"]
    if isinstance(split, str):  # the JSON text of orient="split", as pandas writes it
        split = json.loads(split)
    frame = pd.DataFrame(split["data"], columns=split["columns"], index=split.get("index"))
    dtypes = payload.get("dtypes") or {}
    for position, dtype in enumerate(dtypes.get("columns") or []):
        frame.isetitem(position, _restore(frame.iloc[:, position], dtype))
    if dtypes.get("index"):
        frame.index = pd.Index(_restore(frame.index.to_series(), dtypes["index"]), name=dtypes.get("index_name"))
    return frame


def _restore(series: pd.Series, dtype: str | dict[str, Any]) -> pd.Series:
    """A column read back from JSON, cast to the dtype it had before chunking."""
    try:
        if isinstance(dtype, dict):
            return series.astype(pd.CategoricalDtype(dtype["category"], ordered=dtype.get("ordered", False)))
        if dtype.startswith("datetime64"):
            parsed = pd.to_datetime(series, utc="," in dtype, format="ISO8601")
            return parsed.dt.tz_convert(dtype.split(", ")[1].rstrip("]")).astype(dtype) if "," in dtype \
                else parsed.astype(dtype)
        if dtype.startswith("timedelta64"):
            return pd.to_timedelta(series.astype("float64"), unit="s").astype(dtype)
        return series.astype(dtype)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"column {series.name!r} cannot be restored to dtype {dtype}: {error}") from error


# -- batch ids ----------------------------------------------------------------


def _digest(name: str, queue: str) -> Any:
    return hashlib.sha256(json.dumps([name, queue], separators=(",", ":")).encode())


def canonical_json(payload: Mapping[str, Any]) -> str:
    """A payload's JSON with sorted keys: the text :class:`ContentDigest` hashes (and ``map`` stores)."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, allow_nan=False)


class ContentDigest:
    """The default batch id, fed one chunk's :func:`canonical_json` at a time (so no second pass is needed)."""

    def __init__(self, name: str, queue: str):
        self.name, self._digest = name, _digest(name, queue)

    def update(self, text: str) -> None:
        self._digest.update(b"\n")
        self._digest.update(text.encode())

    def batch_id(self) -> str:
        return f"{self.name[:_NAME_PART]}-{self._digest.hexdigest()[:16]}"


def default_batch_id(name: str, queue: str, payloads: Iterable[Mapping[str, Any]]) -> str:
    """``name-<16 hex>``: the same name, queue and chunk payloads always give the same id."""
    digest = ContentDigest(name, queue)
    for payload in payloads:
        data = payload.get("parquet") if isinstance(payload, Mapping) else None
        if data is not None:  # a Parquet chunk: its JSON part and its bytes
            payload = {key: value for key, value in payload.items() if key != "parquet"}
            digest.update(hashlib.sha256(data).hexdigest())
        digest.update(canonical_json(payload))
    return digest.batch_id()


def range_batch_id(name: str, queue: str, data: range, chunk_size: int) -> str:
    """The batch id of a range, from its bounds: what its chunks hold follows from its first member, length,
    step and the chunk size (``range(0, 10, 3) == range(0, 11, 3)`` give the same id)."""
    digest = _digest(name, queue)
    layout = ["range", data.start, len(data), data.step, int(chunk_size)]
    digest.update(json.dumps(layout, separators=(",", ":")).encode())
    return f"{name[:_NAME_PART]}-{digest.hexdigest()[:16]}"


def frame_batch_id(name: str, queue: str, frame: pd.DataFrame | None, chunk_size: int) -> str | None:
    """The batch id of a DataFrame cut by ``chunk_size`` rows, without cutting it.

    pandas' vectorised row hashes (index included) plus the column labels,
    dtypes and chunk size stand for the payloads: ten times quicker than
    hashing their JSON.  None for no frame, or one with unhashable cells
    (lists, dicts), whose payloads are hashed instead.  The hashes are
    pandas' own, so a pandas upgrade may give the same frame a new id.
    """
    if frame is None:
        return None
    try:
        rows = pd.util.hash_pandas_object(frame, index=True).to_numpy()
    except TypeError:
        return None
    digest = _digest(name, queue)
    layout = [int(chunk_size), len(frame), [str(label) for label in frame.columns],
              [_dtype_spec(dtype) for dtype in frame.dtypes], str(frame.index.dtype)]
    digest.update(json.dumps(layout, separators=(",", ":")).encode())
    digest.update(rows.tobytes())
    return f"{name[:_NAME_PART]}-{digest.hexdigest()[:16]}"


def checked_batch_id(batch: Any) -> str:
    if not isinstance(batch, str):
        raise InvalidInputError(f"batch must be a str, got {type(batch).__name__}")
    if not batch or len(batch) > MAX_BATCH_ID_LENGTH or not batch.isprintable():
        raise InvalidInputError(f"batch {batch[:40]!r} must have 1 to {MAX_BATCH_ID_LENGTH} printable characters")
    return batch
