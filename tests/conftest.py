"""Fixtures that run each test against real SQLite files, PostgreSQL and MariaDB, and private servers.

Server URLs come from ``KRONIX_TEST_POSTGRES_URL`` and ``KRONIX_TEST_MYSQL_URL``
(defaults: this machine's local servers).  A server that cannot be reached is
skipped with a hint outside CI, and fails the test when ``CI=true``.  The
helpers behind these fixtures are in ``helpers.py``; only fixtures live here.
"""

from __future__ import annotations

import pytest

from helpers import (BACKENDS, TablePool, close_private_server, database_url, drop_table, start_private_server,
                     tagged_sessions, unique_table)
from kronix_data import DatabaseQueueDriver
from worker_jobs import create_runs_table


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def db_url(backend, tmp_path) -> str:
    return database_url(backend, tmp_path)


@pytest.fixture(scope="session")
def table_pools():
    """One :class:`helpers.TablePool` per server URL, for the whole session."""
    pools: dict[str, TablePool] = {}
    yield pools
    for pool in pools.values():
        pool.close()


@pytest.fixture
def table_slot(request, db_url, table_pools):
    """``(name, exists)``: the test's table.  A test with the ``driver`` fixture on a server gets an emptied
    table from the pool (or a new name); every other test a new name, its table dropped afterwards."""
    if db_url.startswith("sqlite") or "driver" not in request.fixturenames:
        name = unique_table()
        yield name, False
        drop_table(db_url, name)
        return
    pool = table_pools.get(db_url) or table_pools.setdefault(db_url, TablePool(db_url))
    slot = pool.take()
    yield slot
    pool.give_back(slot[0])


@pytest.fixture
def table_name(table_slot):
    return table_slot[0]


@pytest.fixture
def driver(db_url, table_slot):
    """A driver on an empty table of its own (new, or emptied after an earlier test: the same state)."""
    name, exists = table_slot
    queue = DatabaseQueueDriver(db_url, table=name)
    if not exists:
        queue.create_table()
    yield queue
    queue.close()


@pytest.fixture
def other_driver(db_url, table_name, driver):
    """A second worker on the same table (another worker_id)."""
    queue = DatabaseQueueDriver(db_url, table=table_name)
    yield queue
    queue.close()


@pytest.fixture
def runs_table(db_url):
    """A table where ``worker_jobs.record`` jobs write their runs (start, end, process)."""
    name = f"runs_{unique_table()}"
    create_runs_table(db_url, name)
    yield name
    drop_table(db_url, name)


# -- private servers: for tests that stop, restart or cut off a server ------------------------------

@pytest.fixture(scope="session")
def private_postgresql():
    """A throwaway PostgreSQL cluster for the whole session, started when a test first asks for it."""
    server = start_private_server("postgresql")
    yield server
    close_private_server(server)


@pytest.fixture(scope="session")
def private_mariadb():
    """A throwaway MariaDB server for the whole session, started when a test first asks for it."""
    server = start_private_server("mariadb")
    yield server
    close_private_server(server)


@pytest.fixture
def private_server(backend, request):
    """The private server of ``backend`` (``postgresql`` or ``mariadb``), running again after the test.

    A test may stop it; whether the test passes or fails, it is started again for the next one.
    """
    server = request.getfixturevalue(f"private_{backend}")
    yield server
    server.start()


@pytest.fixture
def tagged(db_url):
    """``(url, tag)``: the test's database with sessions tagged so the test can kill its own and no one else's."""
    with tagged_sessions(db_url) as url_and_tag:
        yield url_and_tag


@pytest.fixture
def quiet_db_url(backend, tmp_path, request) -> str:
    """A database only this test session uses: a SQLite file, or the private server's.  On a shared
    server other people's open transactions hold a fold's watermark back (by design), so a test that
    needs folds to move with the clock runs here."""
    if backend == "sqlite":
        return database_url(backend, tmp_path)
    return request.getfixturevalue(f"private_{backend}").url
