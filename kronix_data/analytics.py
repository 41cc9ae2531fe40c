"""The DataFrame views of the queue: stats per queue and the dead letters.

Every frame has a fixed set of columns and dtypes, also when it is empty, so
notebook code such as ``df.groupby("queue")`` never needs a special case.

``fetch_stats`` stays fast on a big table because it never reads the whole
history: counts per (queue, status) come from the finished jobs' rollup plus
live counts of the jobs finished since its watermark and of those in flight
(see the store's rollup section), the oldest pending job from the claim
index, and wait/run timings only from the jobs finished in the window, found
through the ``<table>_finished`` index.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pandas as pd

from .errors import InvalidInputError
from .job import JobStatus

if TYPE_CHECKING:
    from .store import JobStore

STATS_COLUMNS = {
    "queue": "object",
    "pending": "int64",
    "processing": "int64",
    "completed": "int64",
    "failed": "int64",
    "waiting": "int64",
    "cancelled": "int64",
    "oldest_pending_age_s": "float64",
    "wait_s_mean": "float64",
    "wait_s_p50": "float64",
    "wait_s_p95": "float64",
    "run_s_mean": "float64",
    "run_s_p50": "float64",
    "run_s_p95": "float64",
    "throughput_per_s": "float64",
    "unrunnable": "int64",
}

#: The columns read from the table for a dead letter (the frame adds the error split).
DEAD_LETTER_SOURCE_COLUMNS = ["id", "name", "queue", "attempts", "max_retries", "last_error", "payload",
                              "created_at", "finished_at", "reserved_by", "batch_id"]

DEAD_LETTER_COLUMNS = {
    "id": "object",
    "name": "object",
    "queue": "object",
    "attempts": "int64",
    "max_retries": "int64",
    "last_error": "object",
    "payload": "object",
    "created_at": "datetime64[ns, UTC]",
    "finished_at": "datetime64[ns, UTC]",
    "reserved_by": "object",
    "batch_id": "object",
    "error_type": "object",
    "error_message": "object",
}

_STATUSES = tuple(status.value for status in JobStatus)
_TIMINGS = ("wait_s_mean", "wait_s_p50", "wait_s_p95", "run_s_mean", "run_s_p50", "run_s_p95")


def typed_frame(records: Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]], columns: Mapping[str, str],
                names: Sequence[str] | None = None) -> pd.DataFrame:
    """A DataFrame with exactly ``columns``, cast to their dtypes (empty or not); ``names``: the records are
    tuples of these columns (what a statement returned: no dict per row, for the views of 10,000 rows).

    The frame is built once from its cast columns: assigning them one by one into a frame made of
    the records cost a block copy each (most of ``batches()``' time at 10,000 batches).
    """
    if names is None:
        raw = pd.DataFrame.from_records(list(records), columns=list(columns))
        return pd.DataFrame({name: _cast(raw[name], dtype) for name, dtype in columns.items()}, index=raw.index)
    # Tuples: one column each, cast straight to its dtype (from_records first guessed a type per column,
    # trying datetimes on every value: ~60 ms of 10,000 rows).  An object column is still inferred first,
    # as from_records did: pandas reads a text column's None as NaN, and the views keep saying so.
    values = list(zip(*records)) or [()] * len(names)
    at = {name: position for position, name in enumerate(names)}
    return pd.DataFrame({name: _cast(pd.Series(values[at[name]], dtype=None if dtype == "object" else object),
                                     dtype) for name, dtype in columns.items()})


def _cast(values: pd.Series, dtype: str) -> pd.Series:
    """One column as ``dtype``; timestamps (aware datetimes, naive UTC, or epoch microseconds as
    ``dialect.raw_timestamp`` reads them on PostgreSQL) as UTC."""
    if not dtype.startswith("datetime64"):
        return values.astype(dtype)
    if values.dtype == object and pd.api.types.infer_dtype(values, skipna=True) == "integer":
        return pd.to_datetime(values.astype("Int64"), unit="us", utc=True).astype(dtype)
    return pd.to_datetime(values, utc=True).astype(dtype)


def with_lag(frame: pd.DataFrame, store: JobStore) -> pd.DataFrame:
    """The frame, saying in ``frame.attrs["replica_lag_s"]`` how stale it may be: 0 when read from the
    primary, the standby's replay lag when read from one (``read_db``), None where unknown."""
    frame.attrs["replica_lag_s"] = store.read_lag_s()
    return frame


def window_seconds(window: timedelta | float) -> float:
    """A stats window in seconds; a clear error for anything but a positive span."""
    seconds = window.total_seconds() if isinstance(window, timedelta) else window
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise InvalidInputError(f"window must be a positive timedelta or number of seconds, got {window!r}")
    return float(seconds)


# -- fetch_stats ------------------------------------------------------------------


def fetch_stats(store: JobStore, window: timedelta | float,
                unrunnable: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Per queue: counts of every row by status, the oldest pending age, and timings over ``window``.

    ``wait_s_*`` is claim minus due time over jobs finished (completed or
    dead-lettered) in the window; ``run_s_*`` is finish minus claim over jobs
    completed in the window; ``throughput_per_s`` is completed-in-window
    divided by the window's seconds.  Percentiles interpolate linearly
    (``percentile_cont``, pandas' ``quantile``).  ``oldest_pending_age_s`` is
    how long the longest-waiting due job has been due (0 when every pending
    job is scheduled for later, NaN with none).  ``unrunnable``: per queue, the
    pending or waiting jobs whose requirements no live worker's resources cover
    (:func:`kronix_data.workers.unrunnable_jobs`, which the driver passes in).
    """
    seconds = window_seconds(window)
    read = store.read_queue_stats(seconds)
    queues = _count_rows(read.counts)
    for queue, due in read.earliest_due:
        if due is not None and queue in queues:
            queues[queue]["oldest_pending_age_s"] = max((read.now - due).total_seconds(), 0.0)
    if read.timing_summary is not None:
        timings = {queue: _timings_from_summary(row) for queue, row in read.timing_summary.items()}
    else:
        timings = _timings_in_pandas(read.timing_rows)
    for queue, values in timings.items():
        if queue in queues:
            completed = values.pop("completed_in_window")
            queues[queue].update(values, throughput_per_s=completed / seconds)
    for queue, jobs in (unrunnable or {}).items():
        if queue in queues:
            queues[queue]["unrunnable"] = jobs
    return with_lag(typed_frame([queues[queue] for queue in sorted(queues)], STATS_COLUMNS), store)


def _count_rows(rows: Sequence[Any]) -> dict[str, dict[str, Any]]:
    queues: dict[str, dict[str, Any]] = {}
    for queue, status, jobs in rows:
        record = queues.setdefault(queue, {"queue": queue, **dict.fromkeys(_STATUSES, 0),
                                           "oldest_pending_age_s": float("nan"),
                                           **dict.fromkeys(_TIMINGS, float("nan")), "throughput_per_s": 0.0,
                                           "unrunnable": 0})
        if status in _STATUSES:
            record[status] += jobs
    return queues


def _timings_from_summary(row: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one queue as the database aggregated them (PostgreSQL)."""
    values = {"completed_in_window": int(row["completed_in_window"]),
              "wait_s_mean": _float(row["wait_s_mean"]), "run_s_mean": _float(row["run_s_mean"])}
    for name in ("wait", "run"):
        p50, p95 = row[name] or (None, None)  # NULL when every value was NULL
        values.update({f"{name}_s_p50": _float(p50), f"{name}_s_p95": _float(p95)})
    return values


def _timings_in_pandas(rows: Sequence[Any]) -> dict:
    """The same figures from the window's rows, where the database has no percentile aggregate."""
    frame = pd.DataFrame(rows, columns=["queue", "wait", "run"]).astype({"wait": "float64", "run": "float64"})
    timings = {}
    for queue, group in frame.groupby("queue", sort=False):
        values = {"completed_in_window": int(group["run"].count())}
        for column in ("wait", "run"):
            series = group[column].dropna()
            values[f"{column}_s_mean"] = series.mean() if len(series) else float("nan")
            values[f"{column}_s_p50"] = series.quantile(0.5) if len(series) else float("nan")
            values[f"{column}_s_p95"] = series.quantile(0.95) if len(series) else float("nan")
        timings[queue] = values
    return timings


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


# -- dead letters -----------------------------------------------------------------

#: ``Type: message`` as the worker writes it (``type(error).__name__``, maybe dotted).
_TYPED_ERROR = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*): ?(.*)")
#: Reasons the driver itself writes, which have no exception type.
_DRIVER_REASONS = {"lease expired": "LeaseExpired", "could not rebuild job": "UnbuildableJob"}


def split_error(last_error: str | None) -> tuple[str, str]:
    """``(error_type, error_message)`` from the first line of ``last_error``.

    The worker writes ``Type: message`` then the traceback; a lease that ran
    out is ``LeaseExpired`` and a row whose job could not be rebuilt
    ``UnbuildableJob`` (the whole line is the message); anything else is
    ``UnknownError``, so ``groupby("error_type")`` never drops a row.
    """
    line = (last_error or "").split("\n", 1)[0].strip()
    for prefix, error_type in _DRIVER_REASONS.items():
        if line.startswith(prefix):
            return error_type, line
    match = _TYPED_ERROR.fullmatch(line)
    if match:
        return match.group(1), match.group(2)
    return "UnknownError", line


def dead_letter_jobs(store: JobStore, queue: str | None = None, batch: str | None = None) -> pd.DataFrame:
    """The dead letters (of a queue and/or batch), newest first, payload decoded, error split."""
    return with_lag(dead_letter_frame(store.read_dead_letters(DEAD_LETTER_SOURCE_COLUMNS, queue, batch)), store)


def dead_letter_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per dead letter, payload decoded (kept as text if it is not JSON)."""
    records = []
    for row in rows:
        error_type, error_message = split_error(row["last_error"])
        records.append({**row, "payload": _decode_or_keep(row["payload"]), "error_type": error_type,
                        "error_message": error_message})
    return typed_frame(records, DEAD_LETTER_COLUMNS)


def _decode_or_keep(text: str | None) -> Any:
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return text


def stats_html(frame: pd.DataFrame, title: str) -> str:
    """A small HTML summary of a stats frame, for ``_repr_html_``."""
    import html

    shown = frame[["queue", *_STATUSES, "oldest_pending_age_s", "run_s_p50", "throughput_per_s"]]
    body = shown.to_html(index=False, na_rep="-", float_format=lambda value: f"{value:.2f}") if len(frame) \
        else "<p>no jobs</p>"
    return f"<div><b>{html.escape(title)}</b>{body}</div>"


def stats_html_error(title: str, error: Exception) -> str:
    """What ``_repr_html_`` shows when the database cannot be read."""
    import html

    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"<div><b>{html.escape(title)}</b><p>stats unavailable: {html.escape(reason)}</p></div>"
