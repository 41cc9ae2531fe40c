"""The jobs table: its columns, indexes, and creating or upgrading it in place.

The seed's twelve columns keep their names, types and meanings; the columns
after them are kronix-data's own.  Only SQLAlchemy Core is used, and table
names are validated identifiers that SQLAlchemy quotes, never user SQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from .errors import InvalidInputError
from .job import MAX_BATCH_ID_LENGTH, MAX_ID_LENGTH, MAX_KEY_LENGTH, MAX_NAME_LENGTH, MAX_QUEUE_LENGTH, JobStatus

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")

#: Status literals are inlined (not bound) so the planner can match them to
#: the partial indexes, which a bound parameter in a generic plan cannot.
#: Every status so, by its value (a key of this dict, never a caller's string, is what is inlined).
STATUS_LITERALS = {status.value: sa.literal_column(f"'{status.value}'") for status in JobStatus}
PENDING, PROCESSING, WAITING = (STATUS_LITERALS[status] for status in ("pending", "processing", "waiting"))


#: What a claim reads back: what a worker needs to run the job and nothing
#: more (every extra timestamp costs a parse per row on the hot path).
CLAIMED_COLUMNS = ("id", "name", "queue", "attempts", "max_retries", "payload", "last_error",
                   "created_at", "available_at", "reserved_at", "job_key", "batch_id", "priority",
                   "requires", "fair_rank")


def claim_order(table: sa.Table) -> tuple[sa.ColumnElement, ...]:
    """The order jobs are claimed in: highest priority, then lowest fair-share turn, then due longest, then
    oldest id (the ``_due`` index; the turn is :mod:`kronix_data.limits`' round robin between batches)."""
    c = table.c
    return (c.priority.desc(), c.fair_rank, c.available_at, c.id)


def claim_sort_key(row) -> tuple:
    """The same order for claimed rows in Python."""
    return (-row["priority"], row["fair_rank"], row["available_at"], row["id"])


def parse_table_name(name: str) -> tuple[str | None, str]:
    """Split ``[schema.]table`` and validate both parts as plain identifiers.

    Raises ``ValueError`` before any SQL runs, so quotes, spaces, semicolons or
    SQL in a table name never reach the database.
    """
    if not isinstance(name, str):
        raise InvalidInputError(f"table name must be a str, got {type(name).__name__}")
    parts = name.split(".")
    if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(part) for part in parts):
        raise InvalidInputError(
            f"invalid table name {name!r}: use letters, digits and underscores "
            "(at most 48, not starting with a digit), optionally as schema.table"
        )
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


class UTCDateTime(sa.types.TypeDecorator):
    """Timestamps stored in UTC and always read back timezone-aware.

    PostgreSQL keeps ``TIMESTAMPTZ``; MySQL/MariaDB ``DATETIME(6)`` and SQLite
    text have no zone, so values are written as naive UTC there.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value, dialect):
        if value is None or dialect.name == "postgresql":
            return value
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if isinstance(value, str):  # an expression SQLite returned untyped
            value = datetime.fromisoformat(value)
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _key_text(length: int) -> sa.types.TypeEngine:
    """TEXT, except a bounded VARCHAR where MySQL must index it."""
    return sa.Text().with_variant(sa.String(length), "mysql", "mariadb")


def _long_text() -> sa.types.TypeEngine:
    """TEXT, except LONGTEXT on MySQL, whose TEXT stops at 64 KiB."""
    return sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


@dataclass(frozen=True)
class Tables:
    """The jobs table and the small tables beside it, on one MetaData.

    ``jobs``: one row per job.  ``deps``: one row per (parent job, wait group)
    edge.  ``waits``: one row per wait group, the jobs that wait for the same
    parents (a job pushed with ``depends_on``, the chunks of a batch mapped
    ``after=`` another, a batch's ``then`` step), with how many of its parents
    have not completed yet.  ``queues``: one row per queue that has settings
    (paused or not); a queue without a row has the defaults.  ``workers``: one
    row per worker, written by its heartbeat (the worker registry).  ``rollup``,
    ``rollup_totals``, ``rollup_batches`` and ``rollup_state``: the finished jobs' counts, folded
    (see :func:`build_rollup_tables`).
    """

    jobs: sa.Table
    deps: sa.Table
    waits: sa.Table
    queues: sa.Table
    workers: sa.Table
    #: One row per task with limits (``@task(concurrency=..., rate=...)``), written by the workers that run it.
    task_limits: sa.Table
    schedules: sa.Table
    rollup: sa.Table
    rollup_totals: sa.Table
    rollup_state: sa.Table
    #: Binary data beside a job (``<table>_data``): a DataFrame chunk's or result's Parquet bytes.
    data: sa.Table
    #: One row per batch: the rollup's rows of the batch summed up (what ``batches()`` reads).
    rollup_batches: sa.Table

    def all(self) -> tuple[sa.Table, ...]:
        return (self.jobs, self.deps, self.waits, self.queues, self.workers, self.task_limits, self.schedules,
                self.rollup, self.rollup_totals, self.rollup_state, self.data, self.rollup_batches)


def build_tables(name: str, *, partial_indexes: bool, now_default: str) -> Tables:
    """The jobs table, its companions (``<name>_deps``, ``<name>_waits``, ``<name>_queues``) and their
    indexes for one dialect.

    ``partial_indexes`` says whether the database has ``CREATE INDEX ... WHERE``;
    ``now_default`` is the SQL of the server's current time, the default of
    ``created_at`` (the driver always writes it explicitly anyway).
    """
    schema, table_name = parse_table_name(name)
    metadata = sa.MetaData()
    options = {"schema": schema, "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}
    table = sa.Table(
        table_name,
        metadata,
        # The seed's columns, in the seed's order.
        sa.Column("id", _key_text(MAX_ID_LENGTH), primary_key=True),
        sa.Column("name", _key_text(MAX_NAME_LENGTH), nullable=False),
        sa.Column("queue", _key_text(MAX_QUEUE_LENGTH), nullable=False, server_default="default"),
        sa.Column("status", _key_text(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_retries", sa.Integer, nullable=False, server_default="3"),
        sa.Column("payload", _long_text()),
        sa.Column("last_error", _long_text()),
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=sa.text(now_default)),
        sa.Column("available_at", UTCDateTime()),
        sa.Column("finished_at", UTCDateTime()),
        sa.Column("reserved_by", _key_text(255)),
        # kronix-data's own: when the current reservation began, when its lease
        # was last renewed, the job's JSON return value, its idempotency key
        # (unique; NULLs never collide) and the batch it belongs to.
        sa.Column("reserved_at", UTCDateTime()),
        sa.Column("heartbeat_at", UTCDateTime()),
        sa.Column("result", _long_text()),
        sa.Column("job_key", _key_text(MAX_KEY_LENGTH)),
        sa.Column("batch_id", _key_text(MAX_BATCH_ID_LENGTH)),
        # Pipelines: claim order, the wait group a waiting job belongs to, whether
        # some wait group waits for this job, and when a cancel was asked while it ran.
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("wait_id", _key_text(MAX_KEY_LENGTH)),
        sa.Column("has_dependents", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("cancel_requested_at", UTCDateTime()),
        # Progress and checkpoints: what the running job last reported (units done, of
        # how many, a JSON object of details, when; written by its worker at most once a
        # progress_interval), and the JSON cursor it last saved to resume from.
        sa.Column("progress_done", sa.Double()),
        sa.Column("progress_total", sa.Double()),
        sa.Column("progress_info", _long_text()),
        sa.Column("progress_at", UTCDateTime()),
        sa.Column("checkpoint_state", _long_text()),
        sa.Column("checkpoint_at", UTCDateTime()),
        # Resources the job needs (kronix_data.resources): canonical JSON like {"gpu":1.0}; NULL for none,
        # which every worker may claim.
        sa.Column("requires", sa.Text),
        # Fair share: the job's turn among the batches of its queue (kronix_data.limits).
        sa.Column("fair_rank", sa.BigInteger, nullable=False, server_default="0"),
        **options,
    )
    c = table.c
    sa.Index(f"{table_name}_key", c.job_key, unique=True)
    if partial_indexes:
        # Claim: due pending jobs of a queue, highest priority then oldest first; only pending rows are in it.
        sa.Index(f"{table_name}_due", c.queue, c.priority.desc(), c.fair_rank, c.available_at, c.id,
                 postgresql_where=sa.text("status = 'pending'"),
                 sqlite_where=sa.text("status = 'pending'"))
        # The stats' oldest pending job per queue: one MIN read off the front of a queue's range, where
        # through _due (priority first) it read every pending row (~90 ms at 200,000).  A claim adds no
        # entry (the new row is processing), an enqueue one.
        sa.Index(f"{table_name}_pending_due", c.queue, c.available_at,
                 postgresql_where=sa.text("status = 'pending'"),
                 sqlite_where=sa.text("status = 'pending'"))
        # The dead letters newest first (jobs(status="failed", limit=n), the monitor's failures): through
        # _created that read every newer job (107,000 rows behind 100,000 pending chunks) to find 5.  Only a
        # job dead-lettered adds an entry; a claim or a completion none.
        sa.Index(f"{table_name}_failed_created", c.created_at, c.id,
                 postgresql_where=sa.text("status = 'failed'"),
                 sqlite_where=sa.text("status = 'failed'"))
        # Stale recovery: held jobs by the age of their lease.
        sa.Index(f"{table_name}_lease", c.heartbeat_at,
                 postgresql_where=sa.text("status = 'processing'"),
                 sqlite_where=sa.text("status = 'processing'"))
        # History: finished jobs by finishing time (stats windows, prune); a batch's chunks.
        sa.Index(f"{table_name}_finished", c.finished_at,
                 postgresql_where=sa.text("finished_at IS NOT NULL"),
                 sqlite_where=sa.text("finished_at IS NOT NULL"))
        sa.Index(f"{table_name}_batch", c.batch_id, c.status,
                 postgresql_where=sa.text("batch_id IS NOT NULL"),
                 sqlite_where=sa.text("batch_id IS NOT NULL"))
        # Releasing or cancelling the jobs of a wait group.
        sa.Index(f"{table_name}_wait", c.wait_id,
                 postgresql_where=sa.text("wait_id IS NOT NULL"),
                 sqlite_where=sa.text("wait_id IS NOT NULL"))
        # A batch's queued chunks (pending, waiting: bounded by the work queued), index-only: batches()
        # and the monitor count them per batch and status with their names and creation times, and a
        # batch's progress sums their units, without reading 100,000 rows of a big batch.  A claim or
        # completion adds no entry (the new row is processing or finished); MySQL has no partial
        # index: there they go through <table>_batch.
        sa.Index(f"{table_name}_queued", c.status, c.batch_id, c.queue, c.name, c.created_at, c.progress_total,
                 c.progress_done,
                 postgresql_where=sa.text("status IN ('pending', 'waiting') AND batch_id IS NOT NULL"),
                 sqlite_where=sa.text("status IN ('pending', 'waiting') AND batch_id IS NOT NULL"))
        # The stats' unrunnable count reads only the jobs that need resources (few, usually), not every
        # pending row.  MySQL has no partial index: there it goes through <table>_status.
        sa.Index(f"{table_name}_requires", c.status, c.queue,
                 postgresql_where=sa.text("requires IS NOT NULL"),
                 sqlite_where=sa.text("requires IS NOT NULL"))
    else:
        # InnoDB appends the primary key (id) to every secondary index by itself: naming it too would
        # pass MySQL's 3072-byte key limit on a table of the seed's (VARCHAR(255) id, queue, status).
        sa.Index(f"{table_name}_due", c.queue, c.status, c.priority.desc(), c.fair_rank, c.available_at)
        sa.Index(f"{table_name}_lease", c.status, c.heartbeat_at)
        sa.Index(f"{table_name}_finished", c.finished_at)
        sa.Index(f"{table_name}_batch", c.batch_id, c.status)
        sa.Index(f"{table_name}_wait", c.wait_id)
    # Stats: fetch_stats counts every row by (status, queue) with an index-only scan
    # of this small index (few distinct keys, so PostgreSQL deduplicates it: 7 MB
    # for 1M rows, ~80 ms to count them where a scan of the table took ~300 ms);
    # dead_letter_jobs() and jobs(status=...) find their rows through it too.
    sa.Index(f"{table_name}_status", c.status, c.queue)
    # History: jobs() lists newest first and filters since/until on created_at;
    # without it that is a sort of the whole table (~450 ms at 1M rows).
    sa.Index(f"{table_name}_created", c.created_at)

    deps = sa.Table(
        f"{table_name}_deps", metadata,
        sa.Column("parent_id", _key_text(MAX_ID_LENGTH), primary_key=True),
        sa.Column("wait_id", _key_text(MAX_KEY_LENGTH), primary_key=True),
        **options,
    )
    sa.Index(f"{table_name}_deps_wait", deps.c.wait_id)  # a group's parents (results, cascades)
    waits = sa.Table(
        f"{table_name}_waits", metadata,
        sa.Column("wait_id", _key_text(MAX_KEY_LENGTH), primary_key=True),
        sa.Column("remaining", sa.Integer, nullable=False),  # parents not completed yet
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=sa.text(now_default)),
        **options,
    )
    queues = sa.Table(
        f"{table_name}_queues", metadata,
        sa.Column("queue", _key_text(MAX_QUEUE_LENGTH), primary_key=True),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("changed_at", UTCDateTime()),
        # Limits (kronix_data.limits): jobs processing at once, and starts per rate_per_s seconds, with
        # the starts of the last window as JSON [[epoch seconds, jobs], ...]; NULL: no limit.
        sa.Column("concurrency", sa.Integer),
        sa.Column("rate", sa.Integer),
        sa.Column("rate_per_s", sa.Double()),
        sa.Column("rate_window", _long_text()),
        **options,
    )
    workers = build_workers_table(metadata, table_name, options)
    task_limits = sa.Table(
        f"{table_name}_task_limits", metadata,
        sa.Column("name", _key_text(MAX_NAME_LENGTH), primary_key=True),
        # As in <table>_queues (kronix_data.limits); NULL: no such limit.
        sa.Column("concurrency", sa.Integer),
        sa.Column("rate", sa.Integer),
        sa.Column("rate_per_s", sa.Double()),
        sa.Column("rate_window", _long_text()),
        sa.Column("changed_at", UTCDateTime()),
        **options,
    )
    schedules = build_schedules_table(metadata, table_name, options)
    rollup, rollup_totals, rollup_state = build_rollup_tables(metadata, table_name, options)
    data = build_data_table(metadata, table_name, options)
    rollup_batches = build_rollup_batches_table(metadata, table_name, options)
    return Tables(table, deps, waits, queues, workers, task_limits, schedules, rollup, rollup_totals, rollup_state,
                  data, rollup_batches)


#: The ``kind`` of a ``<table>_data`` row: the chunk a job works on, or the frame it returned.
CHUNK_DATA, RESULT_DATA = "chunk", "result"


def _binary() -> sa.types.TypeEngine:
    """BYTEA on PostgreSQL, BLOB on SQLite, LONGBLOB on MySQL/MariaDB (whose BLOB stops at 64 KiB)."""
    return sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


def build_data_table(metadata: sa.MetaData, table_name: str, options: dict) -> sa.Table:
    """``<name>_data``: one row per (job, kind), the Parquet bytes of a DataFrame chunk or result, beside
    the jobs table so a claim never drags megabytes through the hot table and its indexes; read by id
    when the job runs (chunk) or when results are collected (result), deleted with the job."""
    return sa.Table(
        f"{table_name}_data", metadata,
        sa.Column("job_id", _key_text(MAX_ID_LENGTH), primary_key=True),
        sa.Column("kind", _key_text(16), primary_key=True),
        sa.Column("data", _binary(), nullable=False),
        **options,
    )


def build_workers_table(metadata: sa.MetaData, table_name: str, options: dict) -> sa.Table:
    """``<name>_workers``: one row per worker, upserted by its heartbeat, so ``driver.workers()`` can
    tell live workers from dead ones (no heartbeat for ``lease_timeout``) and from stopped ones."""
    return sa.Table(
        f"{table_name}_workers", metadata,
        sa.Column("worker_id", _key_text(255), primary_key=True),
        sa.Column("host", _key_text(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("queues", sa.Text),  # a JSON list of queue names
        sa.Column("concurrency", sa.Integer),
        sa.Column("running", sa.Integer),  # jobs running at the last heartbeat
        sa.Column("lease_timeout", sa.Double()),  # seconds without a heartbeat after which it counts as gone
        sa.Column("started_at", UTCDateTime()),
        sa.Column("last_seen", UTCDateTime()),
        sa.Column("stopped_at", UTCDateTime()),  # set when it stopped by itself (signal, stop(), burst end)
        sa.Column("resources", sa.Text),  # a JSON object of what it has ({"gpu": 1.0}); NULL: none
        **options,
    )


def build_schedules_table(metadata: sa.MetaData, table_name: str, options: dict) -> sa.Table:
    """``<name>_schedules``: one row per cron schedule, in the database so that a schedule made in a
    notebook reaches the workers of every machine; any worker's scheduler fires its due slots."""
    schedules = sa.Table(
        f"{table_name}_schedules", metadata,
        sa.Column("name", _key_text(MAX_KEY_LENGTH), primary_key=True),
        sa.Column("task", _key_text(MAX_NAME_LENGTH), nullable=False),  # the jobs' name
        sa.Column("cron", sa.Text, nullable=False),
        sa.Column("timezone", sa.Text, nullable=False),  # IANA name the cron is read in
        sa.Column("payload", _long_text()),  # JSON, the payload of every job fired
        sa.Column("queue", _key_text(MAX_QUEUE_LENGTH), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_retries", sa.Integer, nullable=False, server_default="3"),
        sa.Column("next_run_at", UTCDateTime()),  # the next slot to fire
        sa.Column("last_run_at", UTCDateTime()),  # the slot last fired
        sa.Column("last_job_id", _key_text(MAX_ID_LENGTH)),
        sa.Column("last_fired_at", UTCDateTime()),  # when that slot was fired (late if no scheduler ran)
        sa.Column("created_at", UTCDateTime()),
        sa.Column("updated_at", UTCDateTime()),
        **options,
    )
    sa.Index(f"{table_name}_schedules_next", schedules.c.next_run_at)  # the scheduler's look for due slots
    return schedules


def build_rollup_tables(metadata: sa.MetaData, table_name: str, options: dict) -> tuple[sa.Table, sa.Table, sa.Table]:
    """``<name>_rollup``, ``<name>_rollup_totals`` and ``<name>_rollup_state``: the finished jobs' counts
    without a scan of history.

    ``<name>_rollup`` holds one row per (queue, batch, status) of the finished
    jobs (completed, failed, cancelled) whose ``finished_at`` is before the
    watermark in the one row of ``<name>_rollup_state`` (or NULL: jobs a
    previous release finished without one): how many, and the extremes
    ``batches()`` shows; ``<name>_rollup_totals`` the same counts per queue
    and status only, what ``fetch_stats()`` reads (a handful of rows however
    many batches there were).  The jobs finished since the watermark are counted
    live through the ``<name>_finished`` index; a fold moves them in (see
    ``JobStore.fold_finished``).  Only holders of the state row's lock write
    either table, so a fold never counts a job twice.
    """
    rollup = sa.Table(
        f"{table_name}_rollup", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("queue", _key_text(MAX_QUEUE_LENGTH), nullable=False),
        sa.Column("batch_id", _key_text(MAX_BATCH_ID_LENGTH)),
        sa.Column("status", _key_text(16), nullable=False),
        sa.Column("jobs", sa.BigInteger, nullable=False),
        # Bounds over every job folded into the row (a job pruned or retried later may have set them).
        sa.Column("min_name", _key_text(MAX_NAME_LENGTH)),
        sa.Column("max_name", _key_text(MAX_NAME_LENGTH)),
        sa.Column("min_created_at", UTCDateTime()),
        sa.Column("max_created_at", UTCDateTime()),
        sa.Column("max_finished_at", UTCDateTime()),
        **options,
    )
    sa.Index(f"{table_name}_rollup_key", rollup.c.batch_id, rollup.c.queue, rollup.c.status)
    totals = sa.Table(
        f"{table_name}_rollup_totals", metadata,
        sa.Column("queue", _key_text(MAX_QUEUE_LENGTH), primary_key=True),
        sa.Column("status", _key_text(16), primary_key=True),
        sa.Column("jobs", sa.BigInteger, nullable=False),
        **options,
    )
    state = sa.Table(
        f"{table_name}_rollup_state", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # always 1
        sa.Column("watermark", UTCDateTime()),  # finished before this: in the rollup
        sa.Column("folded_at", UTCDateTime()),  # when the last fold ran (database clock)
        **options,
    )
    return rollup, totals, state


def build_rollup_batches_table(metadata: sa.MetaData, table_name: str, options: dict) -> sa.Table:
    """``<name>_rollup_batches``: one row per batch with folded jobs, its ``<name>_rollup`` rows summed
    up (counts per finished status as columns, the extremes over its queues and statuses).

    ``batches()`` reads it instead of grouping the rollup (three rows or more
    per batch) on every call, and ``batches(since=...)`` finds the recent
    batches through ``<name>_rollup_batches_created``.  Whoever changes a
    batch's rollup rows recounts its summary row in the same transaction.
    """
    summary = sa.Table(
        f"{table_name}_rollup_batches", metadata,
        sa.Column("batch_id", _key_text(MAX_BATCH_ID_LENGTH), primary_key=True),
        sa.Column("completed", sa.BigInteger, nullable=False),
        sa.Column("failed", sa.BigInteger, nullable=False),
        sa.Column("cancelled", sa.BigInteger, nullable=False),
        sa.Column("min_name", _key_text(MAX_NAME_LENGTH)),
        sa.Column("max_name", _key_text(MAX_NAME_LENGTH)),
        sa.Column("min_created_at", UTCDateTime()),
        sa.Column("max_created_at", UTCDateTime()),
        sa.Column("max_finished_at", UTCDateTime()),
        **options,
    )
    sa.Index(f"{table_name}_rollup_batches_created", summary.c.max_created_at)
    return summary


#: Indexes an earlier release made that a newer one replaced: dropped on upgrade.
_REPLACED_INDEXES = ("{table}_claim",)  # by {table}_due, which orders by priority too
#: Indexes whose columns a newer release changed, and a column the new one has: rebuilt on upgrade.
_REBUILT_INDEXES = {"{table}_due": "fair_rank"}  # the claim order gained the fair-share turn


def create_or_upgrade(conn: sa.Connection, tables: Tables, now: sa.ColumnElement) -> None:
    """Create the tables, or bring existing ones (the seed's, say) up to date.

    Missing columns are added (kronix-data's own are nullable or have a
    default), rows the seed left without ``available_at`` or a reservation
    time are filled in, missing indexes are created and indexes a newer index
    replaced are dropped.  No data is dropped or rewritten.
    """
    inspector = sa.inspect(conn)
    for table in tables.all():
        if not inspector.has_table(table.name, schema=table.schema):
            table.create(conn)
            continue
        _upgrade(conn, inspector, table)
    table = tables.jobs
    c = table.c
    conn.execute(table.update().where(c.available_at.is_(None)).values(available_at=c.created_at))
    conn.execute(
        table.update()
        .where(c.status == PROCESSING, c.heartbeat_at.is_(None))
        .values(reserved_at=sa.func.coalesce(c.reserved_at, now), heartbeat_at=now)
    )


def _upgrade(conn: sa.Connection, inspector: sa.Inspector, table: sa.Table) -> None:
    preparer = conn.dialect.identifier_preparer
    qualified = preparer.format_table(table)
    existing = {column["name"] for column in inspector.get_columns(table.name, schema=table.schema)}
    for column in table.columns:
        if column.name not in existing:
            spec = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {qualified} ADD COLUMN {spec}"))
    indexes = {index["name"] for index in inspector.get_indexes(table.name, schema=table.schema)}
    for index in table.indexes:
        if index.name not in indexes:
            index.create(conn)
    for index in table.indexes:
        needs = _REBUILT_INDEXES.get(index.name.replace(table.name, "{table}", 1))
        if needs and index.name in indexes and needs not in _index_columns(inspector, table, index.name):
            conn.execute(sa.schema.DropIndex(index))
            index.create(conn)
    for replaced in (name.format(table=table.name) for name in _REPLACED_INDEXES):
        if replaced in indexes:  # on a stand-in table, so the real one never gains the old index
            stand_in = sa.Table(table.name, sa.MetaData(), sa.Column("id"), schema=table.schema)
            conn.execute(sa.schema.DropIndex(sa.Index(replaced, stand_in.c.id)))


def _index_columns(inspector: sa.Inspector, table: sa.Table, name: str) -> set[str]:
    """The columns of one of the table's indexes as the database has it."""
    for index in inspector.get_indexes(table.name, schema=table.schema):
        if index["name"] == name:
            return {column for column in index["column_names"] if column}
    return set()
