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
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import pandas as pd
import sqlalchemy as sa

from . import analytics
from .dialects import dialect_for, make_engine
from .job import (Job, JobStatus, decode_json, encode_payload, encode_result, new_job_id, possible_job_id,
                  validate_job, validate_queue)
from .tasks import task_factory
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

        Safe to call from many workers at once: a lost creation race is
        retried once against the table the winner made.
        """
        for attempt in (1, 2):
            try:
                with self._writer.begin() as conn:
                    create_or_upgrade(conn, self.table, self.dialect.now())
                return
            except sa.exc.DBAPIError:
                if attempt == 2:
                    raise
                log.info("create_table lost a race with another process; checking again")

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
        bad one leaves the table untouched.
        """
        jobs = list(jobs)
        rows = [self._row_for_push(job, queue) for job in jobs]
        if not rows:
            return []
        now = self.dialect.now()
        statement = self.table.insert().values(
            created_at=now,
            available_at=sa.func.coalesce(sa.bindparam("due", type_=self.table.c.available_at.type), now),
        )
        try:
            with self._writer.begin() as conn:
                conn.execute(statement, rows)
                self.dialect.notify(conn, self.channel)  # one wake-up per batch, not per row
        except sa.exc.IntegrityError as error:
            raise ValueError(f"a job id is already in table {self.table_name!r}: {error.orig}") from error
        for job, row in zip(jobs, rows):
            job.id, job.queue, job.status = row["id"], row["queue"], JobStatus.PENDING
        return [row["id"] for row in rows]

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

    def _claim(self, n: int, queue: str) -> tuple[list[Job], int]:
        """Claimed jobs that could be rebuilt, and how many rows were claimed.

        A row whose payload is not JSON or whose factory raises is moved to the
        dead letters with the reason, never left held (the seed stranded it).
        """
        validate_queue(queue)
        changes = {"status": JobStatus.PROCESSING.value, "reserved_by": self.worker_id}
        with self._writer.begin() as conn:
            rows = self.dialect.claim(conn, self.table, queue, n, changes)
        rows.sort(key=lambda row: (row["available_at"], row["id"]))
        jobs, broken = [], []
        for row in rows:
            try:
                jobs.append(self._job_from_row(row, use_factory=True))
            except Exception as error:  # noqa: BLE001 - any factory error is the job's fault
                broken.append((row, f"could not rebuild job {row['name']!r}: {type(error).__name__}: {error}"))
        for row, reason in broken:
            log.error("dead-lettering job %s: %s", row["id"], reason)
            stub = Job(row["name"], id=row["id"], attempts=row["attempts"], last_error=reason)
            self.fail(stub)
        return jobs, len(rows)

    def _job_from_row(self, row: dict[str, Any], *, use_factory: bool) -> Job:
        payload = decode_json(row["payload"])
        factory = (self._factories.get(row["name"]) or task_factory(row["name"])) if use_factory else None
        job = factory(payload) if factory else Job(row["name"], payload)
        if not isinstance(job, Job):
            raise TypeError(f"factory returned {type(job).__name__}, not a Job")
        job.name = row["name"]
        job.payload = payload
        for column in ("id", "queue", "attempts", "max_retries", "last_error", "created_at",
                       "available_at", "reserved_by", "reserved_at", "finished_at"):
            setattr(job, column, row[column])
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
            changed = conn.execute(self.table.update().where(self._held(job)).values(values)).rowcount
        return changed == 1

    def complete(self, job: Job) -> bool:
        """Mark a held job completed, storing ``job.result``; False if not held."""
        return self.complete_many([job]) == 1

    def complete_many(self, jobs: Iterable[Job]) -> int:
        """Complete many held jobs in one transaction; returns how many were held."""
        return self._update_held(
            jobs, {"status": JobStatus.COMPLETED.value, "finished_at": self.dialect.now(),
                   "heartbeat_at": None, "result": sa.bindparam("job_result")},
            lambda job: {"job_result": encode_result(job)})

    def unclaim(self, jobs: Iterable[Job]) -> int:
        """Give back held jobs that were never started: pending again, the attempt not counted.

        A worker that stops calls this for what it claimed but did not run.
        """
        c = self.table.c
        return self._update_held(jobs, {"status": JobStatus.PENDING.value, "attempts": c.attempts - 1,
                                        "reserved_by": None, "reserved_at": None, "heartbeat_at": None})

    def heartbeat(self, jobs: Iterable[Job]) -> int:
        """Renew the lease of held jobs so stale recovery leaves them alone; returns how many."""
        ids = [job.id for job in jobs if job.id is not None]
        if not ids:
            return 0
        c = self.table.c
        statement = (self.table.update()
                     .where(c.id.in_(ids), c.reserved_by == self.worker_id, c.status == PROCESSING)
                     .values(heartbeat_at=self.dialect.now()))
        with self._writer.begin() as conn:
            return conn.execute(statement).rowcount

    def _update_held(self, jobs: Iterable[Job], values: dict[str, Any],
                     extra: Callable[[Job], dict[str, Any]] = lambda job: {}) -> int:
        """One statement run for each held job (ownership checked per row) in one transaction."""
        c = self.table.c
        params = [{"job_id": job.id, "job_attempts": job.attempts, **extra(job)}
                  for job in jobs if job.id is not None]
        if not params:
            return 0
        statement = (
            self.table.update()
            .where(c.id == sa.bindparam("job_id"), c.attempts == sa.bindparam("job_attempts"),
                   c.reserved_by == self.worker_id, c.status == PROCESSING)
            .values(values)
        )
        with self._writer.begin() as conn:
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
            self.table.update()
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

    def retry_dead_letters(self, queue: str | None = None, name: str | None = None) -> int:
        """Retry every dead letter (of one queue and/or job name); returns how many."""
        c = self.table.c
        conditions = [c.queue == queue] if queue is not None else []
        conditions += [c.name == name] if name is not None else []
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

    def dead_letter_jobs(self, queue: str | None = None) -> pd.DataFrame:
        """The dead letters, newest first, one row per job (payload decoded)."""
        c = self.table.c
        statement = sa.select(*(c[name] for name in analytics.DEAD_LETTER_COLUMNS)).where(
            c.status == JobStatus.FAILED.value).order_by(c.finished_at.desc(), c.id)
        if queue is not None:
            statement = statement.where(c.queue == queue)
        with self._reader.connect() as conn:
            rows = conn.execute(statement).mappings().all()
        return analytics.dead_letter_frame(rows)

    def fetch_stats(self) -> pd.DataFrame:
        """Per queue: counts by status, oldest pending age, average wait and run times."""
        c = self.table.c
        wait = self.dialect.seconds_between(c.reserved_at, c.available_at)
        run = sa.case((c.status == JobStatus.COMPLETED.value,
                       self.dialect.seconds_between(c.finished_at, c.reserved_at)))
        statement = (
            sa.select(c.queue, c.status, sa.func.count().label("jobs"),
                      sa.func.min(c.available_at).label("earliest_due"),
                      sa.func.sum(wait).label("wait_sum"), sa.func.count(wait).label("wait_count"),
                      sa.func.sum(run).label("run_sum"), sa.func.count(run).label("run_count"),
                      self.dialect.now().label("db_now"))
            .group_by(c.queue, c.status)
        )
        with self._reader.connect() as conn:
            rows = conn.execute(statement).mappings().all()
        return analytics.stats_frame(rows)

