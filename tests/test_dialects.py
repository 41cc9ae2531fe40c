"""What differs between PostgreSQL, MariaDB and SQLite, each difference shown on the real database.

The store asks its dialect for the clock, time arithmetic, the atomic claim, keyed inserts,
the SET order, LISTEN/NOTIFY and what the server allows; these tests hold each dialect to the
same contract, and check the differences that are meant to be there.
"""

from __future__ import annotations

import re
import threading
from datetime import timedelta
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from kronix_data import InvalidInputError, Job
from kronix_data.dialects import (MySQLDialect, PostgresDialect, SQLiteDialect, WriterTurns, dialect_class,
                                  make_engine)
from kronix_data.schema import CLAIMED_COLUMNS

from helpers import SERVERS, kill_session, session_id


@pytest.fixture
def store(driver):
    return driver.store


def scalar(store, expression):
    with store.engine.connect() as conn:
        return conn.execute(sa.select(expression)).scalar_one()


def test_urls_get_the_drivers_kronix_installs_and_an_engine_is_taken_as_it_is():
    assert make_engine("postgresql://u@h/db").url.drivername == "postgresql+psycopg"
    assert make_engine("postgres://u@h/db").url.drivername == "postgresql+psycopg"
    assert make_engine("mysql://u@h/db").url.drivername == "mysql+pymysql"
    assert make_engine("mariadb://u@h/db").url.drivername == "mariadb+pymysql"
    engine = sa.create_engine("sqlite://")
    assert make_engine(engine) is engine
    with pytest.raises(InvalidInputError, match="db must be a SQLAlchemy Engine or a database URL, got int"):
        make_engine(5)
    assert [dialect_class(name) for name in ("postgresql", "mysql", "mariadb", "sqlite")] == [
        PostgresDialect, MySQLDialect, MySQLDialect, SQLiteDialect]
    with pytest.raises(InvalidInputError, match="unsupported database 'mssql'"):
        dialect_class("mssql")


def test_the_clock_and_time_arithmetic_agree_with_python(store):
    dialect = store.dialect
    now, later = scalar(store, dialect.now()), scalar(store, dialect.now_plus(90.5))
    assert now.tzinfo is not None and timedelta(seconds=90) < later - now < timedelta(seconds=92)
    earlier = scalar(store, dialect.now_plus(-3600))
    assert timedelta(minutes=59) < now - earlier < timedelta(minutes=61)
    span = scalar(store, dialect.seconds_between(dialect.now_plus(2.25), dialect.now_plus(1.0)))
    assert span == pytest.approx(1.25, abs=0.002)  # SQLite's clock has milliseconds


def test_percentiles_are_aggregated_by_postgresql_only_and_interpolate_as_pandas_does(store, backend):
    dialect = store.dialect
    values = sa.values(sa.column("v", sa.Float), name="v").data([(float(v),) for v in (1, 2, 3, 4, 10)])
    aggregate = dialect.percentiles([0.5, 0.95], values.c.v)
    if backend != "postgresql":
        assert aggregate is None  # the stats compute them in pandas there
        return
    with store.engine.connect() as conn:
        p50, p95 = conn.execute(sa.select(aggregate).select_from(values)).scalar_one()
    expected = pd.Series([1, 2, 3, 4, 10]).quantile([0.5, 0.95]).tolist()
    assert [p50, p95] == pytest.approx(expected)


def test_keyed_inserts_skip_stored_keys_and_return_every_keys_id(store):
    rows = lambda keys: [store.row_for_push(Job("n", key=key)) for key in keys]  # noqa: E731
    with store.engine.begin() as conn:
        first = store.dialect.insert_new_keys(conn, store.table, rows(["a", "b"]))
    with store.engine.begin() as conn:
        second = store.dialect.insert_new_keys(conn, store.table, rows(["b", "c"]))
    assert second["b"] == first["b"] and set(second) == {"b", "c"} and second["c"] not in first.values()
    assert store.count_pending("default") == 3


def test_a_duplicate_id_under_a_new_key_is_refused_on_every_database(store, backend):
    """MySQL's ON DUPLICATE KEY UPDATE swallows it; its dialect finds and reports it like the others."""
    taken = store.insert_jobs([store.row_for_push(Job("n", id="taken"))])[0]
    with pytest.raises((InvalidInputError, sa.exc.IntegrityError), match="taken"):
        with store.engine.begin() as conn:
            store.dialect.insert_new_keys(conn, store.table, [store.row_for_push(Job("n", id=taken, key="new"))])
    assert store.count_pending("default") == 1


def test_set_in_order_reads_every_column_as_it_was_before_the_update(store):
    """MySQL evaluates SET left to right with the new values (and SQLAlchemy orders a plain SET by the
    table's columns: ``name`` before ``last_error``); the dialect orders it so all three databases agree."""
    store.insert_jobs([store.row_for_push(Job("old-name", id="j"))])
    c = store.table.c
    with store.engine.begin() as conn:
        update = store.dialect.set_in_order(store.table.update().where(c.id == "j"),
                                            [(c.last_error, sa.literal("was ") + c.name),
                                             (c.name, sa.literal("new-name"))])
        conn.execute(update)
    row = store.read_job("j")
    assert (row["last_error"], row["name"]) == ("was old-name", "new-name")


def test_claims_take_due_jobs_oldest_first_and_return_the_claimed_columns(store):
    store.insert_jobs([store.row_for_push(Job("n", i, id=f"j{i}")) for i in range(3)])
    store.insert_jobs([store.row_for_push(Job("n", id="later", available_at=scalar(store, store.dialect.now_plus(60))))])
    c = store.table.c
    with store.engine.begin() as conn:
        due = [c.queue == "default", c.status == "pending", c.available_at <= store.dialect.now()]
        rows = store.dialect.claim(conn, store.table, due, 10, {"status": "processing", "reserved_by": "w"})
    assert sorted(row["id"] for row in rows) == ["j0", "j1", "j2"]
    assert all(set(row) == set(CLAIMED_COLUMNS) and row["attempts"] == 1 and row["reserved_at"] for row in rows)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_claims_and_recovery_skip_rows_another_transaction_holds(store):
    store.insert_jobs([store.row_for_push(Job("n", id=f"j{i}")) for i in range(3)])
    c = store.table.c
    with store.engine.connect() as holder:
        transaction = holder.begin()
        holder.execute(sa.select(c.id).where(c.id == "j0").with_for_update())
        claimed = []
        thread = threading.Thread(target=lambda: claimed.extend(store.claim("w", 3, "default")), daemon=True)
        thread.start()
        thread.join(10)
        transaction.rollback()
    assert not thread.is_alive(), "the claim waited on a locked row"
    assert sorted(row["id"] for row in claimed) == ["j1", "j2"]
    with store.engine.connect() as conn:
        assert store.dialect.skips_locked(conn)


def statements_run(store, action) -> list[tuple[str, Any, bool]]:
    """``(statement, parameters, autocommit)`` of each statement ``action()`` sends through the store's engine."""
    seen = []

    def record(conn, _cursor, statement, parameters, _context, _many):
        seen.append((statement, parameters, conn.connection.dbapi_connection.autocommit))

    sa.event.listen(store.engine, "before_cursor_execute", record)
    try:
        action()
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", record)
    return seen


@pytest.mark.parametrize("backend", ["postgresql"])
def test_the_postgres_claim_finds_its_locked_candidates_by_primary_key(store):
    """Joined to a CTE of the candidates, the UPDATE was hashed against a sequential scan of the whole table."""
    for start in range(0, 3000, 1000):
        store.insert_jobs([store.row_for_push(Job("n", i)) for i in range(start, start + 1000)])
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"ANALYZE {store.table.name}")
    [(claim, parameters, _)] = statements_run(store, lambda: store.claim("w", 100, "default"))
    with store.engine.connect() as conn:
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {claim}", parameters))
    assert f"Index Scan using {store.table.name}_pkey" in plan, plan
    assert not re.search(rf"Seq Scan on {store.table.name}(?!_)\b", plan), plan


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_single_postgres_push_is_one_statement_in_autocommit_that_notifies(store):
    store.insert_jobs([store.row_for_push(Job("n", i)) for i in range(2)])
    [(statement, _, autocommit)] = statements_run(store, lambda: store.insert_jobs([store.row_for_push(Job("n", 2))]))
    assert "pg_notify" in statement and autocommit
    assert [row["payload"] for row in store.claim("w", 3, "default")] == ["0", "1", "2"]  # first in, first out


def test_mysql_pins_held_job_updates_to_the_primary_key(store, backend):
    compiled = str(store.dialect.update_by_id(store.table).values(status="x").compile(store.engine))
    assert ("FORCE INDEX (PRIMARY)" in compiled) == (backend == "mariadb")


def test_large_pushes_take_the_bulk_path_and_store_the_same_rows(store):
    """COPY on PostgreSQL from 64 rows, plain bound values on MariaDB, executemany on SQLite."""
    ids = store.insert_jobs([store.row_for_push(Job("bulk", {"n": i, "s": "é\t\n\\"})) for i in range(200)])
    small = store.insert_jobs([store.row_for_push(Job("small", {"n": -1, "s": "é\t\n\\"}))])
    bulk_row, small_row = store.read_job(ids[123]), store.read_job(small[0])
    assert bulk_row["payload"] == '{"n":123,"s":"\\u00e9\\t\\n\\\\"}'
    assert small_row["payload"] == '{"n":-1,"s":"\\u00e9\\t\\n\\\\"}'
    assert bulk_row["created_at"].tzinfo is not None and bulk_row["available_at"] == bulk_row["created_at"]
    assert store.count_pending("default") == 201


def test_only_postgresql_listens_and_a_push_wakes_its_listener(store, backend):
    listener = store.listener()
    if backend != "postgresql":
        assert listener is None  # workers poll there
        return
    try:
        assert listener.wait(0.05) is False
        store.insert_jobs([store.row_for_push(Job("n"))])
        assert listener.wait(10) is True
    finally:
        listener.close()


def test_sqlite_writes_durably_in_wal_and_takes_writer_turns_per_file(tmp_path):
    from kronix_data.store import JobStore

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_or_upgrade_table()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    assert WriterTurns.for_database(str(tmp_path / "jobs.db")) is WriterTurns.for_database(str(tmp_path / "jobs.db"))
    assert WriterTurns.for_database(":memory:") is None and WriterTurns.for_database(None) is None
    assert (tmp_path / "jobs.db.kronix-lock").exists()
    store.close()


# -- the fold's watermark ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", SERVERS)
def test_a_session_lost_while_the_watermark_is_read_is_a_database_error_a_worker_rides_out(driver):
    """The chaos test found it: on MariaDB a killed session was taken for a missing privilege, and the next
    statement on the dead connection raised PendingRollbackError, which stopped the worker."""
    store = driver.store
    with store.engine.connect() as conn:
        conn.begin()
        kill_session(store.url_with_password, session_id(conn.connection.dbapi_connection))
        with pytest.raises(store.database_errors):
            store.dialect.fold_watermark(conn)


def test_the_postgres_watermark_stays_behind_an_open_transaction_and_falls_back_when_sessions_are_hidden(
        private_postgresql):
    """W' is at most the start of any transaction still open (minus the margin); a role that cannot see
    other roles' sessions keeps W' the fallback margin behind the clock instead of trusting what it sees."""
    admin = sa.create_engine(private_postgresql.url)
    dialect = PostgresDialect()
    with admin.begin() as conn:
        conn.execute(sa.text("DROP ROLE IF EXISTS kronix_limited"))
        conn.execute(sa.text("CREATE ROLE kronix_limited LOGIN"))
    limited = sa.create_engine(sa.make_url(private_postgresql.url).set(username="kronix_limited", password=None))
    try:
        with admin.connect() as holder:
            holder.begin()
            opened = holder.execute(sa.text("SELECT now()")).scalar_one()  # an open transaction, idle in it
            with admin.begin() as conn:
                seen = dialect.fold_watermark(conn)
            assert seen <= opened - timedelta(seconds=dialect.fold_margin_s)
            assert seen >= opened - timedelta(seconds=dialect.fold_margin_s + 1)
            with limited.begin() as conn:
                now = conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
                hidden = dialect.fold_watermark(conn)
            assert hidden <= now - timedelta(seconds=dialect.fold_fallback_margin_s)
            holder.rollback()
        with admin.begin() as conn:  # nothing open, nothing hidden: two seconds behind the clock
            now = conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
            assert dialect.fold_watermark(conn) >= now - timedelta(seconds=dialect.fold_margin_s + 1)
    finally:
        limited.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text("DROP ROLE IF EXISTS kronix_limited"))
        admin.dispose()


# -- pinging pooled connections ------------------------------------------------------------------

@pytest.mark.parametrize("backend", SERVERS)
def test_a_pooled_connection_is_pinged_only_after_it_idled_and_a_dead_one_is_replaced(driver, monkeypatch):
    """No ping on a connection given back a moment ago (a round trip of every push and claim once); one
    that idled past PING_AFTER_IDLE_S is pinged, and replaced without an error when its session is gone."""
    import kronix_data.dialects as dialects

    store = driver.store
    with store.engine.connect() as conn:
        first = session_id(conn.connection.dbapi_connection)
    with store.engine.connect() as conn:
        assert session_id(conn.connection.dbapi_connection) == first  # reused at once, not replaced
    kill_session(store.url_with_password, first)
    monkeypatch.setattr(dialects, "PING_AFTER_IDLE_S", 0.0)  # every pooled connection counts as idle now
    with store.engine.connect() as conn:
        assert session_id(conn.connection.dbapi_connection) != first
        assert conn.execute(sa.select(sa.literal(1))).scalar_one() == 1
