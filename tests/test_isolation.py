"""Process isolation with real child processes: killed at the timeout or the memory limit, crashes
named by their signal, the slot replaced and the worker going on."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

import isolation_jobs
from helpers import TESTS, kronix, run_burst
from kronix_data import DatabaseQueueDriver, InvalidInputError, task
from kronix_data.isolation import JobFailedInChild, child_error, runs_in_process


def pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def sqlite_driver(tmp_path):
    """Isolation does not depend on the database: these tests run on SQLite."""
    queue = DatabaseQueueDriver(f"sqlite:///{tmp_path / 'queue.db'}", table="jobs")
    queue.create_table()
    yield queue
    queue.close()


def test_kronix_worker_pool_process_kills_a_hung_job_retries_it_then_dead_letters_it(driver, db_url, tmp_path):
    pid_file = tmp_path / "hung.pids"
    hung = driver.push(isolation_jobs.sleep_forever.job({"pid_file": str(pid_file)}, priority=10))
    others = driver.push_many(isolation_jobs.where.job({"n": n}) for n in range(40))
    done = kronix("worker", "--db", db_url, "--table", driver.table_name, "--pool", "process", "-c", "3",
                  "--burst", "-m", "isolation_jobs", cwd=TESTS)
    assert done.returncode == 0, done.stderr
    job = driver.get_job(hung)
    assert str(job.status) == "failed" and job.attempts == 2  # run, killed, retried, killed, dead-lettered
    assert job.last_error.splitlines()[0] == "TimeoutError: killed after 1 s"
    assert len(pids(pid_file)) == 2 and all(gone(pid) for pid in pids(pid_file))
    results = [driver.get_job(job_id) for job_id in others]
    assert all(str(other.status) == "completed" for other in results)
    assert [other.result["payload"] for other in results] == [{"n": n} for n in range(40)]
    assert len({other.result["pid"] for other in results}) >= 2  # in the slots' children, more than one


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace(sqlite_driver, tmp_path):
    pid_file = tmp_path / "stubborn.pids"
    job_id = sqlite_driver.push(isolation_jobs.ignore_sigterm.job({"pid_file": str(pid_file)}))
    worker = run_burst(sqlite_driver, concurrency=1, pool="process", kill_grace=0.5)
    job = sqlite_driver.get_job(job_id)
    assert job.last_error.splitlines()[0] == "TimeoutError: killed after 1 s"
    assert gone(pids(pid_file)[0])
    assert worker.stats.timed_out == 1 and worker.stats.dead_lettered == 1


def test_a_job_past_its_memory_limit_is_killed_and_the_worker_lives(sqlite_driver):
    bloated = sqlite_driver.push(isolation_jobs.bloat.job(priority=10))
    beside = sqlite_driver.push_many(isolation_jobs.where.job(n) for n in range(20))
    worker = run_burst(sqlite_driver, concurrency=2)  # a thread pool: the memory limit alone asks for a process
    job = sqlite_driver.get_job(bloated)
    assert str(job.status) == "failed"
    first_line = job.last_error.splitlines()[0]
    assert first_line.startswith("MemoryError: job used ") and "past its memory_limit of 300 MiB: killed" in first_line
    assert worker.stats.completed == 20 and worker.stats.dead_lettered == 1
    assert {sqlite_driver.get_job(job_id).result["pid"] for job_id in beside} == {os.getpid()}  # on threads


def test_a_job_calling_abort_is_recorded_with_sigabrt_and_its_slot_replaced(sqlite_driver, tmp_path):
    pid_file = tmp_path / "abort.pids"
    aborted = sqlite_driver.push(isolation_jobs.abort.job({"pid_file": str(pid_file)}, priority=10))
    after = sqlite_driver.push_many(isolation_jobs.where.job(n) for n in range(5))
    worker = run_burst(sqlite_driver, concurrency=1, pool="process")
    job = sqlite_driver.get_job(aborted)
    assert str(job.status) == "failed"
    assert job.last_error.splitlines()[0] == "WorkerCrash: killed by SIGABRT"
    assert worker.stats.completed == 5
    ran_in = {sqlite_driver.get_job(job_id).result["pid"] for job_id in after}
    assert len(ran_in) == 1 and ran_in.isdisjoint({os.getpid(), *pids(pid_file)})  # one new child, reused


def test_a_child_failure_keeps_its_type_message_and_traceback(sqlite_driver):
    job_id = sqlite_driver.push(isolation_jobs.fail.job({"row": 7}))
    async_id = sqlite_driver.push(isolation_jobs.async_in_process.job())
    run_burst(sqlite_driver, concurrency=1, pool="process")
    failed = sqlite_driver.get_job(job_id)
    assert failed.last_error.splitlines()[0] == "ValueError: bad input {'row': 7}"
    assert "isolation_jobs.py" in failed.last_error and "raise ValueError" in failed.last_error
    assert sqlite_driver.get_job(async_id).result["pid"] != os.getpid()


def test_which_jobs_go_to_a_child():
    @task(name="test_isolation.plain")
    def plain(payload):
        return payload

    @task(name="test_isolation.threaded", isolation="thread")
    def threaded(payload):
        return payload

    assert not runs_in_process(plain.job(), "thread") and runs_in_process(plain.job(), "process")
    assert not runs_in_process(threaded.job(), "process")
    assert runs_in_process(isolation_jobs.bloat.job(), "thread")  # a memory limit needs a process
    assert runs_in_process(isolation_jobs.async_in_process.job(), "thread")


def test_isolation_options_are_checked():
    with pytest.raises(InvalidInputError, match="isolation of task 'test_isolation.bad' must be"):
        task(name="test_isolation.bad", isolation="fork")(lambda payload: None)
    with pytest.raises(InvalidInputError, match="a memory_limit needs isolation='process'"):
        task(name="test_isolation.bad", isolation="thread", memory_limit="1GiB")(lambda payload: None)
    with pytest.raises(InvalidInputError, match="memory_limit of task 'test_isolation.bad'"):
        task(name="test_isolation.bad", memory_limit="lots")(lambda payload: None)
    with pytest.raises(InvalidInputError, match="pool must be 'thread' or 'process'"):
        run_burst(DatabaseQueueDriver("sqlite://"), pool="fork")


def test_child_errors_keep_their_names():
    assert type(child_error("ValueError", "bad")) is ValueError
    custom = child_error("ParseError", "line 3")
    assert isinstance(custom, JobFailedInChild) and type(custom).__name__ == "ParseError" and str(custom) == "line 3"
    assert type(child_error("UnicodeDecodeError", "x")).__name__ == "UnicodeDecodeError"
