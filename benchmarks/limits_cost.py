"""What a global concurrency limit costs: a queue limited to 4 beside 4 jobs in flight with no limit.

    python -m benchmarks.limits_cost [--db URL] [--jobs 2000] [--sleep 0 0.01] [--runs 1]

Real worker processes (``start_local_workers``) on a table of their own; the
workers are started and registered first, then the jobs are pushed and the
clock runs until every one has completed.  Cases, interleaved per run:

- ``local-4``: no limit, one process with ``concurrency=4`` and no prefetch
  (4 jobs in flight, counted by the worker itself);
- ``global-4 x1`` / ``global-4 x4``: ``set_limits(queue, concurrency=4)``, one or
  four processes of ``concurrency=8`` (4 in flight, counted by the claim);
- ``unlimited x4``: no limit, four processes of ``concurrency=8`` (the ceiling).

Prints one JSON line per case and job length: jobs per second, and the ratio
to ``local-4`` of the same run.  The URL defaults to
``KRONIX_BENCH_POSTGRES_URL`` or this machine's server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid

from kronix_data import DatabaseQueueDriver, start_local_workers

from .limits_jobs import sleep

DEFAULT_URL = os.environ.get("KRONIX_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
QUEUE = "bench"
#: case -> (limit, processes, worker options)
CASES = {"local-4": (None, 1, {"concurrency": 4, "prefetch_seconds": 0.0}),
         "global-4 x1": (4, 1, {"concurrency": 8}),
         "global-4 x4": (4, 4, {"concurrency": 8}),
         "unlimited x4": (None, 4, {"concurrency": 8})}


def completed(driver: DatabaseQueueDriver) -> int:
    return sum(jobs for queue, status, jobs in driver.store.count_jobs_by_queue_and_status()
               if queue == QUEUE and status == "completed")


def wait_for(condition, workers, interval: float, timeout: float = 300.0) -> None:
    """Poll ``condition``; a worker process that died, or ``timeout`` seconds, is an error."""
    deadline = time.monotonic() + timeout
    while not condition():
        if len(workers.alive()) < len(workers.processes) or time.monotonic() > deadline:
            raise RuntimeError(f"the workers stopped or stalled: exit codes "
                               f"{[process.exitcode for process in workers.processes]}")
        time.sleep(interval)


def run_case(url: str, case: str, jobs: int, seconds: float) -> float:
    """Jobs per second of one case, from the push until the last completion is written."""
    limit, processes, options = CASES[case]
    driver = DatabaseQueueDriver(url, table=f"bench_{uuid.uuid4().hex[:12]}")
    driver.create_table()
    try:
        if limit is not None:
            driver.set_limits(QUEUE, concurrency=limit, create=True)
        with start_local_workers(driver, processes, modules=["benchmarks.limits_jobs"], queues=[QUEUE],
                                 **options) as workers:
            wait_for(lambda: int((driver.workers()["state"] == "live").sum()) >= processes, workers, 0.05)
            start = time.perf_counter()
            driver.push_many([sleep.job(seconds, queue=QUEUE) for _ in range(jobs)])
            wait_for(lambda: completed(driver) >= jobs, workers, 0.01)
            elapsed = time.perf_counter() - start
            workers.stop()
        return jobs / elapsed
    finally:
        driver.drop_table()
        driver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=DEFAULT_URL)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--sleep", type=float, nargs="+", default=[0.0, 0.01], help="seconds per job")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    for seconds in args.sleep:
        figures: dict[str, list[float]] = {case: [] for case in CASES}
        for _ in range(args.runs):
            for case in CASES:
                figures[case].append(run_case(args.db, case, args.jobs, seconds))
        base = statistics.median(figures["local-4"])
        for case, values in figures.items():
            print(json.dumps({"case": case, "sleep_s": seconds, "jobs": args.jobs, "runs": args.runs,
                              "jobs_per_s": round(statistics.median(values), 1),
                              "vs_local_4": round(statistics.median(values) / base, 2)}), flush=True)


if __name__ == "__main__":
    main()
