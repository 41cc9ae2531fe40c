"""The test suite's own rules, checked on its source: shared helpers live in helpers.py, no test
module imports conftest or another test module, and nothing but helpers.py's private servers
may stop, restart or reach past a test's own sessions on a database server."""

from __future__ import annotations

import ast
import re

import pytest

from helpers import TESTS

SOURCES = {path.name: path.read_text() for path in sorted(TESTS.glob("*.py"))}
TREES = {name: ast.parse(text, filename=name) for name, text in SOURCES.items()}
#: Modules a test may import from this directory: the helpers, and the job modules workers import.
LOCAL_MODULES = {"helpers", "chaos_jobs", "worker_jobs", "pipeline_jobs", "progress_jobs", "metrics_jobs",
                 "schedule_jobs", "isolation_jobs", "rollup_jobs", "limit_jobs"}
#: Written once, in helpers.py.
SHARED = {"wait_until", "run_burst", "database_url", "unique_table", "drop_table", "status_counts",
          "attempts_histogram", "kill_session", "kill_sessions_tagged", "session_id", "kronix_in_parallel",
          "cli_environment", "db_now", "set_times", "finished_job", "select"}
#: Commands and statements that reach beyond a test's own sessions: only helpers.py may hold them,
#: where they act on a private server or on sessions a test tagged.
SERVER_WIDE = re.compile(r"pg_ctlcluster|start-stop-daemon|mysqladmin|systemctl|service mariadb|service postgresql"
                         r"|pg_terminate_backend|KILL CONNECTION|\bpg_ctl\b|\bSHUTDOWN\b")


def imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_no_test_module_imports_conftest_or_another_test_module(name):
    local = {module for module in imported_modules(TREES[name])
             if module == "conftest" or module.startswith("test_") or (TESTS / f"{module}.py").exists()}
    assert local <= LOCAL_MODULES, f"{name} imports {sorted(local - LOCAL_MODULES)}: put shared code in helpers.py"


def test_shared_helpers_are_defined_once_in_helpers():
    defined = {(name, node.name) for name, tree in TREES.items() for node in tree.body
               if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in SHARED}
    assert {name for name, _ in defined} == {"helpers.py"}, sorted(defined)
    assert {function for _, function in defined} == SHARED


def test_conftest_holds_only_fixtures():
    plain = [node.name for node in TREES["conftest.py"].body if isinstance(node, ast.FunctionDef)
             and not any("fixture" in ast.unparse(decorator) for decorator in node.decorator_list)]
    assert plain == [], f"conftest.py defines helpers {plain}: they belong in helpers.py"


@pytest.mark.parametrize("name", sorted(set(SOURCES) - {"helpers.py", "test_suite_layout.py"}))
def test_only_the_private_servers_are_stopped_restarted_or_have_other_sessions_killed(name):
    found = sorted({match.group(0) for match in SERVER_WIDE.finditer(SOURCES[name])})
    assert not found, f"{name} uses {found}: stop or restart a helpers.PrivateServer, kill only tagged sessions"


def test_the_layout_check_sees_a_bad_import_and_a_server_wide_command():
    """The checks themselves: a module breaking each rule is caught."""
    bad = ast.parse("from conftest import database_url\nimport test_worker\nfrom helpers import wait_until\n")
    assert imported_modules(bad) == {"conftest", "test_worker", "helpers"}
    assert SERVER_WIDE.search("subprocess.run(['pg_ctlcluster', '15', 'main', 'restart'])")
    assert SERVER_WIDE.search("SELECT pg_terminate_backend(pid) FROM pg_stat_activity")
    assert not SERVER_WIDE.search("worker.send_signal(signal.SIGKILL)")
