"""What ``driver.map`` costs beside ``push_many`` for the same number of jobs, on one database.

    python -m benchmarks.map_cost [--db URL] [--chunks 100000] [--chunk-size 10] [--data range|list] [--runs 3]

Each run, on fresh tables of its own (so neither pays for the other's rows):

- ``push_many``: ``--chunks`` no-op jobs, built before the clock (as the matrix's
  ``enqueue-batch``), stored by one ``push_many``;
- ``map``: ``driver.map("bench.noop", data, chunk_size)`` making as many chunk jobs,
  everything inside the clock (cutting, batch id, keys, rows, the insert);
- ``rerun``: the same ``map`` call again: the idempotent no-op;
- ``memory``: the same ``map`` on a third table under ``tracemalloc`` (untimed: tracing slows Python),
  its peak of Python allocations.

``--data range`` maps ``range(chunks * chunk_size)`` (the batch id comes from its bounds);
``--data list`` maps the same numbers as a list (hashed chunk by chunk through a spool).
The two enqueues alternate which goes first, run by run.  Prints one JSON line per run and
a last one with the medians and ``map_vs_push_many`` (map's chunks/s over push_many's jobs/s).
Every table is checked to hold exactly ``--chunks`` jobs, then dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import tracemalloc
import uuid

from kronix_data import DatabaseQueueDriver, Job

DEFAULT_URL = os.environ.get("KRONIX_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
QUEUE = "bench"


def stored(driver: DatabaseQueueDriver) -> int:
    return sum(jobs for queue, _, jobs in driver.store.count_jobs_by_queue_and_status() if queue == QUEUE)


def checked(driver: DatabaseQueueDriver, expected: int, what: str) -> None:
    found = stored(driver)
    if found != expected:
        raise RuntimeError(f"{what}: {found} jobs stored, expected {expected}")


def run_once(url: str, chunks: int, chunk_size: int, data_kind: str, map_first: bool) -> dict:
    drivers = {what: DatabaseQueueDriver(url, table=f"bench_{uuid.uuid4().hex[:12]}")
               for what in ("push_many", "map", "memory")}
    try:
        for driver in drivers.values():
            driver.create_table()
        numbers = range(chunks * chunk_size)
        data = numbers if data_kind == "range" else list(numbers)
        jobs = [Job("bench.noop", {"chunk": n, "start": n * chunk_size, "stop": (n + 1) * chunk_size}, queue=QUEUE)
                for n in range(chunks)]
        seconds = {}

        def push_many():
            start = time.perf_counter()
            drivers["push_many"].push_many(jobs)
            seconds["push_many"] = time.perf_counter() - start

        def map_():
            start = time.perf_counter()
            batch = drivers["map"].map("bench.noop", data, chunk_size=chunk_size, queue=QUEUE)
            seconds["map"] = time.perf_counter() - start
            return batch

        if map_first:
            batch = map_()
            push_many()
        else:
            push_many()
            batch = map_()
        start = time.perf_counter()
        again = drivers["map"].map("bench.noop", data, chunk_size=chunk_size, queue=QUEUE)
        seconds["rerun"] = time.perf_counter() - start
        if again != batch:
            raise RuntimeError(f"the re-run returned {again!r}, not {batch!r}")
        del jobs
        tracemalloc.start()
        drivers["memory"].map("bench.noop", data, chunk_size=chunk_size, queue=QUEUE)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        for what, driver in drivers.items():
            checked(driver, chunks, what)
        return {"push_many_jobs_per_s": round(chunks / seconds["push_many"]),
                "map_chunks_per_s": round(chunks / seconds["map"]),
                "map_vs_push_many": round(seconds["push_many"] / seconds["map"], 3),
                "rerun_s": round(seconds["rerun"], 3), "map_peak_python_mb": round(peak / 1e6, 1),
                "map_first": map_first}
    finally:
        for driver in drivers.values():
            driver.drop_table()
            driver.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=DEFAULT_URL)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--chunk-size", type=int, default=10)
    parser.add_argument("--data", choices=("range", "list"), default="range")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    probe = DatabaseQueueDriver(args.db, table="bench_probe")
    database = probe.engine.dialect.name
    probe.close()
    lines = []
    for run in range(args.runs):
        line = {"database": database, "data": args.data, "chunks": args.chunks, "chunk_size": args.chunk_size,
                "run": run, **run_once(args.db, args.chunks, args.chunk_size, args.data, map_first=run % 2 == 1)}
        lines.append(line)
        print(json.dumps(line), flush=True)
    summary = {"database": database, "data": args.data, "chunks": args.chunks, "runs": args.runs, "median": True}
    for key in ("push_many_jobs_per_s", "map_chunks_per_s", "map_vs_push_many", "rerun_s", "map_peak_python_mb"):
        summary[key] = statistics.median(line[key] for line in lines)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
