"""``start_local_workers`` / ``LocalWorkers``: real worker processes started on this machine, on each database.

A script with no main guard run as a real subprocess (the workers never run it again), starting them, burst workers that drain the queue and end by themselves (``join``), ``stop()``
(SIGTERM: running jobs finish), the kill of a worker that outlives ``stop``'s timeout, the job
modules each process imports, and the arguments it refuses.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest

from helpers import status_counts, wait_until
from kronix_data import Job, LocalWorkers, start_local_workers
from worker_jobs import fetch_runs


def record_jobs(driver, db_url: str, runs_table: str, count: int, sleep: float) -> list[str]:
    return driver.push_many([Job("test.record", {"n": n, "sleep": sleep, "url": db_url, "runs": runs_table})
                             for n in range(count)])


def test_burst_workers_drain_the_queue_in_their_own_processes_and_end_by_themselves(driver):
    ids = driver.push_many([Job("test.whoami", n) for n in range(60)])

    workers = start_local_workers(driver, 2, modules=["worker_jobs"], burst=True, concurrency=2)
    try:
        assert isinstance(workers, LocalWorkers) and len(workers.processes) == 2
        assert len(set(workers.pids)) == 2 and os.getpid() not in workers.pids
        assert f"/2 alive, pids={workers.pids})" in repr(workers)
        workers.join(timeout=180)
    finally:
        workers.stop(timeout=30)  # nothing left to stop if join saw them end

    assert [process.exitcode for process in workers.processes] == [0, 0] and workers.alive() == []
    assert status_counts(driver) == {"pending": 0, "processing": 0, "completed": 60, "failed": 0}
    assert {driver.get_job(job_id).result for job_id in ids} <= set(workers.pids)  # run there, not here


def test_the_context_manager_starts_the_workers_and_stops_them(driver):
    driver.push_many([Job("test.noop", n) for n in range(20)])
    with LocalWorkers(driver, 1, modules=["worker_jobs"], concurrency=2) as workers:
        assert len(workers.processes) == 1  # not started twice
        wait_until(lambda: status_counts(driver)["completed"] == 20, 120, "the jobs to complete")
        assert len(workers.alive()) == 1  # not a burst worker: it waits for more
    assert workers.processes[0].exitcode == 0 and workers.alive() == []


def test_each_process_imports_the_job_modules_it_is_given_and_only_those(driver, tmp_path, monkeypatch):
    """Spawned processes start fresh: a task exists in a worker only if ``modules`` imports it there."""
    monkeypatch.chdir(tmp_path)  # the working directory goes on the workers' path: a module written here
    (tmp_path / "local_jobs_here.py").write_text(
        "import os\nimport kronix_data\n\n@kronix_data.task(name='local.here')\n"
        "def here(payload):\n    return {'pid': os.getpid(), 'payload': payload}\n")
    here = driver.push(Job("local.here", "a"))
    with start_local_workers(driver, 1, modules=["local_jobs_here"], burst=True) as with_module:
        with_module.join(timeout=120)
    assert driver.get_job(here).result == {"pid": with_module.pids[0], "payload": "a"}

    unknown = driver.push(Job("local.here", "b"))
    with start_local_workers(driver, 1, burst=True) as without:  # the same job, no module: nobody has the task
        without.join(timeout=120)
    assert without.processes[0].exitcode == 0
    dead = driver.get_job(unknown)
    assert dead.status == "failed" and "no task or job factory is registered for 'local.here'" in dead.last_error


def test_a_module_that_cannot_be_imported_ends_the_worker_with_an_error(driver):
    driver.push(Job("test.noop"))
    with start_local_workers(driver, 1, modules=["no_such_module_for_kronix"], burst=True) as workers:
        workers.join(timeout=120)
    assert workers.processes[0].exitcode == 5  # kronix worker's exit code for a module it cannot import
    assert status_counts(driver) == {"pending": 1, "processing": 0, "completed": 0, "failed": 0}


def test_stop_sends_sigterm_lets_running_jobs_finish_and_gives_the_rest_back(driver, db_url, runs_table):
    record_jobs(driver, db_url, runs_table, 6, sleep=1.0)
    workers = start_local_workers(driver, 1, modules=["worker_jobs"], concurrency=2)
    wait_until(lambda: len(fetch_runs(db_url, runs_table)) == 2, 120, "two jobs to start")
    workers.stop(timeout=60)

    assert workers.processes[0].exitcode == 0  # a graceful stop, not a kill
    runs = fetch_runs(db_url, runs_table)
    assert len(runs) == 2 and all(ended is not None for _, _, _, ended in runs)  # both finished their run
    assert status_counts(driver) == {"pending": 4, "processing": 0, "completed": 2, "failed": 0}


def test_stop_kills_a_worker_that_outlives_the_timeout(driver, db_url, runs_table, caplog):
    """A job longer than the stop timeout, in a worker whose grace period is longer still, outlives SIGTERM."""
    [job_id] = record_jobs(driver, db_url, runs_table, 1, sleep=120)
    workers = start_local_workers(driver, 1, modules=["worker_jobs"], grace_period=300)
    wait_until(lambda: fetch_runs(db_url, runs_table), 120, "the long job to start")
    with caplog.at_level(logging.WARNING, logger="kronix_data.local"):
        workers.stop(timeout=1.0)

    assert workers.processes[0].exitcode == -signal.SIGKILL and workers.alive() == []
    assert f"worker process {workers.pids[0]} did not stop within 1.0s; killing it" in caplog.text
    assert driver.get_job(job_id).status == "processing"  # left to its lease, as after any crash
    assert [ended for _, _, _, ended in fetch_runs(db_url, runs_table)] == [None]


@pytest.mark.parametrize("processes", [0, -1])
def test_fewer_than_one_process_is_refused_before_anything_starts(driver, processes):
    with pytest.raises(ValueError, match=f"processes must be an int >= 1, got {processes}"):
        start_local_workers(driver, processes, modules=["worker_jobs"])
    with pytest.raises(ValueError, match="processes must be an int >= 1"):
        LocalWorkers(driver, processes)


def test_a_worker_option_the_worker_refuses_never_gives_a_running_worker(driver):
    """Refused at once in this process, or by the worker process, which then ends with an error."""
    driver.push(Job("test.noop"))
    try:
        workers = start_local_workers(driver, 1, modules=["worker_jobs"], concurrency=0)
    except ValueError as error:
        assert "concurrency" in str(error)
        return
    try:
        workers.join(timeout=120)
        assert workers.processes[0].exitcode not in (0, None)
    finally:
        workers.stop(timeout=10)
    assert status_counts(driver)["pending"] == 1


NO_GUARD_SCRIPT = """\
import os
import sys

import pandas as pd

import kronix_data

url, table, runs = sys.argv[1:]
with open(runs, "a") as log:  # every execution of this file leaves a line
    log.write(f"{os.getpid()}\\n")
driver = kronix_data.DatabaseQueueDriver(url, table=table)
driver.drop_table()  # spawned workers used to run this again and empty the batch under their feet
driver.create_table()


@kronix_data.task(name="script.double")
def double(payload):
    return {"pid": [os.getpid()], "total": [int(kronix_data.as_frame(payload)["x"].sum() * 2)]}


batch = driver.map(double, pd.DataFrame({"x": range(200)}), chunk_size=20)
workers = kronix_data.start_local_workers(driver, 2, burst=True, concurrency=2)
workers.join(timeout=300)
results = batch.results()
print("progress", batch.progress()["completed"], batch.progress()["total"])
print("exit codes", [process.exitcode for process in workers.processes])
print("total", int(results["total"].sum()))
print("pids", sorted(set(results["pid"]) - {os.getpid()}) == sorted(set(results["pid"])),
      set(results["pid"]) <= set(workers.pids))
"""


def test_a_script_without_a_main_guard_works_unchanged(db_url, table_name, tmp_path):
    """Run as a real script: it drops and creates its table, maps its own task and waits for local workers."""
    script, runs = tmp_path / "no_guard.py", tmp_path / "runs.txt"
    script.write_text(NO_GUARD_SCRIPT)
    result = subprocess.run([sys.executable, str(script), db_url, table_name, str(runs)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(runs.read_text().splitlines()) == 1  # the workers never ran the script again
    assert result.stdout.splitlines() == ["progress 10 10", "exit codes [0, 0]", f"total {2 * sum(range(200))}",
                                          "pids True True"]


ENDS_WITHOUT_STOP_SCRIPT = """\
import sys

import kronix_data

url, table, burst = sys.argv[1], sys.argv[2], sys.argv[3] == "burst"
driver = kronix_data.DatabaseQueueDriver(url, table=table)


@kronix_data.task(name="script.slow_noop")
def slow_noop(payload):
    import time
    time.sleep(0.01)


driver.push_many(slow_noop.job(n) for n in range(300))
workers = kronix_data.start_local_workers(driver, 2, burst=burst, concurrency=2, poll_interval=0.1)
print(" ".join(str(pid) for pid in workers.pids))
"""


def gone(pid: int) -> bool:
    """Ended (a zombie left for a parent that does not reap counts as ended)."""
    try:
        return "\\tZ" in open(f"/proc/{pid}/status").read().split("State:")[1][:4]
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.parametrize("burst", [True, False], ids=["burst", "waiting"])
def test_a_script_that_ends_without_stop_leaves_no_worker_behind(driver, db_url, table_name, tmp_path, burst):
    """Burst workers are waited for at exit, as multiprocessing's children were; waiting workers see their
    script gone and stop by themselves, gracefully."""
    script = tmp_path / "ends.py"
    script.write_text(ENDS_WITHOUT_STOP_SCRIPT)
    result = subprocess.run([sys.executable, str(script), db_url, table_name, "burst" if burst else "waiting"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    pids = [int(pid) for pid in result.stdout.split()]
    if burst:
        assert all(gone(pid) for pid in pids)  # the script's exit waited for them
        assert status_counts(driver)["completed"] == 300
    else:
        wait_until(lambda: all(gone(pid) for pid in pids), 120, "the workers to stop after their script ended")
        # Their log shares the script's stderr, so run() returned once they had closed it too.
        assert result.stderr.count(") is gone: stopping") == 2, result.stderr
    states = driver.workers().set_index("pid").loc[pids, "state"]
    assert set(states) == {"stopped"}  # they left by themselves, not killed
    assert status_counts(driver)["processing"] == 0
