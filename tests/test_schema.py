"""Creating the table, and upgrading a table made with the seed's DDL in place."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from kronix_data import DatabaseQueueDriver, Job, JobStatus
from kronix_data.schema import parse_table_name

SEED_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  queue TEXT NOT NULL DEFAULT 'default',
  status TEXT NOT NULL DEFAULT 'pending',
  attempts INTEGER NOT NULL DEFAULT 0,
  max_retries INTEGER NOT NULL DEFAULT 3,
  payload TEXT,
  last_error TEXT,
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  available_at TIMESTAMPTZ,
  finished_at TIMESTAMPTZ,
  reserved_by TEXT
)"""
# SQLite has no NOW(): the seed's DDL with SQLite's spelling of the same default.
SQLITE_SEED_DDL = SEED_DDL.replace("DEFAULT NOW()", "DEFAULT CURRENT_TIMESTAMP")
SEED_INDEX = "CREATE INDEX idx_{table}_pop ON {table}(queue, status, available_at)"
# MariaDB cannot run the seed's exact DDL (TEXT keys, TIMESTAMPTZ): its closest translation.
MARIADB_SEED_DDL = """
CREATE TABLE {table} (
  id VARCHAR(128) PRIMARY KEY, name VARCHAR(255) NOT NULL,
  queue VARCHAR(128) NOT NULL DEFAULT 'default', status VARCHAR(16) NOT NULL DEFAULT 'pending',
  attempts INTEGER NOT NULL DEFAULT 0, max_retries INTEGER NOT NULL DEFAULT 3,
  payload TEXT, last_error TEXT, created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
  available_at DATETIME(6), finished_at DATETIME(6), reserved_by VARCHAR(255)
)"""
SEED_ROWS = [
    {"id": "job_a", "name": "n", "status": "pending", "payload": '{"i": 1}'},
    {"id": "job_b", "name": "n", "status": "processing", "payload": '{"i": 2}', "reserved_by": "dart-worker"},
    {"id": "job_c", "name": "n", "status": "completed", "payload": '{"i": 3}'},
    {"id": "job_d", "name": "n", "status": "failed", "payload": '{"i": 4}', "last_error": "boom"},
]


def make_seed_table(url: str, table: str, backend: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        ddl = {"mariadb": MARIADB_SEED_DDL, "sqlite": SQLITE_SEED_DDL}.get(backend, SEED_DDL)
        conn.execute(sa.text(ddl.format(table=table)))
        conn.execute(sa.text(SEED_INDEX.format(table=table)))
        for row in SEED_ROWS:
            conn.execute(sa.text(f"INSERT INTO {table} (id, name, status, payload, last_error, reserved_by) "
                                 "VALUES (:id, :name, :status, :payload, :last_error, :reserved_by)"),
                         {"last_error": None, "reserved_by": None, **row})
    engine.dispose()


def test_a_seed_table_is_upgraded_in_place_without_losing_rows(backend, db_url, table_name):
    make_seed_table(db_url, table_name, backend)
    driver = DatabaseQueueDriver(db_url, table=table_name)

    driver.create_table()
    driver.create_table()  # idempotent

    inspector = sa.inspect(driver.engine)
    columns = {column["name"] for column in inspector.get_columns(table_name)}
    assert {"reserved_at", "heartbeat_at", "result"} <= columns
    indexes = {index["name"] for index in inspector.get_indexes(table_name)}
    assert {f"{table_name}_due", f"{table_name}_lease", f"idx_{table_name}_pop"} <= indexes
    if backend != "mariadb":  # the partial ones the stats and the monitor's failures read
        assert {f"{table_name}_pending_due", f"{table_name}_failed_created"} <= indexes
    stats = driver.fetch_stats().set_index("queue").loc["default"]
    assert (stats["pending"], stats["processing"], stats["completed"], stats["failed"]) == (1, 1, 1, 1)
    # The seed's pending row had no available_at: it is due now and claimable.
    job = driver.pop()
    assert job.id == "job_a" and job.payload == {"i": 1} and job.attempts == 1
    assert driver.complete(job)
    # The seed's running row got a lease starting at the upgrade, so it is recoverable.
    time.sleep(0.05)
    assert driver.recover_stale_jobs(timeout=0) == 1
    assert driver.get_job("job_b").status is JobStatus.PENDING
    assert driver.dead_letter_jobs()["last_error"].tolist() == ["boom"]
    driver.push(Job("n", "new"))
    assert driver.size() == 2
    driver.close()


def test_create_table_from_many_processes_at_once_is_safe(db_url, table_name):
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_create, [(db_url, table_name)] * 4))
    driver = DatabaseQueueDriver(db_url, table=table_name)
    driver.push(Job("n"))
    assert driver.size() == 1
    driver.close()


def _create(args) -> None:
    url, table = args
    driver = DatabaseQueueDriver(url, table=table)
    driver.create_table()
    driver.close()


def test_drop_table_removes_it_and_is_idempotent(driver):
    driver.push(Job("n"))
    driver.drop_table()
    driver.drop_table()
    assert not sa.inspect(driver.engine).has_table(driver.table.name)
    driver.create_table()
    assert driver.size() == 0


@pytest.mark.parametrize("name, parts", [("kronix_jobs", (None, "kronix_jobs")),
                                         ("etl.Jobs_2", ("etl", "Jobs_2")), ("_x", (None, "_x"))])
def test_valid_table_names_are_split_into_schema_and_table(name, parts):
    assert parse_table_name(name) == parts


def test_a_previous_release_table_gains_the_rollup_seeded_with_its_finished_jobs(db_url, table_name):
    """A table of the release before the rollup (no <table>_rollup tables) keeps its history, and the
    counts of its finished jobs move into the rollup once, on create_table."""
    old = DatabaseQueueDriver(db_url, table=table_name)
    old.create_table()
    old.push_many([Job("n", i, batch_id=f"b{i % 2}") for i in range(10)] + [Job("n", "plain")])
    jobs = sorted(old.pop_many(8), key=lambda job: job.id)
    old.complete_many(jobs[:5])
    for job in jobs[5:7]:
        job.last_error = "ValueError: no"
        old.fail(job)
    old.cancel(old.jobs(status="pending", limit=1)["id"][0])
    c = old.table.c
    with old.engine.begin() as conn:  # all of it long ago, then back to the previous release's tables
        conn.execute(old.table.update().where(c.finished_at.is_not(None))
                     .values(finished_at=datetime.now(timezone.utc) - timedelta(days=1)))
        for table in (old.store.tables.rollup_state, old.store.tables.rollup_totals, old.store.tables.rollup):
            table.drop(conn)
    old.close()
    expected = {(status, queue): n for status, queue, n in _plain_counts(db_url, table_name)}

    driver = DatabaseQueueDriver(db_url, table=table_name)
    driver.create_table()
    inspector = sa.inspect(driver.engine)
    assert all(inspector.has_table(f"{table_name}_{part}") for part in ("rollup", "rollup_totals", "rollup_state"))
    rollup = driver.store.tables.rollup
    with driver.engine.connect() as conn:
        folded = int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(rollup.c.jobs), 0))).scalar_one())
    stats = driver.fetch_stats().set_index("queue").loc["default"]
    shown = {(status, "default"): int(stats[status]) for status in ("pending", "processing", "completed",
                                                                    "failed", "cancelled") if stats[status]}
    assert shown == expected
    assert expected[("completed", "default")] == 5 and expected[("failed", "default")] == 2
    assert folded == 8  # 5 completed, 2 failed, 1 cancelled: finished well before the seed's watermark
    batches = driver.batches().set_index("batch_id")
    assert int(batches["total"].sum()) == 10 and int(batches["completed"].sum()) == 5
    driver.create_table()  # idempotent: nothing folded twice
    assert driver.fetch_stats().set_index("queue").loc["default", "completed"] == 5
    driver.close()


def _plain_counts(url: str, table: str) -> list:
    engine = sa.create_engine(url)
    meta = sa.Table(table, sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(meta.c.status, meta.c.queue, sa.func.count())
                            .group_by(meta.c.status, meta.c.queue)).all()
    engine.dispose()
    return rows
