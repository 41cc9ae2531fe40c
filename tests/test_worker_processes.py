"""Worker processes under real faults: many processes, kill -9, SIGTERM, dropped connections.

The connections killed are only the ones the test's own workers opened (tagged, see
``helpers.tagged_sessions``): other people's sessions on a shared server are left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from helpers import SERVERS, attempts_histogram, kill_sessions_tagged, status_counts, wait_until
from kronix_data import DatabaseQueueDriver, Job, start_local_workers
from worker_jobs import fetch_runs


def assert_no_job_ran_twice_at_once(runs, killed_at: dict[int, float]) -> None:
    """The ownership check: runs of one job never overlap (a killed run ends at its kill)."""
    by_job: dict[int, list[tuple[float, float]]] = {}
    for job, pid, started, ended in runs:
        by_job.setdefault(job, []).append((started, ended if ended is not None else killed_at[pid]))
    for job, spans in by_job.items():
        spans.sort()
        for (_, first_end), (second_start, _) in zip(spans, spans[1:]):
            assert second_start >= first_end, f"job {job} ran twice at once: {spans}"


@pytest.mark.parametrize("backend", SERVERS)
def test_worker_processes_drain_20000_jobs_each_completed_exactly_once(driver):
    driver.push_many([Job("test.noop", i) for i in range(20_000)])

    with start_local_workers(driver, 4, modules=["worker_jobs"], concurrency=8, burst=True) as workers:
        workers.join(timeout=240)

    assert [process.exitcode for process in workers.processes] == [0, 0, 0, 0]
    assert status_counts(driver) == {"pending": 0, "processing": 0, "completed": 20_000, "failed": 0}
    assert attempts_histogram(driver) == {1: 20_000}  # every job claimed exactly once


@pytest.mark.parametrize("backend", SERVERS)
def test_jobs_of_a_worker_killed_mid_batch_come_back_and_complete(driver, db_url, runs_table):
    jobs = 24
    driver.push_many([Job("test.record", {"n": n, "sleep": 0.5, "url": db_url, "runs": runs_table})
                      for n in range(jobs)])
    with start_local_workers(driver, 2, modules=["worker_jobs"], concurrency=4, lease_timeout=2.0) as workers:
        victim = workers.processes[0]
        wait_until(lambda: any(pid == victim.pid for _, pid, _, _ in fetch_runs(db_url, runs_table)), 30,
                   "the victim to start a job")
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = {victim.pid: time.time()}
        wait_until(lambda: status_counts(driver)["completed"] == jobs, 60, "every job to complete")

    assert status_counts(driver) == {"pending": 0, "processing": 0, "completed": jobs, "failed": 0}
    histogram = attempts_histogram(driver)
    assert histogram.get(2, 0) >= 1, histogram  # the victim's jobs ran again, and the attempt counted
    runs = fetch_runs(db_url, runs_table)
    assert {job for job, _, _, _ in runs} == set(range(jobs))
    assert_no_job_ran_twice_at_once(runs, killed_at)


@pytest.mark.parametrize("backend", SERVERS)
def test_sigterm_lets_running_jobs_finish_and_claims_no_more(driver, db_url, runs_table):
    driver.push_many([Job("test.record", {"n": n, "sleep": 1.5, "url": db_url, "runs": runs_table})
                      for n in range(6)])
    with start_local_workers(driver, 1, modules=["worker_jobs"], concurrency=2) as workers:
        wait_until(lambda: len(fetch_runs(db_url, runs_table)) == 2, 30, "two jobs to start")
        workers.processes[0].terminate()  # SIGTERM
        workers.join(timeout=30)

    assert workers.processes[0].exitcode == 0
    assert status_counts(driver) == {"pending": 4, "processing": 0, "completed": 2, "failed": 0}
    assert attempts_histogram(driver) == {0: 4, 1: 2}  # the unstarted jobs carry no attempt
    assert all(ended is not None for _, _, _, ended in fetch_runs(db_url, runs_table))


@pytest.mark.parametrize("backend", SERVERS)
def test_workers_survive_their_connections_being_killed(driver, table_name, tagged):
    """Three rounds: a wave of jobs, then (once the workers are at it) every session they hold is killed."""
    url, tag = tagged
    waves, wave = 4, 1000
    kills = 0
    with DatabaseQueueDriver(url, table=table_name) as tagged_driver, \
            start_local_workers(tagged_driver, 2, modules=["worker_jobs"], concurrency=4, lease_timeout=2.0) as workers:
        # Both in their loop first (a worker registers with its first heartbeat there): a session killed while a
        # worker still checks the table at its start is an unreachable database to `kronix worker`, exit 4.
        wait_until(lambda: (driver.workers()["state"] == "live").sum() == 2, 90, "both workers to be up")
        for round_ in range(waves):
            done = status_counts(driver)["completed"]
            driver.push_many([Job("test.noop", round_ * wave + n) for n in range(wave)])
            if round_ == waves - 1:
                break  # the last wave runs on the connections made after the last kill
            wait_until(lambda: status_counts(driver)["completed"] > done, 90, "the workers to complete jobs")
            kills += wait_until(lambda: kill_sessions_tagged(url, tag), 30, "sessions of the workers to kill")
        wait_until(lambda: status_counts(driver)["completed"] == waves * wave, 90, "every job to complete")
        assert len(workers.alive()) == 2  # nobody crashed

    assert kills >= 3
    assert status_counts(driver) == {"pending": 0, "processing": 0, "completed": waves * wave, "failed": 0}
    assert [process.exitcode for process in workers.processes] == [0, 0]


@pytest.mark.parametrize("backend", SERVERS)
def test_two_kronix_worker_commands_share_a_queue(driver, db_url, table_name, runs_table):
    """What a user does in two terminals (or on two machines): `kronix worker` twice.

    The first jobs are a meeting: each waits until both processes have run one, so the first
    terminal to start cannot drain the queue before the second is up (a worker claims no more
    than its 4 slots while all of them wait, so 8 meeting jobs leave some for the other).
    """
    jobs = 3000
    driver.push_many([Job("test.meet", {"n": n, "url": db_url, "runs": runs_table, "parties": 2}) for n in range(8)]
                     + [Job("test.noop", n) for n in range(jobs - 8)])
    command = [sys.executable, "-m", "kronix_data.cli", "--db", db_url, "--table", table_name,
               "worker", "-m", "worker_jobs", "-c", "4", "--burst"]
    terminals = [subprocess.Popen(command, cwd=Path(__file__).parent, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [terminal.communicate(timeout=120)[1] for terminal in terminals]

    assert [terminal.returncode for terminal in terminals] == [0, 0], outputs
    assert status_counts(driver) == {"pending": 0, "processing": 0, "completed": jobs, "failed": 0}
    assert attempts_histogram(driver) == {1: jobs}
    with driver.engine.connect() as conn:
        workers = conn.execute(sa.select(driver.table.c.reserved_by).distinct()).scalars().all()
    assert len(workers) == 2  # both terminals did part of the work
