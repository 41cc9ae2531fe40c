"""Fixtures that run each test against real SQLite files, PostgreSQL and MariaDB.

Server URLs come from ``KRONIX_TEST_POSTGRES_URL`` and ``KRONIX_TEST_MYSQL_URL``
(defaults: this machine's local servers).  A server that cannot be reached is
skipped with a hint outside CI, and fails the test when ``CI=true``.
"""

from __future__ import annotations

import os
import uuid
from functools import cache

import pytest
import sqlalchemy as sa

from kronix_data import DatabaseQueueDriver

SERVER_URLS = {
    "postgresql": os.environ.get("KRONIX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mariadb": os.environ.get("KRONIX_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
ENV_NAMES = {"postgresql": "KRONIX_TEST_POSTGRES_URL", "mariadb": "KRONIX_TEST_MYSQL_URL"}
BACKENDS = ["sqlite", "postgresql", "mariadb"]
IN_CI = os.environ.get("CI", "").lower() == "true"


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
        message = (f"{backend} at {sa.make_url(SERVER_URLS[backend]).render_as_string(hide_password=True)} "
                   f"is unreachable ({reason}); set {ENV_NAMES[backend]} to a test database")
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return SERVER_URLS[backend]


def unique_table() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


def drop_table(url: str, table: str) -> None:
    """Drop a test's jobs table and the companions the store makes beside it."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for name in (f"{table}_deps", f"{table}_waits", f"{table}_queues", table):  # our own unique_table()
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def db_url(backend, tmp_path) -> str:
    return database_url(backend, tmp_path)


@pytest.fixture
def table_name(db_url):
    name = unique_table()
    yield name
    drop_table(db_url, name)


@pytest.fixture
def driver(db_url, table_name):
    """A driver on a new, empty table of its own."""
    queue = DatabaseQueueDriver(db_url, table=table_name)
    queue.create_table()
    yield queue
    queue.close()


@pytest.fixture
def other_driver(db_url, table_name, driver):
    """A second worker on the same table (another worker_id)."""
    queue = DatabaseQueueDriver(db_url, table=table_name)
    yield queue
    queue.close()
