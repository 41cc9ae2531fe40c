"""DatabaseQueueDriver: the seed's queue API over one SQL table.

Every state change is one short transaction guarded by an ownership check, so
a late or duplicate ``complete``/``release``/``fail`` from a worker that lost
its reservation changes nothing.  Dialect differences live in
:mod:`kronix_data.dialects`; this module holds none.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
import sqlalchemy as sa

from . import analytics, history
from .batches import Batch, batches_frame, find_batch
from .chunking import enqueue_chunks
from .dialects import dialect_for, make_engine
from .job import (Job, JobStatus, decode_json, encode_payload, encode_result, new_job_id, possible_job_id,
                  validate_job, validate_queue)
from .tasks import Task, task_factory
from .schema import PENDING, PROCESSING, build_table, create_or_upgrade

log = logging.getLogger(__name__)

JobFactory = Callable[[Any], Job]


def default_worker_id() -> str:
    """Host, process id and a random part: unique across machines and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


#: Stale jobs recovered per transaction.
_RECOVERY_BATCH = 1000


def _seconds(value: timedelta | float) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class DatabaseQueueDriver:
    """A job queue in one SQL table, shared by any number of workers.

    Parameters
    ----------
    db
        A SQLAlchemy ``Engine`` or a database URL (``sqlite:///jobs.db``,
        ``postgresql+psycopg://user@host/db``, ``mysql+pymysql://root@host/db``;
        ``postgresql://`` and ``mysql://`` get those drivers).
    table
        The table name, optionally ``schema.table``; validated as an identifier.
    worker_id
        Who holds the jobs this driver pops; unique per process by default.
    """

    def __init__(self, db: sa.Engine | str, table: str = "kronix_jobs", worker_id: str | None = None):
        self.engine = make_engine(db)
        self.dialect = dialect_for(self.engine)
        self.table = build_table(table, partial_indexes=self.dialect.partial_indexes,
                                 now_default=self.dialect.now_default)
        self.table_name = table
        #: Where workers are woken when jobs arrive (PostgreSQL LISTEN/NOTIFY).
        self.channel = f"kronix_{table.replace('.', '_')}"[:63]
        self.worker_id = worker_id or default_worker_id()
        self._writer = self.dialect.writer(self.engine)
        self._reader = self.dialect.reader(self.engine)
        self._factories: dict[str, JobFactory] = {}

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"DatabaseQueueDriver({url!r}, table={self.table_name!r}, worker_id={self.worker_id!r})"

    def close(self) -> None:
        """Close the pooled connections of an engine this driver made."""
        self.engine.dispose()

    def __enter__(self) -> DatabaseQueueDriver:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # -- schema -----------------------------------------------------------

    def create_table(self) -> None:
        """Create the jobs table and its indexes, or upgrade an existing one in place.

        Safe to call from many workers at once: a lost race (MySQL's DDL is
        not transactional, so another process may add the same index between
        our look and our write) is retried against what the winner made.
        """
        attempts = 5
        for attempt in range(1, attempts + 1):
            try:
                with self._writer.begin() as conn:
                    create_or_upgrade(conn, self.table, self.dialect.now())
                return
            except sa.exc.DBAPIError:
                if attempt == attempts:
                    raise
                log.info("create_table lost a race with another process; checking again")
                time.sleep(0.05 * attempt)

    def drop_table(self) -> None:
        """Drop the jobs table and everything in it (for demos and tests)."""
        with self._writer.begin() as conn:
            self.table.drop(conn, checkfirst=True)

    def register_job_factory(self, name: str, factory: JobFactory) -> None:
        """Rebuild jobs named ``name`` on ``pop`` with ``factory(payload) -> Job``.

        Factories registered here come first; then functions registered with
        :func:`kronix_data.task` in this process; otherwise ``pop`` returns a plain Job.
        """
        if not callable(factory):
            raise TypeError(f"factory for {name!r} must be callable, got {type(factory).__name__}")
        self._factories[name] = factory

    # -- producing --------------------------------------------------------

    def push(self, job: Job, queue: str | None = None) -> str:
        """Store one job and return its id; ``queue`` overrides ``job.queue``."""
        return self.push_many([job], queue)[0]

    def push_many(self, jobs: Iterable[Job], queue: str | None = None) -> list[str]:
        """Store many jobs in one transaction and return their ids, in order.

        Every job is validated and serialised before anything is written, so a
        bad one leaves the table untouched.  A job whose ``key`` is already in
        the table is not stored again: its id is the existing job's, so pushing
        the same keyed jobs twice is a no-op that returns the same ids.
        """
        jobs = list(jobs)
        rows = [self._row_for_push(job, queue) for job in jobs]
        if not rows:
            return []
        keyed = [row for row in rows if row["job_key"] is not None]
        distinct_keys = {row["job_key"] for row in keyed}
        if len(distinct_keys) < len(keyed):
            raise ValueError("two jobs in one push share a key; keys must be unique")
        try:
            with self._writer.begin() as conn:
                plain = [row for row in rows if row["job_key"] is None]
                if plain:
                    self.dialect.insert(conn, self.table, plain)
                if keyed:
                    self._insert_keyed(conn, keyed)
                self.dialect.notify(conn, self.channel)  # one wake-up per batch, not per row
        except sa.exc.IntegrityError as error:
            raise ValueError(f"a job id is already in table {self.table_name!r}: {error.orig}") from error
        for job, row in zip(jobs, rows):
            job.id, job.queue, job.status = row["id"], row["queue"], JobStatus.PENDING
        return [row["id"] for row in rows]

    def _insert_keyed(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        """Insert keyed rows that are new; point the others' ids at the stored jobs."""
        c = self.table.c
        self.dialect.insert_new_keys(conn, self.table, rows)
        stored: dict[str, str] = {}
        for start in range(0, len(rows), 1000):  # stay under every database's bound-parameter limit
            keys = [row["job_key"] for row in rows[start:start + 1000]]
            stored.update(conn.execute(sa.select(c.job_key, c.id).where(c.job_key.in_(keys))).all())
        for row in rows:
            if row["job_key"] not in stored:  # MySQL swallowed a duplicate id
                raise ValueError(f"job id {row['id']!r} is already in table {self.table_name!r}")
            row["id"] = stored[row["job_key"]]

    def _row_for_push(self, job: Job, queue: str | None) -> dict[str, Any]:
        if not isinstance(job, Job):
            raise TypeError(f"push takes Job objects, got {type(job).__name__}")
        queue = job.queue if queue is None else queue
        validate_job(job, queue)
        return {
            "id": job.id or new_job_id(),
            "name": job.name,
            "queue": queue,
            "status": JobStatus.PENDING.value,
            "attempts": 0,
            "max_retries": job.max_retries,
            "payload": encode_payload(job),
            "job_key": job.key,
            "batch_id": job.batch_id,
            "due": job.available_at,
        }

    # -- consuming --------------------------------------------------------

    def pop(self, queue: str = "default") -> Job | None:
        """Claim the oldest due job of ``queue``, or return None if there is none."""
        while True:
            jobs, claimed = self._claim(1, queue)
            if jobs or not claimed:
                return jobs[0] if jobs else None

    def pop_many(self, n: int, queue: str = "default") -> list[Job]:
        """Claim up to ``n`` due jobs of ``queue`` in one transaction, oldest first."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"pop_many needs n >= 1, got {n!r}")
        return self._claim(n, queue)[0]

    def complete_and_pop(self, completed: Iterable[Job], n: int,
                         queues: Sequence[str] = ("default",)) -> tuple[int, list[Job]]:
        """Complete finished jobs and claim up to ``n`` more, in one transaction.

        A busy worker's step: one commit (a durable flush, the dominant cost of
        a queue) where completing and claiming apart would take two.  Queues are
        claimed in order.  Returns how many completions were held, and the jobs.
        """
        completed = list(completed)
        rows: list[dict[str, Any]] = []
        with self._writer.begin() as conn:
            held = self._complete(conn, completed) if completed else 0
            for queue in queues:
                if len(rows) >= n:
                    break
                rows += self._claim_rows(conn, n - len(rows), queue)
        return held, self._jobs_from_claimed(rows)

    def _claim(self, n: int, queue: str) -> tuple[list[Job], int]:
        """Claimed jobs that could be rebuilt, and how many rows were claimed."""
        with self._writer.begin() as conn:
            rows = self._claim_rows(conn, n, queue)
        return self._jobs_from_claimed(rows), len(rows)

    def _claim_rows(self, conn: sa.Connection, n: int, queue: str) -> list[dict[str, Any]]:
        validate_queue(queue)
        changes = {"status": JobStatus.PROCESSING.value, "reserved_by": self.worker_id}
        rows = self.dialect.claim(conn, self.table, queue, n, changes)
        rows.sort(key=lambda row: (row["available_at"], row["id"]))
        return rows

    def _jobs_from_claimed(self, rows: list[dict[str, Any]]) -> list[Job]:
        """Rebuild claimed rows as jobs.

        A row whose payload is not JSON or whose factory raises is moved to the
        dead letters with the reason, never left held (the seed stranded it).
        """
        jobs, broken = [], []
        for row in rows:
            # What the claim set, so it need not be read back.
            row.update(status=JobStatus.PROCESSING.value, reserved_by=self.worker_id, finished_at=None, result=None)
            try:
                jobs.append(self._job_from_row(row, use_factory=True))
            except Exception as error:  # noqa: BLE001 - any factory error is the job's fault
                broken.append((row, f"could not rebuild job {row['name']!r}: {type(error).__name__}: {error}"))
        for row, reason in broken:
            log.error("dead-lettering job %s: %s", row["id"], reason)
            stub = Job(row["name"], id=row["id"], attempts=row["attempts"], last_error=reason)
            self.fail(stub)
        return jobs

    def _job_from_row(self, row: dict[str, Any], *, use_factory: bool) -> Job:
        payload = decode_json(row["payload"])
        factory = (self._factories.get(row["name"]) or task_factory(row["name"])) if use_factory else None
        job = factory(payload) if factory else Job(row["name"], payload)
        if not isinstance(job, Job):
            raise TypeError(f"factory returned {type(job).__name__}, not a Job")
        job.name = row["name"]
        job.payload = payload
        for column in ("id", "queue", "attempts", "max_retries", "last_error", "created_at",
                       "available_at", "reserved_by", "reserved_at", "finished_at", "batch_id"):
            setattr(job, column, row[column])
        job.key = row["job_key"]
        job.status = JobStatus(row["status"])
        job.result = decode_json(row["result"])
        return job

    # -- finishing --------------------------------------------------------

    def _held(self, job: Job) -> sa.ColumnElement[bool]:
        """The ownership rule: this worker still holds this very attempt."""
        c = self.table.c
        return sa.and_(c.id == job.id, c.reserved_by == self.worker_id,
                       c.attempts == job.attempts, c.status == PROCESSING)

    def _finish(self, job: Job, values: dict[str, Any]) -> bool:
        if job.id is None:
            return False
        with self._writer.begin() as conn:
            changed = conn.execute(self.dialect.update_by_id(self.table).where(self._held(job)).values(values)).rowcount
        return changed == 1

    def complete(self, job: Job) -> bool:
        """Mark a held job completed, storing ``job.result``; False if not held."""
        return self.complete_many([job]) == 1

    def complete_many(self, jobs: Iterable[Job]) -> int:
        """Complete many held jobs in one transaction; returns how many were held."""
        with self._writer.begin() as conn:
            return self._complete(conn, list(jobs))

    def _complete(self, conn: sa.Connection, jobs: list[Job]) -> int:
        """Jobs without a result are completed by one statement matching
        ``(id, attempts)`` pairs: PyMySQL runs an executemany of UPDATEs as one
        round trip per row, which made MariaDB completions cost a round trip each.
        """
        jobs = [job for job in jobs if job.id is not None]
        values = {"status": JobStatus.COMPLETED.value, "finished_at": self.dialect.now(), "heartbeat_at": None}
        with_result = [job for job in jobs if job.result is not None]
        without = [job for job in jobs if job.result is None]
        c = self.table.c
        changed = 0
        for start in range(0, len(without), 500):
            pairs = [(job.id, job.attempts) for job in without[start:start + 500]]
            statement = (self.dialect.update_by_id(self.table)
                         .where(sa.tuple_(c.id, c.attempts).in_(pairs), c.reserved_by == self.worker_id,
                                c.status == PROCESSING)
                         .values(values))
            changed += conn.execute(statement).rowcount
        if with_result:
            changed += self._update_held(conn, with_result, {**values, "result": sa.bindparam("job_result")},
                                         lambda job: {"job_result": encode_result(job)})
        return changed

    def unclaim(self, jobs: Iterable[Job]) -> int:
        """Give back held jobs that were never started: pending again, the attempt not counted.

        A worker that stops calls this for what it claimed but did not run.
        """
        c = self.table.c
        with self._writer.begin() as conn:
            return self._update_held(conn, jobs, {"status": JobStatus.PENDING.value, "attempts": c.attempts - 1,
                                                  "reserved_by": None, "reserved_at": None, "heartbeat_at": None})

    def heartbeat(self, jobs: Iterable[Job]) -> int:
        """Renew the lease of held jobs so stale recovery leaves them alone; returns how many."""
        ids = [job.id for job in jobs if job.id is not None]
        if not ids:
            return 0
        c = self.table.c
        statement = (self.dialect.update_by_id(self.table)
                     .where(c.id.in_(ids), c.reserved_by == self.worker_id, c.status == PROCESSING)
                     .values(heartbeat_at=self.dialect.now()))
        with self._writer.begin() as conn:
            return conn.execute(statement).rowcount

    def _update_held(self, conn: sa.Connection, jobs: Iterable[Job], values: dict[str, Any],
                     extra: Callable[[Job], dict[str, Any]] = lambda job: {}) -> int:
        """One statement run for each held job (ownership checked per row)."""
        c = self.table.c
        params = [{"job_id": job.id, "job_attempts": job.attempts, **extra(job)}
                  for job in jobs if job.id is not None]
        if not params:
            return 0
        statement = (
            self.dialect.update_by_id(self.table)
            .where(c.id == sa.bindparam("job_id"), c.attempts == sa.bindparam("job_attempts"),
                   c.reserved_by == self.worker_id, c.status == PROCESSING)
            .values(values)
        )
        return conn.execute(statement, params).rowcount

    def release(self, job: Job, *, delay: timedelta | float | None = None) -> bool:
        """Put a held job back as pending, with ``job.last_error``, for a later retry.

        It becomes due at ``job.available_at`` or, if ``delay`` is given, that
        long after now by the database's clock.
        """
        if delay is not None:
            due = self.dialect.now_plus(_seconds(delay))
        elif job.available_at is not None:
            due = job.available_at
        else:
            due = self.dialect.now()
        return self._finish(job, {"status": JobStatus.PENDING.value, "available_at": due,
                                  "last_error": job.last_error, "reserved_by": None,
                                  "reserved_at": None, "heartbeat_at": None})

    def fail(self, job: Job) -> bool:
        """Move a held job to the dead letters with ``job.last_error``."""
        return self._finish(job, {"status": JobStatus.FAILED.value, "last_error": job.last_error,
                                  "finished_at": self.dialect.now(), "heartbeat_at": None})

    # -- maintenance ------------------------------------------------------

    def recover_stale_jobs(self, timeout: timedelta | float = timedelta(minutes=5)) -> int:
        """Return jobs held past ``timeout`` without a heartbeat to pending.

        A job whose attempts are used up goes to the dead letters instead, so a
        job that kills its worker cannot crash-loop forever.  Returns how many
        jobs were changed.
        """
        seconds = _seconds(timeout)
        if seconds < 0:
            raise ValueError(f"timeout must not be negative, got {timeout!r}")
        c = self.table.c
        exhausted = c.attempts > c.max_retries
        note = sa.literal(f"lease expired: no heartbeat for {seconds:g}s from worker ") + sa.func.coalesce(
            c.reserved_by, "?")
        stale = sa.and_(c.status == PROCESSING, c.heartbeat_at < self.dialect.now_plus(-seconds))
        statement = (
            self.dialect.update_by_id(self.table)
            .where(stale, c.id.in_(sa.bindparam("stale_ids", expanding=True)))
            # Ordered: MySQL evaluates SET left to right, so reserved_by is read before it is cleared.
            .ordered_values(
                (c.last_error, sa.case((exhausted, note + sa.literal("; attempts used up")), else_=note)),
                (c.status, sa.case((exhausted, JobStatus.FAILED.value), else_=JobStatus.PENDING.value)),
                (c.finished_at, sa.case((exhausted, self.dialect.now()), else_=sa.null())),
                (c.reserved_by, sa.case((exhausted, c.reserved_by), else_=sa.null())),
                (c.reserved_at, sa.case((exhausted, c.reserved_at), else_=sa.null())),
                (c.heartbeat_at, sa.null()),
            )
        )
        changed = 0
        while True:  # in batches: the ids are bound parameters, and drivers cap how many a statement takes
            with self._writer.begin() as conn:
                # Rows another transaction holds are passed by, never waited for: a worker cut off
                # mid-transaction keeps its locks until the server drops its session.
                ids = self.dialect.lock_rows(conn, self.table, stale, limit=_RECOVERY_BATCH)
                changed += conn.execute(statement, {"stale_ids": ids}).rowcount if ids else 0
            if len(ids) < _RECOVERY_BATCH:
                return changed

    def size(self, queue: str = "default") -> int:
        """How many jobs of ``queue`` are pending (due now or later)."""
        validate_queue(queue)
        c = self.table.c
        with self._reader.connect() as conn:
            return conn.execute(
                sa.select(sa.func.count()).select_from(self.table).where(c.queue == queue, c.status == PENDING)
            ).scalar_one()

    def clear(self, queue: str = "default") -> int:
        """Delete the pending jobs of ``queue``; jobs being run are never touched."""
        validate_queue(queue)
        c = self.table.c
        with self._writer.begin() as conn:
            return conn.execute(self.table.delete().where(c.queue == queue, c.status == PENDING)).rowcount

    def clear_dead_letters(self, queue: str | None = None) -> int:
        """Delete the dead letters (of one queue, or all); returns how many."""
        c = self.table.c
        condition = c.status == JobStatus.FAILED.value
        if queue is not None:
            condition = sa.and_(condition, c.queue == queue)
        with self._writer.begin() as conn:
            return conn.execute(self.table.delete().where(condition)).rowcount

    def retry_dead_letter(self, job_id: str) -> bool:
        """Give a dead-lettered job a fresh start (pending, attempts 0); False if no such job."""
        if not possible_job_id(job_id):
            return False
        return self._retry_dead_letters(self.table.c.id == job_id) == 1

    def retry_dead_letters(self, queue: str | None = None, name: str | None = None, batch: str | None = None) -> int:
        """Retry every dead letter (of one queue, job name and/or batch); returns how many."""
        c = self.table.c
        conditions = [c.queue == queue] if queue is not None else []
        conditions += [c.name == name] if name is not None else []
        conditions += [c.batch_id == batch] if batch is not None else []
        return self._retry_dead_letters(*conditions)

    def _retry_dead_letters(self, *conditions: sa.ColumnElement[bool]) -> int:
        c = self.table.c
        statement = (
            self.table.update()
            .where(c.status == JobStatus.FAILED.value, *conditions)
            .values(status=JobStatus.PENDING.value, attempts=0, last_error=None, available_at=self.dialect.now(),
                    finished_at=None, reserved_by=None, reserved_at=None, heartbeat_at=None)
        )
        with self._writer.begin() as conn:
            changed = conn.execute(statement).rowcount
            if changed:
                self.dialect.notify(conn, self.channel)
        return changed

    # -- reading ----------------------------------------------------------

    def get_job(self, job_id: str) -> Job | None:
        """The job with this id as stored (a plain Job, result decoded), or None."""
        if not possible_job_id(job_id):
            return None
        with self._reader.connect() as conn:
            row = conn.execute(sa.select(self.table).where(self.table.c.id == job_id)).mappings().first()
        return None if row is None else self._job_from_row(dict(row), use_factory=False)

    def dead_letter_jobs(self, queue: str | None = None, batch: str | None = None) -> pd.DataFrame:
        """The dead letters (of a queue and/or batch), newest first, payload decoded.

        Columns: see :data:`kronix_data.analytics.DEAD_LETTER_COLUMNS`; ``error_type``
        and ``error_message`` come from ``last_error``'s first line, so
        ``df.groupby("error_type")`` works.
        """
        return analytics.dead_letter_jobs(self, queue, batch)

    def fetch_stats(self, window: timedelta | float = timedelta(hours=1)) -> pd.DataFrame:
        """Per queue: counts by status, oldest pending age, wait/run means and percentiles and
        throughput over the jobs finished in the last ``window`` (see :func:`kronix_data.analytics.fetch_stats`)."""
        return analytics.fetch_stats(self, window)

    def jobs(self, queue: str | None = None, name: str | None = None, status: str | Iterable[str] | None = None,
             batch: str | None = None, since: datetime | timedelta | None = None,
             until: datetime | timedelta | None = None, limit: int | None = 1000) -> pd.DataFrame:
        """The jobs' history, newest first; ``since``/``until`` bound ``created_at``
        (see :func:`kronix_data.history.jobs`)."""
        return history.jobs(self, queue, name, status, batch, since, until, limit)

    def prune(self, older_than: timedelta | float, *, dead_letters: bool = False,
              chunk_size: int = history.PRUNE_CHUNK) -> int:
        """Delete completed jobs (and dead letters if ``dead_letters``) finished more than
        ``older_than`` ago, ``chunk_size`` rows per transaction; returns how many."""
        return history.prune(self, older_than, dead_letters=dead_letters, chunk_size=chunk_size)

    # -- batches ----------------------------------------------------------

    def map(self, name: str | Task, data: Any, chunk_size: int = 10_000, *, queue: str | None = None,
            batch: str | None = None, max_retries: int | None = None) -> Batch:
        """Enqueue ``data`` in chunks as jobs ``name``; idempotent (see :func:`kronix_data.enqueue_chunks`)."""
        return enqueue_chunks(self, name, data, chunk_size, queue=queue, batch=batch, max_retries=max_retries)

    def batch(self, batch_id: str) -> Batch:
        """The Batch with this id (after a kernel restart, say); LookupError if no job has it."""
        return find_batch(self, batch_id)

    def batches(self, since: datetime | timedelta | None = None) -> pd.DataFrame:
        """One row per batch, newest first: counts by status, created_at, latest finished_at;
        ``since`` keeps those with a job created since then (see :func:`kronix_data.batches.batches_frame`)."""
        return batches_frame(self, since)

    def _repr_html_(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        title = f"kronix queue: table {self.table_name} on {url}"
        try:
            return analytics.stats_html(self.fetch_stats(), title)
        except sa.exc.SQLAlchemyError as error:  # a notebook repr must not raise
            return analytics.stats_html_error(title, error)
