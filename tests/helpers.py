"""What the test modules share: database URLs, waits, workers, faults and private servers.

Fixtures live in ``conftest.py`` and import from here; test modules import from here too, never
from ``conftest`` or from one another.  Importable as ``helpers`` because pytest puts ``tests/``
on ``sys.path``.

Faults that reach beyond one test's own sessions (a server stopped or restarted, a network cut)
are done only to a :class:`PrivateServer`: a throwaway PostgreSQL cluster or MariaDB server this
test session starts in a temporary directory on a free port, never the server of
``KRONIX_TEST_POSTGRES_URL``/``KRONIX_TEST_MYSQL_URL``, which other people may be using.  On the
shared servers a test kills only the sessions it tagged itself (:func:`tagged_sessions`).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from functools import cache
from glob import glob
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

import chaos_jobs
from kronix_data import DatabaseQueueDriver, Job, Worker

T = TypeVar("T")

TESTS = Path(__file__).resolve().parent
REPOSITORY = TESTS.parent

SERVER_URLS = {
    "postgresql": os.environ.get("KRONIX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mariadb": os.environ.get("KRONIX_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
ENV_NAMES = {"postgresql": "KRONIX_TEST_POSTGRES_URL", "mariadb": "KRONIX_TEST_MYSQL_URL"}
BACKENDS = ["sqlite", "postgresql", "mariadb"]
SERVERS = ["postgresql", "mariadb"]
IN_CI = os.environ.get("CI", "").lower() == "true"


def skip_or_fail(message: str):
    """Skip with ``message`` on a developer's machine; fail under ``CI=true``, where nothing may be missing."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


# -- databases ---------------------------------------------------------------------------------------

@cache
def _unreachable(backend: str) -> str | None:
    """Why a server cannot be used, or None if it answers."""
    engine = sa.create_engine(SERVER_URLS[backend])
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as error:  # noqa: BLE001 - any failure means "not reachable"
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    finally:
        engine.dispose()
    return None


def database_url(backend: str, tmp_path) -> str:
    """A URL for ``backend``: a fresh SQLite file, or the configured server."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    reason = _unreachable(backend)
    if reason:
        skip_or_fail(f"{backend} at {sa.make_url(SERVER_URLS[backend]).render_as_string(hide_password=True)} "
                     f"is unreachable ({reason}); set {ENV_NAMES[backend]} to a test database")
    return SERVER_URLS[backend]


def unique_table() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


def drop_table(url: str, table: str) -> None:
    """Drop a test's jobs table and the companions the store makes beside it."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for name in (f"{table}_deps", f"{table}_waits", f"{table}_queues", f"{table}_workers", f"{table}_task_limits",
                     f"{table}_schedules", f"{table}_rollup", f"{table}_rollup_totals", f"{table}_rollup_state",
                     f"{table}_data", f"{table}_rollup_batches", table):  # our own unique_table()
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
    engine.dispose()


class TablePool:
    """Jobs tables of one server kept between tests: emptied and handed to the next test that asks for the
    ``driver`` fixture, instead of dropped and created again.

    Creating a table (a dozen tables and twenty indexes of DDL, then SQLAlchemy's reflection) and dropping
    it took 0.3-0.5 s a test on PostgreSQL and MariaDB, more than most tests themselves.  A table comes back
    only when it is whole (the columns and indexes a new one has, every companion there) and held few jobs
    (``MOST_ROWS``: no dead rows or planner statistics of a big test carry over); it is emptied with DELETE
    and its rollup seeded again, as create_table leaves it.  Anything else is dropped.  Tables are reused
    first in, first out, and only once ``KEEP_FREE`` others wait, so a worker a test left behind for a
    moment writes to a table no test is using.
    """

    KEEP_FREE = 3
    MOST_ROWS = 1_000

    def __init__(self, url: str):
        self.url = url
        self.engine = sa.create_engine(url, pool_size=1)
        self.free: collections.deque[str] = collections.deque()
        reference = unique_table()
        fresh = DatabaseQueueDriver(url, table=reference)
        fresh.create_table()
        self.suffixes = [table.name.removeprefix(reference) for table in fresh.store.tables.all()]
        fresh.close()
        self.shape = self._shape(reference)
        self.free.append(reference)

    def take(self) -> tuple[str, bool]:
        """A table name for a test, and whether its table already exists (empty, as create_table makes it)."""
        if len(self.free) > self.KEEP_FREE:
            return self.free.popleft(), True
        return unique_table(), False

    def give_back(self, name: str) -> None:
        """Empty the test's table and keep it if it is whole and was small; drop it otherwise."""
        try:
            kept = self._shape(name) == self.shape and self._emptied(name)
        except sa.exc.DBAPIError:
            kept = False
        if kept:
            self.free.append(name)
        else:
            drop_table(self.url, name)

    def close(self) -> None:
        while self.free:
            drop_table(self.url, self.free.popleft())
        self.engine.dispose()

    def _shape(self, name: str) -> tuple:
        """Every column (table, name, type) and index of the table and its companions, the name made generic."""
        if self.engine.dialect.name == "postgresql":
            columns = ("SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                       "JOIN pg_class c ON c.oid = a.attrelid WHERE c.relname IN :names "
                       "AND c.relnamespace = current_schema()::regnamespace AND a.attnum > 0 AND NOT a.attisdropped")
            indexes = ("SELECT tablename, indexname FROM pg_indexes "
                       "WHERE schemaname = current_schema() AND tablename IN :names")
        else:
            columns = ("SELECT table_name, column_name, column_type FROM information_schema.columns "
                       "WHERE table_schema = DATABASE() AND table_name IN :names")
            indexes = ("SELECT DISTINCT table_name, index_name FROM information_schema.statistics "
                       "WHERE table_schema = DATABASE() AND table_name IN :names")
        names = [name + suffix for suffix in self.suffixes]
        with self.engine.connect() as conn:
            found = [tuple(str(value).replace(name, "T") for value in row)
                     for sql in (columns, indexes)
                     for row in conn.execute(sa.text(sql).bindparams(sa.bindparam("names", expanding=True)),
                                             {"names": names})]
        return tuple(sorted(found))

    def _emptied(self, name: str) -> bool:
        """DELETE every row of the table and its companions, then seed the rollup; False (nothing deleted)
        when the table held more than ``MOST_ROWS`` jobs."""
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(sa.text("SET LOCAL lock_timeout = '10s'"))
            else:
                conn.execute(sa.text("SET SESSION innodb_lock_wait_timeout = 10"))
            if conn.execute(sa.text(f"SELECT count(*) FROM (SELECT 1 FROM {name} LIMIT {self.MOST_ROWS + 1}) AS j"
                                    )).scalar() > self.MOST_ROWS:
                return False
            for suffix in self.suffixes:
                conn.execute(sa.text(f"DELETE FROM {name}{suffix}"))
        queue = DatabaseQueueDriver(self.url, table=name)
        queue.store.seed_rollup()  # the rollup's state row, as create_table leaves it
        queue.close()
        return True


def select(url: str, sql: str, parameters: dict | None = None) -> list:
    """The rows of one query, on an engine of its own."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql), parameters or {}).all()
    finally:
        engine.dispose()


def db_now(driver: DatabaseQueueDriver) -> datetime:
    """The database's clock in UTC (what the driver stamps rows with)."""
    return driver.store.database_now()


def set_times(driver: DatabaseQueueDriver, job_id: str, **values) -> None:
    """Put known timestamps on a row, as if it had run then."""
    with driver.engine.begin() as conn:
        conn.execute(driver.table.update().where(driver.table.c.id == job_id).values(**values))
    driver.store.rebuild_rollup()  # a finished job moved back in time by hand: counted afresh


def set_schedule_next_run(driver: DatabaseQueueDriver, name: str, when: datetime) -> None:
    """Move a schedule's next slot, as if no scheduler had run since then."""
    schedules = driver.store.tables.schedules
    with driver.engine.begin() as conn:
        conn.execute(schedules.update().where(schedules.c.name == name).values(next_run_at=when))


def finished_job(driver: DatabaseQueueDriver, *, queue: str = "default", status: str = "completed",
                 due: datetime, wait: float, run: float, last_error: str | None = None,
                 name: str = "stats.job") -> str:
    """A job that really went through push, pop and complete/fail, then got controlled times."""
    job_id = driver.push(Job(name, queue=queue))
    job = driver.pop(queue)
    assert job.id == job_id, "finished_job needs a queue with no other due job"
    job.last_error = last_error
    assert driver.complete(job) if status == "completed" else driver.fail(job)
    set_times(driver, job_id, created_at=due, available_at=due, reserved_at=due + timedelta(seconds=wait),
              finished_at=due + timedelta(seconds=wait + run))
    return job_id


def status_counts(driver: DatabaseQueueDriver) -> dict[str, int]:
    """Jobs per status over every queue of the driver's table."""
    stats = driver.fetch_stats()
    return {status: int(stats[status].sum()) for status in ("pending", "processing", "completed", "failed")}


def attempts_histogram(driver: DatabaseQueueDriver) -> dict[int, int]:
    """How many jobs have each number of attempts."""
    c = driver.table.c
    with driver.engine.connect() as conn:
        rows = conn.execute(sa.select(c.attempts, sa.func.count()).group_by(c.attempts)).all()
    return {attempts: count for attempts, count in rows}


# -- waiting and working -----------------------------------------------------------------------------

def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy, and return that; fail after ``timeout`` s.

    Deadlines are generous on purpose: a slow machine waits longer, a fast one moves on at once.
    """
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return result


def run_burst(driver: DatabaseQueueDriver, **options: Any) -> Worker:
    """Run a burst worker in this process until nothing is due; returns it (for its stats)."""
    worker = Worker(driver, **{"burst": True, "lease_timeout": 10, **options})
    worker.run()
    return worker


def define_in_main(source: str) -> dict[str, Any]:
    """Run ``source`` as a notebook cell runs: in a namespace named ``__main__``, so the ``@task``
    functions it defines have ``__module__ == "__main__"`` and travel to local workers by value."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(textwrap.dedent(source), "<notebook cell>", "exec"), namespace)
    return namespace


# -- the kronix command line -------------------------------------------------------------------------

def cli_environment(**variables: str) -> dict[str, str]:
    """The test's environment without the developer's KRONIX_* settings, plus ``variables``."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("KRONIX_")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    return {**environment, **variables}


def start_kronix(arguments, *, cwd: Path, environment: dict[str, str] | None = None,
                 command: list[str] | None = None) -> subprocess.Popen:
    command = command or [sys.executable, "-m", "kronix_data.cli"]
    return subprocess.Popen([*command, *arguments], cwd=cwd, env=environment or cli_environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kronix(*arguments: str, cwd: Path, **options) -> subprocess.CompletedProcess:
    """Run one ``kronix`` command to its end."""
    return finish(start_kronix(arguments, cwd=cwd, **options))


def kronix_in_parallel(*commands: list[str], cwd: Path, **options) -> list[subprocess.CompletedProcess]:
    """Run ``kronix`` commands as subprocesses at once (each start imports pandas), in order of the results."""
    return [finish(process) for process in [start_kronix(command, cwd=cwd, **options) for command in commands]]


# -- faults on the sessions of one test ----------------------------------------------------------------

def session_id(dbapi_connection) -> int:
    """The server's id of a psycopg or PyMySQL connection."""
    info = getattr(dbapi_connection, "info", None)
    return info.backend_pid if hasattr(info, "backend_pid") else dbapi_connection.thread_id()


def kill_session(url, session: int) -> None:
    """Terminate one database session from another connection, as an operator or a failover would."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": session})
            else:
                conn.exec_driver_sql(f"KILL CONNECTION {int(session)}")
    finally:
        engine.dispose()


def tagged_session_ids(url, tag: str) -> list[int]:
    """The sessions a test tagged: ``application_name`` ``tag`` on PostgreSQL, user ``tag`` on MariaDB."""
    if sa.make_url(url).get_backend_name() == "postgresql":
        sql, parameters = ("SELECT pid FROM pg_stat_activity WHERE application_name = :tag "
                           "AND pid <> pg_backend_pid()"), {"tag": tag}
    else:
        sql, parameters = "SELECT id FROM information_schema.processlist WHERE user = :tag", {"tag": tag}
    return [session for (session,) in select(url, sql, parameters)]


def kill_sessions_tagged(url, tag: str, fraction: float = 1.0) -> int:
    """Terminate the sessions one test tagged (see :func:`tagged_sessions`), and no one else's.

    Kills a random ``fraction`` of them (at least one, if there is any); returns how many went.
    """
    sessions = tagged_session_ids(url, tag)
    killed = 0
    for session in random.sample(sessions, max(1, round(len(sessions) * fraction))) if sessions else []:
        try:
            kill_session(url, session)
            killed += 1
        except sa.exc.DBAPIError:  # it ended by itself meanwhile
            pass
    return killed


@contextlib.contextmanager
def tagged_sessions(url: str) -> Iterator[tuple[str, str]]:
    """A URL whose sessions carry a tag of their own, and the tag, for :func:`kill_sessions_tagged`.

    PostgreSQL: the tag is the sessions' ``application_name``.  MariaDB: a throwaway user named
    after the tag, with every right on the URL's database, dropped afterwards.  Either way the
    test can kill its own workers' sessions and nobody else's on a shared server.
    """
    tag = f"kx_tag_{uuid.uuid4().hex[:8]}"
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "postgresql":
        yield parsed.update_query_dict({"application_name": tag}).render_as_string(hide_password=False), tag
        return
    engine = sa.create_engine(url, pool_pre_ping=True)  # it may outlive a restart of a private server
    hosts = ("localhost", "127.0.0.1")
    try:
        with engine.begin() as conn:
            for host in hosts:
                conn.exec_driver_sql(f"CREATE USER '{tag}'@'{host}'")  # tag is ours: letters, digits, _
                conn.exec_driver_sql(f"GRANT ALL ON `{parsed.database}`.* TO '{tag}'@'{host}'")
        yield parsed.set(username=tag, password=None).render_as_string(hide_password=False), tag
    finally:
        with engine.begin() as conn:
            for host in hosts:
                conn.exec_driver_sql(f"DROP USER IF EXISTS '{tag}'@'{host}'")
        engine.dispose()


# -- private servers ---------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except sa.exc.DBAPIError:
        return False
    finally:
        engine.dispose()


class PrivateServerError(RuntimeError):
    """A private server could not be made, started or stopped; the message says why, with its log."""


class PrivateServer:
    """A throwaway database server of this test session, in a temporary directory, on a free port.

    Tests that stop, restart or cut off a server use one of these, never the shared server.
    ``url`` is the URL of its database ``test``; :meth:`stop`, :meth:`start` and :meth:`restart`
    act on the server process (stop cuts every session, as a crash or failover would);
    :meth:`close` stops it and removes the directory.  A session-scoped fixture starts one per
    kind, lazily, and closes it at the end of the session, failed tests or not.

    It listens on 127.0.0.1, and on the addresses given to :meth:`listen_also` (the host side of
    a test's network links), where ``root``/``postgres`` get in without a password too: nothing
    but this machine and its test namespaces can reach it.
    """

    backend = ""
    startup_timeout = 90.0

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=f"kronix-test-{self.backend}-"))
        self.port = 0
        self.log = self.directory / "server.log"
        self.extra_addresses: list[str] = []

    @property
    def addresses(self) -> list[str]:
        return ["127.0.0.1", *self.extra_addresses]

    def listen_also(self, addresses: list[str]) -> None:
        """Restart the server listening on 127.0.0.1 and ``addresses`` (``[]``: on 127.0.0.1 only again)."""
        self.extra_addresses = list(addresses)
        self.restart()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, running={self.is_running()})"

    @property
    def url(self) -> str:
        raise NotImplementedError

    def is_running(self) -> bool:
        raise NotImplementedError

    def _initialise(self) -> None:
        raise NotImplementedError

    def _launch(self) -> None:
        raise NotImplementedError

    def _halt(self) -> None:
        raise NotImplementedError

    def _create_database(self) -> None:
        raise NotImplementedError

    def setup(self) -> PrivateServer:
        """Make the data directory and start the server on a free port, with an empty database ``test``.

        A port taken between the probe and the server's bind (other test runs share the machine)
        gets another try on another port.
        """
        self._initialise()
        for attempt in range(3):
            self.port = free_port()
            try:
                self.start()
                break
            except PrivateServerError:
                self._halt()
                if attempt == 2 or "in use" not in self.log_tail():
                    raise
        self._create_database()
        return self

    def start(self) -> None:
        """Start the server and return once it accepts connections (raises with its log if it cannot)."""
        if self.is_running():
            return
        self._launch()
        deadline = time.monotonic() + self.startup_timeout
        while not self._accepts_connections():
            if not self.is_running() or time.monotonic() > deadline:
                raise PrivateServerError(f"{type(self).__name__} did not start on port {self.port}:\n"
                                         f"{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (every session is cut) and return once it is down."""
        if self.is_running():
            self._halt()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server, whatever state it is in, and remove its directory."""
        try:
            self._halt()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _accepts_connections(self) -> bool:
        raise NotImplementedError

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-characters:]
        except OSError:
            return "(no log)"


def _postgres_binaries() -> Path:
    """The directory of initdb/pg_ctl: ``KRONIX_TEST_POSTGRES_BIN``, the PATH, or the newest Debian install."""
    configured = os.environ.get("KRONIX_TEST_POSTGRES_BIN")
    if configured:
        return Path(configured)
    found = shutil.which("pg_ctl")
    if found:  # through a link (/usr/local/bin/pg_ctl -> .../15/bin/pg_ctl) to where its siblings are
        return Path(found).resolve().parent
    installed = sorted(glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda path: int(path.split("/")[4]))
    if not installed:
        raise PrivateServerError("initdb/pg_ctl not found: install PostgreSQL or set KRONIX_TEST_POSTGRES_BIN")
    return Path(installed[-1]).parent


class PrivatePostgres(PrivateServer):
    """A PostgreSQL cluster from ``initdb``, run by ``pg_ctl`` with its socket in its own directory.

    PostgreSQL refuses to run as root, so under root the cluster belongs to (and runs as) the
    ``postgres`` user.  Durability is off (fsync, full pages): the data is thrown away anyway.
    """

    backend = "postgresql"

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.binaries = _postgres_binaries()  # before the directory exists: nothing to clean up if missing
        #: Server settings on top of the throwaway defaults (``-c name=value`` at every start).
        self.settings = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                         "max_connections": "200", **(settings or {})}
        super().__init__()
        self.data = self.directory / "data"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.directory, user="postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/test"

    def _run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run([*self._as_user, *command], capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise PrivateServerError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr or done.stdout}"
                                     f"\n{self.log_tail()}")
        return done

    def _initialise(self) -> None:
        self._run(str(self.binaries / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync")
        with open(self.data / "pg_hba.conf", "a") as hba:  # clients on the test links (see listen_also)
            hba.write("host all all samenet trust\n")

    def _launch(self) -> None:
        settings = [part for name, value in self.settings.items() for part in ("-c", f"{name}={value}")]
        options = shlex.join(["-p", str(self.port), "-k", str(self.directory),
                              "-c", f"listen_addresses={','.join(self.addresses)}", *settings])
        self._run(str(self.binaries / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", str(int(self.startup_timeout)), "start", timeout=self.startup_timeout + 30)

    def _halt(self) -> None:
        if not self.data.exists() or not self.is_running():
            return
        pg_ctl = str(self.binaries / "pg_ctl")
        try:  # a fast shutdown cuts every session, as a crash or failover would for the clients
            self._run(pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        except (PrivateServerError, subprocess.TimeoutExpired):
            self._run(pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")

    def crash(self) -> None:
        """Stop at once, as a machine that loses power would (``pg_ctl stop -m immediate``): no checkpoint."""
        self._run(str(self.binaries / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")

    def is_running(self) -> bool:
        return subprocess.run([*self._as_user, str(self.binaries / "pg_ctl"), "-D", str(self.data), "status"],
                              capture_output=True).returncode == 0

    def _accepts_connections(self) -> bool:
        return _answers(f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres")

    def _create_database(self) -> None:
        engine = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres",
                                  isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE DATABASE test")
        engine.dispose()


class PrivateStandby(PrivatePostgres):
    """A hot standby of a :class:`PrivatePostgres` primary: a base backup (``pg_basebackup -R``) that
    streams the primary's WAL and answers reads; :meth:`promote` makes it the primary (a failover).

    Its settings are the primary's (``primary.settings``); it has no database of its own to make,
    the primary's ``test`` arrives with the backup.
    """

    def __init__(self, primary: PrivatePostgres) -> None:
        self.primary = primary
        super().__init__(dict(primary.settings))

    def _initialise(self) -> None:
        self._run(str(self.binaries / "pg_basebackup"), "-D", str(self.data), "-h", "127.0.0.1",
                  "-p", str(self.primary.port), "-U", "postgres", "-R", "-X", "stream", "--no-sync",
                  "-c", "fast")

    def _create_database(self) -> None:
        """The primary's databases come with the base backup."""

    def _accepts_connections(self) -> bool:
        return _answers(f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/test")

    def promote(self) -> None:
        """Make this standby the primary, and return once it accepts writes."""
        self._run(str(self.binaries / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "promote")



@contextlib.contextmanager
def replicated_postgres(synchronous: bool = True, settings: dict[str, str] | None = None
                        ) -> Iterator[tuple[PrivatePostgres, PrivateStandby]]:
    """A private primary and a hot standby of it, both closed afterwards (skipped, or failed under CI,
    if they cannot start).

    ``synchronous``: every commit waits until the standby has it on disk (``synchronous_commit=on``,
    ``synchronous_standby_names='*'``), so a failover loses nothing.  The standby list is set on the
    primary only after the base backup: a standby that inherited it would, once promoted, wait for
    ever for a standby of its own.
    """
    expected = (PrivateServerError, OSError, subprocess.SubprocessError, sa.exc.DBAPIError)
    made: list[PrivateServer] = []
    try:
        primary = PrivatePostgres({"synchronous_commit": "on" if synchronous else "off", "hot_standby": "on",
                                   "wal_level": "replica", "max_wal_senders": "10", **(settings or {})})
        made.append(primary)
        _open_servers.append(primary)
        primary.setup()
        standby = PrivateStandby(primary)
        made.append(standby)
        _open_servers.append(standby)
        standby._initialise()
        standby.port = free_port()
        standby.start()
        if synchronous:
            engine = sa.create_engine(primary.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
            with engine.connect() as conn:
                conn.exec_driver_sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
                conn.exec_driver_sql("SELECT pg_reload_conf()")
            engine.dispose()
    except expected as error:
        for server in reversed(made):
            close_private_server(server)
        skip_or_fail(f"cannot start a private PostgreSQL primary and standby: {error}")
    try:
        yield primary, standby
    finally:
        for server in reversed(made):
            close_private_server(server)


class PrivateMariaDB(PrivateServer):
    """A MariaDB server from ``mariadb-install-db``, run by ``mariadbd`` as a child of this process.

    Its own data directory, socket and pid file; no option files are read (``--no-defaults``),
    so the machine's server configuration does not leak in; ``root`` has no password
    (``--auth-root-authentication-method=normal``) and reaches it over TCP at 127.0.0.1.
    """

    backend = "mariadb"

    def __init__(self) -> None:
        self.install_db = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
        self.server = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/libexec")
        if not self.install_db or not self.server:
            raise PrivateServerError("mariadb-install-db/mariadbd not found: install mariadb-server")
        super().__init__()
        self.data = self.directory / "data"
        self.socket = self.directory / "mariadb.sock"
        self.pid_file = self.directory / "mariadb.pid"
        self.process: subprocess.Popen | None = None
        self._user = ["--user=root"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/test"

    def _initialise(self) -> None:
        done = subprocess.run([self.install_db, "--no-defaults", f"--datadir={self.data}", "--skip-test-db",
                               "--auth-root-authentication-method=normal", "--skip-name-resolve", *self._user],
                              capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise PrivateServerError(f"mariadb-install-db failed ({done.returncode}): {done.stderr or done.stdout}")

    def _launch(self) -> None:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [self.server, "--no-defaults", f"--datadir={self.data}", f"--socket={self.socket}",
                 f"--pid-file={self.pid_file}", f"--port={self.port}",
                 f"--bind-address={','.join(self.addresses)}",
                 "--skip-name-resolve", "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
                 "--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0", "--innodb-buffer-pool-size=128M",
                 "--max-connections=300", f"--log-error={self.log}", *self._user],
                stdout=log, stderr=log, start_new_session=True)

    def _halt(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)  # a normal shutdown: client sessions are cut
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _accepts_connections(self) -> bool:
        return _answers(f"mysql+pymysql://root@127.0.0.1:{self.port}/mysql")

    def _create_database(self) -> None:
        engine = sa.create_engine(f"mysql+pymysql://root@127.0.0.1:{self.port}/mysql", poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE DATABASE test")
            # For clients on the test links (see listen_also); it listens nowhere else.
            conn.exec_driver_sql("CREATE USER 'root'@'10.%%'")  # %% : PyMySQL formats the statement
            conn.exec_driver_sql("GRANT ALL ON *.* TO 'root'@'10.%%' WITH GRANT OPTION")
        engine.dispose()


PRIVATE_SERVERS = {"postgresql": PrivatePostgres, "mariadb": PrivateMariaDB}
#: Servers made and not closed yet: closed at exit too, should a session end without its teardown.
_open_servers: list[PrivateServer] = []


@atexit.register
def _close_open_servers() -> None:
    while _open_servers:
        _open_servers.pop().close()


def start_private_server(backend: str) -> PrivateServer:
    """Make and start a private server of ``backend``; skipped (failed under CI) with the reason if it cannot.

    Whatever goes wrong on the way, nothing is left running and its directory is removed.
    """
    expected = (PrivateServerError, OSError, subprocess.SubprocessError, sa.exc.DBAPIError)
    try:
        server = PRIVATE_SERVERS[backend]()
    except expected as error:
        skip_or_fail(f"cannot start a private {backend} server for this test: {error}")
    _open_servers.append(server)
    try:
        return server.setup()
    except BaseException as error:
        close_private_server(server)
        if isinstance(error, expected):
            skip_or_fail(f"cannot start a private {backend} server for this test: {error}")
        raise


def close_private_server(server: PrivateServer) -> None:
    if server in _open_servers:
        _open_servers.remove(server)
    server.close()


@contextlib.contextmanager
def private_postgres(settings: dict[str, str]) -> Iterator[PrivatePostgres]:
    """A private PostgreSQL of its own with these ``settings`` (``max_connections`` say), closed afterwards;
    skipped (failed under CI) if it cannot start."""
    expected = (PrivateServerError, OSError, subprocess.SubprocessError, sa.exc.DBAPIError)
    try:
        server = PrivatePostgres(settings)
    except expected as error:
        skip_or_fail(f"cannot start a private PostgreSQL for this test: {error}")
    _open_servers.append(server)
    try:
        server.setup()
    except expected as error:
        close_private_server(server)
        skip_or_fail(f"cannot start a private PostgreSQL for this test: {error}")
    try:
        yield server
    finally:
        close_private_server(server)


class PgBouncer:
    """A PgBouncer (Debian's ``pgbouncer``) of this test in front of a private PostgreSQL, on a free port.

    ``pool_mode`` and ``pool_size`` as given; ``max_prepared_statements`` is not set (PgBouncer before 1.21
    has no such thing, and 0 is the default of those that do), so a client that prepares statements in
    transaction pooling meets "prepared statement ... does not exist".  Clients log in as anyone
    (``auth_type = any``) and reach the server as ``postgres``.  Under root it runs as ``postgres``
    (``-u``; PgBouncer refuses root).  ``url`` is the URL of database ``test`` through it.
    """

    def __init__(self, server: PrivatePostgres, *, pool_mode: str = "transaction", pool_size: int = 10,
                 max_client_conn: int = 1000):
        binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
        if binary is None:
            raise PrivateServerError("pgbouncer not found: apt-get install pgbouncer")
        self.binary = binary
        self.directory = Path(tempfile.mkdtemp(prefix="kronix-test-pgbouncer-"))
        self.log = self.directory / "pgbouncer.log"
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.config = self.directory / "pgbouncer.ini"
        self.config.write_text(f"""[databases]
test = host=127.0.0.1 port={server.port} dbname=test user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir = {self.directory}
auth_type = any
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_db_connections = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {max_client_conn}
ignore_startup_parameters = extra_float_digits
logfile = {self.log}
pidfile = {self.directory / "pgbouncer.pid"}
""")
        self._user = []
        if os.geteuid() == 0:
            shutil.chown(self.directory, user="postgres")
            shutil.chown(self.config, user="postgres")
            self._user = ["-u", "postgres"]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/test"

    def start(self) -> PgBouncer:
        self.process = subprocess.Popen([self.binary, *self._user, str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while not _answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise PrivateServerError(f"pgbouncer did not start on port {self.port}:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-characters:]
        except OSError:
            return "(no log)"

    def close(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def pgbouncer_in_front_of(server: PrivatePostgres, **options: Any) -> Iterator[PgBouncer]:
    """A :class:`PgBouncer` before ``server``, stopped and removed afterwards; skipped (failed under CI)
    if it cannot start."""
    try:
        bouncer = PgBouncer(server, **options).start()
    except (PrivateServerError, OSError, subprocess.SubprocessError) as error:
        skip_or_fail(f"cannot start pgbouncer for this test: {error}")
    try:
        yield bouncer
    finally:
        bouncer.close()


# -- chaos audits: every status change logged by a trigger, checked against the runs ------------------

def create_audit(url: str, table: str, audit: str) -> None:
    """A trigger logs every status change of a job (and every write of a final status) as the database saw it."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {audit} (job VARCHAR(128), status VARCHAR(16), attempts INTEGER, "
                             "reserved_by VARCHAR(255), at DOUBLE PRECISION)")
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"""
                CREATE FUNCTION {audit}_log() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                  INSERT INTO {audit} VALUES (NEW.id, NEW.status, NEW.attempts, NEW.reserved_by,
                                              extract(epoch FROM clock_timestamp()));
                  RETURN NEW;
                END $$""")
            conn.exec_driver_sql(f"""
                CREATE TRIGGER {audit}_trigger AFTER UPDATE ON {table} FOR EACH ROW
                WHEN (NEW.status <> OLD.status OR NEW.status IN ('completed', 'failed'))
                EXECUTE FUNCTION {audit}_log()""")
        else:
            conn.exec_driver_sql(f"""
                CREATE TRIGGER {audit}_trigger AFTER UPDATE ON {table} FOR EACH ROW
                INSERT INTO {audit} SELECT NEW.id, NEW.status, NEW.attempts, NEW.reserved_by,
                                           UNIX_TIMESTAMP(NOW(6)) FROM DUAL
                WHERE NEW.status <> OLD.status OR NEW.status IN ('completed', 'failed')""")
    engine.dispose()


def drop_audit(url: str, audit: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {audit}")
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {audit}_log() CASCADE")
    engine.dispose()


def overlapping_runs(runs, killed_at: dict[int, float]) -> list:
    """Pairs of runs of one job that overlap in time.

    A run lasts from its start to its recorded end; a run without an end was cut
    by kill -9 and lasts until its worker's kill (a run without an end on a worker
    that was never killed is itself reported).
    """
    spans = collections.defaultdict(list)
    for job, attempt, worker, started, ended, _ok in runs:
        if ended is None:
            pid = int(worker.split("-")[1])
            ended = max(started, killed_at.get(pid, float("inf")))
        spans[job].append((started, ended, attempt, worker))
    overlaps = []
    for job, runs_of_job in spans.items():
        runs_of_job.sort()
        for earlier, later in zip(runs_of_job, runs_of_job[1:]):
            if later[0] < earlier[1]:
                overlaps.append((job, earlier, later))
    return overlaps


def audit_chaos_jobs(driver: DatabaseQueueDriver, url: str, runs_table: str, audit: str, pushed: int,
                     killed_at: dict[int, float]) -> dict:
    """Check the jobs of a chaos run (``chaos_jobs``, ids ``c0000000``...), the audit log and the runs against
    each other; returns figures and problems (see tests/test_chaos.py)."""
    problems: list[str] = []
    c = driver.table.c
    with driver.engine.connect() as conn:
        jobs = {row.id: row for row in conn.execute(
            sa.select(c.id, c.status, c.attempts, c.max_retries, c.reserved_by, c.last_error, c.result,
                      c.payload))}
    runs = select(url, f"SELECT job, attempt, worker, started, ended, ok FROM {runs_table}")
    changes = select(url, f"SELECT job, status, attempts, reserved_by FROM {audit} ORDER BY at")

    # Every job is there, and final.
    expected = {f"c{n:07d}" for n in range(pushed)}
    missing = expected - jobs.keys()
    not_final = [job_id for job_id, row in jobs.items() if row.status not in ("completed", "failed")]
    problems += [f"missing {job_id}" for job_id in sorted(missing)] + [f"not final {job_id}" for job_id in not_final]

    # The audit: each attempt handed out once; one final write per job, matching the row; never both.
    claims = collections.Counter((job, attempts) for job, status, attempts, _ in changes if status == "processing")
    problems += [f"attempt {key} handed out {count} times" for key, count in claims.items() if count > 1]
    finals = collections.defaultdict(list)
    for job, status, attempts, reserved_by in changes:
        if status in ("completed", "failed"):
            finals[job].append((status, attempts, reserved_by))
    duplicates = [job for job, writes in finals.items() if len(writes) > 1]
    problems += [f"{job} finished {len(finals[job])} times: {finals[job]}" for job in duplicates]

    runs_by_attempt = collections.defaultdict(list)
    for job, attempt, worker, started, ended, ok in runs:
        runs_by_attempt[f"c{job:07d}", attempt].append((worker, ended, ok))
    problems += [f"attempt {key} ran {len(found)} times" for key, found in runs_by_attempt.items() if len(found) > 1]

    lost, dead_by_design, dead_by_chaos, reasons = [], 0, 0, collections.Counter()
    for job_id, row in jobs.items():
        n = int(job_id[1:])
        if [status for status, _, _ in finals.get(job_id, [])][:1] != [row.status] and row.status in (
                "completed", "failed"):
            problems.append(f"{job_id} is {row.status} but the audit says {finals.get(job_id)}")
        if row.status == "completed":
            result = json.loads(row.result)
            backing = [(worker, ok) for worker, ended, ok in runs_by_attempt.get((job_id, row.attempts), [])]
            if result != {"attempt": row.attempts, "worker": row.reserved_by}:
                problems.append(f"{job_id} completed by attempt {row.attempts} of {row.reserved_by}, result {result}")
            if backing != [(row.reserved_by, 1)]:
                lost.append(job_id)  # completed, but the completing attempt's side effect is not there
            if chaos_jobs.always_fails(n):
                problems.append(f"{job_id} should always fail but completed")
        elif row.status == "failed":
            # A dead letter has used up its attempts, and says why: its own failure, or (when its last
            # attempt died with its worker) the expired lease.
            reasons.update([(row.last_error or "").split(":")[0]])
            if not row.last_error or row.attempts <= row.max_retries:
                problems.append(f"{job_id} dead-lettered after {row.attempts} attempts: {row.last_error!r}")
            if chaos_jobs.always_fails(n):
                dead_by_design += 1
            else:
                dead_by_chaos += 1
    lost += sorted(missing) + not_final

    overlaps = overlapping_runs(runs, killed_at)
    problems += [f"runs overlap: {overlap}" for overlap in overlaps]
    successes = collections.Counter(job for job, _, _, _, _, ok in runs if ok == 1)
    statuses = collections.Counter(row.status for row in jobs.values())
    return {"completed": statuses["completed"], "dead": statuses["failed"], "dead_by_design": dead_by_design,
            "dead_by_chaos": dead_by_chaos, "cut_runs": sum(ended is None for *_, ended, _ in runs),
            "re_executed": sum(count > 1 for count in successes.values()), "duplicates": len(duplicates),
            "lost": len(lost), "problems": problems, "reasons": dict(reasons)}


# -- charts ----------------------------------------------------------------------------------------

def png_pixels(data: bytes):
    """The RGB pixels of PNG bytes (rows x columns x 3, floats 0-1); fails unless it is a whole PNG."""
    import io

    import matplotlib.image

    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"not a PNG: starts with {data[:8]!r}"
    assert data[-8:-4] == b"IEND", "the PNG does not end with its IEND chunk"
    return matplotlib.image.imread(io.BytesIO(data), format="png")[..., :3]


def color_fraction(pixels, hex_color: str, tolerance: float = 0.08) -> float:
    """The share of pixels within ``tolerance`` of ``hex_color`` (a line drawn in that colour shows)."""
    import numpy as np

    target = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return float((np.abs(pixels - target).max(axis=-1) <= tolerance).mean())
