"""What a new user meets first: the version, ``python -m kronix_data``, the declared dependencies,
and a database driver that is not installed.

A missing driver is made real, not mocked: each case runs a subprocess whose
``sitecustomize`` (on ``PYTHONPATH``) puts a finder first on ``sys.meta_path``
that refuses to import the driver's module, exactly as Python does when the
package is absent. No server is needed: the error comes when the driver is
built, before any connection (the URLs point at a closed port).
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kronix_data
from kronix_data import InvalidInputError, KronixError, MissingDriverError

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGE = REPOSITORY / "kronix_data"

HIDER = '''\
"""Hide {hidden!r} from every import in this process, as if it were not installed."""
import sys

HIDDEN = {hidden!r}


class RefuseHidden:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, RefuseHidden())
'''

BUILD_DRIVER = '''\
import importlib, json, sys
import kronix_data

try:
    importlib.import_module(sys.argv[2])
    hidden = False
except ImportError:
    hidden = True
try:
    kronix_data.DatabaseQueueDriver(sys.argv[1])
except Exception as error:
    print(json.dumps({"hidden": hidden, "type": type(error).__name__, "message": str(error),
                      "name": getattr(error, "name", None), "database": getattr(error, "database", None),
                      "install": getattr(error, "install", None),
                      "kronix_error": isinstance(error, kronix_data.KronixError),
                      "import_error": isinstance(error, ImportError)}))
else:
    print(json.dumps({"hidden": hidden, "type": None}))
'''


def environment(**variables: str) -> dict[str, str]:
    """This environment without the developer's KRONIX_* settings; the checkout first on the path."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("KRONIX_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    return {**env, **variables}


def hiding(tmp_path: Path, *modules: str) -> dict[str, str]:
    """An environment in which ``modules`` (top-level names) cannot be imported."""
    directory = tmp_path / "hide"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(HIDER.format(hidden=set(modules)))
    env = environment()
    env["PYTHONPATH"] = os.pathsep.join([str(directory), env["PYTHONPATH"]])
    return env


def run(command: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env or environment(), capture_output=True, text=True, timeout=120)


def run_in_parallel(*commands: list[str], cwd: Path, env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Start every command, then collect them (each start imports pandas: waiting one by one is slow)."""
    processes = [subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for command in commands]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def pyproject_version() -> str:
    text = (REPOSITORY / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version\s*=\s*"([^"]+)"', project, re.MULTILINE).group(1)


# -- the version and the entry points ---------------------------------------------


def test_the_version_is_the_one_in_pyproject_read_from_the_package_metadata():
    # (The metadata is written at install: after changing pyproject.toml, pip install -e . again.)
    assert kronix_data.__version__ == importlib.metadata.version("kronix-data") == pyproject_version()
    assert f'"{pyproject_version()}"' not in (PACKAGE / "__init__.py").read_text()  # not written down twice


def test_kronix_version_and_python_m_kronix_data_run_the_command_line(tmp_path):
    script = Path(sys.executable).with_name("kronix")
    assert script.exists(), f"the console script is not installed next to {sys.executable}"
    database = tmp_path / "jobs.db"
    version, module_version, init, bare = run_in_parallel(
        [str(script), "--version"],
        [sys.executable, "-m", "kronix_data", "--version"],
        [sys.executable, "-m", "kronix_data", "init", "--db", f"sqlite:///{database}", "--json"],
        [sys.executable, "-m", "kronix_data"],
        cwd=tmp_path, env=environment())

    expected = f"kronix-data {kronix_data.__version__}\n"
    assert (version.returncode, version.stdout) == (0, expected), version.stderr
    assert (module_version.returncode, module_version.stdout) == (0, expected), module_version.stderr
    assert init.returncode == 0, init.stderr
    assert json.loads(init.stdout)["action"] == "created" and database.exists()
    # No command: the usage error of the kronix CLI, not "cannot be directly executed".
    assert bare.returncode == 2 and bare.stderr.startswith("usage: kronix ")
    assert "the following arguments are required: COMMAND" in bare.stderr


# -- the dependencies ----------------------------------------------------------------


def imported_top_level_modules() -> dict[str, set[str]]:
    """Every absolute module kronix_data's own files import (at any depth), with the files that do."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.partition(".")[0], set()).add(path.name)
    return found


def requirement_name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def test_every_package_that_kronix_data_imports_is_a_declared_core_dependency():
    requirements = importlib.metadata.requires("kronix-data") or []
    core = {requirement_name(r) for r in requirements if "extra ==" not in r}
    mysql = {requirement_name(r) for r in requirements if re.search(r"""extra == ['"]mysql['"]""", r)}
    assert {"sqlalchemy", "pandas", "numpy", "psycopg", "tqdm", "ipywidgets"} <= core  # issue 18's list
    assert mysql == {"pymysql"} and "pymysql" not in core  # MySQL/MariaDB stays an extra

    distributions = importlib.metadata.packages_distributions()
    third_party = {module: files for module, files in imported_top_level_modules().items()
                   if module not in sys.stdlib_module_names and module != "kronix_data"}
    assert {"numpy", "pandas", "sqlalchemy", "psycopg", "tqdm", "ipywidgets"} <= set(third_party)  # it looks
    undeclared = {module: sorted(files) for module, files in third_party.items()
                  if not {requirement_name(d) for d in distributions.get(module, [module])} & core}
    assert not undeclared, (f"imported by kronix_data but not a dependency of the installed kronix-data: {undeclared} "
                            "(declare it in pyproject.toml; after a change there, pip install -e . again)")


# -- a database driver that is not installed ---------------------------------------

CASES = {
    # case: (URL, hidden module, database, the install that fixes it, words of the message)
    "postgresql": ("postgresql://postgres:hunter2secret@127.0.0.1:1/test", "psycopg", "PostgreSQL",
                   "pip install 'kronix-data[postgres]'",
                   "PostgreSQL needs the psycopg 3 driver, which is not installed "
                   "(ModuleNotFoundError: No module named 'psycopg'): pip install 'kronix-data[postgres]'"),
    "mysql": ("mysql://root@127.0.0.1:1/test", "pymysql", "MySQL/MariaDB", "pip install 'kronix-data[mysql]'",
              "MySQL/MariaDB needs the PyMySQL driver, which is not installed "
              "(ModuleNotFoundError: No module named 'pymysql'): pip install 'kronix-data[mysql]'"),
    "mariadb": ("mariadb://root@127.0.0.1:1/test", "pymysql", "MySQL/MariaDB", "pip install 'kronix-data[mysql]'",
                "MySQL/MariaDB needs the PyMySQL driver, which is not installed "
                "(ModuleNotFoundError: No module named 'pymysql'): pip install 'kronix-data[mysql]'"),
    # A Python compiled without SQLite's headers has sqlite3/ but not its C part, _sqlite3.
    "sqlite": ("sqlite:///{tmp}/jobs.db", "_sqlite3", "SQLite", None,
               "SQLite needs Python's sqlite3 module, which this Python lacks "
               "(ModuleNotFoundError: No module named '_sqlite3'): use a Python built with SQLite"),
    # A driver the URL chose itself: kronix-data cannot know its package, but names its own.
    "another driver": ("postgresql+psycopg2://postgres@127.0.0.1:1/test", "psycopg2", "PostgreSQL", None,
                       "the psycopg2 driver that the URL names is not installed (ModuleNotFoundError: No module "
                       "named 'psycopg2'): install it, or write postgresql:// to use psycopg 3 "
                       "(pip install 'kronix-data[postgres]')"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_missing_driver_names_the_install_from_python_and_from_the_cli(case, tmp_path):
    url, module, database, install, words = CASES[case]
    url = url.format(tmp=tmp_path)
    env = hiding(tmp_path, module)
    built, cli = run_in_parallel([sys.executable, "-c", BUILD_DRIVER, url, module],
                                 [sys.executable, "-m", "kronix_data", "stats", "--db", url],
                                 cwd=tmp_path, env=env)

    assert built.returncode == 0, built.stderr
    error = json.loads(built.stdout)
    assert error["hidden"], f"the test could import {module!r}: it hid nothing"
    assert error["type"] == "MissingDriverError" and error["kronix_error"] and error["import_error"]
    assert words in error["message"]
    assert (error["name"], error["database"], error["install"]) == (module, database, install)

    # The CLI: exit 3 (invalid configuration) with the same words, the password hidden, nothing created.
    assert cli.returncode == 3, cli.stderr
    assert cli.stderr.startswith(f"kronix: {error['message']} (database ") and cli.stdout == ""
    assert "hunter2secret" not in cli.stderr and "Traceback" not in cli.stderr
    assert not (tmp_path / "jobs.db").exists()


def test_missing_driver_error_is_a_kronix_error_and_an_import_error_that_survives_pickling():
    import pickle

    assert issubclass(MissingDriverError, KronixError) and issubclass(MissingDriverError, ImportError)
    assert kronix_data.MissingDriverError is MissingDriverError and "MissingDriverError" in kronix_data.__all__
    error = MissingDriverError("MySQL/MariaDB needs the PyMySQL driver", name="pymysql", database="MySQL/MariaDB",
                               install="pip install 'kronix-data[mysql]'")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.name, copy.database, copy.install) == (str(error), "pymysql", "MySQL/MariaDB",
                                                                   "pip install 'kronix-data[mysql]'")


def test_an_installed_driver_builds_and_an_unknown_database_is_still_invalid_input(tmp_path):
    # Nothing hidden: the same URLs build a driver (no connection yet), and the check adds no false alarm.
    for url in (CASES["postgresql"][0], CASES["mysql"][0], CASES["mariadb"][0], f"sqlite:///{tmp_path}/x.db"):
        kronix_data.DatabaseQueueDriver(url).close()
    with pytest.raises(InvalidInputError, match="unsupported database 'oracle'"):
        kronix_data.DatabaseQueueDriver("oracle://scott@127.0.0.1:1/x")
