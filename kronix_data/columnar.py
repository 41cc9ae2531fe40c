"""DataFrames as compressed Parquet bytes (pyarrow, zstd) and back, exactly: the binary data plane.

A DataFrame chunk (``driver.map(task, frame)``) and a DataFrame a task returns
travel as these bytes, stored in the ``<table>_data`` side table (never in the
hot jobs table).  Parquet carries no code: whoever can write a row can at worst
make a job fail, never run anything (pyarrow reads it; nothing is unpickled).

What Parquet and pandas' own metadata would not round-trip exactly is kept in
a small ``kronix`` JSON entry of the file's metadata: the column labels (str or
int, in order, duplicates allowed), the index name, and categoricals, stored
as their integer codes with the categories (any dtype, unused ones too) in a
compressed Arrow IPC buffer of their own.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InvalidInputError
from .job import Job, encode_result

#: The compression of stored frames: zstd, fast to decode, several times smaller than the JSON.
COMPRESSION = "zstd"
#: The four bytes every Parquet file starts and ends with.
PARQUET_MAGIC = b"PAR1"
_META = b"kronix"
#: The key of the JSON a DataFrame result leaves in the ``result`` column (its bytes are in ``<table>_data``).
FRAME_RESULT = "kronix_frame"
_INDEX = "__kronix_index__"


def frame_to_parquet(frame: pd.DataFrame, what: str = "DataFrame") -> bytes:
    """``frame`` as Parquet bytes (zstd) that :func:`parquet_to_frame` restores exactly.

    Raises InvalidInputError naming the column when a column has values Arrow
    cannot type (mixed Python objects, say): pass ``chunk_format="json"`` then.
    """
    if isinstance(frame.columns, pd.MultiIndex) or isinstance(frame.index, pd.MultiIndex):
        raise InvalidInputError(f"{what} has a MultiIndex; reset_index() or flatten the columns first")
    labels = []
    for label in frame.columns:
        if isinstance(label, bool) or not isinstance(label, (str, int, np.integer)):
            raise InvalidInputError(f"column label {label!r} of {what} must be a str or an int")
        labels.append(label if isinstance(label, str) else int(label))
    meta: dict[str, Any] = {"labels": labels, "labels_dtype": str(frame.columns.dtype),
                            "labels_range": [frame.columns.start, frame.columns.stop, frame.columns.step]
                            if isinstance(frame.columns, pd.RangeIndex) else None,
                            "index_name": frame.index.name, "categoricals": {}}
    # pandas 3 reads Arrow strings back as its "str" dtype: an object column or index stays object.
    meta["object_columns"] = [position for position, dtype in enumerate(frame.dtypes) if dtype == object]
    meta["object_index"] = frame.index.dtype == object
    if isinstance(frame.index, pd.RangeIndex):  # Parquet of no column would forget its rows
        meta["range"] = [frame.index.start, frame.index.stop, frame.index.step]
    if frame.index.name is not None and not isinstance(frame.index.name, (str, int)):
        raise InvalidInputError(f"the index name of {what} must be a str or an int, got {frame.index.name!r}")
    plain = frame.copy(deep=False)  # no data copied: only the labels, the index name and categoricals change
    plain.columns = [f"c{position}" for position in range(frame.shape[1])]
    plain.index = frame.index.rename(None if isinstance(frame.index, pd.RangeIndex) else _INDEX)
    for position, dtype in enumerate(frame.dtypes):
        if isinstance(dtype, pd.CategoricalDtype):
            meta["categoricals"][str(position)] = {"ordered": bool(dtype.ordered),
                                                   "categories": _categories_bytes(dtype, what)}
            plain.isetitem(position, frame.iloc[:, position].cat.codes.to_numpy())
    columns = set(plain.columns)
    try:
        table = pa.Table.from_pandas(plain, preserve_index=None, nthreads=1)  # threads cost more than they save here
    except (pa.ArrowException, TypeError, ValueError) as error:
        raise InvalidInputError(f"{what} cannot be stored as Parquet ({_column_named(error, labels)}): "
                                f"{error}; use chunk_format='json' or give the column one type") from error
    # Cells of lists or dicts: pandas would read numpy arrays back; kronix gives the Python values again.
    meta["python_values"] = [int(name[1:]) for name, kind in zip(table.schema.names, table.schema.types)
                             if name in columns and _nested(kind)]
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _META: json.dumps(meta).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=COMPRESSION, write_statistics=False)  # no reader filters on them
    return sink.getvalue().to_pybytes()


def encode_job_result(job: Job, check_size: Callable[[int, str], None]) -> str | None:
    """A job's result as stored: a DataFrame as Parquet bytes in ``job.result_data`` (checked by ``check_size``)
    and a small JSON marker for the ``result`` column; anything else as JSON (:func:`~kronix_data.job.encode_result`)."""
    if not isinstance(job.result, pd.DataFrame):
        job.result_data = None
        return encode_result(job)
    what = f"the DataFrame result of job {job.name!r}"
    job.result_data = frame_to_parquet(job.result, what)
    check_size(len(job.result_data), what)
    return json.dumps({FRAME_RESULT: "parquet", "rows": len(job.result), "bytes": len(job.result_data)},
                      separators=(",", ":"))


def parquet_to_frame(data: bytes, what: str = "data") -> pd.DataFrame:
    """The DataFrame :func:`frame_to_parquet` stored; InvalidInputError for bytes that are not one."""
    table = parquet_table(data, what)
    raw = (table.schema.metadata or {}).get(_META)
    try:
        frame = table.to_pandas()
        if raw is None:  # Parquet written by something else: as pyarrow reads it
            return frame
        meta = json.loads(raw)
        if meta.get("range") and not table.num_columns:
            frame = pd.DataFrame(index=pd.RangeIndex(*meta["range"]))
        for position in meta.get("python_values", ()):
            frame.isetitem(position, pd.Series(table.column(f"c{position}").to_pylist(), index=frame.index,
                                               dtype=object))
        for position in meta.get("object_columns", ()):
            if frame.dtypes.iloc[position] != object:
                frame.isetitem(position, frame.iloc[:, position].astype(object))
        if meta.get("object_index") and frame.index.dtype != object:
            frame.index = frame.index.astype(object)
        for position, spec in meta["categoricals"].items():
            position = int(position)
            categories = pa.ipc.open_stream(base64.b64decode(spec["categories"])).read_all().column(0)
            dtype = pd.CategoricalDtype(pd.Index(categories.to_pandas()).rename(None), ordered=spec["ordered"])
            codes = frame.iloc[:, position].to_numpy()
            frame.isetitem(position, pd.Categorical.from_codes(codes, dtype=dtype))
        frame.columns = pd.RangeIndex(*meta["labels_range"]) if meta.get("labels_range") \
            else pd.Index(meta["labels"], dtype=meta["labels_dtype"])
        frame.index.name = meta["index_name"]
    except (pa.ArrowException, KeyError, TypeError, ValueError) as error:
        raise InvalidInputError(f"{what} is Parquet that kronix did not write as a frame: {error}") from error
    return frame


def parquet_table(data: bytes, what: str = "data") -> pa.Table:
    """The Arrow table in Parquet bytes, read by pyarrow alone; InvalidInputError for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"{what} must be Parquet bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 12 or data[:4] != PARQUET_MAGIC or data[-4:] != PARQUET_MAGIC:
        raise InvalidInputError(f"{what} is not Parquet ({len(data):,} bytes without the PAR1 markers)")
    try:
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as error:
        raise InvalidInputError(f"{what} is not readable Parquet: {error}") from error


def _nested(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_struct(kind) or pa.types.is_map(kind)


def _categories_bytes(dtype: pd.CategoricalDtype, what: str) -> str:
    """A categorical's categories as base64 of a zstd Arrow IPC stream (any dtype, order kept)."""
    try:
        values = pa.Array.from_pandas(pd.Series(dtype.categories))
    except (pa.ArrowException, TypeError, ValueError) as error:
        raise InvalidInputError(f"the categories of a column of {what} cannot be stored: {error}") from error
    sink = pa.BufferOutputStream()
    table = pa.table({"categories": values})
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=COMPRESSION)) as writer:
        writer.write_table(table)
    return base64.b64encode(sink.getvalue().to_pybytes()).decode()


def _column_named(error: BaseException, labels: list) -> str:
    """Which column an Arrow conversion error is about (pyarrow says "column c3")."""
    text = str(error)
    for position in range(len(labels) - 1, -1, -1):
        if f"c{position}" in text:
            return f"column {labels[position]!r}"
    return "a column"


def concat_frames(parts: list[tuple[int, pd.DataFrame]]) -> pd.DataFrame:
    """DataFrame results as one frame through Arrow (:func:`pyarrow.concat_tables`), a ``chunk`` column first.

    Rows keep chunk order under a new RangeIndex; a named index becomes a column
    (as ``reset_index()``), an unnamed one is dropped.  Columns missing from some
    parts are null there; types are promoted as Arrow does (int with null: float).
    """
    tables = []
    for chunk, frame in parts:
        flat = frame.reset_index(drop=frame.index.name is None)
        if "chunk" not in flat.columns:
            flat.insert(0, "chunk", np.full(len(flat), chunk, dtype="int64"))
        flat.columns = [str(label) for label in flat.columns]
        tables.append(pa.Table.from_pandas(flat, preserve_index=False))
    if not tables:
        return pd.DataFrame({"chunk": pd.Series(dtype="int64")})
    try:
        combined = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowException, TypeError, ValueError) as error:
        raise InvalidInputError(f"the DataFrame results do not concatenate (columns of clashing types): "
                                f"{error}") from error
    return combined.to_pandas()
