"""Everything that differs between PostgreSQL, MariaDB/MySQL and SQLite.

One :class:`QueueDialect` is chosen when the driver is built
(:func:`dialect_for`).  The driver asks it for the database's clock, time
arithmetic, and the atomic claim; it never tests the database's name itself.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql

try:
    import fcntl
except ImportError:  # Windows: writers rely on sqlite's busy timeout alone
    fcntl = None

from .errors import InvalidInputError, MissingDriverError
from .schema import CLAIMED_COLUMNS, Tables, UTCDateTime, claim_order, create_or_upgrade

log = logging.getLogger(__name__)

#: Short driver-less URL schemes mapped to the drivers kronix-data uses (see _DRIVERS).
_DEFAULT_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg",
                    "mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql"}


def make_engine(db: sa.Engine | str) -> sa.Engine:
    """An engine for a URL (given drivers filled in), or the caller's own engine.

    A URL whose driver module cannot be imported raises :class:`MissingDriverError`
    with the ``pip install`` that brings it, before any connection is tried.
    """
    if isinstance(db, sa.Engine):
        return db
    if not isinstance(db, (str, sa.URL)):
        raise InvalidInputError(f"db must be a SQLAlchemy Engine or a database URL, got {type(db).__name__}")
    url = sa.make_url(multi_host_url(db) if isinstance(db, str) else db)
    if url.drivername in _DEFAULT_DRIVERS:
        url = url.set(drivername=_DEFAULT_DRIVERS[url.drivername])
    dialect = dialect_class(url.get_backend_name())
    try:
        return dialect.create_engine(url)  # imports the driver's module
    except ImportError as error:
        raise missing_driver(url, error) from error


#: A pooled connection given back less than this many seconds ago is handed out again without a ping.
PING_AFTER_IDLE_S = 1.0


def ping_when_idle(engine: sa.Engine) -> sa.Engine:
    """Ping a pooled connection at checkout only when it sat idle (``PING_AFTER_IDLE_S``), not every time.

    ``pool_pre_ping`` paid a round trip before every transaction: a third of a
    single push's trips, and one of the five of a worker's complete-and-claim,
    on a connection used a millisecond before.  A connection that idled is
    still pinged, and replaced when the ping fails (the pool retries the
    checkout on ``DisconnectionError``), as a server restart needs.
    """
    @event.listens_for(engine, "checkin")
    def _given_back(_dbapi_connection, record) -> None:
        if record is not None:
            record.info["kronix_checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _taken(dbapi_connection, record, _proxy) -> None:
        given_back = record.info.get("kronix_checked_in")
        if given_back is None or time.monotonic() - given_back < PING_AFTER_IDLE_S:
            return  # new (just connected), or used a moment ago
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            raise sa.exc.DisconnectionError(f"the pooled connection is gone: {error}") from error
        if not alive:
            raise sa.exc.DisconnectionError("the pooled connection is gone")

    return engine


class _Driver(NamedTuple):
    database: str  # the database, as a person names it
    driver: str  # SQLAlchemy's name of the driver kronix-data uses for it
    package: str  # that driver, as a person names it
    install: str | None  # what brings it back (None: nothing pip installs)


#: The driver kronix-data uses for each backend, and how to install it.
_DRIVERS = {
    "postgresql": _Driver("PostgreSQL", "psycopg", "psycopg 3", "pip install 'kronix-data[postgres]'"),
    "mysql": _Driver("MySQL/MariaDB", "pymysql", "PyMySQL", "pip install 'kronix-data[mysql]'"),
    "mariadb": _Driver("MySQL/MariaDB", "pymysql", "PyMySQL", "pip install 'kronix-data[mysql]'"),
    "sqlite": _Driver("SQLite", "pysqlite", "Python's sqlite3 module", None),
}


def missing_driver(url: sa.URL, error: ImportError) -> MissingDriverError:
    """The error for a URL whose driver module failed to import, saying what to install."""
    backend, driver = url.get_backend_name(), url.get_driver_name()
    known = _DRIVERS[backend]
    why = "is not installed" if isinstance(error, ModuleNotFoundError) else "cannot be imported"
    cause = f"{type(error).__name__}: {' '.join(str(error).split())}"
    if driver != known.driver:  # the URL chose another driver (postgresql+psycopg2://)
        also = f" ({known.install})" if known.install else ""
        message = (f"the {driver} driver that the URL names {why} ({cause}): install it, or write {backend}:// "
                   f"to use {known.package}{also}")
        install = None  # which package holds that driver is not ours to know
    elif known.install is None:
        lacks = "lacks" if isinstance(error, ModuleNotFoundError) else "cannot import"
        message = (f"{known.database} needs {known.package}, which this Python {lacks} ({cause}): use a Python "
                   "built with SQLite (its headers, e.g. libsqlite3-dev, present when Python is compiled), "
                   "or a PostgreSQL or MySQL/MariaDB URL")
        install = None
    else:
        message = f"{known.database} needs the {known.package} driver, which {why} ({cause}): {known.install}"
        install = known.install
    return MissingDriverError(message, name=error.name or driver, database=known.database, install=install)


#: ``postgresql://[user@]host1:port1,host2:port2/db?...``, as libpq writes several hosts.
_LIBPQ_HOSTS = re.compile(r"(?P<scheme>postgres(?:ql)?(?:\+\w+)?://)(?P<user>[^@/]*@)?(?P<hosts>[^/?@]*,[^/?@]*)"
                          r"(?P<path>/[^?]*)?(?:\?(?P<query>.*))?")


def multi_host_url(text: str) -> str:
    """A libpq multi-host URL (``postgresql://h1:5432,h2:5432/db``) in the form SQLAlchemy parses
    (``postgresql://@/db?host=h1:5432&host=h2:5432``); any other URL unchanged.

    With ``target_session_attrs=read-write`` a connection goes to whichever host is the primary
    now, which is how workers follow a failover.
    """
    match = _LIBPQ_HOSTS.fullmatch(text)
    if match is None:
        return text
    hosts = "&".join(f"host={host}" for host in match["hosts"].split(","))
    query = f"{hosts}&{match['query']}" if match["query"] else hosts
    return f"{match['scheme']}{match['user'] or ''}{match['path'] or '/'}?{query}"


def dialect_class(backend: str) -> type[QueueDialect]:
    """The dialect for a SQLAlchemy backend name, or an InvalidInputError naming it."""
    for cls in (PostgresDialect, MySQLDialect, SQLiteDialect):
        if backend in cls.backends:
            return cls
    raise InvalidInputError(f"unsupported database {backend!r}: use PostgreSQL, MySQL/MariaDB or SQLite")


def dialect_for(engine: sa.Engine) -> QueueDialect:
    """Build the dialect for an engine and prepare the engine for it."""
    dialect = dialect_class(engine.dialect.name)()
    dialect.prepare_engine(engine)
    return dialect


class QueueDialect:
    """The default behaviour; subclasses override what their database does differently."""

    backends: tuple[str, ...] = ()
    partial_indexes = False
    #: SQL text of the current time, for the server default of ``created_at``.
    now_default = "CURRENT_TIMESTAMP"

    @classmethod
    def create_engine(cls, url: sa.URL) -> sa.Engine:
        return ping_when_idle(sa.create_engine(url))

    def prepare_engine(self, engine: sa.Engine) -> None:
        """Hook for per-connection settings on an engine (URL-made or the caller's)."""

    def writer(self, engine: sa.Engine) -> sa.Engine:
        """The engine to run read-write transactions on."""
        return engine

    def reader(self, engine: sa.Engine) -> sa.Engine:
        """The engine to run read-only queries on."""
        return engine

    def read_one_snapshot(self, conn: sa.Connection) -> None:
        """Make a fresh connection's transaction read one snapshot: every statement of a REPEATABLE READ
        transaction sees the database as of its first (PostgreSQL, InnoDB; set on the connection, as an
        engine's own READ COMMITTED would win over an engine option)."""
        conn.execution_options(isolation_level="REPEATABLE READ")

    def missing_database(self, engine: sa.Engine) -> str | None:
        """Why the database itself is not there, found without creating it (None: it may be)."""
        return None

    #: How often creating the table is tried when another process creates it at the same time.
    schema_attempts = 5

    def create_or_upgrade(self, engine: sa.Engine, tables: Tables) -> None:
        """Create or upgrade the tables, safe from many processes at once.

        A lost race (PostgreSQL: two CREATE TABLEs collide in the catalog; MySQL:
        DDL is not transactional, so another process may add the same index
        between our look and our write) is tried again against what the winner made.
        """
        for attempt in range(1, self.schema_attempts + 1):
            try:
                with engine.begin() as conn:
                    create_or_upgrade(conn, tables, self.now())
                return
            except sa.exc.DBAPIError:
                if attempt == self.schema_attempts:
                    raise
                log.info("creating table %s lost a race with another process; checking again", tables.jobs.fullname)
                time.sleep(0.05 * attempt)

    def now(self) -> sa.ColumnElement:
        """The database's current time (UTC, microseconds where it has them)."""
        raise NotImplementedError

    #: The largest binary chunk or result (``<table>_data``) kronix writes here: a sane cap (PostgreSQL's
    #: BYTEA and SQLite's BLOB take up to 1 GB, but a chunk that big holds a worker's memory for nothing).
    data_cap_bytes = 64 * 1024 * 1024

    def max_data_bytes(self, conn: sa.Connection) -> tuple[int, str]:
        """The largest binary data one row of ``<table>_data`` may hold here, and why (for the error)."""
        return self.data_cap_bytes, f"kronix's cap for {conn.dialect.name}"

    def now_plus(self, seconds: float) -> sa.ColumnElement:
        """The database's current time shifted by ``seconds`` (may be negative)."""
        raise NotImplementedError

    def seconds_between(self, later: sa.ColumnElement, earlier: sa.ColumnElement) -> sa.ColumnElement:
        """``later - earlier`` in seconds, as a float expression."""
        raise NotImplementedError

    def now_minus(self, seconds: sa.ColumnElement) -> sa.ColumnElement:
        """The database's current time minus ``seconds``, an expression (a bound parameter of an
        executemany, say), where :meth:`now_plus` takes a Python number."""
        raise NotImplementedError

    def epoch_seconds(self, column: sa.ColumnElement) -> sa.ColumnElement:
        """Whole seconds since 1970-01-01 UTC of a timestamp column, an integer expression (rounded down)."""
        raise NotImplementedError

    def time_bucket(self, column: sa.ColumnElement, seconds: int) -> sa.ColumnElement:
        """Which ``seconds``-long interval since 1970 (UTC) ``column`` falls in, as an integer: the
        timeline's buckets, aligned on the clock (1 min buckets start on the minute).  Integer arithmetic
        only, so a time on a boundary never lands in the bucket before it through a rounding error."""
        return self.epoch_seconds(column) // sa.literal(int(seconds), sa.BigInteger)

    def json_number(self, column: sa.ColumnElement, key: str) -> sa.ColumnElement:
        """The number under ``key`` in the JSON object stored as text in ``column`` (NULL if absent).

        ``key`` is a validated resource name (kronix_data.resources), bound as a value in the path.
        SQLite's and MySQL's ``JSON_EXTRACT``; MariaDB's returns text, which it compares as a number.
        """
        return sa.func.json_extract(column, sa.literal(f'$."{key}"'))

    def percentiles(self, fractions: list[float], expression: sa.ColumnElement) -> sa.ColumnElement | None:
        """An aggregate of ``expression``'s linearly interpolated percentiles, as an array.

        None where the database has no such aggregate (the stats then compute
        them in pandas from the window's rows).
        """
        return None

    def replay_lag_s(self, conn: sa.Connection) -> float | None:
        """How far a standby's data is behind its primary, in seconds (0 on a primary; None: unknown here)."""
        return None

    def notify(self, conn: sa.Connection, channel: str) -> None:
        """Wake listening workers when the transaction commits (no-op without LISTEN)."""

    def listener(self, engine: sa.Engine, channel: str) -> Listener | None:
        """A dedicated connection waiting for notifications, or None where there are none."""
        return None

    def insert(self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """Insert new jobs (no keys among them); a duplicate id raises IntegrityError.

        ``rows`` hold column values plus ``due`` (None: due now); ``created_at``
        and a missing due time are the database's clock.
        """
        self._insert(conn, table.insert(), rows)

    #: Whether :meth:`insert_one_and_notify` stores a job in one statement (run outside a transaction).
    inserts_one_in_one_statement = False

    def insert_one_and_notify(self, conn: sa.Connection, table: sa.Table, row: dict[str, Any],
                              fair_rank: Callable[[], sa.ColumnElement], channel: str, params: dict[str, Any]) -> None:
        """INSERT one new job (no key) with the turn ``fair_rank()`` builds (its parameters in ``params``)
        computed in the statement, and wake listeners: one statement, one round trip, in autocommit."""
        raise NotImplementedError

    def insert_new_keys(self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> dict[str, str]:
        """Insert keyed jobs whose key is new (the others are skipped); every row's key mapped to its stored id."""
        self._insert(conn, self.insert_skipping_stored_keys(table), rows)
        return stored_ids_by_key(conn, table, [row["job_key"] for row in rows])

    #: How many values one :meth:`among` may hold (None: any number, passed as one parameter).
    among_limit: int | None = 1000

    def among(self, column: sa.ColumnElement, values: list[Any]) -> sa.ColumnElement[bool]:
        """``column IN (values)``, the values bound (at most :attr:`among_limit`: under every parameter limit)."""
        return column.in_(values)

    def insert_skipping_stored_keys(self, table: sa.Table) -> sa.Insert:
        """An INSERT that skips a row whose ``job_key`` is already stored, and fails on anything else."""
        raise NotImplementedError

    def _insert(self, conn: sa.Connection, statement: sa.Insert, rows: list[dict[str, Any]]) -> None:
        """Run an INSERT of ``rows`` with the clock as SQL: no extra round trip."""
        now = self.now()
        due = sa.func.coalesce(sa.bindparam("due", type_=UTCDateTime()), now)
        conn.execute(statement.values(created_at=now, available_at=due), rows)

    def _clocked(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows with the database's time filled in, read once per push (for COPY and MySQL)."""
        now = conn.execute(sa.select(self.now())).scalar_one()
        return [{**{k: v for k, v in row.items() if k != "due"}, "created_at": now,
                 "available_at": row["due"] or now} for row in rows]

    def update_by_id(self, table: sa.Table) -> sa.Update:
        """An UPDATE of rows picked by id (the ownership-checked writes of held jobs)."""
        return table.update()

    def is_attempt_of(self, table: sa.Table, pairs: Sequence[tuple[str, int]]) -> sa.ColumnElement[bool]:
        """A row is one of these ``(id, attempts)`` pairs: the batch a worker completes at once."""
        return sa.tuple_(table.c.id, table.c.attempts).in_(list(pairs))

    def set_in_order(self, update: sa.Update, assignments: Sequence[tuple[sa.Column, Any]]) -> sa.Update:
        """SET ``assignments``, each reading the row as it was before the UPDATE."""
        return update.values({column: value for column, value in assignments})

    def skips_locked(self, conn: sa.Connection) -> bool:
        """Whether ``FOR UPDATE SKIP LOCKED`` works here (SQLite has no row locks to skip)."""
        return True

    def lock_rows(self, conn: sa.Connection, table: sa.Table, condition: sa.ColumnElement[bool],
                  limit: int) -> list[Any]:
        """Lock up to ``limit`` rows matching ``condition``, skipping rows others hold; their ids."""
        select = sa.select(table.c.id).where(condition).limit(limit)
        return conn.execute(select.with_for_update(skip_locked=self.skips_locked(conn))).scalars().all()

    def claim(self, conn: sa.Connection, table: sa.Table, conditions: list[sa.ColumnElement[bool]], limit: int,
              changes: dict[str, Any], claimed_at: datetime | None = None, shape: tuple | None = None
              ) -> list[dict[str, Any]]:
        """Atomically take up to ``limit`` jobs matching ``conditions`` (due pending jobs of one
        queue), in claim order (:func:`kronix_data.schema.claim_order`).

        ``changes`` are the column values a claim sets (besides ``attempts + 1``
        and the reservation times); the claimed rows come back as dicts of
        :data:`CLAIMED_COLUMNS`.  ``claimed_at`` is the reservation time to
        record (a rate-limited claim's clock reading); None: the database's now.
        ``shape``: a key that stands for every value in the other arguments (the
        statement built for it is kept and run again), or None: build it afresh.
        """
        raise NotImplementedError

    def _kept(self, shape: tuple | None, build) -> Any:
        """The statement built for ``shape`` (built by ``build()`` the first time); ``build()`` if no shape.

        A claim's statement built once and run again skips SQLAlchemy's construction
        and cache-key work, a fifth of a busy worker's claim in the profile.
        """
        if shape is None:
            return build()
        kept = self.__dict__.setdefault("_statements", {})  # one dialect per engine; shapes name their table
        statement = kept.get(shape)
        if statement is None:
            if len(kept) >= 256:
                kept.clear()
            statement = kept[shape] = build()
        return statement

    def clock(self) -> sa.ColumnElement:
        """The database's time when the statement runs (not when its transaction began): a rate-limited
        claim reads it after locking its queue's row, so claims are timed in the order they commit."""
        return self.now()

    def _claimed_at(self, claimed_at: datetime | None) -> sa.ColumnElement:
        return self.now() if claimed_at is None else sa.literal(claimed_at, UTCDateTime())

    def upsert(self, conn: sa.Connection, table: sa.Table, values: dict[str, Any], changes: dict[str, Any]) -> None:
        """INSERT ``values``, or where the primary key is already there, UPDATE that row with ``changes``
        (in their order: an expression may read the stored row before a later assignment changes it)."""
        raise NotImplementedError

    def prepare_analytics(self, conn: sa.Connection) -> None:
        """Hook run at the start of a view's read (its transaction): settings for short aggregate reads."""

    def raw_timestamp(self, column: sa.ColumnElement) -> sa.ColumnElement:
        """A timestamp column of a view of many rows, for pandas to convert the whole column at once
        (``analytics.typed_frame``): here as it is (a datetime, or ISO text); PostgreSQL: epoch microseconds."""
        return column

    #: How far behind the clock a fold's watermark stays at least (seconds): covers the instant between a
    #: transaction taking its clock and the server listing it as running.
    fold_margin_s = 2.0

    def fold_watermark(self, conn: sa.Connection) -> Any:
        """The newest watermark a fold may take now: no transaction not yet visible to the fold's next
        statement can still finish a job with ``finished_at`` before it (see ``JobStore.fold_finished``).
        Run as a statement of its own, before the fold's count."""
        raise NotImplementedError


def stored_ids_by_key(conn: sa.Connection, table: sa.Table, keys: list[str]) -> dict[str, str]:
    """The ids of the stored jobs with these keys, read in slices under every database's parameter limit."""
    stored: dict[str, str] = {}
    for start in range(0, len(keys), 1000):
        part = keys[start:start + 1000]
        stored.update(conn.execute(sa.select(table.c.job_key, table.c.id).where(table.c.job_key.in_(part))).all())
    return stored


def _candidates(table: sa.Table, conditions: list[sa.ColumnElement[bool]], limit: int) -> sa.Select:
    """The ids of the jobs to claim, in claim order (matches the ``<table>_due`` index)."""
    return sa.select(table.c.id).where(*conditions).order_by(*claim_order(table)).limit(limit)


def _claimed(table: sa.Table) -> list[sa.Column]:
    return [table.c[name] for name in CLAIMED_COLUMNS]


def _claim_values(table: sa.Table, changes: dict[str, Any], now: Any) -> dict[str, Any]:
    return {**changes, "attempts": table.c.attempts + 1, "reserved_at": now, "heartbeat_at": now}


class OnConflictDialect(QueueDialect):
    """PostgreSQL and SQLite: ``INSERT ... ON CONFLICT`` names the constraint a duplicate may hit."""

    def insert_with_conflicts(self, table: sa.Table) -> sa.Insert:
        """The database's own INSERT construct, the one with ``on_conflict_do_*``."""
        raise NotImplementedError

    def insert_skipping_stored_keys(self, table):
        return self.insert_with_conflicts(table).on_conflict_do_nothing(index_elements=["job_key"])

    def upsert(self, conn, table, values, changes):
        key = [column.name for column in table.primary_key]
        conn.execute(self.insert_with_conflicts(table).values(values).on_conflict_do_update(
            index_elements=key, set_=changes))


#: The URL option that says PostgreSQL is reached through PgBouncer, and in which pooling mode
#: (``postgresql://app@bouncer:6432/db?kronix_pgbouncer=transaction``).  A URL is what every worker
#: process is given, so the option reaches them all; it is taken out before psycopg sees the URL.
PGBOUNCER_OPTION = "kronix_pgbouncer"
PGBOUNCER_MODES = ("session", "transaction", "statement")


def pgbouncer_mode(url: sa.URL) -> str | None:
    """The PgBouncer pooling mode a URL names (None: a direct connection); a wrong value is refused."""
    mode = url.query.get(PGBOUNCER_OPTION)
    if mode is None:
        return None
    if mode not in PGBOUNCER_MODES:
        raise InvalidInputError(f"{PGBOUNCER_OPTION} must be one of {', '.join(PGBOUNCER_MODES)} (PgBouncer's "
                                f"pool_mode), got {mode!r}")
    return mode


def _through_pgbouncer(mode: str, _dialect, _record, _args, params: dict[str, Any]) -> None:
    """Connect arguments for PgBouncer: without the option, and in transaction or statement pooling without
    psycopg's prepared statements, which live in one server session that the next transaction may not get."""
    params.pop(PGBOUNCER_OPTION, None)
    if mode != "session":
        params["prepare_threshold"] = None


def _attach_pgbouncer(engine: sa.Engine) -> str | None:
    """Set an engine whose URL names PgBouncer up for it (once); returns the mode."""
    mode = pgbouncer_mode(engine.url)
    if mode is not None and not getattr(engine, "_kronix_pgbouncer", None):
        event.listen(engine, "do_connect", partial(_through_pgbouncer, mode))
        engine._kronix_pgbouncer = mode
    return mode


class PostgresDialect(OnConflictDialect):
    """PostgreSQL: SKIP LOCKED claims in one statement, partial indexes; directly or through PgBouncer."""

    backends = ("postgresql",)
    partial_indexes = True
    now_default = "now()"
    #: PgBouncer's pooling mode between us and the server (the URL's kronix_pgbouncer), or None.
    pgbouncer: str | None = None

    @classmethod
    def create_engine(cls, url):
        engine = super().create_engine(url)
        _attach_pgbouncer(engine)
        return engine

    def prepare_engine(self, engine):
        self.pgbouncer = _attach_pgbouncer(engine)

    def now(self):
        return sa.type_coerce(sa.func.now(), UTCDateTime())

    def now_plus(self, seconds):
        return sa.type_coerce(sa.func.now() + sa.literal(timedelta(seconds=seconds), sa.Interval), UTCDateTime())

    def seconds_between(self, later, earlier):
        return sa.cast(sa.extract("epoch", later - earlier), sa.Float)

    def now_minus(self, seconds):
        return sa.type_coerce(sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, sa.cast(seconds, sa.Double())),
                              UTCDateTime())

    def epoch_seconds(self, column):
        return sa.cast(sa.func.floor(sa.extract("epoch", column)), sa.BigInteger)

    def json_number(self, column, key):
        # Text to jsonb, the member as text, then a number: NULL all along when the key is absent.
        return sa.cast(sa.func.jsonb_extract_path_text(sa.cast(column, postgresql.JSONB), key), sa.Double())

    def percentiles(self, fractions, expression):
        # One ordered-set aggregate for all fractions: one sort of the window, not one per fraction.
        from sqlalchemy.dialects.postgresql import ARRAY

        return sa.func.percentile_cont(sa.literal(list(fractions), ARRAY(sa.Float))).within_group(expression)

    def notify(self, conn, channel):
        conn.execute(sa.select(sa.func.pg_notify(channel, "")))

    def replay_lag_s(self, conn):
        # Caught up (everything received is replayed) means no lag, however long ago the last
        # commit was; otherwise the age of the last replayed commit bounds how stale a read is.
        return float(conn.execute(sa.select(sa.case(
            (~sa.func.pg_is_in_recovery(), 0.0),
            (sa.func.pg_last_wal_receive_lsn() == sa.func.pg_last_wal_replay_lsn(), 0.0),
            else_=sa.func.coalesce(sa.extract("epoch", sa.func.now() - sa.func.pg_last_xact_replay_timestamp()),
                                   0.0)))).scalar_one())

    def listener(self, engine, channel):
        if self.pgbouncer in ("transaction", "statement"):
            # LISTEN belongs to one server session; in these modes the session goes back to PgBouncer's
            # pool after each transaction, and the notifications with it: say so, and let workers poll.
            log.info("LISTEN is off: the database is reached through PgBouncer in %s pooling mode (%s); "
                     "workers poll for jobs every poll_interval", self.pgbouncer, PGBOUNCER_OPTION)
            return None
        return PostgresListener(engine, channel)

    def raw_timestamp(self, column):
        # Epoch microseconds, exact (EXTRACT is numeric): psycopg's datetimes carry a ZoneInfo, which sends
        # pandas down a per-value path (~40 ms for 10,000, on top of UTCDateTime's astimezone per value),
        # where integers convert in one step.
        return sa.cast(sa.extract("epoch", column) * 1_000_000, sa.BigInteger)

    def prepare_analytics(self, conn):
        # A view over many jobs in flight is estimated costly enough for JIT, whose compiling took
        # 140 ms of a 500 ms batches() with 100,000 pending chunks; for the transaction only.
        conn.execute(sa.text("SET LOCAL jit = off"))

    #: Where some sessions' transactions are hidden from this role (no ``pg_read_all_stats``, other roles'
    #: sessions), the watermark stays this far behind the clock (seconds), as on MariaDB without PROCESS.
    fold_fallback_margin_s = 600.0

    def fold_watermark(self, conn):
        # finished_at is now(), the start of the finishing transaction, so a job is finished before W only by
        # a transaction that started before W: every such one has ended (a session leaves the list after its
        # commit is visible, so the fold's next statement, read committed, sees it) when W is at most the
        # start of every transaction still open in this database.  Idle sessions have no xact_start; a long
        # open transaction holds the watermark back.  Another role's session whose state this role may not
        # see (state NULL) could hide one: then the fallback margin.
        activity = sa.table("pg_stat_activity", sa.column("xact_start"), sa.column("datname"), sa.column("pid"),
                            sa.column("state"))
        clock = sa.func.clock_timestamp()
        hidden = sa.func.count().filter(activity.c.state.is_(None))  # every session this role may see has one
        fallback = sa.case((hidden > 0, clock - sa.literal(timedelta(seconds=self.fold_fallback_margin_s), sa.Interval)))
        margin = sa.literal(timedelta(seconds=self.fold_margin_s), sa.Interval)
        statement = (sa.select(sa.type_coerce(sa.func.least(clock, sa.func.min(activity.c.xact_start), fallback) - margin,
                                              UTCDateTime()))
                     .where(activity.c.datname == sa.func.current_database(), activity.c.pid != sa.func.pg_backend_pid()))
        return conn.execute(statement).scalar_one()

    #: Below this many rows a multi-row INSERT is as quick as COPY and simpler.
    copy_threshold = 64

    def insert(self, conn, table, rows):
        if len(rows) < self.copy_threshold:
            return super().insert(conn, table, rows)
        # COPY streams rows without a statement per row: about 2.5x executemany here.
        import psycopg.sql as pgsql

        rows = self._clocked(conn, rows)  # before COPY starts: no other statement may run during it
        columns = list(rows[0])  # every row of a push has the same columns
        target = pgsql.Identifier(*([table.schema] if table.schema else []), table.name)
        statement = pgsql.SQL("COPY {} ({}) FROM STDIN").format(
            target, pgsql.SQL(", ").join(map(pgsql.Identifier, columns)))
        with conn.connection.dbapi_connection.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row([row[column] for column in columns])

    among_limit = None

    def among(self, column, values):
        # One text parameter the server splits (= ANY): a short statement psycopg converts once and caches,
        # where a thousand placeholders cost it about 20 ms to convert at every execution, and a text array
        # about 13 ms to dump.  The values are keys, printable text: none holds a newline.
        if any("\n" in value for value in values):
            return column.in_(values)
        return column == sa.any_(sa.func.string_to_array(sa.literal("\n".join(values), sa.Text), "\n"))

    def insert_with_conflicts(self, table):
        from sqlalchemy.dialects.postgresql import insert

        return insert(table)

    inserts_one_in_one_statement = True

    def insert_one_and_notify(self, conn, table, row, fair_rank, channel, params):
        # WITH pushed AS (INSERT ... RETURNING id) SELECT pg_notify(...) FROM pushed: the NOTIFY goes out
        # when the statement's own transaction commits, so a worker never wakes to a job not yet visible.
        # Built once per table and set of columns, every value a named parameter.
        columns = tuple(column for column in row if column != "due")

        def build():
            now = self.now()
            values = {column: sa.bindparam(f"push_{column}", type_=table.c[column].type) for column in columns}
            values.update(fair_rank=fair_rank(), created_at=now,
                          available_at=sa.func.coalesce(sa.bindparam("push_due", type_=UTCDateTime()), now))
            pushed = table.insert().values(values).returning(table.c.id).cte("pushed")
            return sa.select(sa.func.pg_notify(sa.bindparam("push_channel", type_=sa.Text), "")).select_from(pushed)

        statement = self._kept(("push one", table.fullname, columns), build)
        conn.execute(statement, {**{f"push_{column}": row[column] for column in columns}, "push_due": row.get("due"),
                                 "push_channel": channel, **params}).all()

    def clock(self):
        return sa.type_coerce(sa.func.clock_timestamp(), UTCDateTime())  # now() is the transaction's start

    def is_attempt_of(self, table, pairs):
        # Two arrays joined as a table (UPDATE ... FROM unnest(ids, attempts)): one statement text whatever
        # the batch's size, which psycopg prepares after a few runs, where an IN list of pairs was a new
        # text (and 200 parameters expanded by SQLAlchemy) per size.
        ids = sa.bindparam("held_ids", [job_id for job_id, _ in pairs], type_=postgresql.ARRAY(sa.Text))
        attempts = sa.bindparam("held_attempts", [attempt for _, attempt in pairs],
                                type_=postgresql.ARRAY(sa.Integer))
        held = (sa.func.unnest(ids, attempts).table_valued(sa.column("id", sa.Text), sa.column("attempts", sa.Integer))
                .render_derived(name="held"))
        return sa.and_(table.c.id == held.c.id, table.c.attempts == held.c.attempts)

    def claim(self, conn, table, conditions, limit, changes, claimed_at=None, shape=None):
        # Lock the candidates, skipping rows another worker holds, then update
        # exactly those: one round trip, no waiting on other claimers.  As
        # ``id = ANY(ARRAY(...))``: the locked ids are an InitPlan and the UPDATE
        # finds them by primary key.  Joined to a CTE instead, the planner
        # (estimating the CTE's rows, not knowing they are few keys) hashed them
        # against a sequential scan of the whole table: 12 ms of a 16 ms claim
        # at 20,000 rows, growing with the table.
        def build():
            candidates = _candidates(table, conditions, limit).with_for_update(skip_locked=True).scalar_subquery()
            return (table.update()
                    .where(table.c.id == sa.any_(sa.func.array(candidates)))
                    .values(_claim_values(table, changes, self._claimed_at(claimed_at)))
                    .returning(*_claimed(table)))

        statement = self._kept(shape if claimed_at is None else None, build)
        return [dict(zip(CLAIMED_COLUMNS, row)) for row in conn.execute(statement)]


class Listener:
    """Waits for a wake-up on its own connection (never one shared with queries)."""

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True if woken by a notification."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class PostgresListener(Listener):
    """LISTEN on a dedicated autocommit psycopg connection.

    A connection shared with queries would stall them while it waits (as a
    peer's does); behind pgbouncer in transaction mode LISTEN does not work,
    and the worker falls back to polling when this raises.
    """

    def __init__(self, engine: sa.Engine, channel: str):
        import psycopg
        import psycopg.sql

        # The engine's own connect arguments: multi-host URLs and target_session_attrs included,
        # so after a failover the listener finds the new primary as the pool does.
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        kwargs.pop(PGBOUNCER_OPTION, None)  # PgBouncer in session mode: LISTEN works there
        self._conn = psycopg.connect(*args, **kwargs, autocommit=True)
        quoted = psycopg.sql.Identifier(channel)
        self._conn.execute(psycopg.sql.SQL("LISTEN {}").format(quoted))

    def wait(self, timeout):
        for _ in self._conn.notifies(timeout=timeout, stop_after=1):
            return True
        return False

    def close(self):
        self._conn.close()


class MySQLDialect(QueueDialect):
    """MariaDB >= 10.6 and MySQL >= 8: SKIP LOCKED, but no UPDATE ... RETURNING."""

    backends = ("mysql", "mariadb")
    now_default = "CURRENT_TIMESTAMP(6)"

    @classmethod
    def create_engine(cls, url):
        # READ COMMITTED set once on each new connection: as an execution option of every checkout it was a
        # SET SESSION TRANSACTION before each transaction and another when the pool took the connection
        # back, two round trips of five in a worker's complete-and-claim (a fifth of its loop's time).
        engine = sa.create_engine(url, isolation_level="READ COMMITTED", connect_args={"charset": "utf8mb4"})
        engine._kronix_read_committed = True
        return ping_when_idle(engine)

    def prepare_engine(self, engine):
        # InnoDB's default REPEATABLE READ takes gap locks that make concurrent
        # claims deadlock; READ COMMITTED locks only the rows it takes.  A caller's
        # own engine gets it per checkout.
        read_committed = getattr(engine, "_kronix_read_committed", False)
        self._engine = engine if read_committed else engine.execution_options(isolation_level="READ COMMITTED")

    def writer(self, engine):
        return self._engine

    def reader(self, engine):
        return self._engine

    def max_data_bytes(self, conn):
        """Half the server's ``max_allowed_packet`` (less room for the statement): PyMySQL escapes binary
        data into the statement text, which can double it; past the packet the server drops the connection."""
        packet = int(conn.execute(sa.text("SELECT @@max_allowed_packet")).scalar_one())
        return min(self.data_cap_bytes, max(packet - 65536, 0) // 2), f"half of max_allowed_packet ({packet:,})"

    def skips_locked(self, conn):
        """MariaDB >= 10.6 and MySQL >= 8.0.1; older servers get a plain (still atomic) FOR UPDATE."""
        version = conn.dialect.server_version_info or (0,)
        return version >= ((10, 6) if conn.dialect.is_mariadb else (8, 0, 1))

    def now(self):
        return sa.type_coerce(sa.literal_column("UTC_TIMESTAMP(6)"), UTCDateTime())

    #: Where the open transactions cannot be listed (no PROCESS privilege), the watermark stays this far
    #: behind the clock instead (seconds): exact as long as no transaction that finishes jobs stays open
    #: longer (kronix-data's own are short; InnoDB's lock wait timeout defaults to 50 s).
    fold_fallback_margin_s = 600.0
    #: The server's "access denied" errors: to a database, a table, or for want of a privilege (PROCESS).
    access_denied_codes = frozenset({1044, 1142, 1227})
    _warned_no_process = False  # said once per process, not at every fold

    def fold_watermark(self, conn):
        # UTC_TIMESTAMP(6) is the time of the statement that finishes a job, which comes after its
        # transaction started (InnoDB's trx_started, in whole seconds of the session's zone, hence
        # measured as an age against NOW()).  The margin covers the first statement's clock running a
        # moment before InnoDB starts its transaction, and innodb_trx's cache (refreshed every 0.1 s).
        trx = sa.table("innodb_trx", sa.column("trx_started"), sa.column("trx_mysql_thread_id"),
                       schema="information_schema")
        oldest_age = (sa.select(sa.func.timestampdiff(sa.literal_column("MICROSECOND"), sa.func.min(trx.c.trx_started),
                                                      sa.func.now(6)))
                      .where(trx.c.trx_mysql_thread_id != sa.func.connection_id()).scalar_subquery())
        try:
            with conn.begin_nested():
                age_us = conn.execute(sa.select(oldest_age)).scalar()
            margin_s = self.fold_margin_s + max(float(age_us or 0) / 1e6, 0.0)
        except sa.exc.DBAPIError as error:
            # Only a refusal (no PROCESS privilege) is ridden out here; a lost connection is the caller's
            # database error (swallowing it left the connection unusable: the next statement raised
            # PendingRollbackError, which stopped a worker in the chaos test).
            if error.connection_invalidated or _error_code(error) not in self.access_denied_codes:
                raise
            if not self._warned_no_process:
                log.warning("cannot list open transactions (%s); folding finished jobs %gs behind the clock",
                            str(error.orig).splitlines()[0], self.fold_fallback_margin_s)
                self._warned_no_process = True
            margin_s = self.fold_fallback_margin_s
        return conn.execute(sa.select(self.now_plus(-margin_s))).scalar_one()

    def update_by_id(self, table):
        # With "status = 'processing'" in the WHERE, InnoDB may range-scan the
        # lease index instead of the primary key, locking every held row of
        # every worker: concurrent completions then deadlock.  Pin the key.
        return table.update().with_hint("FORCE INDEX (PRIMARY)", dialect_name="mysql").with_hint(
            "FORCE INDEX (PRIMARY)", dialect_name="mariadb")

    def insert_skipping_stored_keys(self, table):
        # No conflict target in MySQL, and INSERT IGNORE would hide other errors:
        # "id = id" changes nothing on any duplicate, a duplicate id included,
        # which insert_new_keys then finds and reports.
        from sqlalchemy.dialects.mysql import insert

        return insert(table).on_duplicate_key_update(id=table.c.id)

    def upsert(self, conn, table, values, changes):
        from sqlalchemy.dialects.mysql import insert

        # As a list: SQLAlchemy would put a dict's assignments in column order, and MySQL reads a column
        # named in a later assignment as already changed by the ones before it.
        conn.execute(insert(table).values(values).on_duplicate_key_update(list(changes.items())))

    def insert_new_keys(self, conn, table, rows):
        stored = super().insert_new_keys(conn, table, rows)
        for row in rows:
            if row["job_key"] not in stored:  # skipped for its id, not its key
                raise InvalidInputError(f"job id {row['id']!r} is already in table {table.fullname!r}")
        return stored

    def set_in_order(self, update, assignments):
        # MySQL evaluates SET left to right, each assignment seeing the ones before
        # it: in the order given, a column is read before it is changed.
        return update.ordered_values(*assignments)

    def _insert(self, conn, statement, rows):
        # Plain bound values only: PyMySQL folds an executemany INSERT into one
        # multi-row statement only when VALUES holds nothing but placeholders
        # (with UTC_TIMESTAMP() in it, it sent one statement per row).
        conn.execute(statement, self._clocked(conn, rows))

    def now_plus(self, seconds):
        microseconds = round(seconds * 1_000_000)
        return sa.type_coerce(
            sa.func.timestampadd(sa.literal_column("MICROSECOND"), microseconds, sa.literal_column("UTC_TIMESTAMP(6)")),
            UTCDateTime(),
        )

    def seconds_between(self, later, earlier):
        return sa.func.timestampdiff(sa.literal_column("MICROSECOND"), earlier, later) / 1_000_000.0

    def epoch_seconds(self, column):
        # TIMESTAMPDIFF, not UNIX_TIMESTAMP: the stored DATETIME is UTC whatever the session's time zone.
        return sa.func.timestampdiff(sa.literal_column("SECOND"), sa.literal_column("'1970-01-01 00:00:00'"), column)

    def now_minus(self, seconds):
        microseconds = sa.cast(sa.func.round(seconds * -1_000_000), sa.Integer)
        return sa.type_coerce(
            sa.func.timestampadd(sa.literal_column("MICROSECOND"), microseconds, sa.literal_column("UTC_TIMESTAMP(6)")),
            UTCDateTime(),
        )

    def claim(self, conn, table, conditions, limit, changes, claimed_at=None, shape=None):
        # Lock and read the rows (with the server's clock), then mark them.
        now = self._claimed_at(claimed_at).label("kronix_now")
        select = (
            sa.select(*_claimed(table), now)
            .where(*conditions)
            .order_by(*claim_order(table))
            .limit(limit)
            .with_for_update(skip_locked=self.skips_locked(conn))
        )
        rows = [dict(zip((*CLAIMED_COLUMNS, "now"), row)) for row in conn.execute(select)]
        if not rows:
            return []
        claimed_at = rows[0]["now"]
        for row in rows:
            del row["now"]
        conn.execute(
            table.update()
            .where(table.c.id.in_([row["id"] for row in rows]))
            .values(_claim_values(table, changes, claimed_at))
        )
        for row in rows:
            row.update(attempts=row["attempts"] + 1, reserved_at=claimed_at)
        return rows


class SQLiteDialect(OnConflictDialect):
    """SQLite: WAL, durable commits, and claims inside ``BEGIN IMMEDIATE``.

    The write lock is taken when the transaction begins, so two processes can
    never read the same pending rows and both claim them; readers (``size``,
    stats) use deferred transactions and are never blocked under WAL.
    """

    backends = ("sqlite",)
    partial_indexes = True
    #: The clock in the text format SQLAlchemy stores (microseconds; SQLite has milliseconds).
    _now_sql = "strftime('%Y-%m-%d %H:%M:%f000', 'now')"
    now_default = f"({_now_sql})"
    busy_timeout_s = 30.0

    @classmethod
    def create_engine(cls, url):
        return sa.create_engine(url, connect_args={"timeout": cls.busy_timeout_s})

    def prepare_engine(self, engine):
        self._reader = engine.execution_options(kronix_sqlite_begin="BEGIN DEFERRED")
        if getattr(engine, "_kronix_sqlite_prepared", False):
            return
        turns = WriterTurns.for_database(engine.url.database)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", partial(_sqlite_on_begin, turns))
        event.listen(engine, "commit", partial(_sqlite_end_turn, "COMMIT"))
        event.listen(engine, "rollback", partial(_sqlite_end_turn, "ROLLBACK"))
        engine._kronix_sqlite_prepared = True
        engine.dispose()  # pooled connections made before the listeners lack the pragmas

    def reader(self, engine):
        return self._reader

    def read_one_snapshot(self, conn):
        pass  # a deferred transaction under WAL already reads one snapshot, from its first read

    def missing_database(self, engine):
        # Connecting would create the file: an inspection of a mistyped path must not.
        database = engine.url.database
        if not database or database == ":memory:" or database.startswith("file:") or os.path.exists(database):
            return None
        return f"SQLite database file {os.path.abspath(database)!r} does not exist"

    def now(self):
        return sa.type_coerce(sa.literal_column(self._now_sql), UTCDateTime())

    def now_plus(self, seconds):
        modifier = f"{seconds:+.6f} seconds"
        return sa.type_coerce(sa.func.strftime("%Y-%m-%d %H:%M:%f000", "now", modifier), UTCDateTime())

    def seconds_between(self, later, earlier):
        return (sa.func.julianday(later) - sa.func.julianday(earlier)) * 86400.0

    def epoch_seconds(self, column):
        # strftime('%s') reads the stored UTC text exactly; julianday() would go through a float.
        return sa.cast(sa.func.strftime("%s", column), sa.Integer)

    def now_minus(self, seconds):
        modifier = sa.func.printf("%+.6f seconds", -seconds)
        return sa.type_coerce(sa.func.strftime("%Y-%m-%d %H:%M:%f000", "now", modifier), UTCDateTime())

    def fold_watermark(self, conn):
        # The fold runs under BEGIN IMMEDIATE: it holds the write lock, so every transaction that finished
        # a job has committed and any later one reads a later clock.  The margin only guards the clock.
        return conn.execute(sa.select(self.now_plus(-self.fold_margin_s))).scalar_one()

    among_limit = None

    def among(self, column, values):
        # One JSON parameter the server reads (json_each): SQLAlchemy builds a thousand placeholders in
        # about 5 ms at every execution, once per window of a map's re-run.
        import json

        listed = sa.func.json_each(sa.literal(json.dumps(values), sa.Text)).table_valued("value")
        return column.in_(sa.select(listed.c.value))

    def insert_with_conflicts(self, table):
        from sqlalchemy.dialects.sqlite import insert

        return insert(table)

    def claim(self, conn, table, conditions, limit, changes, claimed_at=None, shape=None):
        def build():
            return (table.update()
                    .where(table.c.id.in_(_candidates(table, conditions, limit).scalar_subquery()))
                    .values(_claim_values(table, changes, self._claimed_at(claimed_at)))
                    .returning(*_claimed(table)))

        statement = self._kept(shape if claimed_at is None else None, build)
        return [dict(zip(CLAIMED_COLUMNS, row)) for row in conn.execute(statement)]


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's implicit
    # BEGIN is deferred, which lets two writers read the same rows).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _sqlite_on_begin(turns: WriterTurns | None, conn: sa.Connection) -> None:
    begin = conn.get_execution_options().get("kronix_sqlite_begin", "BEGIN IMMEDIATE")
    if turns is None or begin != "BEGIN IMMEDIATE":
        conn.exec_driver_sql(begin)
        return
    turn = turns.wait()
    try:
        conn.exec_driver_sql(begin)
    except BaseException:
        turn.release()
        raise
    conn.info["kronix_turn"] = turn


def _sqlite_end_turn(statement: str, conn: sa.Connection) -> None:
    turn = conn.info.pop("kronix_turn", None)
    if turn is None:
        return
    try:  # end the transaction here, so the turn passes only once it is over (pysqlite's own call is then a no-op)
        dbapi_connection = conn.connection.dbapi_connection
        if dbapi_connection.in_transaction:
            dbapi_connection.execute(statement)
    finally:
        turn.release()


class WriterTurns:
    """Writers to one SQLite file take turns through an flock on a sidecar file.

    SQLite's busy handler sleeps and polls (1 ms, growing to 100 ms) instead of
    queueing: a process that commits and begins again at once keeps winning the
    write lock while the others sleep.  With 4 processes the shares of the work
    came out between 7 % and 48 % and single waits passed a second (issue 6).
    A blocked flock is handed over by the kernel the moment it is released, so
    waiting writers get their turn.  The turn is taken before BEGIN IMMEDIATE
    and passed on right after COMMIT/ROLLBACK; sqlite's busy timeout stays the
    backstop (for writers that do not take turns, such as other programs).
    Closing the descriptor, or the death of the process, drops the lock.  The
    turn is re-entrant per thread and file (whatever the engine), so a thread
    that nests writes gets sqlite's "database is locked", never a hang.
    """

    _by_path: dict[str, WriterTurns] = {}
    _by_path_lock = threading.Lock()

    def __init__(self, path: str):
        self.path = path
        self._local = threading.local()

    @classmethod
    def for_database(cls, database: str | None) -> WriterTurns | None:
        """The turns of a database file, or None (in-memory, URI filenames, no flock)."""
        if fcntl is None or not database or database == ":memory:" or database.startswith("file:"):
            return None
        path = os.path.abspath(database) + ".kronix-lock"
        with cls._by_path_lock:
            return cls._by_path.setdefault(path, cls(path))

    def wait(self) -> _Turn:
        """Block until this thread may write."""
        turn = getattr(self._local, "turn", None)
        if turn is None or turn.pid != os.getpid():  # a new thread, or a forked child
            turn = self._local.turn = _Turn(self.path)
        turn.take()
        return turn


class _Turn:
    """One thread's hold on the lock file: opened and locked on the first take, closed on the last release."""

    def __init__(self, path: str):
        self.path = path
        self.pid = os.getpid()
        self.depth = 0
        self.fd: int | None = None

    def take(self) -> None:
        if self.depth == 0:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
        self.depth += 1

    def release(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            os.close(self.fd)  # drops the lock
            self.fd = None


def _error_code(error: sa.exc.DBAPIError) -> int | None:
    """The server's numeric code of a MySQL/MariaDB error (PyMySQL puts it first in ``args``), or None."""
    args = getattr(error.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None
