"""The job store: every statement kronix-data runs on its table, each under a name.

Reading this module tells what the library asks of the database.  The store
owns the engine, the dialect (:mod:`kronix_data.dialects`, for what differs
between PostgreSQL, MariaDB/MySQL and SQLite), the reader and writer engines,
the table (:mod:`kronix_data.schema`) and the mapping between a :class:`Job`
and a row.  The driver, worker, batches and analytics call these methods and
build no SQL themselves.

Two rules hold for every statement:

- **Ownership.** A write to a held job matches ``reserved_by`` (the worker),
  ``attempts`` (that very attempt) and ``status = 'processing'``, so a late or
  duplicate write from a worker that lost the job changes nothing.
- **Short transactions.** Nothing waits on another transaction's row locks:
  claims and recovery skip locked rows, and every loop over many rows commits
  in bounded slices.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from .cron import next_slot, plan_firing, schedule_key, seconds_until
from .dialects import Listener, dialect_for, make_engine, stored_ids_by_key
from .errors import DatabaseUnavailableError, InvalidInputError, NotFoundError
from .job import Job, JobStatus, decode_json, encode_payload, new_job_id, validate_job
from .limits import Limits, RateWindow
from .resources import checked_resources, encode_requirements
from .schema import (CHUNK_DATA, PENDING, PROCESSING, RESULT_DATA, STATUS_LITERALS, WAITING, UTCDateTime,
                     build_tables, claim_order, claim_sort_key)

log = logging.getLogger(__name__)

#: Stale jobs recovered per transaction.
RECOVERY_BATCH = 1000
#: Values bound in one ``IN (...)``: under every database's bound-parameter limit.
IN_LIST_LIMIT = 1000
#: ``(id, attempts)`` pairs completed by one statement.
COMPLETION_SLICE = 500
#: How many claim shapes (queue, free resources) a store keeps built statements for before starting afresh.
CLAIM_SHAPES_KEPT = 64
#: How soon a claim tries a limited queue again when another claim held its row.
LOCKED_RETRY_S = 0.005

COMPLETED = JobStatus.COMPLETED.value
FAILED = JobStatus.FAILED.value
CANCELLED = JobStatus.CANCELLED.value

#: A job's columns as ``Job`` attributes of the same name.
_JOB_ATTRIBUTES = ("id", "queue", "attempts", "max_retries", "last_error", "created_at", "available_at",
                   "reserved_by", "reserved_at", "finished_at", "batch_id", "priority")


@dataclass
class WaitGroup:
    """Jobs of one push that wait for the same parents (``Job.depends_on``, ``map(after=)``, ``then``).

    ``wait_id`` names the group (stable for an idempotent re-run: the same
    group is found, not made twice); ``members`` are indexes into the push's
    rows; ``parent_ids`` are job ids (of stored jobs, or of jobs earlier in the
    same push) and ``parent_batches`` batch ids, each standing for all its jobs.
    """

    wait_id: str
    members: list[int]
    parent_ids: list[str]
    parent_batches: list[str]

JobFactory = Callable[[Any], Job]


@dataclass
class ProgressWrite:
    """One running job's last report, as its worker writes it: ``done`` of ``total`` units (None: keep the
    stored total), ``info`` as JSON text (None: keep the stored info), reported ``age_s`` seconds ago."""

    job: Job
    done: float
    total: float | None
    info: str | None
    age_s: float


@dataclass
class WorkerBeat:
    """What a worker's heartbeat records of the worker itself in ``<table>_workers``.

    ``starting`` is set on the first beat of a run: it (re)sets ``started_at``
    and clears ``stopped_at``.
    """

    worker_id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    running: int
    lease_timeout: float
    starting: bool = False
    resources: dict[str, float] | None = None  # what the worker has (kronix_data.resources)


@dataclass
class BatchProgressRows:
    """What ``batch.progress()``, ``eta()``, ``stragglers()`` and ``wait()`` read of one batch, from one
    connection: the progress module shapes it.

    ``by_status``: status -> ``{"jobs", "units", "with_units", "done", "total", "with_total", "run_s",
    "queue"}`` (``units``: each job's total, else its last ``done``; ``run_s``: finished minus claimed,
    summed over completed jobs).  ``running``: the running jobs' rows.
    """

    now: datetime
    by_status: dict[str, dict[str, Any]]
    running: list[dict[str, Any]]


@dataclass
class QueueStatsRows:
    """What ``fetch_stats`` reads, from one connection: the analytics module shapes it into a frame.

    ``timing_summary`` is the database's own aggregate per queue where it has
    percentiles (PostgreSQL); elsewhere it is None and ``timing_rows`` holds
    the window's ``(queue, wait, run)`` rows for pandas.
    """

    now: datetime
    counts: list[tuple[str, str, int]]
    earliest_due: list[tuple[str, datetime | None]]
    timing_summary: dict[str, dict[str, Any]] | None
    timing_rows: list[tuple[str, float | None, float | None]]


@dataclass
class TimelineRows:
    """What ``driver.timeline`` reads, from one connection (buckets are interval numbers since 1970):
    ``finished``: ``(queue, status, finished bucket, claimed bucket or None, jobs)`` of the jobs finished
    in the span (None: claimed before it); ``running``: ``(queue, claimed bucket, jobs)``."""

    now: datetime
    finished: list[tuple[str, str, int, int | None, int]]
    running: list[tuple[str, int, int]]


class JobStore:
    """One jobs table in one database, and every statement run on it.

    Parameters
    ----------
    db
        A SQLAlchemy ``Engine`` or a database URL (see :func:`kronix_data.dialects.make_engine`).
    table
        The table name, optionally ``schema.table``; validated as an identifier.
    read_db
        A hot standby of ``db`` (URL or Engine) for the analytics views (stats, history, dead
        letters, batches, progress); everything that changes state, and every read a decision
        rests on, goes to ``db``.
    """

    def __init__(self, db: sa.Engine | str, table: str = "kronix_jobs", read_db: sa.Engine | str | None = None):
        self.engine = make_engine(db)
        self.dialect = dialect_for(self.engine)
        #: The jobs table and its companions (wait groups, their edges, queue settings).
        self.tables = build_tables(table, partial_indexes=self.dialect.partial_indexes,
                                   now_default=self.dialect.now_default)
        self.table = self.tables.jobs
        self.table_name = table
        #: Where workers are woken when jobs arrive (PostgreSQL LISTEN/NOTIFY).
        self.channel = f"kronix_{table.replace('.', '_')}"[:63]
        #: The errors a worker rides out by backing off and reconnecting: SQLAlchemy's, and the
        #: database driver's own, which can escape unwrapped from a rollback on a dead connection.
        self.database_errors: tuple[type[BaseException], ...] = (sa.exc.DBAPIError,
                                                                  self.engine.dialect.loaded_dbapi.Error)
        self._writer = self.dialect.writer(self.engine)
        self._reader = self.dialect.reader(self.engine)
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")  # one-statement writes
        #: Where the analytics views read (a hot standby), or None: the primary.
        self.read_engine: sa.Engine | None = None
        self._analytics_reader = self._reader
        if read_db is not None:
            self.read_engine = make_engine(read_db)
            read_dialect = dialect_for(self.read_engine)
            if type(read_dialect) is not type(self.dialect):
                raise InvalidInputError(f"read_db must be the same kind of database as db (a standby of it), got "
                                        f"{self.read_engine.dialect.name} for {self.engine.dialect.name}")
            self._analytics_reader = read_dialect.reader(self.read_engine)
        self._lag = threading.local()
        self._claim_waits = threading.local()  # what the last claim said about rate limits (claim_wait_s)
        self._snapshot = threading.local()  # the connection of a consistent_reads() block, per thread
        self._claim_conditions: dict[tuple, list[sa.ColumnElement[bool]]] = {}  # by queue and free resources
        self._fold_checked_at = -math.inf  # when fold_if_stale last looked (monotonic clock)
        self._data_cap: tuple[int, str] | None = None  # max_data_bytes, asked of the database once

    def __repr__(self) -> str:
        standby = f", read_db={self.read_engine.url.render_as_string(hide_password=True)!r}" if self.read_engine else ""
        return f"JobStore({self.url_shown!r}, table={self.table_name!r}{standby})"

    @property
    def url_shown(self) -> str:
        """The database URL with its password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    @property
    def url_with_password(self) -> str:
        """The database URL to hand to a worker process on this machine (never print it)."""
        return self.engine.url.render_as_string(hide_password=False)

    def close(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()
        if self.read_engine is not None:
            self.read_engine.dispose()

    # -- connections ---------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sa.Connection]:
        """A read-write transaction, committed at the end (SQLite: the write lock from its start)."""
        with self._connected(self._writer) as conn, conn.begin():
            yield conn

    @contextmanager
    def _reading(self) -> Iterator[sa.Connection]:
        """A connection for reads (SQLite: a deferred transaction, never blocked by writers under WAL)."""
        with self._connected(self._reader) as conn:
            yield conn

    @contextmanager
    def consistent_reads(self) -> Iterator[None]:
        """Every analytics read of this thread inside the block in one read transaction, one snapshot: the
        figures of a monitor's refresh (counts per queue, per batch, failures, workers) agree with each other."""
        pinned = getattr(self._snapshot, "conn", None)
        if pinned is not None:  # nested: the outer block's snapshot
            yield
            return
        with self._connected(self._analytics_reader) as conn:
            self.dialect.read_one_snapshot(conn)
            self.dialect.prepare_analytics(conn)  # as each view's own read does (PostgreSQL: no JIT)
            self._lag.seconds = self.dialect.replay_lag_s(conn) if self.read_engine is not None else 0.0
            self._snapshot.conn, self._snapshot.counts = conn, None
            try:
                yield
            finally:
                self._snapshot.conn = self._snapshot.counts = None

    @contextmanager
    def _reading_analytics(self) -> Iterator[sa.Connection]:
        """A connection for the analytics views: the standby's when there is one (its replay lag read first,
        for :meth:`read_lag_s`), else the same as :meth:`_reading`; inside :meth:`consistent_reads`, its."""
        pinned = getattr(self._snapshot, "conn", None)
        if pinned is not None:
            yield pinned
            return
        if self.read_engine is None:
            self._lag.seconds = 0.0
            with self._reading() as conn:
                self.dialect.prepare_analytics(conn)
                yield conn
            return
        with self._connected(self._analytics_reader) as conn:
            self._lag.seconds = self.dialect.replay_lag_s(conn)
            self.dialect.prepare_analytics(conn)
            yield conn

    def read_lag_s(self) -> float | None:
        """How far behind the primary this thread's last analytics read may be, in seconds: 0 on the
        primary, the standby's replay lag on one (None where the database cannot say)."""
        return getattr(self._lag, "seconds", 0.0)

    @staticmethod
    @contextmanager
    def _connected(engine: sa.Engine) -> Iterator[sa.Connection]:
        """A pooled connection; not reaching the database, or losing it mid-call, is DatabaseUnavailableError."""
        try:
            conn = engine.connect()
        except sa.exc.DBAPIError as error:
            raise DatabaseUnavailableError.from_error(error) from error
        try:
            with conn:
                yield conn
        except sa.exc.DBAPIError as error:
            if error.connection_invalidated and not isinstance(error, DatabaseUnavailableError):
                raise DatabaseUnavailableError.from_error(error) from error
            raise

    def listener(self) -> Listener | None:
        """A connection of its own that waits for pushes (PostgreSQL LISTEN), or None where there is none."""
        return self.dialect.listener(self.engine, self.channel)

    # -- schema --------------------------------------------------------------------

    def create_or_upgrade_table(self) -> None:
        """CREATE the tables and their indexes, or ALTER older ones in place (safe from many processes);
        an older table's finished jobs are folded into the new rollup once (see :meth:`seed_rollup`)."""
        self.dialect.create_or_upgrade(self._writer, self.tables)
        self.seed_rollup()

    def drop_table(self) -> None:
        """DROP the jobs table, its companions and everything in them, where they exist."""
        with self._transaction() as conn:
            for table in reversed(self.tables.all()):
                table.drop(conn, checkfirst=True)

    def missing_database(self) -> str | None:
        """Why the database is not there (a SQLite file that does not exist), asked without creating it."""
        return self.dialect.missing_database(self.engine)

    def table_parts(self) -> set[str] | None:
        """The table's columns and indexes as the database has them (``"column x"``, ``"index y"``), or None."""
        with self._reading() as conn:
            inspector = sa.inspect(conn)
            name, schema = self.table.name, self.table.schema
            if not inspector.has_table(name, schema=schema):
                return None
            columns = {f"column {column['name']}" for column in inspector.get_columns(name, schema=schema)}
            companions = {f"table {table.name}" for table in self.tables.all()[1:]
                          if inspector.has_table(table.name, schema=schema)}
            return columns | companions | {f"index {index['name']}"
                                           for index in inspector.get_indexes(name, schema=schema)}

    def database_now(self) -> datetime:
        """The database's clock (UTC), which every due time and lease is measured by."""
        with self._reading() as conn:
            return conn.execute(sa.select(self.dialect.now())).scalar_one()

    # -- jobs and rows ----------------------------------------------------------------

    def row_for_push(self, job: Job, queue: str | None = None) -> dict[str, Any]:
        """The row a new job is stored as: validated, payload encoded, id assigned (nothing is written)."""
        if not isinstance(job, Job):
            raise InvalidInputError(f"push takes Job objects, got {type(job).__name__}")
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
            "priority": job.priority,
            "wait_id": None,
            "due": job.available_at,
            "requires": encode_requirements(checked_resources(job.requires, f"requires of job {job.name!r}")),
        }

    @staticmethod
    def job_from_row(row: dict[str, Any], factory: JobFactory | None = None) -> Job:
        """The Job a row stands for: built by ``factory(payload)`` if given, else a plain Job.

        Raises whatever decoding or the factory raises: the caller decides what
        a row that cannot be rebuilt means.
        """
        payload = decode_json(row["payload"])
        job = factory(payload) if factory else Job(row["name"], payload)
        if not isinstance(job, Job):
            raise TypeError(f"factory returned {type(job).__name__}, not a Job")
        job.name = row["name"]
        job.payload = payload
        for column in _JOB_ATTRIBUTES:
            setattr(job, column, row[column])
        job.key = row["job_key"]
        job.status = JobStatus(row["status"])
        job.result = decode_json(row["result"])
        job.requires = decode_json(row.get("requires"))
        return job

    # -- producing --------------------------------------------------------------------

    def insert_jobs(self, rows: list[dict[str, Any]], waits: Sequence[WaitGroup] = ()) -> list[str]:
        """INSERT new jobs in one transaction and NOTIFY listeners once; returns their ids, in order.

        A row whose ``job_key`` is already stored is not inserted: its id is the
        stored job's.  A taken id fails the whole push (nothing is written).
        ``waits`` are the groups of these rows that wait for parents (see
        :meth:`_join_wait_groups`); an unknown parent or a cycle fails the whole push.
        """
        if (len(rows) == 1 and not waits and rows[0]["job_key"] is None and rows[0].get("data") is None
                and self.dialect.inserts_one_in_one_statement):
            return [self._insert_one(rows[0])]
        keyed = [row for row in rows if row["job_key"] is not None]
        if len({row["job_key"] for row in keyed}) < len(keyed):
            raise InvalidInputError("two jobs in one push share a key; keys must be unique")
        blobs = self.split_data(rows)
        try:
            with self._transaction() as conn:
                self._give_turns(conn, rows)
                if waits:
                    self._join_wait_groups(conn, rows, waits)
                plain = [row for row in rows if row["job_key"] is None]
                if plain:
                    self.dialect.insert(conn, self.table, plain)
                if keyed:
                    stored = self.dialect.insert_new_keys(conn, self.table, keyed)
                    for row in keyed:
                        row["id"] = stored[row["job_key"]]
                if blobs:
                    self._insert_chunk_data(conn, rows, blobs)
                self.dialect.notify(conn, self.channel)  # one wake-up per push, not per row
        except sa.exc.IntegrityError as error:
            raise InvalidInputError(f"a job id is already in table {self.table_name!r}: {error.orig}") from error
        return [row["id"] for row in rows]

    # -- binary data beside the jobs (<table>_data) ----------------------------------

    def max_data_bytes(self) -> tuple[int, str]:
        """The largest binary chunk or result one ``<table>_data`` row may hold, and why (asked once)."""
        if self._data_cap is None:
            with self._reading() as conn:
                self._data_cap = self.dialect.max_data_bytes(conn)
        return self._data_cap

    def check_data_size(self, size: int, what: str) -> None:
        """InvalidInputError naming ``what`` and the sizes when ``size`` bytes are over :meth:`max_data_bytes`."""
        cap, why = self.max_data_bytes()
        if size > cap:
            raise InvalidInputError(f"{what} is {size:,} bytes of Parquet, over the {cap:,} bytes one row of "
                                    f"{self.tables.data.name} may hold ({why}): use a smaller chunk_size")

    def split_data(self, rows: list[dict[str, Any]]) -> dict[int, bytes]:
        """Take the ``data`` (bytes) off the rows that carry it, checked against the cap before anything is
        written: ``{row index: bytes}`` for :meth:`_insert_chunk_data` (an insert path calls both)."""
        blobs = {index: row["data"] for index, row in enumerate(rows) if row.get("data") is not None}
        for index, blob in blobs.items():
            self.check_data_size(len(blob), _data_owner(rows[index]))
        for row in rows:
            row.pop("data", None)
        return blobs

    def _insert_chunk_data(self, conn: sa.Connection, rows: list[dict[str, Any]], blobs: dict[int, bytes], *,
                           ids_new: bool = False) -> None:
        """INSERT the chunk bytes of newly stored rows (ids final) into ``<table>_data``, in the push's
        transaction; a keyed row that was already stored (a re-run) keeps the bytes it has.  ``blobs``:
        what :meth:`split_data` took off the rows.  ``ids_new``: every row was inserted with the id it
        was given (a fast insert), so no row of theirs can hold bytes yet and none is looked up."""
        data = self.tables.data
        ids = [rows[index]["id"] for index in blobs]
        stored: set[str] = set()
        for start in range(0, 0 if ids_new else len(ids), IN_LIST_LIMIT):
            stored.update(conn.execute(sa.select(data.c.job_id).where(
                data.c.job_id.in_(ids[start:start + IN_LIST_LIMIT]), data.c.kind == CHUNK_DATA)).scalars())
        fresh = [{"job_id": rows[index]["id"], "kind": CHUNK_DATA, "data": blob}
                 for index, blob in blobs.items() if rows[index]["id"] not in stored]
        if fresh:
            conn.execute(data.insert(), fresh)

    def read_job_data(self, job_ids: Sequence[str], kind: str, *, on_primary: bool = True) -> dict[str, bytes]:
        """SELECT the ``<table>_data`` bytes of ``kind`` ("chunk" or "result") of jobs by id: one read per set."""
        data, found = self.tables.data, {}
        with self._reading() if on_primary else self._reading_analytics() as conn:
            for start in range(0, len(job_ids), IN_LIST_LIMIT):
                part = list(job_ids[start:start + IN_LIST_LIMIT])
                found.update((job_id, bytes(blob)) for job_id, blob in conn.execute(
                    sa.select(data.c.job_id, data.c.data).where(data.c.job_id.in_(part), data.c.kind == kind)))
        return found

    def _write_result_data(self, conn: sa.Connection, worker_id: str, jobs: Sequence[Job]) -> None:
        """Store the Parquet results (``job.result_data``) of the jobs this transaction just completed for
        ``worker_id`` (one that lost its lease writes nothing), replacing an earlier attempt's."""
        c, data = self.table.c, self.tables.data
        by_id = {job.id: job for job in jobs}
        finished: list[tuple[str, int]] = []
        ids = list(by_id)
        for start in range(0, len(ids), IN_LIST_LIMIT):
            finished += conn.execute(sa.select(c.id, c.attempts).where(
                c.id.in_(ids[start:start + IN_LIST_LIMIT]), c.status == COMPLETED, c.reserved_by == worker_id)).all()
        done = [job_id for job_id, attempts in finished if by_id[job_id].attempts == attempts]
        if not done:
            return
        conn.execute(data.delete().where(data.c.job_id.in_(done), data.c.kind == RESULT_DATA))
        conn.execute(data.insert(), [{"job_id": job_id, "kind": RESULT_DATA, "data": by_id[job_id].result_data}
                                     for job_id in done])

    def _delete_data_of(self, conn: sa.Connection, condition: sa.ColumnElement[bool]) -> None:
        """DELETE the ``<table>_data`` rows of the jobs ``condition`` picks (before they are deleted)."""
        data = self.tables.data
        conn.execute(data.delete().where(data.c.job_id.in_(sa.select(self.table.c.id).where(condition))))

    def _insert_one(self, row: dict[str, Any]) -> str:
        """INSERT one plain job, its fair-share turn and the NOTIFY in the same statement, in autocommit: one
        round trip (a push was a ping, BEGIN, the turn's look-up, INSERT, NOTIFY and COMMIT)."""
        def fair_rank() -> sa.ColumnElement:
            turn = self._head_turn(sa.bindparam("turn_queue", type_=sa.String)).scalar_subquery()
            return sa.func.coalesce(turn, 0) + sa.bindparam("turn_offset", type_=sa.BigInteger)

        params = {"turn_queue": row["queue"], "turn_offset": row.pop("fair_offset", None) or 0}
        try:
            with self._connected(self._autocommit) as conn:
                self.dialect.insert_one_and_notify(conn, self.table, row, fair_rank, self.channel, params)
        except sa.exc.IntegrityError as error:
            raise InvalidInputError(f"a job id is already in table {self.table_name!r}: {error.orig}") from error
        return row["id"]

    def _head_turn(self, queue: str | sa.BindParameter) -> sa.Select:
        """SELECT the fair-share turn of a queue's next job (the head of the ``<table>_due`` index)."""
        c = self.table.c
        return (sa.select(c.fair_rank).where(c.queue == queue, c.status == PENDING)
                .order_by(*claim_order(self.table)).limit(1))

    def _give_turns(self, conn: sa.Connection, rows: list[dict[str, Any]], heads: dict[str, int] | None = None
                    ) -> None:
        """Each row's fair-share turn: the turn of its queue's next job (one look at the head of the
        ``<table>_due`` index per queue), plus its chunk number (``fair_offset``, set by ``map``); a job
        pushed by hand gets the head's turn, so pushes stay first in, first out (see kronix_data.limits).
        ``heads`` keeps the heads seen across calls of one transaction (a batch stored window by window)."""
        heads = {} if heads is None else heads
        for row in rows:
            queue = row["queue"]
            if queue not in heads:
                heads[queue] = conn.execute(self._head_turn(queue)).scalar() or 0
            row["fair_rank"] = heads[queue] + (row.pop("fair_offset", None) or 0)

    def _join_wait_groups(self, conn: sa.Connection, rows: list[dict[str, Any]], waits: Sequence[WaitGroup],
                          joined: dict[str, tuple[int, str | None]] | None = None) -> None:
        """Make each wait group (or find it, on a re-run) and set its members' status and ``wait_id``.

        A new group locks its stored parents (``FOR UPDATE``, in id order), so a
        parent completing meanwhile is either seen completed here or, once this
        commits, sees the group and counts itself off it: never both, never
        neither.  Its ``remaining`` is the parents not completed; the parents are
        marked ``has_dependents``.  Members wait while ``remaining > 0``, and are
        cancelled at once if a parent already was.

        ``joined`` is given when the rows are known to be new (a batch stored window
        by window, its keys looked up already): each group's outcome is kept there,
        so the members of later windows wait, or are cancelled, as the first ones.
        """
        c, waits_table, deps = self.table.c, self.tables.waits, self.tables.deps
        by_id = {row["id"]: row for row in rows}
        self._refuse_cycles(rows, waits)
        keys = [rows[i]["job_key"] for group in waits for i in group.members if rows[i]["job_key"] is not None]
        already = set(stored_ids_by_key(conn, self.table, keys)) if keys and joined is None else set()
        for group in waits:
            members = [rows[i] for i in group.members if rows[i]["job_key"] not in already]
            if not members:
                continue  # a re-run: every member is stored already, with its group
            if joined is not None and group.wait_id in joined:
                found, cancelled_parent = joined[group.wait_id]
            else:
                found = conn.execute(sa.select(waits_table.c.remaining).where(waits_table.c.wait_id == group.wait_id)
                                     .with_for_update()).scalar()
                cancelled_parent = None
            if found is None:
                statuses = self._lock_parents(conn, group, by_id)
                cancelled_parent = next((parent for parent, status in statuses.items() if status == CANCELLED), None)
                remaining = sum(status != COMPLETED for status in statuses.values())
                conn.execute(waits_table.insert().values(wait_id=group.wait_id, remaining=remaining,
                                                         created_at=self.dialect.now()))
                conn.execute(deps.insert(), [{"parent_id": parent, "wait_id": group.wait_id} for parent in statuses])
                stored_parents = [parent for parent in statuses if parent not in by_id]
                for start in range(0, len(stored_parents), IN_LIST_LIMIT):
                    conn.execute(self.dialect.update_by_id(self.table)
                                 .where(c.id.in_(stored_parents[start:start + IN_LIST_LIMIT]),
                                        c.has_dependents == sa.false())
                                 .values(has_dependents=True))
                for parent in statuses:
                    if parent in by_id:
                        by_id[parent]["has_dependents"] = True
            else:
                remaining = found
            if joined is not None:
                joined[group.wait_id] = (remaining, cancelled_parent)
            for row in members:
                row["wait_id"] = group.wait_id
                if cancelled_parent is not None:
                    row.update(status=CANCELLED, finished_at=conn.execute(sa.select(self.dialect.now())).scalar_one(),
                               last_error=f"cancelled: job {cancelled_parent} it depends on was cancelled")
                elif remaining > 0:
                    row["status"] = JobStatus.WAITING.value
        for row in rows:  # every row of a push has the same columns, so one statement takes them all
            row.setdefault("has_dependents", False)
            row.setdefault("finished_at", None)
            row.setdefault("last_error", None)

    def _lock_parents(self, conn: sa.Connection, group: WaitGroup, pushed: dict[str, dict[str, Any]]) -> dict[str, str]:
        """Every parent of a new group and its status, the stored ones locked; an unknown one is refused."""
        c = self.table.c
        statuses = {parent: JobStatus.PENDING.value for parent in group.parent_ids if parent in pushed}
        stored = sorted({parent for parent in group.parent_ids if parent not in pushed})
        found: dict[str, str] = {}
        for start in range(0, len(stored), IN_LIST_LIMIT):
            found.update(conn.execute(sa.select(c.id, c.status).where(c.id.in_(stored[start:start + IN_LIST_LIMIT]))
                                      .order_by(c.id).with_for_update()).all())
        unknown = [parent for parent in stored if parent not in found]
        if unknown:
            raise InvalidInputError(f"job {unknown[0]!r} to depend on is not in table {self.table_name!r}"
                                    + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        statuses.update(found)
        for batch in group.parent_batches:
            chunks = dict(conn.execute(sa.select(c.id, c.status).where(c.batch_id == batch).order_by(c.id)
                                       .with_for_update()).all())
            if not chunks:
                raise InvalidInputError(f"no job has batch id {batch!r} to depend on in table {self.table_name!r}")
            statuses.update(chunks)
        return statuses

    @staticmethod
    def _refuse_cycles(rows: list[dict[str, Any]], waits: Sequence[WaitGroup]) -> None:
        """A job of this push may wait for another of it, but never (through others) for itself."""
        import graphlib

        pushed = {row["id"] for row in rows}
        graph: dict[str, set[str]] = {}
        for group in waits:
            parents = {parent for parent in group.parent_ids if parent in pushed}
            for i in group.members:
                graph.setdefault(rows[i]["id"], set()).update(parents)
        try:
            graphlib.TopologicalSorter(graph).prepare()
        except graphlib.CycleError as error:
            cycle = " -> ".join(error.args[1])
            raise InvalidInputError(f"the jobs' dependencies form a cycle: {cycle}") from None

    def count_stored_keys(self, batch_id: str, keys: Sequence[str]) -> int:
        """COUNT the jobs of a batch whose key is among ``keys`` (a re-run enqueue stops at this)."""
        c = self.table.c
        stored = 0
        with self._reading() as conn:
            for start in range(0, len(keys), IN_LIST_LIMIT):
                part = list(keys[start:start + IN_LIST_LIMIT])
                stored += conn.execute(sa.select(sa.func.count()).select_from(self.table)
                                       .where(c.batch_id == batch_id, c.job_key.in_(part))).scalar_one()
        return stored

    @contextmanager
    def inserting_chunks(self, batch_id: str, wait: WaitGroup | None = None, *, careful: bool = False
                         ) -> Iterator[ChunkInsert]:
        """One transaction storing a batch's chunk jobs window by window (``map``), NOTIFY once at the end.

        Raises :class:`ChunksStoredMeanwhile` when a fast (not ``careful``) insert
        met a key another session stored meanwhile: the caller runs the whole
        batch again with ``careful=True``, which skips such keys as ``insert_jobs``
        does.  A taken id fails the whole batch (nothing is written).
        """
        try:
            with self._transaction() as conn:
                chunk_insert = ChunkInsert(self, conn, batch_id, wait, careful)
                yield chunk_insert
                if chunk_insert.inserted:
                    self.dialect.notify(conn, self.channel)  # one wake-up per batch, not per window
        except sa.exc.IntegrityError as error:
            if not careful:
                raise ChunksStoredMeanwhile(batch_id) from error
            raise InvalidInputError(f"a job id is already in table {self.table_name!r}: {error.orig}") from error

    def _batch_has_jobs(self, conn: sa.Connection, batch_id: str) -> bool:
        """Whether any job has this batch id (one look at the ``<table>_batch`` index)."""
        c = self.table.c
        return conn.execute(sa.select(c.batch_id).where(c.batch_id == batch_id).limit(1)).first() is not None

    def _count_stored_keys(self, conn: sa.Connection, keys: Sequence[str]) -> int:
        """COUNT the jobs holding any of ``keys`` (probes of the unique ``<table>_key`` index only: a condition
        on the batch lets the planner scan the whole batch instead, once per window).  One statement where
        the dialect binds a list as one parameter, else one per ``among_limit`` keys."""
        step = self.dialect.among_limit or len(keys)
        return sum(conn.execute(sa.select(sa.func.count()).select_from(self.table).where(
            self.dialect.among(self.table.c.job_key, list(keys[start:start + step])))).scalar_one()
            for start in range(0, len(keys), step))

    def _stored_keys(self, conn: sa.Connection, keys: Sequence[str]) -> set[str]:
        """SELECT which of ``keys`` are stored (through the unique ``<table>_key`` index)."""
        c, step = self.table.c, self.dialect.among_limit or len(keys)
        return {key for start in range(0, len(keys), step) for key in conn.execute(
            sa.select(c.job_key).where(self.dialect.among(c.job_key, list(keys[start:start + step])))).scalars()}

    # -- consuming --------------------------------------------------------------------

    def claim(self, worker_id: str, n: int, queue: str, resources: Mapping[str, float] | None = None
              ) -> list[dict[str, Any]]:
        """Atomically take up to ``n`` due pending jobs of ``queue`` for a worker: highest priority, then oldest."""
        self._claim_waits.seconds = None
        with self._transaction() as conn:
            return self._claim(conn, worker_id, n, queue, resources)

    def complete_and_claim(self, worker_id: str, completions: Sequence[tuple[Job, str | None]], n: int,
                           queues: Sequence[str], resources: Mapping[str, float] | None = None
                           ) -> tuple[int, list[dict[str, Any]]]:
        """Complete held jobs and claim up to ``n`` more (queues in order), in one transaction: one commit.

        Returns how many completions were held, and the claimed rows.  ``resources``: what the worker
        has free (see :meth:`_requirements_met`).
        """
        rows: list[dict[str, Any]] = []
        self._claim_waits.seconds = None
        with self._transaction() as conn:
            held = self._complete(conn, worker_id, completions) if completions else 0
            for queue in queues:
                if len(rows) >= n:
                    break
                rows += self._claim(conn, worker_id, n - len(rows), queue, resources)
        return held, rows

    def _claim(self, conn: sa.Connection, worker_id: str, n: int, queue: str,
               resources: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
        """The claimed rows, in claim order, with what the claim set filled in (not read back).

        A paused or limited queue gives nothing here, nor any queue while a task has
        limits: the checks are clauses of the claim itself (uncorrelated NOT EXISTS the
        planner evaluates once), not round trips, so an unlimited queue's claim stays
        one statement.  When that finds nothing, :meth:`_claim_limited` claims within
        the limits.
        """
        shape = (queue, tuple(sorted(resources.items())) if resources else None)
        conditions = self._claim_conditions.get(shape)
        if conditions is None:  # built once per queue and free resources: building it was a tenth of a claim
            c, queues = self.table.c, self.tables.queues.c
            held_back = sa.or_(queues.paused == sa.true(), queues.concurrency.is_not(None), queues.rate.is_not(None))
            free = ~sa.exists().where(queues.queue == queue, held_back)
            no_task_limits = ~sa.exists().select_from(self.tables.task_limits)
            conditions = [c.queue == queue, c.status == PENDING, c.available_at <= self.dialect.now(), free,
                          no_task_limits, self._requirements_met(resources)]
            if len(self._claim_conditions) >= CLAIM_SHAPES_KEPT:
                self._claim_conditions.clear()
            self._claim_conditions[shape] = conditions
        changes = {"status": JobStatus.PROCESSING.value, "reserved_by": worker_id}
        rows = self.dialect.claim(conn, self.table, conditions, n, changes,
                                  shape=(self.table.fullname, shape, n, worker_id))
        if not rows:
            rows = self._claim_limited(conn, changes, n, queue, resources)
        rows.sort(key=claim_sort_key)
        for row in rows:
            row.update(status=JobStatus.PROCESSING.value, reserved_by=worker_id, finished_at=None, result=None)
        return rows

    def _requirements_met(self, resources: Mapping[str, float] | None) -> sa.ColumnElement[bool]:
        """The claim's resource clause: a job without requirements, or one whose every requirement the
        worker's free ``resources`` cover.

        A job needing a resource the worker does not name is never taken: the
        job's requirements are stored as canonical JSON of validated names and
        plain numbers, so it names as many resources as its text has colons, and
        that count must equal how many of the worker's resources it names.
        """
        requires = self.table.c.requires
        if not resources:
            return requires.is_(None)
        amounts = {name: self.dialect.json_number(requires, name) for name in sorted(resources)}
        named = sum((sa.case((amount.is_not(None), 1), else_=0) for amount in amounts.values()), sa.literal(0))
        colons = sa.func.length(requires) - sa.func.length(sa.func.replace(requires, ":", ""))
        fits = [sa.func.coalesce(amount, 0) <= float(resources[name]) for name, amount in amounts.items()]
        return sa.or_(requires.is_(None), sa.and_(colons == named, *fits))

    def count_pending_requirements(self) -> list[tuple[str, str, int]]:
        """``(queue, requires, jobs)``: the pending and waiting jobs that need resources, by queue and need."""
        c = self.table.c
        with self._reading_analytics() as conn:
            return [tuple(row) for row in conn.execute(
                sa.select(c.queue, c.requires, sa.func.count())
                .where(c.status.in_([PENDING, WAITING]), c.requires.is_not(None))
                .group_by(c.queue, c.requires))]

    def _claim_limited(self, conn: sa.Connection, changes: dict[str, Any], n: int, queue: str,
                       resources: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
        """Claim from a queue with limits, or whose jobs' tasks have some (see :mod:`kronix_data.limits`);
        [] for a paused queue, or one without limits when no task has any.

        The queue's settings row is locked (skipping a lock another claimer holds: it is claiming this
        queue now, and this worker tries again shortly), then its room is counted: its jobs processing,
        its starts in the rate window by the database's clock read after the lock.  Jobs of tasks
        without limits are claimed first; then, for each task with limits (its row locked the same
        way), its own jobs within its room.  Never waiting for a lock, claims never deadlock.
        """
        q, c = self.tables.queues.c, self.table.c
        limited_tasks = list(conn.execute(sa.select(self.tables.task_limits.c.name)
                                          .order_by(self.tables.task_limits.c.name)).scalars())
        settings = conn.execute(sa.select(q.paused, q.concurrency, q.rate, q.rate_per_s, q.rate_window)
                                .where(q.queue == queue)
                                .with_for_update(skip_locked=self.dialect.skips_locked(conn))).first()
        if settings is None and conn.execute(sa.select(sa.exists().where(q.queue == queue))).scalar_one():
            self._note_claim_wait(LOCKED_RETRY_S)  # another worker is claiming from it right now
            return []
        if settings is not None and settings.paused:
            return []
        queue_limited = settings is not None and (settings.concurrency is not None or settings.rate is not None)
        if not queue_limited and not limited_tasks:
            return []
        due = [c.queue == queue, c.status == PENDING, c.available_at <= self.dialect.now(),
               self._requirements_met(resources)]
        room, queue_window, now = n, None, None
        if queue_limited:
            room, queue_window, now = self._room(conn, settings, [c.queue == queue, c.status == PROCESSING], room)
            if room <= 0:
                self._note_held_back(conn, due, queue_window, now)
                return []
        rows = self.dialect.claim(conn, self.table, due + [c.name.not_in(limited_tasks)] if limited_tasks else due,
                                  room, changes, claimed_at=now)
        if queue_limited and len(rows) == room < n:
            self._note_claim_wait(math.inf)  # the limit is reached: no use claiming again before a job ends
        starts = [(now, len(rows))]
        task_table = self.tables.task_limits
        for name in limited_tasks:
            if len(rows) >= room:
                break
            of_task = due + [c.name == name]
            task = self._lock_limits(conn, task_table, task_table.c.name == name)
            if task is None:
                continue
            task_room, task_window, task_now = self._room(conn, task, [c.name == name, c.status == PROCESSING],
                                                          room - len(rows))
            claimed_at = task_now or now
            if task_room <= 0:
                self._note_held_back(conn, of_task, task_window, task_now)
                continue
            got = self.dialect.claim(conn, self.table, of_task, task_room, changes, claimed_at=claimed_at)
            if len(got) == task_room:
                self._note_claim_wait(math.inf)  # this task's limit (or the queue's) is reached
            rows += got
            starts.append((claimed_at, len(got)))
            self._record_starts(conn, task_table, task_table.c.name == name, task_window, [(task_now, len(got))])
        self._record_starts(conn, self.tables.queues, q.queue == queue, queue_window, starts)
        return rows

    def _lock_limits(self, conn: sa.Connection, table: sa.Table, which: sa.ColumnElement[bool]):
        """Lock one limits row (a queue's or a task's), skipping it if another claim holds it (None then:
        the worker is told to try again in :data:`LOCKED_RETRY_S`)."""
        row = conn.execute(sa.select(table.c.concurrency, table.c.rate, table.c.rate_per_s, table.c.rate_window)
                           .where(which).with_for_update(skip_locked=self.dialect.skips_locked(conn))).first()
        if row is None:
            self._note_claim_wait(LOCKED_RETRY_S)
        return row

    def _room(self, conn: sa.Connection, limits, processing: list[sa.ColumnElement[bool]], room: int):
        """``(room, rate window or None, clock or None)``: how many of ``room`` jobs one limits row lets
        start now, counting the jobs ``processing`` matches and the starts in its window."""
        window = now = None
        if limits.concurrency is not None:
            running = conn.execute(sa.select(sa.func.count()).select_from(self.table).where(*processing)).scalar_one()
            room = min(room, limits.concurrency - running)
        if limits.rate is not None and room > 0:
            now = conn.execute(sa.select(self.dialect.clock())).scalar_one()
            window = RateWindow(limits.rate, limits.rate_per_s, limits.rate_window)
            room = min(room, window.room(now.timestamp()))
        return room, window, now

    def _note_held_back(self, conn: sa.Connection, due: list[sa.ColumnElement[bool]], window: RateWindow | None,
                        now: datetime | None) -> None:
        """A limit left no room: if a job is due, tell the worker when to try again (unknown: ``inf``)."""
        if conn.execute(sa.select(sa.exists().where(*due))).scalar_one():
            self._note_claim_wait(window.next_free_in(now.timestamp()) if window is not None else math.inf)

    def _record_starts(self, conn: sa.Connection, table: sa.Table, which: sa.ColumnElement[bool],
                       window: RateWindow | None, starts: list[tuple[datetime | None, int]]) -> None:
        """Add a claim's starts to a rate window and store it; note when the window frees, if full."""
        if window is None:
            return
        for when, jobs in starts:
            window.add(when.timestamp(), jobs)
        if any(jobs for _, jobs in starts):
            conn.execute(table.update().where(which).values(rate_window=window.stored()))
        last = max(when for when, _ in starts)
        self._note_claim_wait(window.next_free_in(last.timestamp()))

    def _note_claim_wait(self, seconds: float | None) -> None:
        if seconds is not None:
            known = getattr(self._claim_waits, "seconds", None)
            self._claim_waits.seconds = seconds if known is None else min(known, seconds)

    def claim_wait_s(self) -> float | None:
        """After this thread's last claim: None if no limit held a due job back; else seconds until a
        job may start (a full rate window's next start: the worker sleeps that long rather than poll),
        ``math.inf`` when that is unknown (a full concurrency limit frees a slot when a job ends)."""
        return getattr(self._claim_waits, "seconds", None)

    # -- finishing held jobs ------------------------------------------------------------
    #
    # Each finishing write has a fast path for the common job (no dependents, no
    # cancel asked), matched in the statement itself; a job the fast path does not
    # match is finished one by one, which completes it and releases its
    # dependents, or records it as cancelled and cancels its dependents.

    def _held(self, worker_id: str, job: Job) -> sa.ColumnElement[bool]:
        """The ownership rule: this worker still holds this very attempt."""
        c = self.table.c
        return sa.and_(c.id == job.id, c.reserved_by == worker_id, c.attempts == job.attempts,
                       c.status == PROCESSING)

    def _plain(self) -> sa.ColumnElement[bool]:
        """A held job the fast path may finish: nothing waits for it and no cancel was asked."""
        c = self.table.c
        return sa.and_(c.has_dependents == sa.false(), c.cancel_requested_at.is_(None))

    def _cancelled_values(self, reason: str) -> dict[str, Any]:
        """What a cancelled job's row is set to: final, finished now, with the reason."""
        return {"status": CANCELLED, "finished_at": self.dialect.now(), "heartbeat_at": None, "last_error": reason}

    def complete(self, worker_id: str, completions: Sequence[tuple[Job, str | None]]) -> int:
        """Mark held jobs completed with their JSON results, in one transaction; returns how many were held."""
        with self._transaction() as conn:
            return self._complete(conn, worker_id, completions)

    def _complete(self, conn: sa.Connection, worker_id: str, completions: Sequence[tuple[Job, str | None]]) -> int:
        """Jobs without a result are completed by one statement matching ``(id, attempts)`` pairs:
        PyMySQL runs an executemany of UPDATEs as one round trip per row."""
        c = self.table.c
        values = {"status": COMPLETED, "finished_at": self.dialect.now(), "heartbeat_at": None}
        # In id order: a push that makes a wait group locks its parents in id order too, so the two never deadlock.
        completions = sorted((pair for pair in completions if pair[0].id is not None), key=lambda pair: pair[0].id)
        without = [(job, None) for job, result in completions if result is None]
        with_result = [(job, result) for job, result in completions if result is not None]
        changed = 0
        for start in range(0, len(without), COMPLETION_SLICE):
            part = without[start:start + COMPLETION_SLICE]
            statement = (self.dialect.update_by_id(self.table)
                         .where(self.dialect.is_attempt_of(self.table, [(job.id, job.attempts) for job, _ in part]),
                                c.reserved_by == worker_id, c.status == PROCESSING, self._plain())
                         .values(values))
            fast = conn.execute(statement).rowcount
            changed += fast + (self._finish_one_by_one(conn, worker_id, part) if fast < len(part) else 0)
        if with_result:
            fast = self._update_each_held(conn, worker_id, [job for job, _ in with_result],
                                          {**values, "result": sa.bindparam("job_result")},
                                          [{"job_result": result} for _, result in with_result], plain=True)
            changed += fast + (self._finish_one_by_one(conn, worker_id, with_result) if fast < len(with_result) else 0)
        framed = [job for job, _ in with_result if getattr(job, "result_data", None) is not None]
        if framed:  # DataFrame results: their Parquet bytes beside the row, in the same transaction
            self._write_result_data(conn, worker_id, framed)
        return changed

    def _finish_one_by_one(self, conn: sa.Connection, worker_id: str,
                           completions: Sequence[tuple[Job, str | None]]) -> int:
        """Complete the held jobs the fast path left (those already completed by it are no longer held),
        releasing what waits for them; a job whose cancel was asked is recorded as cancelled instead."""
        values = {"status": COMPLETED, "finished_at": self.dialect.now(), "heartbeat_at": None}
        c = self.table.c
        # Only those still held: in a batch of a hundred with one such job, one look-up, not two
        # statements for each of the ninety-nine the fast path already completed.
        still_held = set(conn.execute(sa.select(c.id).where(
            sa.tuple_(c.id, c.attempts).in_([(job.id, job.attempts) for job, _ in completions]),
            c.reserved_by == worker_id, c.status == PROCESSING)).scalars())
        completed, cancelled = [], []
        for job, result in completions:
            if job.id not in still_held:
                continue
            statement = (self.dialect.update_by_id(self.table)
                         .where(self._held(worker_id, job), c.cancel_requested_at.is_(None))
                         .values({**values, "result": result}))
            if conn.execute(statement).rowcount:
                completed.append(job.id)
            elif self._cancel_held(conn, worker_id, job):
                cancelled.append(job.id)
        if completed:
            self._release_waiting(conn, completed)
        if cancelled:
            self._cancel_dependents(conn, cancelled)
        return len(completed) + len(cancelled)

    def _cancel_held(self, conn: sa.Connection, worker_id: str, job: Job) -> bool:
        """Record a held job whose cancel was asked as cancelled (not failed, not retried)."""
        reason = f"cancelled while running on worker {worker_id}"
        statement = (self.dialect.update_by_id(self.table)
                     .where(self._held(worker_id, job), self.table.c.cancel_requested_at.is_not(None))
                     .values(self._cancelled_values(reason)))
        return conn.execute(statement).rowcount == 1

    def finish_cancelled(self, worker_id: str, jobs: Iterable[Job]) -> int:
        """Record held jobs whose cancel was asked as cancelled, and cancel what waits for them."""
        with self._transaction() as conn:
            cancelled = [job.id for job in jobs if job.id is not None and self._cancel_held(conn, worker_id, job)]
            if cancelled:
                self._cancel_dependents(conn, cancelled)
        return len(cancelled)

    def release(self, worker_id: str, job: Job, delay_s: float | None = None) -> bool:
        """Put a held job back as pending with its ``last_error``, due after ``delay_s`` (database clock)
        or at ``job.available_at`` or now.  A job whose cancel was asked is cancelled instead."""
        if delay_s is not None:
            due = self.dialect.now_plus(delay_s)
        elif job.available_at is not None:
            due = job.available_at
        else:
            due = self.dialect.now()
        return self._finish_one(worker_id, job, {"status": JobStatus.PENDING.value, "available_at": due,
                                                 "last_error": job.last_error, "reserved_by": None,
                                                 "reserved_at": None, "heartbeat_at": None})

    def dead_letter(self, worker_id: str, job: Job) -> bool:
        """Move a held job to the dead letters (status failed) with its ``last_error``; a job whose cancel
        was asked is cancelled instead."""
        return self._finish_one(worker_id, job, {"status": FAILED, "last_error": job.last_error,
                                                 "finished_at": self.dialect.now(), "heartbeat_at": None})

    def _finish_one(self, worker_id: str, job: Job, values: dict[str, Any]) -> bool:
        """Set ``values`` on one held job in its own transaction; cancelled instead if a cancel was asked."""
        if job.id is None:
            return False
        statement = (self.dialect.update_by_id(self.table)
                     .where(self._held(worker_id, job), self.table.c.cancel_requested_at.is_(None)).values(values))
        with self._transaction() as conn:
            if conn.execute(statement).rowcount == 1:
                return True
            if self._cancel_held(conn, worker_id, job):
                self._cancel_dependents(conn, [job.id])
                return True
        return False

    def unclaim(self, worker_id: str, jobs: Iterable[Job]) -> int:
        """Give held jobs that never started back: pending again, the attempt not counted (cancelled,
        if a cancel was asked meanwhile)."""
        c = self.table.c
        jobs = [job for job in jobs if job.id is not None]
        with self._transaction() as conn:
            given_back = self._update_each_held(conn, worker_id, jobs, {
                "status": JobStatus.PENDING.value, "attempts": c.attempts - 1, "reserved_by": None,
                "reserved_at": None, "heartbeat_at": None}, cancel_asked=False)
            if given_back == len(jobs):
                return given_back
            cancelled = [job.id for job in jobs if self._cancel_held(conn, worker_id, job)]
            if cancelled:
                self._cancel_dependents(conn, cancelled)
        return given_back + len(cancelled)

    def renew_leases(self, worker_id: str, jobs: Iterable[Job]) -> int:
        """Set ``heartbeat_at`` to now on the jobs this worker holds, so recovery leaves them alone."""
        ids = [job.id for job in jobs if job.id is not None]
        if not ids:
            return 0
        with self._transaction() as conn:
            return self._renew_leases(conn, worker_id, ids)

    def _renew_leases(self, conn: sa.Connection, worker_id: str, ids: Sequence[str]) -> int:
        c = self.table.c
        changed = 0
        for start in range(0, len(ids), IN_LIST_LIMIT):
            statement = (self.dialect.update_by_id(self.table)
                         .where(c.id.in_(ids[start:start + IN_LIST_LIMIT]), c.reserved_by == worker_id,
                                c.status == PROCESSING)
                         .values(heartbeat_at=self.dialect.now()))
            changed += conn.execute(statement).rowcount
        return changed

    def cancels_asked(self, worker_id: str, job_ids: Sequence[str]) -> list[str]:
        """SELECT which of the jobs this worker holds have had a cancel asked (the worker tells the jobs)."""
        c = self.table.c
        asked: list[str] = []
        with self._reading() as conn:
            for start in range(0, len(job_ids), IN_LIST_LIMIT):
                asked += conn.execute(sa.select(c.id).where(
                    c.id.in_(list(job_ids[start:start + IN_LIST_LIMIT])), c.reserved_by == worker_id,
                    c.status == PROCESSING, c.cancel_requested_at.is_not(None))).scalars().all()
        return asked

    def _update_each_held(self, conn: sa.Connection, worker_id: str, jobs: list[Job], values: dict[str, Any],
                          extra: list[dict[str, Any]] | None = None, *, plain: bool = False,
                          cancel_asked: bool | None = None) -> int:
        """One UPDATE run for each held job (executemany), ownership checked per row; ``plain`` adds the
        fast path's condition, ``cancel_asked=False`` only that no cancel was asked."""
        c = self.table.c
        params = [{"job_id": job.id, "job_attempts": job.attempts, **(extra[i] if extra else {})}
                  for i, job in enumerate(jobs) if job.id is not None]
        if not params:
            return 0
        conditions = [c.id == sa.bindparam("job_id"), c.attempts == sa.bindparam("job_attempts"),
                      c.reserved_by == worker_id, c.status == PROCESSING]
        if plain:
            conditions.append(self._plain())
        elif cancel_asked is False:
            conditions.append(c.cancel_requested_at.is_(None))
        statement = self.dialect.update_by_id(self.table).where(*conditions).values(values)
        return conn.execute(statement, params).rowcount

    # -- what waits for what -------------------------------------------------------------

    def _release_waiting(self, conn: sa.Connection, completed_ids: Sequence[str]) -> int:
        """Count completed parents off their wait groups and make the jobs of groups left with none due.

        O(1) per completed job: its edges, one decrement per group (in wait id
        order, so two completions never lock two groups in opposite orders), and
        the release of a group only when it reaches zero.  Returns how many jobs
        became due (and NOTIFYs listeners if any did).
        """
        deps, waits, c = self.tables.deps.c, self.tables.waits, self.table.c
        counts: dict[str, int] = {}
        for start in range(0, len(completed_ids), IN_LIST_LIMIT):
            part = list(completed_ids[start:start + IN_LIST_LIMIT])
            for wait_id, parents in conn.execute(sa.select(deps.wait_id, sa.func.count()).where(
                    deps.parent_id.in_(part)).group_by(deps.wait_id)):
                counts[wait_id] = counts.get(wait_id, 0) + parents
        if not counts:
            return 0
        conn.execute(waits.update().where(waits.c.wait_id == sa.bindparam("group"))
                     .values(remaining=waits.c.remaining - sa.bindparam("parents")),
                     [{"group": wait_id, "parents": counts[wait_id]} for wait_id in sorted(counts)])
        ready = list(conn.execute(sa.select(waits.c.wait_id).where(
            waits.c.wait_id.in_(sorted(counts)), waits.c.remaining <= 0)).scalars())
        released = 0
        if ready:
            released = conn.execute(self.table.update().where(c.wait_id.in_(ready), c.status == WAITING)
                                    .values(status=JobStatus.PENDING.value, available_at=self.dialect.now())).rowcount
            if released:
                self.dialect.notify(conn, self.channel)
        return released

    def _cancel_dependents(self, conn: sa.Connection, cancelled_ids: Sequence[str]) -> int:
        """Cancel the waiting jobs whose groups wait for these cancelled jobs, and theirs in turn."""
        deps, c = self.tables.deps.c, self.table.c
        frontier, cancelled = list(cancelled_ids), 0
        while frontier:
            groups: set[str] = set()
            for start in range(0, len(frontier), IN_LIST_LIMIT):
                groups.update(conn.execute(sa.select(deps.wait_id).where(
                    deps.parent_id.in_(frontier[start:start + IN_LIST_LIMIT]))).scalars())
            victims: list[str] = []
            for wait_id in sorted(groups):
                victims += conn.execute(sa.select(c.id).where(c.wait_id == wait_id, c.status == WAITING)
                                        .order_by(c.id).with_for_update()).scalars().all()
            for start in range(0, len(victims), IN_LIST_LIMIT):
                part = victims[start:start + IN_LIST_LIMIT]
                cancelled += conn.execute(self.table.update().where(c.id.in_(part), c.status == WAITING).values(
                    self._cancelled_values("cancelled: a job it depends on was cancelled"))).rowcount
            frontier = victims
        return cancelled

    def cancel_job(self, job_id: str) -> bool:
        """Cancel one job: a pending or waiting one at once (and what waits for it); for a running one,
        set ``cancel_requested_at`` for its worker to see.  False if it had finished; NotFoundError if unknown."""
        c = self.table.c
        with self._transaction() as conn:
            status = conn.execute(sa.select(c.status).where(c.id == job_id).with_for_update()).scalar()
            if status is None:
                raise NotFoundError(f"no job has id {job_id!r} in table {self.table_name!r}")
            if status in (JobStatus.PENDING.value, JobStatus.WAITING.value):
                conn.execute(self.dialect.update_by_id(self.table).where(c.id == job_id)
                             .values(self._cancelled_values("cancelled before it ran")))
                self._cancel_dependents(conn, [job_id])
                return True
            if status == JobStatus.PROCESSING.value:
                conn.execute(self.dialect.update_by_id(self.table).where(c.id == job_id)
                             .values(cancel_requested_at=sa.func.coalesce(c.cancel_requested_at, self.dialect.now())))
                return True
        return False

    def cancel_batch(self, batch_id: str) -> dict[str, int]:
        """Cancel a batch's pending and waiting jobs at once (and what waits for them), and ask its
        running ones to stop; returns how many of each there were."""
        c = self.table.c
        with self._transaction() as conn:
            rows = conn.execute(sa.select(c.id, c.status).where(
                c.batch_id == batch_id, c.status.in_([JobStatus.PENDING.value, WAITING, PROCESSING]))
                .order_by(c.id).with_for_update()).all()
            by_status: dict[str, list[str]] = {}
            for job_id, status in rows:
                by_status.setdefault(status, []).append(job_id)
            stopping = by_status.get(JobStatus.PENDING.value, []) + by_status.get(JobStatus.WAITING.value, [])
            for start in range(0, len(stopping), IN_LIST_LIMIT):
                conn.execute(self.table.update().where(c.id.in_(stopping[start:start + IN_LIST_LIMIT]))
                             .values(self._cancelled_values("cancelled with its batch before it ran")))
            running = by_status.get(JobStatus.PROCESSING.value, [])
            for start in range(0, len(running), IN_LIST_LIMIT):
                conn.execute(self.table.update().where(c.id.in_(running[start:start + IN_LIST_LIMIT]))
                             .values(cancel_requested_at=sa.func.coalesce(c.cancel_requested_at, self.dialect.now())))
            if stopping:
                self._cancel_dependents(conn, stopping)
        return {"pending": len(by_status.get(JobStatus.PENDING.value, [])),
                "waiting": len(by_status.get(JobStatus.WAITING.value, [])), "running": len(running)}

    def read_parent_results(self, job_id: str) -> list[dict[str, Any]]:
        """SELECT ``id``, ``job_key``, ``batch_id``, ``status`` and ``result`` of the jobs a job waited for."""
        c, deps = self.table.c, self.tables.deps
        child = self.table.alias("child")
        statement = (sa.select(c.id, c.job_key, c.batch_id, c.status, c.result)
                     .join(deps, deps.c.parent_id == c.id)
                     .join(child, child.c.wait_id == deps.c.wait_id)
                     .where(child.c.id == job_id))
        with self._reading() as conn:
            return [dict(row) for row in conn.execute(statement).mappings()]

    # -- queues ---------------------------------------------------------------------------

    def set_paused(self, queue: str, paused: bool) -> None:
        """INSERT or UPDATE a queue's row with ``paused``; resuming NOTIFYs listeners, so workers claim at once."""
        queues = self.tables.queues
        with self._transaction() as conn:
            values = {"queue": queue, "paused": paused, "changed_at": self.dialect.now()}
            self.dialect.upsert(conn, queues, values, {"paused": paused, "changed_at": self.dialect.now()})
            if not paused:
                self.dialect.notify(conn, self.channel)

    def set_limits(self, queue: str, limits: Limits) -> None:
        """INSERT or UPDATE a queue's row with its limits (None: that limit cleared); a changed rate starts
        an empty window.  NOTIFYs listeners, so workers claim under the new limits at once."""
        queues = self.tables.queues
        changes = {"concurrency": limits.concurrency, "rate": limits.rate, "rate_per_s": limits.per_s,
                   "changed_at": self.dialect.now()}
        with self._transaction() as conn:
            stored = conn.execute(sa.select(queues.c.rate, queues.c.rate_per_s).where(queues.c.queue == queue)
                                  .with_for_update()).first()
            if stored is None or tuple(stored) != (limits.rate, limits.per_s):
                changes["rate_window"] = None
            self.dialect.upsert(conn, queues, {"queue": queue, "paused": False, **changes}, changes)
            self.dialect.notify(conn, self.channel)

    def write_task_limits(self, limits: dict[str, Limits | None]) -> None:
        """Store tasks' limits in ``<table>_task_limits`` in one transaction: UPSERT those with limits
        (a changed rate starts an empty window), DELETE the rows of those without."""
        table = self.tables.task_limits
        with self._transaction() as conn:
            stored = {row.name: (row.concurrency, row.rate, row.rate_per_s) for row in conn.execute(
                sa.select(table.c.name, table.c.concurrency, table.c.rate, table.c.rate_per_s)
                .where(table.c.name.in_(sorted(limits))).order_by(table.c.name).with_for_update())}
            for name in sorted(limits):
                wanted = limits[name]
                if wanted is None:
                    if name in stored:
                        conn.execute(table.delete().where(table.c.name == name))
                    continue
                if stored.get(name) == (wanted.concurrency, wanted.rate, wanted.per_s):
                    continue  # unchanged: keep its window
                changes = {"concurrency": wanted.concurrency, "rate": wanted.rate, "rate_per_s": wanted.per_s,
                           "rate_window": None, "changed_at": self.dialect.now()}
                self.dialect.upsert(conn, table, {"name": name, **changes}, changes)

    def read_task_limits(self) -> list[dict[str, Any]]:
        """SELECT every task's limits row."""
        table = self.tables.task_limits
        with self._reading_analytics() as conn:
            return [dict(row) for row in conn.execute(sa.select(table).order_by(table.c.name)).mappings()]

    def queue_is_known(self, queue: str) -> bool:
        """Whether a queue has a settings row or any job (what "a queue" means to set_limits and the CLI)."""
        c, queues = self.table.c, self.tables.queues.c
        with self._reading() as conn:
            return conn.execute(sa.select(sa.or_(sa.exists().where(queues.queue == queue),
                                                 sa.exists().where(c.queue == queue)))).scalar_one()

    def count_jobs_by_queue_and_status(self) -> list[tuple[str, str, int]]:
        """Every job's count by queue and status, from the rollup and live counts (see :meth:`_live_counts`);
        a status may come in several rows, to be added up."""
        self.fold_if_stale()
        with self._reading_analytics() as conn:
            return self._counts_in(conn)

    def _counts_in(self, conn: sa.Connection) -> list[tuple[str, str, int]]:
        """:meth:`_live_counts` read on ``conn``; once per :meth:`consistent_reads` block, whose views see one
        snapshot: a monitor's ``fetch_stats()`` and ``queues()`` count the jobs in flight once, not twice."""
        snapshot = self._snapshot
        if getattr(snapshot, "conn", None) is conn and getattr(snapshot, "counts", None) is not None:
            return list(snapshot.counts)
        counts = [(queue, status, int(jobs)) for queue, status, jobs in
                  conn.execute(self._live_counts(self._read_watermark(conn)))]
        if getattr(snapshot, "conn", None) is conn:
            snapshot.counts = counts
        return list(counts)

    def count_held_by_queue_and_worker(self) -> list[tuple[str, str | None, int]]:
        """COUNT the held (``processing``) jobs by queue and the worker holding them (``<table>_status``
        finds them; they are few)."""
        c = self.table.c
        with self._reading_analytics() as conn:
            return [tuple(row) for row in conn.execute(
                sa.select(c.queue, c.reserved_by, sa.func.count()).where(c.status == PROCESSING)
                .group_by(c.queue, c.reserved_by))]

    def read_queue_settings(self) -> dict[str, dict[str, Any]]:
        """SELECT every queue's settings row (a queue without one has the defaults)."""
        queues = self.tables.queues
        with self._reading_analytics() as conn:
            return {row["queue"]: dict(row) for row in conn.execute(sa.select(queues)).mappings()}

    # -- maintenance ------------------------------------------------------------------

    def recover_expired_leases(self, timeout_s: float) -> int:
        """Return held jobs whose lease is older than ``timeout_s`` to pending, or to the dead letters
        once their attempts are used up; returns how many changed.

        Works in slices of :data:`RECOVERY_BATCH`; rows another transaction holds
        are passed by, never waited for (a worker cut off mid-transaction keeps
        its locks until the server drops its session).
        """
        c = self.table.c
        exhausted = c.attempts > c.max_retries
        asked = c.cancel_requested_at.is_not(None)  # a job cancelled while its worker died ends cancelled
        ends = sa.or_(exhausted, asked)
        note = sa.literal(f"lease expired: no heartbeat for {timeout_s:g}s from worker ") + sa.func.coalesce(
            c.reserved_by, "?")
        stale = sa.and_(c.status == PROCESSING, c.heartbeat_at < self.dialect.now_plus(-timeout_s))
        statement = self.dialect.set_in_order(
            self.dialect.update_by_id(self.table).where(stale, c.id.in_(sa.bindparam("stale_ids", expanding=True))),
            [(c.last_error, sa.case((asked, sa.literal("cancelled; ") + note),
                                    (exhausted, note + sa.literal("; attempts used up")), else_=note)),
             (c.status, sa.case((asked, CANCELLED), (exhausted, FAILED), else_=JobStatus.PENDING.value)),
             (c.finished_at, sa.case((ends, self.dialect.now()), else_=sa.null())),
             (c.reserved_by, sa.case((ends, c.reserved_by), else_=sa.null())),
             (c.reserved_at, sa.case((ends, c.reserved_at), else_=sa.null())),
             (c.heartbeat_at, sa.null())])
        changed = 0
        while True:
            with self._transaction() as conn:
                ids = self.dialect.lock_rows(conn, self.table, stale, limit=RECOVERY_BATCH)
                changed += conn.execute(statement, {"stale_ids": ids}).rowcount if ids else 0
                cancelled = conn.execute(sa.select(c.id).where(c.id.in_(ids), c.status == CANCELLED)).scalars().all() \
                    if ids else []
                if cancelled:
                    self._cancel_dependents(conn, cancelled)
            if len(ids) < RECOVERY_BATCH:
                return changed

    def count_pending(self, queue: str) -> int:
        """COUNT the pending jobs of a queue (due now or later)."""
        c = self.table.c
        with self._reading() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(self.table)
                                .where(c.queue == queue, c.status == PENDING)).scalar_one()

    def delete_pending(self, queue: str) -> int:
        """DELETE the pending jobs of a queue; a running job is never touched."""
        c = self.table.c
        with self._transaction() as conn:
            self._delete_data_of(conn, sa.and_(c.queue == queue, c.status == PENDING))
            return conn.execute(self.table.delete().where(c.queue == queue, c.status == PENDING)).rowcount

    def delete_dead_letters(self, queue: str | None = None) -> int:
        """DELETE the dead letters, of one queue or all."""
        c = self.table.c
        condition = c.status == FAILED
        if queue is not None:
            condition = sa.and_(condition, c.queue == queue)
        with self._transaction() as conn:
            taken = self._take_from_rollup(conn, condition)
            self._delete_data_of(conn, condition)
            deleted = conn.execute(self.table.delete().where(condition)).rowcount
            self._settle_rollup(conn, taken)
            return deleted

    def retry_dead_letters(self, *, job_id: str | None = None, queue: str | None = None, name: str | None = None,
                           batch: str | None = None) -> int:
        """Set dead letters matching every filter given back to pending with attempts 0, due now; NOTIFY."""
        c = self.table.c
        filters = [(c.id, job_id), (c.queue, queue), (c.name, name), (c.batch_id, batch)]
        condition = sa.and_(c.status == FAILED, *(column == value for column, value in filters if value is not None))
        statement = (
            self.table.update()
            .where(condition)
            .values(status=JobStatus.PENDING.value, attempts=0, last_error=None, available_at=self.dialect.now(),
                    finished_at=None, reserved_by=None, reserved_at=None, heartbeat_at=None)
        )
        with self._transaction() as conn:
            taken = self._take_from_rollup(conn, condition)
            changed = conn.execute(statement).rowcount
            self._settle_rollup(conn, taken)
            if changed:
                self.dialect.notify(conn, self.channel)
        return changed

    def prune_finished(self, older_than_s: float, statuses: Sequence[str], chunk_size: int) -> int:
        """DELETE jobs of ``statuses`` finished more than ``older_than_s`` ago, oldest first, about
        ``chunk_size`` rows per transaction (each slice bounded by the ``finished_at`` of its last row,
        found through the ``<table>_finished`` index), so claims go on meanwhile."""
        c = self.table.c
        with self._reading() as conn:
            cutoff = conn.execute(sa.select(self.dialect.now_plus(-older_than_s))).scalar_one()
        prunable = sa.and_(c.finished_at < cutoff, c.status.in_(list(statuses)))
        deleted = 0
        while True:
            with self._transaction() as conn:
                watermark = self._lock_rollup(conn)  # first: every writer of finished rows locks in this order
                boundary = conn.execute(sa.select(c.finished_at).where(prunable).order_by(c.finished_at)
                                        .offset(chunk_size - 1).limit(1)).scalar()
                last = boundary is None  # fewer than chunk_size left: take them all
                condition = prunable if last else sa.and_(prunable, c.finished_at <= boundary)
                taken = self._take_from_rollup(conn, condition) if watermark is not None else (None, [])
                self._delete_data_of(conn, condition)
                deleted += conn.execute(self.table.delete().where(condition)).rowcount
                self._settle_rollup(conn, taken)
            if last:
                return deleted

    # -- reading ----------------------------------------------------------------------

    def read_job(self, job_id: str) -> dict[str, Any] | None:
        """SELECT one job's whole row by id, or None."""
        with self._reading() as conn:
            row = conn.execute(sa.select(self.table).where(self.table.c.id == job_id)).mappings().first()
        return None if row is None else dict(row)

    def read_dead_letters(self, columns: Sequence[str], queue: str | None = None,
                          batch: str | None = None) -> list[dict[str, Any]]:
        """SELECT ``columns`` of the dead letters (of a queue and/or batch), newest first."""
        c = self.table.c
        statement = (sa.select(*(c[name] for name in columns))
                     .where(c.status == FAILED).order_by(c.finished_at.desc(), c.id))
        if queue is not None:
            statement = statement.where(c.queue == queue)
        if batch is not None:
            statement = statement.where(c.batch_id == batch)
        with self._reading_analytics() as conn:
            return [dict(row) for row in conn.execute(statement).mappings()]

    def read_queue_stats(self, window_s: float) -> QueueStatsRows:
        """Per queue, in one connection: the jobs' counts by status (:meth:`_live_counts`: the rollup and live
        counts, no scan of history), the earliest due pending job of each queue with some
        (:meth:`_earliest_due`), and wait/run timings of the jobs finished in the last ``window_s`` (found
        through ``<table>_finished``), aggregated by the database where it can."""
        c, dialect = self.table.c, self.dialect
        wait = dialect.seconds_between(c.reserved_at, c.available_at)
        run = sa.case((c.status == COMPLETED, dialect.seconds_between(c.finished_at, c.reserved_at)))
        in_window = c.finished_at >= dialect.now_plus(-window_s)
        self.fold_if_stale()
        with self._reading_analytics() as conn:
            now = conn.execute(sa.select(dialect.now())).scalar_one()
            count_rows = self._counts_in(conn)  # the finished jobs from the rollup: no history
            pending = sorted({queue for queue, status, jobs in count_rows
                              if status == JobStatus.PENDING.value and jobs})
            earliest_rows = [tuple(row) for row in conn.execute(self._earliest_due(pending))] if pending else []
            summary, rows = None, []
            if dialect.percentiles([0.5], wait) is not None:
                summary = self._aggregate_timings(conn, wait, run, in_window)
            else:
                rows = [tuple(row) for row in conn.execute(
                    sa.select(c.queue, wait.label("wait"), run.label("run")).where(in_window))]
        return QueueStatsRows(now, count_rows, earliest_rows, summary, rows)

    def _earliest_due(self, queues: Sequence[str]) -> sa.CompoundSelect:
        """SELECT each of these queues' earliest ``available_at`` of a pending job: a MIN per queue, which
        PostgreSQL and SQLite read off the front of the queue's range of ``<table>_pending_due``."""
        c = self.table.c
        # The literal lets PostgreSQL match the partial index even in a generic plan.
        return sa.union_all(*(
            sa.select(sa.literal(queue, c.queue.type).label("queue"),
                      sa.select(sa.func.min(c.available_at)).where(c.status == PENDING, c.queue == queue)
                      .scalar_subquery().label("due"))
            for queue in queues))

    def _aggregate_timings(self, conn: sa.Connection, wait, run, in_window) -> dict[str, dict[str, Any]]:
        """Means and 50th/95th percentiles of wait and run per queue, aggregated by the database."""
        c, percentiles = self.table.c, self.dialect.percentiles
        statement = (
            sa.select(c.queue, sa.func.count(run).label("completed_in_window"),
                      sa.func.avg(wait).label("wait_s_mean"), percentiles([0.5, 0.95], wait).label("wait"),
                      sa.func.avg(run).label("run_s_mean"), percentiles([0.5, 0.95], run).label("run"))
            .where(in_window).group_by(c.queue)
        )
        return {row["queue"]: dict(row) for row in conn.execute(statement).mappings()}

    def read_timeline(self, bucket_s: int, since: datetime | float, queue: str | None = None) -> TimelineRows:
        """COUNT per queue and ``bucket_s``-second interval (bucketed by the database) of the jobs claimed,
        completed and dead-lettered since ``since`` (a datetime, or seconds before the database's now).

        Index ranges only, never the whole history: the jobs completed or dead-lettered since then
        through ``<table>_finished``, in one pass that buckets their finish and their claim (a job is
        claimed before it finishes, so the same range holds the claims of every finished job), and the
        claims of the running jobs, found by status (``<table>_status``; PostgreSQL's plan at 1M rows).
        A job's claim is its last: an attempt given back for a retry counts when it is claimed again.
        """
        c, dialect = self.table.c, self.dialect
        start = self._time_bound(since, "since")
        in_queue = [c.queue == queue] if queue is not None else []
        claimed = sa.case((c.reserved_at >= start, dialect.time_bucket(c.reserved_at, bucket_s)))
        finished = sa.select(c.queue, c.status, dialect.time_bucket(c.finished_at, bucket_s).label("finished"),
                             claimed.label("claimed")).where(
            c.finished_at >= start, c.status.in_([COMPLETED, FAILED]), *in_queue).subquery()
        running = sa.select(c.queue, dialect.time_bucket(c.reserved_at, bucket_s).label("claimed")).where(
            c.status == PROCESSING, c.reserved_at >= start, *in_queue).subquery()
        with self._reading_analytics() as conn:
            now = conn.execute(sa.select(dialect.now())).scalar_one()
            finished_rows = [tuple(row) for row in conn.execute(
                sa.select(*finished.c, sa.func.count()).group_by(*finished.c))]
            running_rows = [tuple(row) for row in conn.execute(
                sa.select(*running.c, sa.func.count()).group_by(*running.c))]
        return TimelineRows(now, finished_rows, running_rows)

    def read_history(self, columns: Sequence[str], *, queue: str | None = None, name: str | None = None,
                     statuses: Sequence[str] | None = None, batch: str | None = None,
                     since: datetime | float | None = None, until: datetime | float | None = None,
                     limit: int | None = None) -> list[dict[str, Any]]:
        """SELECT ``columns`` of the jobs matching every filter, newest (``created_at``) first.

        ``since``/``until`` bound ``created_at``: a datetime, or seconds before the
        database's now.  ``job_key`` is read as ``key``.
        """
        c = self.table.c
        conditions = [column == value for column, value in ((c.queue, queue), (c.name, name), (c.batch_id, batch))
                      if value is not None]
        if statuses is not None:  # inlined: jobs(status="failed") then matches <table>_failed_created
            conditions.append(c.status.in_([STATUS_LITERALS[status] for status in statuses]))
        if since is not None:
            conditions.append(c.created_at >= self._time_bound(since, "since"))
        if until is not None:
            conditions.append(c.created_at < self._time_bound(until, "until"))
        read = [c.job_key.label("key") if column == "key" else c[column] for column in columns]
        statement = sa.select(*read).where(*conditions).order_by(c.created_at.desc(), c.id.desc()).limit(limit)
        with self._reading_analytics() as conn:
            return [dict(row) for row in conn.execute(statement).mappings()]

    def _time_bound(self, value: datetime | float, what: str) -> sa.ColumnElement:
        """A bound on ``created_at``: a datetime as a parameter, or seconds ago by the database's clock."""
        if isinstance(value, datetime):
            return sa.bindparam(f"kronix_{what}", value, type_=self.table.c.created_at.type)
        return self.dialect.now_plus(-float(value))

    # -- batches ------------------------------------------------------------------------

    def count_batch_by_status(self, batch_id: str, *, on_primary: bool = False) -> dict[str, int]:
        """COUNT a batch's jobs by status (through the ``<table>_batch`` index)."""
        c = self.table.c
        statement = sa.select(c.status, sa.func.count()).where(c.batch_id == batch_id).group_by(c.status)
        with self._reading() if on_primary else self._reading_analytics() as conn:
            return {status: int(count) for status, count in conn.execute(statement)}

    def read_batch_results(self, batch_id: str, *, on_primary: bool = False) -> list[tuple[str, str | None, str | None]]:
        """SELECT ``(id, job_key, result)`` of a batch's completed jobs."""
        c = self.table.c
        statement = sa.select(c.id, c.job_key, c.result).where(c.batch_id == batch_id, c.status == COMPLETED)
        with self._reading() if on_primary else self._reading_analytics() as conn:
            return [tuple(row) for row in conn.execute(statement)]

    def read_payloads(self, job_ids: Sequence[str], *, on_primary: bool = False) -> dict[str, str | None]:
        """SELECT the payloads (JSON text) of jobs by id."""
        c = self.table.c
        payloads: dict[str, str | None] = {}
        with self._reading() if on_primary else self._reading_analytics() as conn:
            for start in range(0, len(job_ids), IN_LIST_LIMIT):
                part = list(job_ids[start:start + IN_LIST_LIMIT])
                payloads.update(conn.execute(sa.select(c.id, c.payload).where(c.id.in_(part))).all())
        return payloads

    def names_in_batch(self, batch_id: str, limit: int = 2) -> list[str]:
        """SELECT up to ``limit`` distinct job names of a batch (none: no such batch)."""
        c = self.table.c
        with self._reading() as conn:
            return list(conn.execute(sa.select(c.name).where(c.batch_id == batch_id).distinct()
                                     .limit(limit)).scalars())

    def summarise_batches(self, since: datetime | float | None = None) -> tuple[list[str], list[tuple]]:
        """One row per batch: ``batch_id``, ``total``, a count per status, ``name`` (None if its jobs have
        several), the first ``created_at`` and the last ``finished_at``; of every batch, or of those with a
        job created since ``since`` (whole).  Returns the column names and the rows.

        The timestamps come as ``dialect.raw_timestamp`` reads them (epoch
        microseconds on PostgreSQL): ``typed_frame`` converts them a column at a time.
        One statement, pivoted and grouped by the database, over the batch
        summaries (``<table>_rollup_batches``: one row per batch, the recent
        ones through its ``created`` index), the jobs finished since the
        watermark and those in flight (:meth:`_live_batches`): no scan of
        history, and one row per batch to hand to pandas.
        """
        self.fold_if_stale()
        statuses = [status.value for status in JobStatus]
        bound = None
        if since is not None:
            bound = since if isinstance(since, datetime) else self.dialect.now_plus(-float(since))
            if isinstance(bound, datetime):
                bound = sa.bindparam("kronix_since", bound, type_=self.table.c.created_at.type)
        with self._reading_analytics() as conn:
            parts = self._live_batches(self._read_watermark(conn), bound).subquery("parts")
            name = sa.func.min(parts.c.name)
            statement = (sa.select(parts.c.batch_id,
                                   sa.cast(sum((sa.func.sum(parts.c[status]) for status in statuses[1:]),
                                               sa.func.sum(parts.c[statuses[0]])), sa.BigInteger).label("total"),
                                   *(sa.cast(sa.func.sum(parts.c[status]), sa.BigInteger).label(status)
                                     for status in statuses),
                                   sa.case((name == sa.func.max(parts.c.other_name), name)).label("name"),
                                   self.dialect.raw_timestamp(sa.func.min(parts.c.created_at)).label("created_at"),
                                   self.dialect.raw_timestamp(sa.func.max(parts.c.finished_at)).label("finished_at"))
                         .group_by(parts.c.batch_id))
            if bound is not None:
                statement = statement.having(sa.func.max(parts.c.last_created_at) >= bound)
            result = conn.execute(statement)
            return list(result.keys()), [tuple(row) for row in result.all()]

    def job_name_other_than(self, name: str) -> str | None:
        """SELECT the name of one job not named ``name`` (the demo refuses a table holding others'), or None."""
        c = self.table.c
        with self._reading() as conn:
            return conn.execute(sa.select(c.name).where(c.name != name).limit(1)).scalar()

    # -- progress and checkpoints ---------------------------------------------------------
    #
    # A running job's progress is written by its worker, at most once per
    # progress_interval for all its jobs and with every heartbeat, never once per
    # call; a checkpoint is written by the job's own thread, in a transaction of
    # its own.  Both match the ownership rule, so a worker that lost the job (its
    # lease expired, another worker runs a later attempt) changes nothing.

    def write_progress(self, worker_id: str, reports: Sequence[ProgressWrite]) -> int:
        """UPDATE the reported progress of jobs this worker holds, in one transaction; returns how many."""
        if not reports:
            return 0
        with self._transaction() as conn:
            return self._write_progress(conn, worker_id, reports)

    def _write_progress(self, conn: sa.Connection, worker_id: str, reports: Sequence[ProgressWrite]) -> int:
        """One UPDATE per job (executemany), ownership checked per row; ``progress_at`` is when it was
        reported, by the database's clock."""
        c = self.table.c
        values = {"progress_done": sa.bindparam("p_done", type_=sa.Double()),
                  "progress_total": sa.func.coalesce(sa.bindparam("p_total", type_=sa.Double()), c.progress_total),
                  "progress_info": sa.func.coalesce(sa.bindparam("p_info", type_=sa.Text()), c.progress_info),
                  "progress_at": self.dialect.now_minus(sa.bindparam("p_age", type_=sa.Double()))}
        extra = [{"p_done": report.done, "p_total": report.total, "p_info": report.info, "p_age": report.age_s}
                 for report in reports]
        return self._update_each_held(conn, worker_id, [report.job for report in reports], values, extra)

    def heartbeat(self, worker_id: str, jobs: Sequence[Job], reports: Sequence[ProgressWrite],
                  worker: WorkerBeat | None) -> int:
        """In one transaction: renew the leases of the jobs this worker holds, write their reported progress,
        and upsert the worker's row in ``<table>_workers``; returns how many leases were renewed."""
        ids = [job.id for job in jobs if job.id is not None]
        if not ids and not reports and worker is None:
            return 0
        with self._transaction() as conn:
            renewed = self._renew_leases(conn, worker_id, ids) if ids else 0
            if reports:
                self._write_progress(conn, worker_id, reports)
            if worker is not None:
                self._upsert_worker(conn, worker)
        return renewed

    def save_checkpoint(self, worker_id: str, job: Job, state_json: str | None) -> bool:
        """UPDATE a held job's checkpoint (its JSON cursor) in a transaction of its own; False if not held."""
        statement = (self.dialect.update_by_id(self.table).where(self._held(worker_id, job))
                     .values(checkpoint_state=state_json, checkpoint_at=self.dialect.now()))
        with self._transaction() as conn:
            return conn.execute(statement).rowcount == 1

    def read_checkpoint(self, job_id: str) -> str | None:
        """SELECT a job's last saved checkpoint (JSON text), or None."""
        with self._reading() as conn:
            return conn.execute(sa.select(self.table.c.checkpoint_state)
                                .where(self.table.c.id == job_id)).scalar()

    def read_batch_progress(self, batch_id: str, *, on_primary: bool = False) -> BatchProgressRows:
        """Per status of a batch's jobs, in one connection: COUNT, the units reported (done, totals, and how
        many have one) and the completed jobs' summed run time; then the running jobs, with their worker,
        claim time and last report (both through the ``<table>_batch`` index); and the database's clock."""
        c, dialect = self.table.c, self.dialect
        units = sa.func.coalesce(c.progress_total, c.progress_done)
        run = sa.case((c.status == COMPLETED, dialect.seconds_between(c.finished_at, c.reserved_at)))
        queued = c.status.in_([PENDING, WAITING])
        held_or_finished = [status.value for status in JobStatus if status.value not in ("pending", "waiting")]

        def grouped(condition, run_s=sa.func.sum(run)):
            return (sa.select(c.status, sa.func.count().label("jobs"), sa.func.sum(units).label("units"),
                              sa.func.count(units).label("with_units"), sa.func.sum(c.progress_done).label("done"),
                              sa.func.sum(c.progress_total).label("total"),
                              sa.func.count(c.progress_total).label("with_total"), run_s.label("run_s"),
                              sa.func.min(c.queue).label("queue"))
                    .where(c.batch_id == batch_id, condition).group_by(c.status))

        # The queued jobs (never completed: no run time) index-only through <table>_queued, whose columns are
        # all this reads: a big batch's 100,000 pending rows are not read.  One equality per other status:
        # an IN list on <table>_batch's second column PostgreSQL reads as a filter over every row of the batch.
        statement = sa.union_all(grouped(queued, sa.cast(sa.null(), sa.Double())),
                                 *(grouped(c.status == status) for status in held_or_finished))
        running = (sa.select(c.id, c.job_key, c.queue, c.reserved_by, c.reserved_at, c.attempts, c.progress_done,
                             c.progress_total, c.progress_info, c.progress_at)
                   .where(c.batch_id == batch_id, c.status == PROCESSING).order_by(c.reserved_at, c.id))
        with self._reading() if on_primary else self._reading_analytics() as conn:
            now = conn.execute(sa.select(dialect.now())).scalar_one()
            by_status = {row["status"]: dict(row) for row in conn.execute(statement).mappings()}
            rows = [dict(row) for row in conn.execute(running).mappings()]
        return BatchProgressRows(now, by_status, rows)

    def read_batch_run_times(self, batch_id: str) -> tuple[float | None, list[float]]:
        """The 95th percentile of a batch's completed run times (finished minus claimed), aggregated by the
        database where it can (then the list is empty), else ``(None, every run time)`` for pandas."""
        c, dialect = self.table.c, self.dialect
        run = dialect.seconds_between(c.finished_at, c.reserved_at)
        completed = sa.and_(c.batch_id == batch_id, c.status == COMPLETED)
        percentile = dialect.percentiles([0.95], run)
        with self._reading_analytics() as conn:
            if percentile is not None:
                value = conn.execute(sa.select(percentile).where(completed)).scalar()
                return (None if not value or value[0] is None else float(value[0])), []
            return None, [float(value) for value in conn.execute(sa.select(run).where(completed)).scalars()
                          if value is not None]

    # -- the worker registry -------------------------------------------------------------

    def _upsert_worker(self, conn: sa.Connection, worker: WorkerBeat) -> None:
        """INSERT or UPDATE a worker's row: last seen now, with what it runs."""
        now = self.dialect.now()
        changes = {"host": worker.host, "pid": worker.pid, "queues": json.dumps(list(worker.queues)),
                   "concurrency": worker.concurrency, "running": worker.running,
                   "lease_timeout": worker.lease_timeout, "last_seen": now,
                   "resources": json.dumps(worker.resources) if worker.resources else None}
        if worker.starting:
            changes.update(started_at=now, stopped_at=None)
        self.dialect.upsert(conn, self.tables.workers, {"worker_id": worker.worker_id, "started_at": now,
                                                        **changes}, changes)

    def mark_worker_stopped(self, worker_id: str) -> None:
        """UPDATE a worker's row: stopped now (by a signal, ``stop()`` or the end of a burst), nothing running."""
        workers = self.tables.workers
        with self._transaction() as conn:
            conn.execute(workers.update().where(workers.c.worker_id == worker_id)
                         .values(stopped_at=self.dialect.now(), last_seen=self.dialect.now(), running=0))

    def read_workers(self, seen_within_s: float) -> tuple[datetime, list[dict[str, Any]]]:
        """The database's clock and every worker row last seen within ``seen_within_s`` seconds."""
        workers = self.tables.workers
        with self._reading_analytics() as conn:
            now = conn.execute(sa.select(self.dialect.now())).scalar_one()
            rows = [dict(row) for row in conn.execute(
                sa.select(workers).where(workers.c.last_seen >= self.dialect.now_plus(-seen_within_s))
                .order_by(workers.c.started_at, workers.c.worker_id)).mappings()]
        return now, rows

    def delete_workers_gone(self, older_than_s: float) -> int:
        """DELETE the rows of workers last seen more than ``older_than_s`` seconds ago (dead workers age out)."""
        workers = self.tables.workers
        with self._transaction() as conn:
            return conn.execute(workers.delete().where(
                workers.c.last_seen < self.dialect.now_plus(-older_than_s))).rowcount

    # -- schedules ----------------------------------------------------------------------
    #
    # A schedule's row says which slot is next; whichever worker's scheduler finds it
    # due locks the row (skipping rows another scheduler holds), inserts one job per
    # slot under the key cron.schedule_key(name, slot) (a slot already stored is not
    # inserted again), and moves next_run_at on, in one transaction.

    def save_schedule(self, values: dict[str, Any]) -> datetime:
        """INSERT or UPDATE a schedule's row; returns its next slot.

        An unchanged cron and time zone keep the stored next slot (re-running a cell or
        restarting a worker neither skips nor repeats a slot); a new one starts from now.
        """
        schedules = self.tables.schedules
        with self._transaction() as conn:
            now = conn.execute(sa.select(self.dialect.now())).scalar_one()
            stored = conn.execute(sa.select(schedules.c.cron, schedules.c.timezone, schedules.c.next_run_at)
                                  .where(schedules.c.name == values["name"]).with_for_update()).first()
            same = stored is not None and (stored.cron, stored.timezone) == (values["cron"], values["timezone"])
            next_run_at = stored.next_run_at if same and stored.next_run_at is not None else \
                next_slot(values["cron"], values["timezone"], now)
            # Two workers storing the same new schedule at once: the row the other wrote keeps its next slot
            # (first in SET: MySQL reads the columns as already changed by the assignments before).
            c = schedules.c
            kept = sa.case((sa.and_(c.cron == values["cron"], c.timezone == values["timezone"],
                                    c.next_run_at.is_not(None)), c.next_run_at), else_=sa.literal(next_run_at, UTCDateTime()))
            changes = {"next_run_at": kept, **{k: v for k, v in values.items() if k != "name"}, "updated_at": now}
            self.dialect.upsert(conn, schedules, {**values, "next_run_at": next_run_at, "updated_at": now,
                                                  "created_at": now}, changes)
        return next_run_at

    def delete_schedule(self, name: str) -> bool:
        """DELETE a schedule (the jobs it fired stay); False if there was none of that name."""
        schedules = self.tables.schedules
        with self._transaction() as conn:
            return conn.execute(schedules.delete().where(schedules.c.name == name)).rowcount == 1

    def read_schedules(self) -> tuple[datetime, list[dict[str, Any]]]:
        """The database's clock and every schedule's row, by name."""
        schedules = self.tables.schedules
        with self._reading_analytics() as conn:
            now = conn.execute(sa.select(self.dialect.now())).scalar_one()
            return now, [dict(row) for row in conn.execute(sa.select(schedules).order_by(schedules.c.name))
                         .mappings()]

    def schedules_due_in(self) -> float | None:
        """Seconds until the earliest schedule's next slot (<= 0: due now), or None without schedules:
        one read, so an idle scheduler writes nothing."""
        schedules = self.tables.schedules
        with self._reading() as conn:
            now, earliest = conn.execute(sa.select(self.dialect.now(), sa.func.min(schedules.c.next_run_at)
                                                   .label("earliest"))).one()
        return seconds_until(earliest, now)

    def fire_due_schedules(self, limit: int = 100) -> int:
        """Fire the due slots of up to ``limit`` schedules (see :func:`kronix_data.cron.plan_firing`) in one
        transaction, NOTIFY listeners if a job was made; returns how many jobs were made."""
        schedules = self.tables.schedules
        made = 0
        with self._transaction() as conn:
            now = conn.execute(sa.select(self.dialect.now())).scalar_one()
            due = conn.execute(sa.select(schedules).where(schedules.c.next_run_at <= now)
                               .order_by(schedules.c.next_run_at, schedules.c.name).limit(limit)
                               .with_for_update(skip_locked=self.dialect.skips_locked(conn))).mappings().all()
            for schedule in due:
                made += self._fire_schedule(conn, dict(schedule), now)
            if made:
                self.dialect.notify(conn, self.channel)
        return made

    def _fire_schedule(self, conn: sa.Connection, schedule: dict[str, Any], now: datetime) -> int:
        """Insert the jobs of one locked schedule's due slots and move its next slot on; how many were new."""
        schedules = self.tables.schedules
        try:
            plan = plan_firing(schedule["cron"], schedule["timezone"], schedule["next_run_at"], now)
        except InvalidInputError as error:  # a row no validation made (edited by hand, a zone this machine lacks)
            log.error("schedule %r cannot fire and is stopped (next_run_at cleared; save it again to restart it): "
                      "%s", schedule["name"], error)
            conn.execute(schedules.update().where(schedules.c.name == schedule["name"]).values(next_run_at=None))
            return 0
        if plan.missed:
            log.warning("schedule %r: %d slot(s) missed while no scheduler ran; firing the latest, %s, once",
                        schedule["name"], plan.skipped + 1, plan.slots[-1].isoformat())
        payload = decode_json(schedule["payload"])
        rows = [self.row_for_push(Job(schedule["task"], payload, queue=schedule["queue"], priority=schedule["priority"],
                                      max_retries=schedule["max_retries"], key=schedule_key(schedule["name"], slot)))
                for slot in plan.slots]
        stored = self.dialect.insert_new_keys(conn, self.table, rows) if rows else {}
        new = sum(stored.get(row["job_key"]) == row["id"] for row in rows)
        changes: dict[str, Any] = {"next_run_at": plan.next_run_at}
        if rows:
            changes.update(last_run_at=plan.slots[-1], last_job_id=stored[rows[-1]["job_key"]], last_fired_at=now)
        conn.execute(schedules.update().where(schedules.c.name == schedule["name"]).values(changes))
        return new

    # -- snooze ----------------------------------------------------------------------------

    def snooze(self, worker_id: str, snoozed: Sequence[tuple[Job, float]]) -> int:
        """Put held jobs back as pending, each due its own delay from now (database clock), the attempt not
        counted and ``last_error`` untouched: a job that asked to run later did not fail.  One UPDATE per job
        (executemany), in one transaction; a job whose cancel was asked is cancelled instead."""
        c = self.table.c
        jobs = [job for job, _ in snoozed if job.id is not None]
        if not jobs:
            return 0
        extra = [{"snooze_back_s": -float(delay)} for job, delay in snoozed if job.id is not None]
        values = {"status": JobStatus.PENDING.value, "attempts": c.attempts - 1, "reserved_by": None,
                  "reserved_at": None, "heartbeat_at": None,
                  "available_at": self.dialect.now_minus(sa.bindparam("snooze_back_s", type_=sa.Double()))}
        with self._transaction() as conn:
            put_back = self._update_each_held(conn, worker_id, jobs, values, extra, cancel_asked=False)
            if put_back == len(jobs):
                return put_back
            cancelled = [job.id for job in jobs if self._cancel_held(conn, worker_id, job)]
            if cancelled:
                self._cancel_dependents(conn, cancelled)
        return put_back + len(cancelled)

    # -- the finished jobs' rollup ---------------------------------------------------------
    #
    # Counts that do not grow with history.  Jobs still in flight (pending, waiting,
    # processing) are counted live through the <table>_status index: they are bounded
    # by the work queued, not by the history.  Finished jobs are counted from
    # <table>_rollup (one row per queue, batch and status) for those finished before
    # the watermark W in <table>_rollup_state, plus a live count of those finished
    # since W through the <table>_finished index (a few minutes' worth).  A fold moves
    # that tail into the rollup; the statements that change already-finished rows
    # (retrying or deleting dead letters, pruning) take what they change out of it in
    # their own transaction.  Both hold the state row's lock, so they never interleave;
    # the claim and completion path never touches either table.

    #: A fold before a read on the primary, when the last one is older than this (seconds): the tail
    #: stays small even where no worker runs (the workers fold on every maintenance pass).
    FOLD_STALE_S = 300.0
    #: How often one store looks whether the rollup needs a fold before a read (seconds).
    FOLD_CHECK_S = 60.0

    @staticmethod
    def _rollup_statuses() -> tuple[list[str], list[str]]:
        """The statuses counted live (in flight) and those folded (finished, final)."""
        return ([JobStatus.PENDING.value, JobStatus.WAITING.value, JobStatus.PROCESSING.value],
                [COMPLETED, FAILED, CANCELLED])

    def _folded(self, watermark: datetime) -> sa.ColumnElement[bool]:
        """The jobs the rollup counts: finished before the watermark (or by a previous release, without a time)."""
        c = self.table.c
        return sa.and_(c.status.in_(self._rollup_statuses()[1]),
                       sa.or_(c.finished_at < watermark, c.finished_at.is_(None)))

    def _watermark(self) -> sa.ScalarSelect:
        state = self.tables.rollup_state
        return sa.select(state.c.watermark).where(state.c.id == 1).scalar_subquery()

    def seed_rollup(self) -> None:
        """Make the state row if there is none and, on a table never folded (new, or from a previous
        release), fold every finished job into the rollup: one pass over the table, once."""
        state = self.tables.rollup_state
        with self._transaction() as conn:
            self.dialect.upsert(conn, state, {"id": 1, "watermark": None, "folded_at": None}, {"id": 1})
            row = conn.execute(sa.select(state.c.watermark, state.c.folded_at).where(state.c.id == 1)
                               .with_for_update()).one()
            if row.folded_at is None:
                self._fold(conn, None)
            elif self._summaries_missing(conn):  # folded by the release before the batch summaries
                self._recount_batch_summaries(conn, None)

    def _summaries_missing(self, conn: sa.Connection) -> bool:
        """Whether the rollup holds a batch but ``<table>_rollup_batches`` none (a table upgraded to it)."""
        r, b = self.tables.rollup.c, self.tables.rollup_batches.c
        return bool(conn.execute(sa.select(sa.and_(sa.exists().where(r.batch_id.is_not(None)),
                                                   ~sa.exists().where(b.batch_id.is_not(None))))).scalar())

    def rebuild_rollup(self) -> int:
        """Count the rollup afresh from the table (one pass over it), for a table whose finished rows were
        changed behind the store's back (an UPDATE of ``finished_at`` or ``status`` by hand); waits for a
        fold in progress.  Returns how many jobs it holds."""
        with self._transaction() as conn:
            if self._lock_rollup(conn) is None and conn.execute(sa.select(sa.func.count()).select_from(
                    self.tables.rollup_state)).scalar_one() == 0:
                raise NotFoundError(f"table {self.table_name!r} has no rollup: create_table() first")
            conn.execute(self.tables.rollup.delete())
            conn.execute(self.tables.rollup_totals.delete())
            return self._fold(conn, None)

    def fold_finished(self) -> int | None:
        """Fold the jobs finished since the watermark into the rollup, in one transaction; returns how many,
        or None if another process is folding (its state row is locked: this one skips, never waits)."""
        state = self.tables.rollup_state
        with self._transaction() as conn:
            row = conn.execute(sa.select(state.c.watermark, state.c.folded_at).where(state.c.id == 1)
                               .with_for_update(skip_locked=self.dialect.skips_locked(conn))).first()
            if row is None or row.folded_at is None:
                return None  # locked, or a table never upgraded (create_or_upgrade_table seeds it)
            return self._fold(conn, row.watermark)

    def fold_if_stale(self) -> None:
        """Fold first when the last fold is older than :attr:`FOLD_STALE_S`, on the primary only (a standby
        cannot write; there the primary's workers fold).  A fold that cannot run (a read-only role, say)
        leaves the read to count a longer tail, still exact."""
        if self.read_engine is not None:
            return
        # One look per FOLD_CHECK_S, not one per view: a monitor's refresh calls three views, each of which
        # asked again (a round trip each) for a fold that is due only every FOLD_STALE_S.
        now = time.monotonic()
        if now < self._fold_checked_at + self.FOLD_CHECK_S:
            return
        self._fold_checked_at = now
        state = self.tables.rollup_state
        try:
            with self._reading() as conn:
                stale = conn.execute(sa.select(sa.func.count()).select_from(state).where(
                    state.c.id == 1, state.c.folded_at < self.dialect.now_plus(-self.FOLD_STALE_S))).scalar_one()
            if stale:
                self.fold_finished()
        except sa.exc.DBAPIError as error:
            log.debug("no fold before the read: %s", str(error).splitlines()[0])

    def _fold(self, conn: sa.Connection, old: datetime | None) -> int:
        """Count ``old <= finished_at < new`` by queue, batch and status into the rollup and set W = new.

        The new watermark is read first, in a statement of its own (see
        ``QueueDialect.fold_watermark``): every job that will ever be finished
        before it is finished by a transaction visible to the count that follows.
        """
        c, state = self.table.c, self.tables.rollup_state
        new = self.dialect.fold_watermark(conn)
        folded = 0
        if old is None or new > old:
            window = self._folded(new) if old is None else sa.and_(
                c.status.in_(self._rollup_statuses()[1]), c.finished_at >= old, c.finished_at < new)
            groups = [dict(row) for row in conn.execute(self._rollup_groups(window)).mappings()]
            self._add_to_rollup(conn, groups)
            self._recount_batch_summaries(conn, None if old is None else {group["batch_id"] for group in groups})
            folded = sum(group["jobs"] for group in groups)
        else:
            new = old  # the clock or an open transaction held it back: W never moves back
        conn.execute(state.update().where(state.c.id == 1).values(watermark=new, folded_at=self.dialect.now()))
        return folded

    def _rollup_groups(self, condition: sa.ColumnElement[bool]) -> sa.Select:
        """The rollup's figures of the jobs matching ``condition``, per queue, batch and status."""
        c = self.table.c
        return (sa.select(c.queue, c.batch_id, c.status, sa.func.count().label("jobs"),
                          sa.func.min(c.name).label("min_name"), sa.func.max(c.name).label("max_name"),
                          sa.func.min(c.created_at).label("min_created_at"),
                          sa.func.max(c.created_at).label("max_created_at"),
                          sa.func.max(c.finished_at).label("max_finished_at"))
                .where(condition).group_by(c.queue, c.batch_id, c.status))

    def _rollup_rows(self, conn: sa.Connection, batch_ids: set[str | None]) -> dict[tuple, dict[str, Any]]:
        """The rollup's rows of these batches (None: the jobs of no batch), by (queue, batch, status)."""
        r = self.tables.rollup.c
        named = sorted(batch for batch in batch_ids if batch is not None)
        conditions = [r.batch_id.in_(named[start:start + IN_LIST_LIMIT]) for start in range(0, len(named),
                                                                                             IN_LIST_LIMIT)]
        if None in batch_ids:
            conditions.append(r.batch_id.is_(None))
        rows: dict[tuple, dict[str, Any]] = {}
        for condition in conditions:
            for row in conn.execute(sa.select(self.tables.rollup).where(condition)).mappings():
                rows[(row["queue"], row["batch_id"], row["status"])] = dict(row)
        return rows

    def _add_to_rollup(self, conn: sa.Connection, groups: Sequence[dict[str, Any]]) -> None:
        """Add folded groups to their rollup rows (made where missing): counts summed, extremes widened."""
        if not groups:
            return
        rollup = self.tables.rollup
        stored = self._rollup_rows(conn, {group["batch_id"] for group in groups})
        new, changed = [], []
        for group in groups:
            row = stored.get((group["queue"], group["batch_id"], group["status"]))
            if row is None:
                new.append({**group, "jobs": int(group["jobs"])})
                continue
            changed.append({"row_id": row["id"], "n_jobs": int(row["jobs"]) + int(group["jobs"]),
                            **{f"n_{name}": _extreme(pick, row[name], group[name]) for name, pick in _ROLLUP_EXTREMES}})
        if new:
            conn.execute(rollup.insert(), new)
        if changed:
            self._update_rollup_rows(conn, changed)
        self._add_to_totals(conn, groups, 1)

    def _add_to_totals(self, conn: sa.Connection, groups: Sequence[dict[str, Any]], sign: int) -> None:
        """Add (``sign`` 1) or take off (-1) the groups' counts per queue and status in ``<table>_rollup_totals``;
        a total left at zero goes."""
        totals = self.tables.rollup_totals
        change: dict[tuple[str, str], int] = {}
        for group in groups:
            key = (group["queue"], group["status"])
            change[key] = change.get(key, 0) + sign * int(group["jobs"])
        stored = {(row.queue, row.status): int(row.jobs) for row in conn.execute(sa.select(totals))}
        new = [{"queue": queue, "status": status, "jobs": jobs} for (queue, status), jobs in change.items()
               if (queue, status) not in stored and jobs > 0]
        left = [{"t_queue": queue, "t_status": status, "t_jobs": stored[(queue, status)] + jobs}
                for (queue, status), jobs in change.items() if (queue, status) in stored]
        same_key = sa.and_(totals.c.queue == sa.bindparam("t_queue"), totals.c.status == sa.bindparam("t_status"))
        if new:
            conn.execute(totals.insert(), new)
        if kept := [row for row in left if row["t_jobs"] > 0]:
            conn.execute(totals.update().where(same_key).values(jobs=sa.bindparam("t_jobs")), kept)
        if gone := [{"t_queue": row["t_queue"], "t_status": row["t_status"]} for row in left if row["t_jobs"] <= 0]:
            conn.execute(totals.delete().where(same_key), gone)

    def _update_rollup_rows(self, conn: sa.Connection, changed: list[dict[str, Any]]) -> None:
        rollup = self.tables.rollup
        conn.execute(rollup.update().where(rollup.c.id == sa.bindparam("row_id")).values(
            jobs=sa.bindparam("n_jobs"), **{name: sa.bindparam(f"n_{name}") for name, _ in _ROLLUP_EXTREMES}),
            changed)

    def _lock_rollup(self, conn: sa.Connection) -> datetime | None:
        """Lock the state row (waiting for a fold in progress) and return the watermark (None: never folded)."""
        state = self.tables.rollup_state
        return conn.execute(sa.select(state.c.watermark).where(state.c.id == 1).with_for_update()).scalar()

    def _take_from_rollup(self, conn: sa.Connection, condition: sa.ColumnElement[bool]):
        """Before a statement changes or deletes the finished jobs matching ``condition``: lock the state row
        and count those among them the rollup holds.  Hand the result to :meth:`_settle_rollup` after it."""
        watermark = self._lock_rollup(conn)
        if watermark is None:
            return None, []
        counts = [dict(row) for row in conn.execute(
            sa.select(self.table.c.queue, self.table.c.batch_id, self.table.c.status, sa.func.count().label("jobs"))
            .where(condition, self._folded(watermark))
            .group_by(self.table.c.queue, self.table.c.batch_id, self.table.c.status)).mappings()]
        return watermark, counts

    def _settle_rollup(self, conn: sa.Connection, taken) -> None:
        """After the change: the counts taken off their rows, and the extremes of each batch touched
        recomputed from the jobs it still has folded (through the ``<table>_batch`` index); rows left
        with no job go."""
        watermark, counts = taken
        if not counts:
            return
        rollup, r = self.tables.rollup, self.tables.rollup.c
        batches = {group["batch_id"] for group in counts}
        stored = self._rollup_rows(conn, batches)
        named = sorted(batch for batch in batches if batch is not None)
        exact = {}
        for start in range(0, len(named), IN_LIST_LIMIT):
            condition = sa.and_(self.table.c.batch_id.in_(named[start:start + IN_LIST_LIMIT]), self._folded(watermark))
            exact.update({(row["queue"], row["batch_id"], row["status"]): dict(row)
                          for row in conn.execute(self._rollup_groups(condition)).mappings()})
        changed, gone = [], []
        for group in counts:
            key = (group["queue"], group["batch_id"], group["status"])
            row = stored.get(key)
            if row is None:
                continue
            jobs = int(row["jobs"]) - int(group["jobs"])
            if jobs <= 0:
                gone.append(row["id"])
                continue
            extremes = exact.get(key, row) if group["batch_id"] is not None else row
            changed.append({"row_id": row["id"], "n_jobs": jobs,
                            **{f"n_{name}": extremes[name] for name, _ in _ROLLUP_EXTREMES}})
        if changed:
            self._update_rollup_rows(conn, changed)
        for start in range(0, len(gone), IN_LIST_LIMIT):
            conn.execute(rollup.delete().where(r.id.in_(gone[start:start + IN_LIST_LIMIT])))
        self._add_to_totals(conn, counts, -1)
        self._recount_batch_summaries(conn, batches)

    def _read_watermark(self, conn: sa.Connection) -> datetime | None:
        """The watermark as it is now (it only ever grows), for :meth:`_in_tail`."""
        return conn.execute(sa.select(self._watermark())).scalar()

    def _in_tail(self, floor: datetime | None) -> sa.ColumnElement[bool]:
        """Finished since the watermark, as the statement's own snapshot has it; ``floor``, a watermark read
        just before (never later than that one), bounds the ``<table>_finished`` range the planner sees:
        against the subquery alone PostgreSQL guesses a third of the table and scans all of it."""
        c = self.table.c
        exact = c.finished_at >= self._watermark()
        return exact if floor is None else sa.and_(c.finished_at >= floor, exact)

    def _live_counts(self, floor: datetime | None = None) -> sa.CompoundSelect:
        """``(queue, status, jobs)`` in one statement (one snapshot): the rollup's totals (a row per queue and
        status), the jobs finished since the watermark (a range of ``<table>_finished``) and those in
        flight (``<table>_status``); the same status may come in several rows, to be added up."""
        c, totals = self.table.c, self.tables.rollup_totals.c
        active, finished = self._rollup_statuses()
        return sa.union_all(
            sa.select(totals.queue, totals.status, totals.jobs),
            sa.select(c.queue, c.status, sa.func.count()).where(self._in_tail(floor), c.status.in_(finished))
            .group_by(c.queue, c.status),
            sa.select(c.queue, c.status, sa.func.count()).where(c.status.in_(active)).group_by(c.status, c.queue))

    def _live_batches(self, floor: datetime | None = None, since: sa.ColumnElement | None = None
                      ) -> sa.CompoundSelect:
        """Per batch, in one statement: a count per status, ``name``/``other_name`` (smallest, largest),
        ``created_at`` (first), ``last_created_at`` and ``finished_at`` (last), from the batch summaries,
        the jobs finished since the watermark and those in flight; several rows may share a batch.
        ``since``: of the summaries, only those of batches with a job created since then or in the
        other two parts (the others have no such job)."""
        c, b = self.table.c, self.tables.rollup_batches.c
        statuses = [status.value for status in JobStatus]
        finished = self._rollup_statuses()[1]

        def live(condition):
            return (sa.select(c.batch_id, *(sa.func.sum(sa.case((c.status == status, 1), else_=0)).label(status)
                                            for status in statuses),
                              sa.func.min(c.name).label("name"), sa.func.max(c.name).label("other_name"),
                              sa.func.min(c.created_at).label("created_at"),
                              sa.func.max(c.created_at).label("last_created_at"),
                              sa.func.max(c.finished_at).label("finished_at"))
                    .where(c.batch_id.is_not(None), condition).group_by(c.batch_id))

        # The queued jobs (unfinished: no finished_at) index-only through <table>_queued, grouped in its order
        # first (a comparison of equal names per row, not a collation's ordering), then per batch; the
        # held ones are few.
        grouped = (sa.select(c.status, c.batch_id, c.name, sa.func.count().label("jobs"),
                             sa.func.min(c.created_at).label("created_at"),
                             sa.func.max(c.created_at).label("last_created_at"))
                   .where(c.status.in_([PENDING, WAITING]), c.batch_id.is_not(None))
                   .group_by(c.status, c.batch_id, c.queue, c.name).subquery("queued"))
        q = grouped.c
        queued = (sa.select(q.batch_id, *(sa.func.sum(sa.case((q.status == status, q.jobs), else_=0)).label(status)
                                          for status in statuses),
                            sa.func.min(q.name).label("name"), sa.func.max(q.name).label("other_name"),
                            sa.func.min(q.created_at).label("created_at"),
                            sa.func.max(q.last_created_at).label("last_created_at"),
                            sa.cast(sa.null(), c.finished_at.type).label("finished_at"))
                  .group_by(q.batch_id))
        recent = sa.union_all(live(sa.and_(self._in_tail(floor), c.status.in_(finished))), queued,
                              live(c.status == PROCESSING)).cte("recent")
        summaries = sa.select(b.batch_id, *(b[status] if status in finished else sa.literal(0).label(status)
                                            for status in statuses),
                              b.min_name.label("name"), b.max_name.label("other_name"),
                              b.min_created_at.label("created_at"), b.max_created_at.label("last_created_at"),
                              b.max_finished_at.label("finished_at"))
        if since is not None:
            summaries = summaries.where(sa.or_(b.max_created_at >= since,
                                               b.batch_id.in_(sa.select(recent.c.batch_id))))
        return sa.union_all(summaries, sa.select(recent))

    def _recount_batch_summaries(self, conn: sa.Connection, batch_ids: set[str | None] | None) -> None:
        """Count the summary rows (``<table>_rollup_batches``) of these batches (None: of every batch) afresh
        from their rollup rows (through ``<table>_rollup_key``); a batch left with none has no row."""
        summary, r = self.tables.rollup_batches, self.tables.rollup.c

        def jobs(status):
            return sa.func.coalesce(sa.func.sum(sa.case((r.status == status, r.jobs), else_=0)), 0)

        counted = (sa.select(r.batch_id, jobs(COMPLETED), jobs(FAILED), jobs(CANCELLED), sa.func.min(r.min_name),
                             sa.func.max(r.max_name), sa.func.min(r.min_created_at), sa.func.max(r.max_created_at),
                             sa.func.max(r.max_finished_at))
                   .where(r.batch_id.is_not(None)).group_by(r.batch_id))
        columns = ["batch_id", COMPLETED, FAILED, CANCELLED, "min_name", "max_name", "min_created_at",
                   "max_created_at", "max_finished_at"]
        if batch_ids is None:
            conn.execute(summary.delete())
            conn.execute(summary.insert().from_select(columns, counted))
            return
        named = sorted(batch for batch in batch_ids if batch is not None)
        for start in range(0, len(named), IN_LIST_LIMIT):
            some = named[start:start + IN_LIST_LIMIT]
            conn.execute(summary.delete().where(summary.c.batch_id.in_(some)))
            conn.execute(summary.insert().from_select(columns, counted.where(r.batch_id.in_(some))))


#: The rollup's extremes and how two of them combine.
_ROLLUP_EXTREMES = (("min_name", min), ("max_name", max), ("min_created_at", min), ("max_created_at", max),
                    ("max_finished_at", max))


def _data_owner(row: dict[str, Any]) -> str:
    """What a row's binary data is, for an error: ``chunk 3 of batch 'b'`` for a ``map`` chunk, else the job."""
    key, batch = row.get("job_key"), row.get("batch_id")
    if key and batch and key.startswith(f"{batch}:"):
        return f"chunk {key[len(batch) + 1:]} of batch {batch!r}"
    return f"the data of job {key or row['id']!r}"


class ChunksStoredMeanwhile(Exception):
    """A fast chunk insert met a key stored by another session since its look-up (the batch is retried)."""


class ChunkInsert:
    """The windows of one batch of chunk jobs, stored in one transaction (:meth:`JobStore.inserting_chunks`).

    A batch with no stored job yet (one indexed look-up at the start) skips the
    per-window look-ups; otherwise :meth:`stored_keys` asks once per window.  New
    rows go through the dialect's fastest insert (COPY on PostgreSQL, one
    multi-row INSERT on MariaDB, executemany on SQLite), or, ``careful``, through
    the INSERT that skips stored keys.
    """

    def __init__(self, store: JobStore, conn: sa.Connection, batch_id: str, wait: WaitGroup | None, careful: bool):
        self.store, self.conn, self.batch_id, self.wait, self.careful = store, conn, batch_id, wait, careful
        self.inserted = 0
        self._heads: dict[str, int] = {}
        self._joined: dict[str, tuple[int, str | None]] = {}
        self._batch_stored = careful or store._batch_has_jobs(conn, batch_id)

    def stored_keys(self, keys: Sequence[str]) -> set[str]:
        """The keys among ``keys`` (a window's) already stored: one indexed count (a second
        look-up reads which, only for a window partly stored), none for a batch with no job stored before
        this transaction.  A key is unique in the table: one stored outside the batch is skipped too, as
        the INSERT skipping stored keys would."""
        if not self._batch_stored or not keys:
            return set()
        stored = self.store._count_stored_keys(self.conn, keys)
        if stored == len(keys):
            return set(keys)
        return self.store._stored_keys(self.conn, keys) if stored else set()

    def insert(self, rows: list[dict[str, Any]]) -> None:
        """Store one window's new rows (rows of :meth:`JobStore.row_for_push`, with ``fair_offset``)."""
        if not rows:
            return
        store, conn = self.store, self.conn
        blobs = store.split_data(rows)  # checked against the cap; COPY takes its columns from the rows
        store._give_turns(conn, rows, self._heads)
        if self.wait is not None:
            group = WaitGroup(self.wait.wait_id, list(range(len(rows))), self.wait.parent_ids, self.wait.parent_batches)
            store._join_wait_groups(conn, rows, [group], self._joined)
        if self.careful:
            stored = store.dialect.insert_new_keys(conn, store.table, rows)
            for row in rows:  # a key stored meanwhile keeps its job (and its bytes): see _insert_chunk_data
                row["id"] = stored[row["job_key"]]
        else:
            store.dialect.insert(conn, store.table, rows)
        if blobs:
            # DataFrame chunks' Parquet bytes, same transaction (a fast insert kept every row's new id)
            store._insert_chunk_data(conn, rows, blobs, ids_new=not self.careful)
        self.inserted += len(rows)


def _extreme(pick, current, value):
    return value if current is None else current if value is None else pick(current, value)
