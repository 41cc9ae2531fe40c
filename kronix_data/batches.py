"""The Batch handle: follow, wait for and collect the chunk jobs of one enqueue.

A Batch is only an id and a driver; everything it shows is read from the
table (through the ``<table>_batch`` index on ``(batch_id, status)``), so a
handle found again after a kernel restart (``driver.batch(batch_id)``) knows
as much as the one ``enqueue_chunks`` returned.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pandas as pd
import sqlalchemy as sa

from .analytics import typed_frame
from .job import JobStatus, decode_json

if TYPE_CHECKING:
    from .driver import DatabaseQueueDriver

_STATUSES = tuple(status.value for status in JobStatus)

#: The columns of ``driver.batches()``.
BATCH_COLUMNS = {
    "batch_id": "object",
    "name": "object",
    "total": "int64",
    "pending": "int64",
    "processing": "int64",
    "completed": "int64",
    "failed": "int64",
    "created_at": "datetime64[ns, UTC]",
    "finished_at": "datetime64[ns, UTC]",
}


class Batch:
    """The chunk jobs of one :func:`~kronix_data.enqueue_chunks` call (same ``batch_id``).

    Attributes
    ----------
    id
        The batch id; ``driver.batch(id)`` finds the batch again later.
    driver
        The queue its jobs are in.
    name
        The job name of its chunks (None if unknown).
    """

    def __init__(self, id: str, driver: DatabaseQueueDriver, name: str | None = None):
        self.id = id
        self.driver = driver
        self.name = name

    def __repr__(self) -> str:
        return f"Batch({self.id!r}, name={self.name!r}, table={self.driver.table_name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Batch) and (self.id, self.driver.table_name, str(self.driver.engine.url)) == (
            other.id, other.driver.table_name, str(other.driver.engine.url))

    def __hash__(self) -> int:
        return hash((self.id, self.driver.table_name))

    # -- progress -----------------------------------------------------------

    def progress(self) -> dict[str, int]:
        """Chunk counts: ``{"total", "pending", "processing", "completed", "failed"}``."""
        c = self.driver.table.c
        statement = sa.select(c.status, sa.func.count()).where(c.batch_id == self.id).group_by(c.status)
        with self.driver._reader.connect() as conn:
            counts = dict(conn.execute(statement).all())
        result = {"total": sum(counts.values())}
        result.update({status: int(counts.get(status, 0)) for status in _STATUSES})
        return result

    @property
    def done(self) -> bool:
        """True when no chunk is pending or processing (each completed or dead-lettered)."""
        counts = self.progress()
        return counts["pending"] + counts["processing"] == 0

    def wait(self, progress: bool = True, timeout: float | None = None, poll_interval: float = 0.5) -> Batch:
        """Block until the batch is done, with a tqdm bar (terminal or Jupyter) unless ``progress=False``.

        Dead-lettered chunks count as finished (the bar shows how many failed);
        look at :meth:`failures`.  Returns the batch, so ``batch.wait().results()`` reads well.

        Raises
        ------
        TimeoutError
            Not done after ``timeout`` seconds (the chunks keep running).
        """
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _progress_bar(self) if progress else None
        try:
            while True:
                counts = self.progress()
                if bar is not None:
                    _show(bar, counts)
                if counts["pending"] + counts["processing"] == 0:
                    return self
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"batch {self.id!r} is not done after {timeout}s: {counts}")
                remaining = poll_interval if deadline is None else min(poll_interval, deadline - time.monotonic())
                time.sleep(max(remaining, 0.0))
        finally:
            if bar is not None:
                bar.close()

    # -- outcomes -----------------------------------------------------------

    def results(self) -> pd.DataFrame:
        """The completed chunks' results, in chunk order.

        Columns ``chunk``, ``job_id``, ``result`` (one row per completed chunk).
        When every result is a list of records (dicts) or a dict of equal-length
        lists (``frame.to_dict("records")`` / ``to_dict("list")`` in the task),
        the results are concatenated into one DataFrame instead, with a
        ``chunk`` column first.
        """
        c = self.driver.table.c
        statement = (sa.select(c.id, c.job_key, c.result)
                     .where(c.batch_id == self.id, c.status == JobStatus.COMPLETED.value))
        with self.driver._reader.connect() as conn:
            rows = conn.execute(statement).all()
        chunk_of = self._chunk_numbers(rows)
        records = sorted(({"chunk": chunk_of[row.id], "job_id": row.id, "result": decode_json(row.result)}
                          for row in rows), key=lambda record: (record["chunk"], record["job_id"]))
        combined = _concatenate(records)
        if combined is not None:
            return combined
        return typed_frame(records, {"chunk": "int64", "job_id": "object", "result": "object"})

    def _chunk_numbers(self, rows: Sequence[Any]) -> dict[str, int]:
        """Chunk numbers from the keys ``f"{batch_id}:{n}"``; from the payload for a job pushed by hand."""
        numbers, unkeyed = {}, []
        prefix = f"{self.id}:"
        for row in rows:
            suffix = row.job_key[len(prefix):] if row.job_key and row.job_key.startswith(prefix) else ""
            if suffix.isdigit():
                numbers[row.id] = int(suffix)
            else:
                unkeyed.append(row.id)
        if unkeyed:
            c = self.driver.table.c
            with self.driver._reader.connect() as conn:
                for start in range(0, len(unkeyed), 1000):
                    for job_id, payload in conn.execute(sa.select(c.id, c.payload).where(
                            c.id.in_(unkeyed[start:start + 1000]))):
                        chunk = decode_json(payload).get("chunk") if payload and payload.startswith("{") else None
                        numbers[job_id] = int(chunk) if isinstance(chunk, int) else -1
        return numbers

    def failures(self) -> pd.DataFrame:
        """The dead-lettered chunks, same columns as ``driver.dead_letter_jobs()``."""
        return self.driver.dead_letter_jobs(batch=self.id)

    def retry_failures(self) -> int:
        """Run the dead-lettered chunks again (pending, attempts 0); returns how many."""
        return self.driver.retry_dead_letters(batch=self.id)

    # -- display ------------------------------------------------------------

    def _repr_html_(self) -> str:
        counts = self.progress()
        finished = counts["completed"] + counts["failed"]
        cells = "".join(f"<td>{counts[key]:,}</td>" for key in ("total", *_STATUSES))
        heads = "".join(f"<th>{key}</th>" for key in ("total", *_STATUSES))
        return (f"<div><b>Batch</b> <code>{html.escape(self.id)}</code> ({html.escape(str(self.name))}) "
                f"<progress value='{finished}' max='{max(counts['total'], 1)}'></progress> "
                f"{finished:,}/{counts['total']:,} finished"
                f"<table><tr>{heads}</tr><tr>{cells}</tr></table></div>")


def _concatenate(records: list[dict[str, Any]]) -> pd.DataFrame | None:
    """The concatenation of record-shaped results, or None if any result is not so shaped."""
    if not records:
        return None
    results = [record["result"] for record in records]
    if all(isinstance(result, list) and all(isinstance(item, Mapping) for item in result) for result in results):
        parts = [pd.DataFrame.from_records(result) for result in results]
    elif all(isinstance(result, Mapping) and result and _equal_length_lists(result) for result in results):
        parts = [pd.DataFrame(dict(result)) for result in results]
    else:
        return None
    for part, record in zip(parts, records):
        if "chunk" not in part.columns:
            part.insert(0, "chunk", record["chunk"])
    non_empty = [part for part in parts if len(part.columns)]
    if not non_empty:
        return pd.DataFrame({"chunk": pd.Series(dtype="int64")})
    return pd.concat(non_empty, ignore_index=True)


def _equal_length_lists(result: Mapping[str, Any]) -> bool:
    lengths = {len(value) if isinstance(value, list) else -1 for value in result.values()}
    return len(lengths) == 1 and -1 not in lengths


def _progress_bar(batch: Batch):
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError("Batch.wait(progress=True) needs tqdm: pip install 'kronix-data[notebook]' "
                          "(or pass progress=False)") from error
    return tqdm(total=0, desc=batch.name or batch.id, unit="chunk")


def _show(bar, counts: Mapping[str, int]) -> None:
    if bar.total != counts["total"]:
        bar.total = counts["total"]
    bar.n = counts["completed"] + counts["failed"]
    bar.set_postfix(failed=counts["failed"], running=counts["processing"], refresh=False)
    bar.refresh()


# -- finding batches ------------------------------------------------------------


def find_batch(driver: DatabaseQueueDriver, batch_id: str) -> Batch:
    """The Batch with this id (after a kernel restart, say); LookupError if no job has it."""
    if not isinstance(batch_id, str):
        raise TypeError(f"batch_id must be a str, got {type(batch_id).__name__}")
    c = driver.table.c
    with driver._reader.connect() as conn:
        names = conn.execute(sa.select(c.name).where(c.batch_id == batch_id).distinct().limit(2)).scalars().all()
    if not names:
        raise LookupError(f"no job has batch id {batch_id!r} in table {driver.table_name!r}")
    return Batch(batch_id, driver, names[0] if len(names) == 1 else None)


def batches_frame(driver: DatabaseQueueDriver, since: datetime | timedelta | None = None) -> pd.DataFrame:
    """One row per batch, newest first: counts by status, first creation, latest finish.

    ``since`` keeps the batches with a job created since then (a timezone-aware
    datetime, or a timedelta meaning that long ago), whole: found through the
    ``created_at`` index, then counted through the batch index, so a monitor
    refreshing it stays cheap on a big table.
    """
    from .history import time_bound

    c = driver.table.c
    statement = (sa.select(c.batch_id, c.status, sa.func.count().label("jobs"), sa.func.min(c.name).label("name"),
                           sa.func.max(c.name).label("other_name"),
                           sa.func.min(c.created_at).label("created_at"),
                           sa.func.max(c.finished_at).label("finished_at"))
                 .group_by(c.batch_id, c.status))
    with driver._reader.connect() as conn:
        if since is None:
            rows = conn.execute(statement.where(c.batch_id.is_not(None))).mappings().all()
        else:
            # Two steps, not a subquery: the planner cannot guess how few batches are
            # recent and would scan the whole table to join them.
            recent = conn.execute(sa.select(c.batch_id).distinct().where(
                c.batch_id.is_not(None), c.created_at >= time_bound(driver, since, "since"))).scalars().all()
            rows = []
            for start in range(0, len(recent), 1000):
                rows += conn.execute(statement.where(c.batch_id.in_(recent[start:start + 1000]))).mappings().all()
    return typed_frame(_fold_batches(rows), BATCH_COLUMNS)


def _fold_batches(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    batches: dict[str, dict[str, Any]] = {}
    for row in rows:
        batch = batches.setdefault(row["batch_id"], {"batch_id": row["batch_id"], "names": set(), "total": 0,
                                                     **dict.fromkeys(_STATUSES, 0),
                                                     "created_at": None, "finished_at": None})
        batch["names"].update((row["name"], row["other_name"]))
        batch["total"] += row["jobs"]
        if row["status"] in _STATUSES:
            batch[row["status"]] += row["jobs"]
        batch["created_at"] = _extreme(min, batch["created_at"], row["created_at"])
        batch["finished_at"] = _extreme(max, batch["finished_at"], row["finished_at"])
    for batch in batches.values():
        names = batch.pop("names")
        batch["name"] = names.pop() if len(names) == 1 else None
    return sorted(batches.values(), key=lambda batch: (batch["created_at"], batch["batch_id"]), reverse=True)


def _extreme(pick, current, value):
    return value if current is None else current if value is None else pick(current, value)
