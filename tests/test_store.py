"""The job store: one room for every statement, its boundary enforced, and its contract on all three databases.

The boundary checks read the package's source (as tests/test_security.py does): outside
``store``, ``dialects`` and ``schema`` no module builds or runs SQL, nor imports a database
driver, and the package's imports form no circle.  Each checker is first shown a planted
violation, so a checker that has gone blind fails instead of passing.
"""

from __future__ import annotations

import ast
import os
import re
import threading
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

import rollup_jobs  # noqa: F401 - the task run_burst runs here
from helpers import (REPOSITORY, SERVERS, TESTS, cli_environment, db_now, finish, kill_session, run_burst,
                     session_id, set_times, start_kronix, unique_table, wait_until)
from kronix_data import DatabaseQueueDriver, DatabaseUnavailableError, Job, JobStatus, KronixError
from kronix_data.store import JobStore

PACKAGE = Path(__file__).resolve().parents[1] / "kronix_data"
#: Where SQL may be built and run.
SQL_MODULES = {"store.py", "dialects.py", "schema.py"}
#: What other modules may take from SQLAlchemy: its exceptions and URL parsing, nothing that makes a statement.
SQLALCHEMY_NAMES_ALLOWED = {"exc", "make_url", "URL", "Engine"}
DATABASE_DRIVERS = {"psycopg", "psycopg2", "pymysql", "MySQLdb", "sqlite3", "asyncpg"}
RUNS_SQL = {"execute", "exec_driver_sql", "executemany", "scalar", "scalars", "mappings"}
SQL_TEXT = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|TRUNCATE|COPY|WITH)\s+\S")


def sql_outside_the_store(name: str, source: str) -> list[str]:
    """Where one module builds or runs SQL, imports a database driver, or takes a statement maker from SQLAlchemy."""
    found = []
    aliases = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in DATABASE_DRIVERS:
                    found.append(f"{name}:{node.lineno} imports {alias.name}")
                elif root == "sqlalchemy":
                    if alias.name not in ("sqlalchemy", "sqlalchemy.exc"):
                        found.append(f"{name}:{node.lineno} imports {alias.name}")
                    aliases.add(alias.asname or "sqlalchemy")
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            if root in DATABASE_DRIVERS:
                found.append(f"{name}:{node.lineno} imports from {node.module}")
            elif root == "sqlalchemy":
                taken = {alias.name for alias in node.names}
                if node.module != "sqlalchemy.exc" and not taken <= SQLALCHEMY_NAMES_ALLOWED:
                    found.append(f"{name}:{node.lineno} takes {sorted(taken - SQLALCHEMY_NAMES_ALLOWED)} "
                                 f"from {node.module}")
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id in aliases and \
                    node.attr not in SQLALCHEMY_NAMES_ALLOWED:
                found.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
            if node.attr in RUNS_SQL:
                found.append(f"{name}:{node.lineno} calls .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL_TEXT.match(node.value):
            found.append(f"{name}:{node.lineno} holds SQL text {node.value[:40]!r}")
    return found


def package_sources() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(PACKAGE.glob("*.py"))}


def test_the_checker_sees_sql_built_or_run_anywhere():
    planted = '''
import sqlalchemy as sa
from sqlalchemy import select
import psycopg
query = "SELECT id FROM kronix_jobs"
def f(conn, table):
    conn.execute(sa.select(table.c.id))
'''
    found = " ".join(sql_outside_the_store("planted.py", planted))
    for violation in ("takes ['select']", "imports psycopg", "SQL text", "calls .execute", "uses sa.select"):
        assert violation in found
    assert sql_outside_the_store("clean.py", "import sqlalchemy as sa\nerror = sa.exc.DBAPIError\n"
                                             "url = sa.make_url('sqlite://')\nnote = 'select a queue'\n") == []


def test_no_module_outside_the_store_dialects_and_schema_builds_or_runs_sql():
    sources = package_sources()
    assert SQL_MODULES <= set(sources) and len(sources) >= 15  # the check really read the package
    found = [violation for name, source in sources.items() if name not in SQL_MODULES
             for violation in sql_outside_the_store(name, source)]
    assert found == []
    # ... and the store is where the statements are: the same checker finds plenty there.
    assert len(sql_outside_the_store("store.py", sources["store.py"])) > 40


def imports_of(source: str) -> set[str]:
    """The package modules one module imports (TYPE_CHECKING imports included: they are arrows too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kronix_data."):
            found.add(node.module.split(".")[1])
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_the_package_has_no_import_circle_and_analytics_never_reach_back_to_the_driver():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    graph = {name.removesuffix(".py"): imports_of(source) for name, source in package_sources().items()}
    assert graph["driver"] >= {"store", "analytics", "history", "batches"}  # the graph really was read
    assert circles(graph) == []
    for module in ("store", "analytics", "history", "batches", "chunking", "dialects", "schema", "job"):
        assert "driver" not in graph[module] and "worker" not in graph[module], module


PRIVATE_PARTS = re.compile(r"store\._\w+|driver\._(?:reader|writer)\b")


def test_nothing_outside_the_store_touches_its_private_parts():
    assert PRIVATE_PARTS.findall("self.driver.store._writer.begin(); driver._reader") == ["store._writer",
                                                                                          "driver._reader"]
    found = [f"{name}: {match}" for name, source in package_sources().items() if name != "store.py"
             for match in PRIVATE_PARTS.findall(source)]
    assert found == []


# -- the store's contract, on every database -----------------------------------------------------

@pytest.fixture
def store(driver) -> JobStore:
    return driver.store


def claimed_jobs(store: JobStore, worker: str, n: int) -> list[Job]:
    return [store.job_from_row(row) for row in store.claim(worker, n, "default")]


def test_every_write_to_a_held_job_checks_the_worker_and_the_attempt(store):
    store.insert_jobs([store.row_for_push(Job("n", i, id=f"j{i}")) for i in range(6)])
    jobs = claimed_jobs(store, "me", 6)
    assert [job.attempts for job in jobs] == [1] * 6
    stale = [Job(job.name, id=job.id, attempts=job.attempts + 1) for job in jobs]  # another attempt's copy
    for who, targets in (("someone else", jobs), ("me", stale)):
        assert store.complete(who, [(job, None) for job in targets[:2]]) == 0
        assert store.complete(who, [(targets[2], '{"x":1}')]) == 0
        assert store.release(who, targets[3]) is False
        assert store.dead_letter(who, targets[4]) is False
        assert store.unclaim(who, targets[5:]) == 0
    assert store.renew_leases("someone else", jobs) == 0
    assert store.renew_leases("me", jobs) == 6
    assert store.complete("me", [(jobs[0], None), (jobs[1], '{"rows":2}')]) == 2
    assert store.complete("me", [(jobs[0], None)]) == 0  # a job completes once
    assert store.release("me", jobs[2], delay_s=60) and store.dead_letter("me", jobs[3])
    assert store.unclaim("me", jobs[4:]) == 2
    rows = {job.id: store.read_job(job.id) for job in jobs}
    assert [rows[f"j{i}"]["status"] for i in range(6)] == ["completed", "completed", "pending", "failed",
                                                           "pending", "pending"]
    assert rows["j1"]["result"] == '{"rows":2}' and rows["j4"]["attempts"] == 0 and rows["j2"]["attempts"] == 1


def test_keyed_inserts_return_the_stored_ids_and_a_taken_id_writes_nothing(store):
    first = store.insert_jobs([store.row_for_push(Job("n", i, key=f"k{i}", batch_id="b")) for i in range(3)])
    again = store.insert_jobs([store.row_for_push(Job("n", i, key=f"k{i}", batch_id="b")) for i in range(4)])
    assert again[:3] == first and len(set(again)) == 4
    assert store.count_stored_keys("b", [f"k{i}" for i in range(10)]) == 4
    with pytest.raises(ValueError, match="already in table"):
        store.insert_jobs([store.row_for_push(Job("n", key="k-new", id=first[0]))])
    with pytest.raises(ValueError, match="already in table"):
        store.insert_jobs([store.row_for_push(Job("n", id="plain")), store.row_for_push(Job("n", id=first[1]))])
    assert store.count_pending("default") == 4 and store.read_job("plain") is None
    assert store.count_stored_keys("b", ["k-new"]) == 0


def test_table_parts_and_the_clock(store):
    parts = store.table_parts()
    assert {"column id", "column job_key", "index " + store.table.name + "_due",
            "table " + store.table.name + "_deps"} <= parts
    now = store.database_now()
    assert now.tzinfo is not None
    store.drop_table()
    assert store.table_parts() is None


def test_a_missing_sqlite_file_is_reported_without_being_created(tmp_path):
    path = tmp_path / "missing.db"
    store = JobStore(f"sqlite:///{path}")
    assert "does not exist" in store.missing_database() and not (tmp_path / "missing.db").exists()
    store.create_or_upgrade_table()
    assert store.missing_database() is None
    assert JobStore("sqlite://").missing_database() is None  # in memory: nothing to be missing
    store.close()


def test_an_unreachable_server_is_database_unavailable_and_still_an_operational_error():
    driver = DatabaseQueueDriver("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2")
    with pytest.raises(DatabaseUnavailableError) as raised:
        driver.size()
    assert isinstance(raised.value, sa.exc.OperationalError) and isinstance(raised.value, KronixError)
    assert "127.0.0.1" in str(raised.value) and raised.value.orig is not None
    driver.close()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_connection_cut_mid_call_is_database_unavailable_and_the_next_call_reconnects(driver, other_driver):
    driver.push(Job("n"))
    cut = []

    @sa.event.listens_for(driver.engine, "before_cursor_execute")
    def cut_the_first_count(conn, _cursor, statement, *_):
        if statement.lstrip().upper().startswith("SELECT COUNT") and not cut:
            cut.append(session_id(conn.connection.driver_connection))  # this test's own session
            kill_session(other_driver.engine.url, cut[0])

    with pytest.raises(DatabaseUnavailableError) as raised:
        driver.size()
    assert cut and isinstance(raised.value, sa.exc.OperationalError) and raised.value.connection_invalidated
    assert driver.size() == 1 and driver.pop().status is JobStatus.PROCESSING


# -- the finished jobs' rollup: counts without a scan of history ---------------------------------

def plain_counts(driver) -> dict[tuple[str, str], int]:
    """COUNT(*) by queue and status over the whole table: what the rollup must equal."""
    c = driver.table.c
    with driver.engine.connect() as conn:
        return {(queue, status): jobs for queue, status, jobs in conn.execute(
            sa.select(c.queue, c.status, sa.func.count()).group_by(c.queue, c.status))}


def plain_batches(driver) -> dict[str, dict]:
    """Per batch, by a GROUP BY over the whole table: the counts by status, first created_at, last finished_at."""
    c = driver.table.c
    batches: dict[str, dict] = {}
    with driver.engine.connect() as conn:
        for batch, status, jobs, created, finished in conn.execute(
                sa.select(c.batch_id, c.status, sa.func.count(), sa.func.min(c.created_at), sa.func.max(c.finished_at))
                .where(c.batch_id.is_not(None)).group_by(c.batch_id, c.status)):
            record = batches.setdefault(batch, {"total": 0, "created_at": created, "finished_at": finished})
            record[status] = jobs
            record["total"] += jobs
            record["created_at"] = min(record["created_at"], created)
            if finished is not None:
                record["finished_at"] = finished if record["finished_at"] is None else max(record["finished_at"],
                                                                                          finished)
    return batches


def assert_counts_exact(driver) -> None:
    """fetch_stats() and batches() (rollup + tail + in flight) equal a plain COUNT/GROUP BY of the table."""
    stats = driver.fetch_stats()
    shown = {(row["queue"], status): int(row[status]) for row in stats.to_dict(orient="records")
             for status in [s.value for s in JobStatus] if row[status]}
    assert shown == plain_counts(driver)
    frame = driver.batches()
    seen = {row["batch_id"]: {"total": row["total"], "created_at": row["created_at"],
                              "finished_at": None if pd.isna(row["finished_at"]) else row["finished_at"],
                              **{s.value: row[s.value] for s in JobStatus if row[s.value]}}
            for row in frame.to_dict(orient="records")}
    assert seen == plain_batches(driver)


def rollup_jobs(driver) -> int:
    """How many jobs the rollup table holds (folded, not counted live)."""
    rollup = driver.store.tables.rollup
    with driver.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(rollup.c.jobs), 0))).scalar_one())


def start_workers(url: str, table: str, tmp_path, processes: int = 2) -> list:
    """Burst workers in processes of their own; lease 1 s, so each folds every half second."""
    return [start_kronix(["worker", "-m", "rollup_jobs", "--db", url, "--table", table, "--burst",
                          "--lease-timeout", "1", "-c", "2", "-q", "default", "-q", "other"], cwd=tmp_path,
                         environment=cli_environment(PYTHONPATH=os.pathsep.join([str(TESTS), str(REPOSITORY)])))
            for _ in range(processes)]


def test_the_rollup_counts_exactly_through_completions_dead_letters_cancels_retries_prunes_and_folds(
        quiet_db_url, tmp_path):
    table = unique_table()
    driver = DatabaseQueueDriver(quiet_db_url, table=table)
    try:
        driver.create_table()
        for round_ in range(2):
            for b in range(3):
                driver.push_many([Job("rollup.work", {"n": n, "sleep": 0.03}, batch_id=f"r{round_}b{b}",
                                      queue="other" if b == 2 else "default") for n in range(120)])
            driver.push_many([Job("rollup.work", {"n": n}) for n in range(40)])  # no batch
            # Due tomorrow: still pending whenever the workers get to it, so the cancel below never races them.
            later = driver.push(Job("rollup.work", {"n": 0}, available_at=db_now(driver) + timedelta(days=1)))
            workers = start_workers(quiet_db_url, table, tmp_path)
            # While the workers complete jobs and fold: cancels, a batch cancelled, retries of dead letters
            # (they fail again) and folds from this process too.
            wait_until(lambda: driver.fetch_stats()["failed"].sum() >= 3, 120, "the first dead letters")
            assert driver.cancel(later)
            assert driver.retry_dead_letters() >= 3
            driver.store.fold_finished()
            driver.store.cancel_batch(f"r{round_}b1")
            driver.store.fold_finished()
            for process in workers:
                result = finish(process)
                assert result.returncode == 0, result.stderr
            assert rollup_jobs(driver) > 0, "the workers' maintenance passes folded finished jobs"
            assert_counts_exact(driver)
            wait_until(lambda: driver.store.fold_finished() is not None and rollup_jobs(driver) > 0, 30,
                       "a fold")
            assert_counts_exact(driver)
        # Both rounds are folded now: every change below touches rows the rollup holds.
        assert driver.retry_dead_letters(batch="r0b2") > 0
        assert_counts_exact(driver)
        run_burst(driver, queues=["default", "other"])  # they fail again: dead letters in the tail, the same batch also in the rollup
        assert_counts_exact(driver)
        assert driver.clear_dead_letters(queue="other") > 0
        assert_counts_exact(driver)
        assert driver.prune(0, chunk_size=50) > 0  # in slices: completed and cancelled jobs go
        assert_counts_exact(driver)
        driver.store.fold_finished()
        assert_counts_exact(driver)
        assert driver.prune(0, dead_letters=True) > 0
        assert plain_counts(driver) == {} and rollup_jobs(driver) == 0
        assert_counts_exact(driver)
    finally:
        driver.drop_table()
        driver.close()


@pytest.mark.parametrize("backend", SERVERS)
def test_a_fold_skips_while_another_holds_the_state_row_and_never_counts_twice(driver, other_driver):
    driver.push_many([Job("n", i) for i in range(30)])
    driver.complete_many(driver.pop_many(30))
    driver.store.dialect.fold_margin_s = other_driver.store.dialect.fold_margin_s = 0.0
    with driver.store._transaction() as conn:
        driver.store._lock_rollup(conn)
        assert other_driver.store.fold_finished() is None  # skipped, not waited for
    folds = []
    threads = [threading.Thread(target=lambda store=store: folds.append(store.fold_finished()))
               for store in (driver.store, other_driver.store) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    driver.store.fold_finished()
    assert rollup_jobs(driver) <= 30 and sum(n for n in folds if n) <= 30
    assert_counts_exact(driver)


def test_the_views_read_the_rollup_not_the_history(driver):
    """A folded finished job is counted from the rollup: proof that the view does not count the table."""
    driver.push_many([Job("n", i, batch_id="b") for i in range(4)])
    jobs = driver.pop_many(4)
    driver.complete_many(jobs)
    for job in jobs:  # finished a day ago: well behind any watermark, so the rebuild folds them
        set_times(driver, job.id, finished_at=db_now(driver) - timedelta(days=1))
    assert rollup_jobs(driver) == 4
    tables = driver.store.tables
    rollup, totals, summaries = tables.rollup, tables.rollup_totals, tables.rollup_batches
    with driver.engine.begin() as conn:  # tamper with the rollup only
        conn.execute(rollup.update().values(jobs=rollup.c.jobs + 1000))
        conn.execute(totals.update().values(jobs=totals.c.jobs + 1000))
        conn.execute(summaries.update().values(completed=summaries.c.completed + 1000))  # what batches() reads
    assert int(driver.fetch_stats()["completed"].sum()) == 1004
    assert driver.batches()["completed"].tolist() == [1004]
    assert driver.store.rebuild_rollup() == 4
    assert_counts_exact(driver)


def test_reads_inside_consistent_reads_see_one_snapshot_and_writes_meanwhile_after_it(store, other_driver):
    """A monitor's refresh reads counts per queue, per batch and the history apart: inside one
    consistent_reads() block they agree, though another connection commits jobs between them."""
    store.insert_jobs([store.row_for_push(Job("n", i, batch_id="b")) for i in range(3)])
    with store.consistent_reads():
        before = sorted(store.count_jobs_by_queue_and_status())
        other_driver.push_many([Job("n", 9, batch_id="b"), Job("n", 10, queue="other")])  # committed meanwhile
        with store.consistent_reads():  # nested: the same snapshot
            assert store.count_batch_by_status("b") == {"pending": 3}
        assert sorted(store.count_jobs_by_queue_and_status()) == before == [("default", "pending", 3)]
        assert len(store.read_history(["id"], batch="b")) == 3
        assert store.count_batch_by_status("b", on_primary=True) == {"pending": 4}  # a decision's read: fresh
    assert store.count_batch_by_status("b") == {"pending": 4}
    assert sorted(store.count_jobs_by_queue_and_status()) == [("default", "pending", 4), ("other", "pending", 1)]


def test_a_table_folded_before_the_batch_summaries_gains_them_on_create_table(driver):
    """A table whose rollup a release before <table>_rollup_batches folded: create_table() sums its rollup
    rows into one summary row per batch once, and batches() reads them."""
    driver.push_many([Job("n", i, batch_id=f"b{i % 2}") for i in range(6)])
    driver.complete_many(driver.pop_many(6))
    for job_id in driver.jobs()["id"]:
        set_times(driver, job_id, finished_at=db_now(driver) - timedelta(days=1))
    summaries = driver.store.tables.rollup_batches
    with driver.engine.begin() as conn:  # as the release before left it: rollup rows, no summary table
        summaries.drop(conn)
    driver.create_table()
    with driver.engine.connect() as conn:
        assert sorted(conn.execute(sa.select(summaries.c.batch_id, summaries.c.completed)).all()) == [
            ("b0", 3), ("b1", 3)]
    assert_counts_exact(driver)
