"""What a task defined in ``__main__`` costs on local workers, against the same task in a module.

    python benchmarks/kernel_tasks_cost.py [--db URL] [--jobs 20000] [--processes 2] [--runs 2]

This script is ``__main__``, so ``cells_noop`` below is what a notebook cell
defines: local workers get it from this process over their channel. Two figures:

- the channel's round trip, in this process: a worker's question about one
  task it already holds and the kernel's "same" (the kernel pickles the task
  afresh to tell), median over 2,000;
- the drain of ``--jobs`` no-op jobs by ``--processes`` burst local workers
  (``concurrency=8``), the ``__main__`` task against ``bench.noop`` from
  ``benchmarks.systems.kronix`` (a module the workers import), interleaved,
  ``--runs`` times each; jobs per second, medians.

It prints one JSON line.  The URL defaults to ``KRONIX_BENCH_POSTGRES_URL``
or this machine's PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import kronix_data  # noqa: E402
from kronix_data import DatabaseQueueDriver, start_local_workers  # noqa: E402
from kronix_data.kernel_tasks import KernelTasks, KernelTaskServer  # noqa: E402

DEFAULT_URL = os.environ.get("KRONIX_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@kronix_data.task(name="bench.cells_noop", max_retries=0)
def cells_noop(payload):
    return None


def round_trip_us(samples: int = 2_000) -> float:
    ours, theirs = socket.socketpair()
    server = KernelTaskServer(ours, {"kernel": "bench", "options": {}})
    worker = KernelTasks(theirs.detach())
    worker.factories(["bench.cells_noop"])  # the first question fetches it
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        worker.factories(["bench.cells_noop"])
        times.append(time.perf_counter() - started)
    server.close()
    return statistics.median(times) * 1e6


def drain(url: str, name: str, modules: list[str], jobs: int, processes: int) -> float:
    driver = DatabaseQueueDriver(url, table=f"bench_cells_{uuid.uuid4().hex[:8]}")
    driver.create_table()
    try:
        driver.push_many(kronix_data.Job(name, {"n": n}, max_retries=0) for n in range(jobs))
        started = time.monotonic()
        with start_local_workers(driver, processes, modules=modules, burst=True, concurrency=8) as workers:
            workers.join()
        seconds = time.monotonic() - started
        assert driver.fetch_stats()["completed"].sum() == jobs
        return jobs / seconds
    finally:
        driver.drop_table()
        driver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=DEFAULT_URL)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    in_main, in_module = [], []
    for _ in range(args.runs):
        in_main.append(drain(args.db, "bench.cells_noop", [], args.jobs, args.processes))
        in_module.append(drain(args.db, "bench.noop", ["benchmarks.systems.kronix"], args.jobs, args.processes))
    print(json.dumps({"round_trip_us_p50": round(round_trip_us(), 1), "jobs": args.jobs, "processes": args.processes,
                      "main_task_jobs_per_s": round(statistics.median(in_main)),
                      "module_task_jobs_per_s": round(statistics.median(in_module)),
                      "runs": {"main": [round(x) for x in in_main], "module": [round(x) for x in in_module]}}))


if __name__ == "__main__":
    main()
