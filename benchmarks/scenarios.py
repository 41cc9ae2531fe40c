"""The scenarios: what is timed, around which calls, and what is checked in the database after.

Every scenario reads the database after its timed part and fails the run
(``BenchmarkError``) unless exactly the expected jobs are there in the
expected states, so no figure comes from a run that lost or skipped work.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from . import jobs
from .processes import WorkerGroup
from .systems.base import BenchmarkError, Counts, System, percentile

#: Jobs per run when --jobs is not given (one by one is slow for everyone; latency waits between jobs).
DEFAULT_JOBS = {"enqueue-batch": 20_000, "enqueue-single": 2_000, "drain": 20_000, "drain-history": 20_000,
                "latency": 40, "stats": 0}
DEFAULT_HISTORY = 1_000_000
#: Scenarios whose jobs are run by worker processes (the others time the producer alone).
WITH_WORKERS = {"drain", "drain-history", "latency"}


@dataclass
class Settings:
    jobs: int
    processes: int = 1
    history: int = 0           # finished jobs already in the table (drain-history, stats)
    interval: float = 0.25     # latency: mean seconds between two pushes
    settle: float = 1.0        # latency: seconds the workers idle before the first push
    timeout: float = 600.0     # the longest a drain or a latency run may take
    stats_repeat: int = 5      # stats: calls timed, median reported

    @property
    def dead_letters(self) -> int:
        """How many history jobs are dead letters: 0.1 %, at least one."""
        return min(self.history, max(1, self.history // 1000)) if self.history else 0


def run(system: System, scenario: str, settings: Settings) -> dict[str, Any]:
    """Run one scenario on a freshly created system; returns the timed figures."""
    if scenario in ("enqueue-batch", "enqueue-single"):
        return enqueue(system, settings, batch=scenario == "enqueue-batch")
    if scenario in ("drain", "drain-history"):
        return drain(system, settings)
    if scenario == "latency":
        return latency(system, settings)
    if scenario == "stats":
        return stats(system, settings)
    raise BenchmarkError(f"unknown scenario {scenario!r}")


def expect(counts: Counts, what: str, **expected: int) -> None:
    """Fail unless the database holds exactly the expected numbers of jobs."""
    found = {key: getattr(counts, key) for key in expected}
    if found != expected:
        raise BenchmarkError(f"{what}: expected {expected} in the database, found {found}")


def enqueue(system: System, settings: Settings, *, batch: bool) -> dict[str, Any]:
    prepared = system.prepare(settings.jobs)
    started = time.perf_counter()
    (system.enqueue_batch if batch else system.enqueue_single)(prepared)
    seconds = time.perf_counter() - started
    expect(system.counts(), "after enqueue", pending=settings.jobs, running=0, done=0)
    return {"seconds": seconds}


def fill_history(system: System, settings: Settings) -> None:
    if not settings.history:
        return
    failed = settings.dead_letters
    system.fill_history(settings.history, failed)
    expect(system.counts(), "after making history", pending=0, running=0,
           done=settings.history - failed, failed=failed)


def drain(system: System, settings: Settings) -> dict[str, Any]:
    """Pre-fill the queue, then time worker processes, released together, until it is empty."""
    fill_history(system, settings)
    system.fill(settings.jobs)
    system.analyze()
    expect(system.counts(), "after filling", pending=settings.jobs, running=0)
    figures = system.probes()
    group = WorkerGroup(system, settings.processes, burst=True)
    try:
        group.start()
        started = group.release()
        results = group.wait(settings.timeout)
    finally:
        group.close()
    seconds = max(result["end"] for result in results) - started
    failed = settings.dead_letters
    expect(system.counts(), "after the drain", pending=0, running=0,
           done=settings.jobs + settings.history - failed, failed=failed)
    finished = sorted(result["finished"] for result in results)
    if sum(finished) != settings.jobs:
        raise BenchmarkError(f"the workers report {sum(finished)} jobs finished, expected {settings.jobs}")
    return {"seconds": seconds, "finished_per_process": finished, **figures}


def latency(system: System, settings: Settings) -> dict[str, Any]:
    """Idle workers; push one job at a time, spaced out; time from push to the job's first line."""
    handle, path = tempfile.mkstemp(prefix="kronix-bench-latency-", suffix=".txt")
    os.close(handle)
    group = WorkerGroup(system, settings.processes, burst=False, env={jobs.LATENCY_FILE_ENV: path})
    try:
        group.start()
        started = group.release()
        time.sleep(settings.settle)
        spacing = random.Random(5)  # the same spacing in every run; jittered so no poll interval phase-locks
        for _ in range(settings.jobs):
            time.sleep(settings.interval * spacing.uniform(0.5, 1.5))
            system.push_latency(time.time())
        samples = _wait_for_lines(path, settings.jobs, timeout=min(settings.timeout, 60.0))
        seconds = time.monotonic() - started
        group.stop(settings.timeout)
    finally:
        group.close()
        os.unlink(path)
    expect(system.counts(), "after the latency run", pending=0, running=0, done=settings.jobs)
    delays = [started_at - sent for sent, started_at in samples]
    return {"seconds": seconds, "jobs_per_s": None, "p50_ms": round(statistics.median(delays) * 1000, 2),
            "p95_ms": round(percentile(delays, 95) * 1000, 2), "max_ms": round(max(delays) * 1000, 2)}


def _wait_for_lines(path: str, count: int, timeout: float) -> list[tuple[float, float]]:
    deadline = time.monotonic() + timeout
    while True:
        with open(path, encoding="ascii") as file:
            lines = [line.split() for line in file if line.endswith("\n")]
        if len(lines) >= count:
            return [(float(sent), float(started)) for sent, started in lines]
        if time.monotonic() > deadline:
            raise BenchmarkError(f"only {len(lines)} of {count} latency jobs started within {timeout:g}s")
        time.sleep(0.05)


def stats(system: System, settings: Settings) -> dict[str, Any]:
    """Time fetch_stats() and dead_letter_jobs() on a table of finished jobs (kronix only)."""
    if not settings.history:
        raise BenchmarkError("the stats scenario needs --history > 0")
    fill_history(system, settings)
    system.analyze()
    figures = system.time_stats(settings.stats_repeat)
    failed = settings.dead_letters
    if (figures["completed"], figures["dead_letters"]) != (settings.history - failed, failed):
        raise BenchmarkError(f"fetch_stats/dead_letter_jobs returned {figures['completed']} completed and "
                             f"{figures['dead_letters']} dead letters, expected {settings.history - failed} "
                             f"and {failed}")
    return {"seconds": (figures["fetch_stats_ms"] + figures["dead_letter_jobs_ms"]) / 1000, "jobs_per_s": None,
            **figures}
