"""What progress() and checkpoint() cost a running job, on PostgreSQL by default.

    python benchmarks/progress_cost.py [--db URL] [--calls 1000000] [--checkpoints 2000] [--runs 5]

One real ``Worker`` (in this process, ``concurrency=1``) runs three jobs on a
table of its own, ``--runs`` times each: an empty loop of ``--calls`` steps,
the same loop calling ``current_job().progress(i, calls)`` at each step, and
``--checkpoints`` calls of ``current_job().checkpoint({"row": i, ...})``.  It
prints one JSON line: the median time per ``progress()`` call (the loop's time
less the empty loop's, per call), how many UPDATEs of progress the worker
sent meanwhile (counted on the engine), and the median and p95 time per
``checkpoint()`` (each one its own transaction: a round trip and a commit).
The URL defaults to ``KRONIX_BENCH_POSTGRES_URL`` or this machine's server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import kronix_data  # noqa: E402
from kronix_data import DatabaseQueueDriver, Worker, current_job  # noqa: E402

DEFAULT_URL = os.environ.get("KRONIX_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@kronix_data.task(name="bench.progress_cost", max_retries=0)
def measure(payload):
    """Time the loop the payload asks for, inside a running job; returns seconds."""
    context, steps = current_job(), payload["steps"]
    if payload["what"] == "empty":
        started = time.perf_counter()
        for step in range(steps):
            pass
        return time.perf_counter() - started
    if payload["what"] == "progress":
        started = time.perf_counter()
        for step in range(steps):
            context.progress(step, steps)
        return time.perf_counter() - started
    timings = []
    for step in range(steps):
        started = time.perf_counter()
        context.checkpoint({"row": step, "state": {"rows": step, "sum": step * 1.5}})
        timings.append(time.perf_counter() - started)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=DEFAULT_URL, help="database URL (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=1_000_000, help="progress() calls per run")
    parser.add_argument("--checkpoints", type=int, default=2_000, help="checkpoint() calls per run")
    parser.add_argument("--runs", type=int, default=5, help="runs of each measurement (medians are printed)")
    args = parser.parse_args(argv)

    driver = DatabaseQueueDriver(args.db, table=f"bench_progress_{uuid.uuid4().hex[:8]}")
    writes = []

    @sa.event.listens_for(driver.engine, "before_cursor_execute")
    def count(_conn, _cursor, statement, _parameters, _context, _executemany):
        if statement.lstrip().upper().startswith("UPDATE") and "progress_done" in statement:
            writes.append(statement)

    driver.create_table()
    try:
        plan = [("empty", args.calls), ("progress", args.calls), ("checkpoint", args.checkpoints)] * args.runs
        ids = driver.push_many([measure.job({"what": what, "steps": steps}) for what, steps in plan])
        Worker(driver, concurrency=1, burst=True, lease_timeout=60).run()
        results = {what: [] for what, _ in plan}
        for (what, _), job_id in zip(plan, ids):
            results[what].append(driver.get_job(job_id).result)
        checkpoints = sorted(seconds for run in results["checkpoint"] for seconds in run)
        per_call = [(loop - empty) / args.calls for loop, empty in zip(results["progress"], results["empty"])]
        print(json.dumps({
            "database": driver.engine.dialect.name,
            "server": ".".join(map(str, driver.engine.dialect.server_version_info or ())),
            "progress_calls": args.calls * args.runs,
            "progress_us_per_call_p50": round(statistics.median(per_call) * 1e6, 3),
            "progress_loop_us_per_step_p50": round(statistics.median(results["progress"]) / args.calls * 1e6, 3),
            "empty_loop_us_per_step_p50": round(statistics.median(results["empty"]) / args.calls * 1e6, 3),
            "progress_loop_s_p50": round(statistics.median(results["progress"]), 3),
            "progress_writes": len(writes),  # a loop shorter than progress_interval (1 s) may need none
            "checkpoint_calls": len(checkpoints),
            "checkpoint_ms_p50": round(checkpoints[len(checkpoints) // 2] * 1e3, 3),
            "checkpoint_ms_p95": round(checkpoints[int(len(checkpoints) * 0.95)] * 1e3, 3),
        }))
    finally:
        driver.drop_table()
        driver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
