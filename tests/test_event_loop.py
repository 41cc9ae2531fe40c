"""async def jobs on the worker's event loop: counted in concurrency, many at once, cancelled at their timeout."""

from __future__ import annotations

import time

import pytest

import isolation_jobs
from helpers import run_burst
from kronix_data import task
from kronix_data.event_loop import is_coroutine_job


def most_at_once(runs: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in runs] + [(end, -1) for _, end in runs])
    level = peak = 0
    for _, change in events:
        level += change
        peak = max(peak, level)
    return peak


def test_a_thousand_async_jobs_share_one_loop_and_the_concurrency_limit(driver):
    isolation_jobs.ASYNC_RUNS.clear()
    ids = driver.push_many(isolation_jobs.async_sleep.job({"seconds": 0.1}) for _ in range(1000))
    started = time.monotonic()
    worker = run_burst(driver, concurrency=100)
    wall = time.monotonic() - started
    assert worker.stats.completed == 1000
    assert len(isolation_jobs.ASYNC_RUNS) == 1000
    peak = most_at_once(isolation_jobs.ASYNC_RUNS)
    # Serially this is 100 s; at 100 at once about 1 s plus the claims and completions.
    assert wall < 20, f"1,000 jobs of 0.1 s took {wall:.1f} s"
    assert 50 <= peak <= 100, f"{peak} async jobs ran at once with concurrency=100"
    assert driver.get_job(ids[0]).result == {"slept": 0.1}


def test_an_async_timeout_cancels_the_coroutine(driver):
    isolation_jobs.CANCELLED.clear()
    job_id = driver.push(isolation_jobs.async_hang.job())
    started = time.monotonic()
    worker = run_burst(driver, concurrency=2)
    assert time.monotonic() - started < 30
    assert isolation_jobs.CANCELLED == [job_id, f"finally {job_id}"]
    job = driver.get_job(job_id)
    assert str(job.status) == "failed"
    assert job.last_error.startswith("TimeoutError: job 'iso.async_hang' ran past its timeout of 0.5s; "
                                     "its coroutine was cancelled")
    assert worker.stats.timed_out == 1 and worker.stats.dead_lettered == 1


def test_async_and_sync_jobs_are_told_apart():
    @task(name="test_event_loop.sync")
    def plain(payload):
        return payload

    assert is_coroutine_job(isolation_jobs.async_sleep.job({"seconds": 0}))
    assert not is_coroutine_job(plain.job(1))
