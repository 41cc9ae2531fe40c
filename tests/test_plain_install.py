"""The project installed without extras into a fresh virtual environment, as a new user does.

A plain ``pip install`` once could not run the project's own demo (tqdm was an
extra): this test builds the project from a copy of this checkout with the new
environment's own pip, packages by name from the registry, and then, from a
directory outside the checkout and with nothing of this environment on the path,
runs ``kronix --version``, ``python -m kronix_data --version``, ``kronix demo``,
one job pushed and worked on SQLite, and a ``mysql://`` URL, whose driver is the
one thing the plain install leaves out.

It is the suite's one slow test (about 20 s with pip's cache warm): run it alone
with ``pytest -m install``, or leave it out with ``-m "not install"``. Outside CI
a registry that cannot be reached skips it; under ``CI=true`` everything fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"
DEMO_ROWS, DEMO_CHUNK_SIZE = 20_000, 2_000

#: Not copied: what the checkout's .gitignore leaves out, when git cannot say.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.egg-info", "build", "dist", "*.db",
                                    "*.db-wal", "*.db-shm", "*.kronix-lock", ".pytest_cache", ".hypothesis")
#: What pip says when it cannot reach the registry (then, outside CI, the test is skipped).
UNREACHABLE = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
                         r"resolution|Name or service not known|Network is unreachable|ConnectTimeout|ReadTimeout")

ONE_JOB = '''\
import json, sys
import kronix_data
from kronix_data import DatabaseQueueDriver, JobStatus, Worker, task


@task(name="plain.add")
def add(payload):
    return {"sum": payload["a"] + payload["b"]}


driver = DatabaseQueueDriver(sys.argv[1])
driver.create_table()
[job_id] = driver.push_many([add.job({"a": 2, "b": 3})])
Worker(driver, burst=True).run()
job = driver.get_job(job_id)
print(json.dumps({"status": JobStatus(job.status).value, "result": job.result, "version": kronix_data.__version__,
                  "package": kronix_data.__file__, "completed": int(driver.fetch_stats()["completed"].sum())}))
'''


def copy_of_the_checkout(target: Path) -> Path:
    """The project's files (as a clone would have them, plus new untracked ones), away from this checkout.

    pip builds in the source directory (setuptools writes build/ and *.egg-info
    there), which must not touch the checkout.
    """
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPOSITORY, capture_output=True)
    if listed.returncode != 0:  # not a git checkout (an unpacked archive): everything but the usual litter
        shutil.copytree(REPOSITORY, target, ignore=NOT_SOURCE)
        return target
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPOSITORY / name
        if source.is_file():  # a tracked file deleted in the work tree is gone from the build too
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def clean_environment() -> dict[str, str]:
    """This environment without anything that would let the new one see this one's packages or queue."""
    leaks = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONUSERBASE", "__PYVENV_LAUNCHER__")
    return {key: value for key, value in os.environ.items() if key not in leaks and not key.startswith("KRONIX_")}


def run(command: list[str | Path], *, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], cwd=cwd, env=clean_environment(), capture_output=True,
                          text=True, timeout=timeout)


def run_in_parallel(commands: dict[str, tuple[list[str | Path], Path]]) -> dict[str, subprocess.CompletedProcess]:
    """Start every command in its own directory, then collect them all (each start imports pandas)."""
    processes = {name: subprocess.Popen([str(part) for part in command], cwd=cwd, env=clean_environment(),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, (command, cwd) in commands.items()}
    results = {}
    for name, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.install
def test_a_plain_install_into_a_fresh_virtualenv_runs_the_demo_and_a_job(tmp_path):
    started = time.monotonic()
    source = copy_of_the_checkout(tmp_path / "kronix-data")
    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python, kronix = venv / "bin" / "python", venv / "bin" / "kronix"

    # An absolute path: a bare name would be looked up in the registry. --no-compile: the
    # byte-code is written on first import instead, about 2 s less for a test that runs once.
    installed = run([python, "-m", "pip", "install", "--no-compile", "--disable-pip-version-check", source],
                    cwd=tmp_path, timeout=900)
    if installed.returncode != 0:
        output = installed.stdout + installed.stderr
        if UNREACHABLE.search(output) and not IN_CI:
            pytest.skip(f"the package registry cannot be reached, so nothing can be installed:\n{tail(output, 5)}")
        pytest.fail(f"pip install of the project without extras failed:\n{tail(output)}")
    installed_at = time.monotonic()

    for directory in ("demo", "job", "mysql", "version"):
        (tmp_path / directory).mkdir()
    results = run_in_parallel({
        "version": ([kronix, "--version"], tmp_path / "version"),
        "python -m": ([python, "-m", "kronix_data", "--version"], tmp_path / "version"),
        "demo": ([kronix, "demo", "--rows", str(DEMO_ROWS), "--chunk-size", str(DEMO_CHUNK_SIZE)], tmp_path / "demo"),
        "job": ([python, "-c", ONE_JOB, f"sqlite:///{tmp_path / 'job' / 'jobs.db'}"], tmp_path / "job"),
        "mysql": ([kronix, "stats", "--db", "mysql://root@127.0.0.1:1/test"], tmp_path / "mysql"),
    })
    print(f"fresh virtualenv: installed in {installed_at - started:.1f} s, "
          f"checked in {time.monotonic() - installed_at:.1f} s")

    version = re.search(r'^version\s*=\s*"([^"]+)"', (REPOSITORY / "pyproject.toml").read_text(), re.MULTILINE)[1]
    for name in ("version", "python -m"):
        assert (results[name].returncode, results[name].stdout) == (0, f"kronix-data {version}\n"), results[name].stderr

    demo = results["demo"]
    assert demo.returncode == 0, f"kronix demo failed:\n{tail(demo.stdout)}\n{tail(demo.stderr)}"
    chunks = DEMO_ROWS // DEMO_CHUNK_SIZE
    counts = re.search(rf"chunks +{chunks}: (\d+) completed, (\d+) failed", demo.stdout)
    assert counts and int(counts[1]) + int(counts[2]) == chunks and int(counts[1]) > 0, demo.stdout
    assert "exactly those failed" in demo.stdout  # the demo checks its own planted bad rows
    assert "revenue per store (batch.results()" in demo.stdout
    assert f"{DEMO_ROWS}/{DEMO_ROWS} rows" in demo.stderr  # the tqdm bar (in rows), which a plain install once lacked

    job = results["job"]
    assert job.returncode == 0, f"one job on SQLite failed:\n{tail(job.stderr)}"
    outcome = json.loads(job.stdout.splitlines()[-1])
    assert (outcome["status"], outcome["result"], outcome["completed"]) == ("completed", {"sum": 5}, 1)
    assert outcome["version"] == version
    assert Path(outcome["package"]).is_relative_to(venv), "kronix_data was not imported from the new environment"

    # The one driver a plain install leaves out is named with its extra, not a traceback.
    mysql = results["mysql"]
    assert mysql.returncode == 3, mysql.stderr
    assert "MySQL/MariaDB needs the PyMySQL driver, which is not installed" in mysql.stderr
    assert "pip install 'kronix-data[mysql]'" in mysql.stderr and "Traceback" not in mysql.stderr

    shutil.rmtree(venv)  # about 220 MB; pytest would keep it with the last three runs' temporary files
