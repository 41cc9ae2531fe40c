"""The jobs' history as a DataFrame, and pruning it so the table does not grow forever."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pandas as pd

from .analytics import typed_frame, with_lag
from .errors import InvalidInputError
from .job import JobStatus
from .progress import decode_info

if TYPE_CHECKING:
    from .store import JobStore

JOB_COLUMNS = {
    "id": "object",
    "name": "object",
    "queue": "object",
    "status": "object",
    "batch_id": "object",
    "key": "object",
    "attempts": "int64",
    "max_retries": "int64",
    "created_at": "datetime64[ns, UTC]",
    "available_at": "datetime64[ns, UTC]",
    "reserved_at": "datetime64[ns, UTC]",
    "finished_at": "datetime64[ns, UTC]",
    "reserved_by": "object",
    "last_error": "object",
    "wait_s": "float64",
    "run_s": "float64",
    # What a running job last reported (current_job().progress) and when it last saved a checkpoint.
    "progress_done": "float64",
    "progress_total": "float64",
    "progress_info": "object",
    "progress_at": "datetime64[ns, UTC]",
    "checkpoint_at": "datetime64[ns, UTC]",
}
#: Columns computed here rather than read.
_COMPUTED = ("wait_s", "run_s")

_STATUSES = tuple(status.value for status in JobStatus)
#: Rows deleted per transaction by prune: short enough never to hold locks for long.
PRUNE_CHUNK = 10_000


def jobs(store: JobStore, queue: str | None = None, name: str | None = None,
         status: str | Iterable[str] | None = None, batch: str | None = None,
         since: datetime | timedelta | None = None, until: datetime | timedelta | None = None,
         limit: int | None = 1000) -> pd.DataFrame:
    """Jobs matching every filter given, newest (by ``created_at``) first, at most ``limit``.

    ``since``/``until`` bound ``created_at`` (``since <= created_at < until``):
    a timezone-aware datetime, or a timedelta meaning that long before now
    (``since=timedelta(hours=1)``: created in the last hour).  ``wait_s`` is
    claim minus due time, ``run_s`` finish minus claim of the last attempt
    (NaN where the job has not got that far).  ``progress_*`` are the job's
    last report from ``current_job().progress()`` (details decoded) and
    ``checkpoint_at`` when it last saved a checkpoint.  Payloads, results and
    checkpoints are not read (they can be large): ``driver.get_job(id)`` has the first two.
    """
    for value, what in ((queue, "queue"), (name, "name"), (batch, "batch")):
        if value is not None and not isinstance(value, str):
            raise InvalidInputError(f"{what} must be a str, got {type(value).__name__}")
    statuses = _statuses(status) if status is not None else None
    since_bound = time_bound(since, "since") if since is not None else None
    until_bound = time_bound(until, "until") if until is not None else None
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidInputError(f"limit must be an int >= 1 or None, got {limit!r}")
    read = [column for column in JOB_COLUMNS if column not in _COMPUTED]
    rows = store.read_history(read, queue=queue, name=name, statuses=statuses, batch=batch, since=since_bound,
                              until=until_bound, limit=limit)
    for row in rows:
        row["progress_info"] = decode_info(row["progress_info"])
    frame = typed_frame(rows, {column: JOB_COLUMNS[column] for column in read})
    frame["wait_s"] = (frame["reserved_at"] - frame["available_at"]).dt.total_seconds().astype("float64")
    frame["run_s"] = (frame["finished_at"] - frame["reserved_at"]).dt.total_seconds().astype("float64")
    return with_lag(frame[list(JOB_COLUMNS)], store)


def _statuses(status: str | Iterable[str]) -> list[str]:
    statuses = [status] if isinstance(status, str) else list(status)
    unknown = [value for value in statuses if str(value) not in _STATUSES]
    if unknown or not statuses:
        raise InvalidInputError(f"unknown status {unknown or statuses!r}: use one or more of {', '.join(_STATUSES)}")
    return [str(value) for value in statuses]


def time_bound(value: Any, what: str) -> datetime | float:
    """A bound on created_at for the store: a timezone-aware datetime, or a timedelta as seconds before now."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidInputError(f"{what} must be timezone-aware (e.g. datetime.now(timezone.utc)), "
                                    f"got {value!r}")
        return value.to_pydatetime() if isinstance(value, pd.Timestamp) else value
    raise InvalidInputError(f"{what} must be a timezone-aware datetime or a timedelta, got {type(value).__name__}")


def prune(store: JobStore, older_than: timedelta | float, *, dead_letters: bool = False,
          chunk_size: int = PRUNE_CHUNK) -> int:
    """Delete completed and cancelled jobs (and dead letters if asked) finished more than ``older_than`` ago.

    Works oldest first in transactions of about ``chunk_size`` rows, so
    pruning millions of rows never holds one long lock and claims go on
    meanwhile.  Returns how many rows went.
    """
    seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
        raise InvalidInputError(f"older_than must be a timedelta or seconds >= 0, got {older_than!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    statuses = [JobStatus.COMPLETED.value, JobStatus.CANCELLED.value] + ([JobStatus.FAILED.value] if dead_letters
                                                                         else [])
    return store.prune_finished(float(seconds), statuses, chunk_size)
