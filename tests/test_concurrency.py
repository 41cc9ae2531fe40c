"""Several OS processes draining one queue: every job completed exactly once."""

from __future__ import annotations

import collections
import multiprocessing

import pytest

from kronix_data import Job

JOBS = 3000
PROCESSES = 4


def drain(url: str, table: str, batch: int, start) -> tuple[str, list[str], list[str]]:
    """Pop and complete until the queue is empty; report what was popped and completed."""
    from kronix_data import DatabaseQueueDriver

    driver = DatabaseQueueDriver(url, table=table)
    start.wait()
    popped, completed = [], []
    while jobs := (driver.pop_many(batch) if batch > 1 else [j for j in [driver.pop()] if j]):
        popped += [job.id for job in jobs]
        for job in jobs:
            if driver.complete(job):
                completed.append(job.id)
    driver.close()
    return driver.worker_id, popped, completed


@pytest.mark.parametrize("batch", [1, 25])
def test_processes_complete_every_job_exactly_once(driver, db_url, table_name, batch):
    ids = driver.push_many([Job("n", i) for i in range(JOBS)])
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start = manager.Barrier(PROCESSES)
        with context.Pool(PROCESSES) as pool:
            results = pool.starmap(drain, [(db_url, table_name, batch, start)] * PROCESSES)

    popped = collections.Counter(job_id for _, got, _ in results for job_id in got)
    completed = collections.Counter(job_id for _, _, done in results for job_id in done)
    shares = {worker: len(done) for worker, _, done in results}
    print(f"\n{driver.engine.dialect.name} batch={batch}: shares per process {sorted(shares.values())}")
    assert [job_id for job_id, n in popped.items() if n > 1] == []  # none handed out twice
    assert [job_id for job_id, n in completed.items() if n > 1] == []  # none completed twice
    assert set(completed) == set(ids)  # none lost
    assert len(shares) == PROCESSES
    stats = driver.fetch_stats().set_index("queue").loc["default"]
    assert (stats["completed"], stats["pending"], stats["processing"]) == (JOBS, 0, 0)
