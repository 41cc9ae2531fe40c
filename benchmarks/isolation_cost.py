"""What process isolation costs a job, against a thread: the slot's round trip and a worker's throughput.

    .venv/bin/python -m benchmarks.isolation_cost [--jobs 2000] [--runs 3] [--concurrency 2]

(run with ``-m`` from the checkout: a slot's child imports this module's task by name.)

Two measurements, each the median of ``--runs``:

- the round trip of one slot: ``--jobs`` no-op jobs sent one after another to one
  ``ProcessSlot`` (JSON out, the child runs the task, JSON back), against calling the
  function on this thread; and what starting the slot's child costs, once;
- a real ``Worker`` in burst mode on a SQLite table of its own, ``concurrency`` slots,
  draining ``--jobs`` no-op jobs with ``pool="thread"`` and then ``pool="process"``:
  jobs per second, and the difference per job.

It prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from kronix_data import DatabaseQueueDriver, Worker, task
from kronix_data.context import JobContext
from kronix_data.isolation import ProcessSlot


@task(max_retries=0)  # named after its module: benchmarks.isolation_cost.noop in the children too
def noop(payload):
    return payload


def slot_round_trips(jobs: int) -> dict[str, float]:
    slot = ProcessSlot(kill_grace=1.0)
    job = noop.job({"n": 1}, id="bench")
    context = JobContext(job, None)
    started = time.perf_counter()
    result, error, _ = slot.run(job, context, None, None)  # starts the child: an interpreter and the import of kronix_data
    start_s = time.perf_counter() - started
    assert error is None and json.loads(result) == {"n": 1}, error
    started = time.perf_counter()
    for _ in range(jobs):
        slot.run(job, context, None, None)
    in_process_s = (time.perf_counter() - started) / jobs
    started = time.perf_counter()
    for _ in range(jobs):
        job.handle()
    on_thread_s = (time.perf_counter() - started) / jobs
    slot.close()
    return {"child_start_s": start_s, "slot_round_trip_us": in_process_s * 1e6, "direct_call_us": on_thread_s * 1e6}


def drain(pool: str, jobs: int, concurrency: int, directory: Path) -> float:
    """Seconds for a burst worker to run ``jobs`` no-op jobs (the children's start included)."""
    driver = DatabaseQueueDriver(f"sqlite:///{directory / f'{pool}.db'}", table="jobs")
    driver.drop_table()
    driver.create_table()
    driver.push_many(noop.job({"n": n}) for n in range(jobs))
    started = time.perf_counter()
    Worker(driver, concurrency=concurrency, pool=pool, burst=True, listen=False).run()
    elapsed = time.perf_counter() - started
    assert driver.size() == 0 and driver.jobs(status="failed").empty, driver.jobs(status="failed")["last_error"]
    driver.close()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    slots = [slot_round_trips(args.jobs) for _ in range(args.runs)]
    with tempfile.TemporaryDirectory() as directory:
        threads = [drain("thread", args.jobs, args.concurrency, Path(directory)) for _ in range(args.runs)]
        processes = [drain("process", args.jobs, args.concurrency, Path(directory)) for _ in range(args.runs)]
    thread_s, process_s = statistics.median(threads), statistics.median(processes)
    print(json.dumps({
        "jobs": args.jobs, "concurrency": args.concurrency, "runs": args.runs,
        **{key: round(statistics.median(run[key] for run in slots), 3) for key in slots[0]},
        "thread_pool_jobs_per_s": round(args.jobs / thread_s),
        "process_pool_jobs_per_s": round(args.jobs / process_s),
        "process_pool_extra_ms_per_job": round((process_s - thread_s) / args.jobs * 1e3, 3),
    }))
    return 0


if __name__ == "__main__":
    # Run under the module's own name, so that the task the children import is the one pushed.
    import importlib

    raise SystemExit(importlib.import_module("benchmarks.isolation_cost").main())
