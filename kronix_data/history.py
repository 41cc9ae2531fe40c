"""The jobs' history as a DataFrame, and pruning it so the table does not grow forever."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pandas as pd
import sqlalchemy as sa

from .analytics import typed_frame
from .job import JobStatus

if TYPE_CHECKING:
    from .driver import DatabaseQueueDriver

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
}

_STATUSES = tuple(status.value for status in JobStatus)
#: Rows deleted per transaction by prune: short enough never to hold locks for long.
PRUNE_CHUNK = 10_000


def jobs(driver: DatabaseQueueDriver, queue: str | None = None, name: str | None = None,
         status: str | Iterable[str] | None = None, batch: str | None = None,
         since: datetime | timedelta | None = None, until: datetime | timedelta | None = None,
         limit: int | None = 1000) -> pd.DataFrame:
    """Jobs matching every filter given, newest (by ``created_at``) first, at most ``limit``.

    ``since``/``until`` bound ``created_at`` (``since <= created_at < until``):
    a timezone-aware datetime, or a timedelta meaning that long before now
    (``since=timedelta(hours=1)``: created in the last hour).  ``wait_s`` is
    claim minus due time, ``run_s`` finish minus claim of the last attempt
    (NaN where the job has not got that far).  Payloads and results are not
    read (they can be large): ``driver.get_job(id)`` has them.
    """
    c = driver.table.c
    conditions = []
    for column, value, what in ((c.queue, queue, "queue"), (c.name, name, "name"), (c.batch_id, batch, "batch")):
        if value is not None:
            if not isinstance(value, str):
                raise TypeError(f"{what} must be a str, got {type(value).__name__}")
            conditions.append(column == value)
    if status is not None:
        conditions.append(c.status.in_(_statuses(status)))
    if since is not None:
        conditions.append(c.created_at >= time_bound(driver, since, "since"))
    if until is not None:
        conditions.append(c.created_at < time_bound(driver, until, "until"))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 or None, got {limit!r}")
    read = [c[column] for column in JOB_COLUMNS if column not in ("key", "wait_s", "run_s")]
    statement = (sa.select(*read, c.job_key.label("key")).where(*conditions)
                 .order_by(c.created_at.desc(), c.id.desc()).limit(limit))
    with driver._reader.connect() as conn:
        rows = conn.execute(statement).mappings().all()
    frame = typed_frame(rows, {column: dtype for column, dtype in JOB_COLUMNS.items() if column not in ("wait_s", "run_s")})
    frame["wait_s"] = (frame["reserved_at"] - frame["available_at"]).dt.total_seconds().astype("float64")
    frame["run_s"] = (frame["finished_at"] - frame["reserved_at"]).dt.total_seconds().astype("float64")
    return frame[list(JOB_COLUMNS)]


def _statuses(status: str | Iterable[str]) -> list[str]:
    statuses = [status] if isinstance(status, str) else list(status)
    unknown = [value for value in statuses if str(value) not in _STATUSES]
    if unknown or not statuses:
        raise ValueError(f"unknown status {unknown or statuses!r}: use one or more of {', '.join(_STATUSES)}")
    return [str(value) for value in statuses]


def time_bound(driver: DatabaseQueueDriver, value: Any, what: str) -> Any:
    """A bound on created_at: a timezone-aware datetime, or a timedelta before the database's now."""
    if isinstance(value, timedelta):
        return driver.dialect.now_plus(-value.total_seconds())
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{what} must be timezone-aware (e.g. datetime.now(timezone.utc)), got {value!r}")
        return sa.bindparam(f"kronix_{what}", value.to_pydatetime() if isinstance(value, pd.Timestamp) else value,
                            type_=driver.table.c.created_at.type)
    raise TypeError(f"{what} must be a timezone-aware datetime or a timedelta, got {type(value).__name__}")


def prune(driver: DatabaseQueueDriver, older_than: timedelta | float, *, dead_letters: bool = False,
          chunk_size: int = PRUNE_CHUNK) -> int:
    """Delete completed jobs (and dead letters if asked) finished more than ``older_than`` ago.

    Works oldest first in transactions of about ``chunk_size`` rows (each
    bounded by the ``finished_at`` of its last row, found through the
    ``<table>_finished`` index), so pruning millions of rows never holds one
    long lock and claims go on meanwhile.  Returns how many rows went.
    """
    seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
        raise ValueError(f"older_than must be a timedelta or seconds >= 0, got {older_than!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    c = driver.table.c
    statuses = [JobStatus.COMPLETED.value] + ([JobStatus.FAILED.value] if dead_letters else [])
    with driver._reader.connect() as conn:
        cutoff = conn.execute(sa.select(driver.dialect.now_plus(-float(seconds)))).scalar_one()
    prunable = sa.and_(c.finished_at < cutoff, c.status.in_(statuses))
    deleted = 0
    while True:
        with driver._writer.begin() as conn:
            boundary = conn.execute(sa.select(c.finished_at).where(prunable).order_by(c.finished_at)
                                    .offset(chunk_size - 1).limit(1)).scalar()
            last = boundary is None  # fewer than chunk_size left: take them all
            condition = prunable if last else sa.and_(prunable, c.finished_at <= boundary)
            deleted += conn.execute(driver.table.delete().where(condition)).rowcount
        if last:
            return deleted
