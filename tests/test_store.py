"""The job store: one room for every statement, its boundary enforced, and its contract on all three databases.

The boundary checks read the package's source (as tests/test_security.py does): outside
``store``, ``dialects`` and ``schema`` no module builds or runs SQL, nor imports a database
driver, and the package's imports form no circle.  Each checker is first shown a planted
violation, so a checker that has gone blind fails instead of passing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from helpers import kill_session, session_id
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
