"""Chaos on PostgreSQL and MariaDB: worker processes drain thousands of jobs while the test
kill -9s workers in the middle of a run, terminates their database sessions, and stops and
starts the database server under them.

The server is a private one (``helpers.PrivateServer``: a throwaway cluster this test session
starts on a free port), never the shared server of ``KRONIX_TEST_*_URL``, and the sessions killed
are only the workers' own (tagged, ``helpers.tagged_sessions``).

The fault schedule is counted, not timed.  One cycle is the rounds in ``CYCLE`` (three kill -9,
three session kills, one server stop/start); ``KRONIX_CHAOS_ROUNDS`` cycles run (2 by default).  Each
round waits on conditions, never on a clock, so a fast machine cannot skip a fault and a slow one
only takes longer (every wait has a generous deadline):

- **kill -9 mid-run**: a *hold* job is pushed first in line; its run records its start and then
  waits for a release file.  The test waits for that run to appear in the runs table, kill -9s
  the worker running it (with whatever else it held), releases the hold for the next attempt and
  starts a worker in its place.  The run is cut mid-job by construction (``cut_runs >= 1``).
- **session kills**: half or all of the workers' sessions are terminated (the round waits until
  there was at least one to kill).
- **server stop/start**: the server is stopped while the workers run and kept down until their
  stats files show a database error they had not had before (``database_errors >= 1`` by
  construction), then started again.

After every round the test waits until the workers have completed ``PROGRESS`` more jobs, so each
fault hits a queue at work and the next finds the workers recovered.  The queue cannot drain while
faults remain: before every round, if fewer than ``LOW_WATER`` jobs are pending (three times the
``PROGRESS`` the round waits for), another wave of ``WAVE`` jobs is pushed.  The faults themselves
need no pending work (a hold job waits for the test; idle workers still poll the server).  The
first wave is ``KRONIX_CHAOS_JOBS`` jobs (10,000).  After the last round no more are pushed and the
queue drains.

At the end every job is completed or dead-lettered with a reason (never both, never missing),
every completion is backed by the side effect of the very attempt that completed, no attempt was
handed out twice, and no two runs of a job overlapped in time.

About half a minute per database (less than the old timed schedule); longer by hand:
``KRONIX_CHAOS_ROUNDS=10 KRONIX_CHAOS_JOBS=100000 pytest tests/test_chaos.py -s``.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

import chaos_jobs
from helpers import (SERVERS, TESTS, PrivateServer, audit_chaos_jobs, create_audit, drop_audit, drop_table,
                     kill_sessions_tagged, overlapping_runs, select, tagged_sessions, unique_table, wait_until)
from kronix_data import DatabaseQueueDriver, Job

JOBS = int(os.environ.get("KRONIX_CHAOS_JOBS", "10000"))
ROUNDS = int(os.environ.get("KRONIX_CHAOS_ROUNDS", "2"))
CYCLE = ("kill", "sessions", "kill", "stop-start", "sessions", "kill", "sessions")
WAVE = 2000
LOW_WATER = 1500
PROGRESS = 500
WORKERS = 4
LEASE_SECONDS = 4.0
DEADLINE = 180.0  # for any one wait: far beyond what a slow machine needs, so only a real hang fails


# -- the workers and the faults ----------------------------------------------------------------------

@dataclass
class Chaos:
    """Worker processes, the jobs pushed to them, and what was done to them."""

    server: PrivateServer
    url: str  # the workers' URL: their sessions carry ``tag``
    tag: str
    table: str
    runs: str
    directory: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    pushed: int = 0  # jobs c0000000 .. c{pushed - 1}
    killed_at: dict[int, float] = field(default_factory=dict)  # pid -> wall-clock time after its kill -9
    sessions_killed: int = 0
    session_faults: int = 0
    restarts: int = 0
    restart_seconds: float = 0.0

    @property
    def stats_dir(self) -> Path:
        return self.directory / "stats"

    @property
    def log(self) -> Path:
        return self.directory / "workers.log"

    def start_worker(self) -> None:
        with open(self.log, "a") as log:
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "chaos_jobs", self.url, self.table, str(self.stats_dir), str(LEASE_SECONDS)],
                cwd=TESTS, stdout=log, stderr=log))

    def alive(self) -> list[subprocess.Popen]:
        return [process for process in self.processes if process.poll() is None]

    def push(self, driver: DatabaseQueueDriver, count: int, **payload) -> int:
        """Push ``count`` more jobs (numbered on from the last); returns the first number."""
        first = self.pushed
        options = {"available_at": datetime.now(timezone.utc) - timedelta(hours=1)} if "hold" in payload else {}
        driver.push_many(Job(chaos_jobs.NAME, {"n": n, "url": self.url, "runs": self.runs, "sleep": 0.005,
                                               **payload}, id=f"c{n:07d}", max_retries=chaos_jobs.MAX_RETRIES,
                             **options) for n in range(first, first + count))
        self.pushed += count
        return first

    def top_up(self, driver: DatabaseQueueDriver) -> None:
        """Another wave when the queue runs low, so it cannot drain while faults remain."""
        if driver.size() < LOW_WATER:
            self.push(driver, WAVE)

    # -- the faults

    def kill_a_worker_mid_run(self, driver: DatabaseQueueDriver) -> None:
        """kill -9 the worker running a hold job (so a run is cut mid-job for sure); start another."""
        release = self.directory / "release" / f"{self.pushed}"
        n = self.push(driver, 1, hold=str(release))  # due an hour ago: first in line

        def running_worker() -> str | None:
            rows = select(self.server.url, f"SELECT worker FROM {self.runs} WHERE job = :n AND ended IS NULL "
                                           "ORDER BY attempt DESC", {"n": n})
            return rows[0][0] if rows else None

        pid = int(wait_until(running_worker, DEADLINE, f"the run of hold job {n} to start").split("-")[1])
        [victim] = [process for process in self.processes if process.pid == pid]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.killed_at[pid] = time.time()
        release.touch()  # the next attempt, on another worker once the lease has expired, runs through
        self.start_worker()

    def kill_sessions(self) -> None:
        fraction = random.choice([0.5, 1.0])
        self.sessions_killed += wait_until(lambda: kill_sessions_tagged(self.server.url, self.tag, fraction),
                                           DEADLINE, "sessions of the workers to kill")
        self.session_faults += 1

    def stop_and_start_the_server(self) -> None:
        """Stop the server under the working workers, keep it down until they have seen it gone, start it."""
        errors_before = self.worker_stats().get("database_errors", 0)
        stopped = time.monotonic()
        self.server.stop()
        try:
            wait_until(lambda: self.worker_stats().get("database_errors", 0) > errors_before, DEADLINE,
                       "the workers to notice that the server is gone")
        finally:
            self.server.start()
        self.restart_seconds += time.monotonic() - stopped
        self.restarts += 1

    def await_progress(self, driver: DatabaseQueueDriver, since: int) -> None:
        wait_until(lambda: (completed_jobs(driver) or 0) >= since + PROGRESS, DEADLINE,
                   f"the workers to complete {PROGRESS} more jobs")

    def unleash(self, driver: DatabaseQueueDriver) -> None:
        """The rounds of CYCLE, ROUNDS times; each waits for the workers to get on with the work afterwards."""
        for fault in CYCLE * ROUNDS:
            self.top_up(driver)
            [since] = wait_until(lambda: [done] if (done := completed_jobs(driver)) is not None else None,
                                 DEADLINE, "the database to answer")
            if fault == "kill":
                self.kill_a_worker_mid_run(driver)
            elif fault == "sessions":
                self.kill_sessions()
            else:
                self.stop_and_start_the_server()
            self.await_progress(driver, since)

    def stop(self) -> list[int]:
        """SIGTERM every live worker once it can take it cleanly (its stats file exists); their exit codes."""
        wait_until(lambda: all((self.stats_dir / f"{p.pid}.json").exists() for p in self.alive()), DEADLINE,
                   "every worker to be up")
        for process in self.alive():
            process.send_signal(signal.SIGTERM)
        return [process.wait(timeout=120) for process in self.processes if process.pid not in self.killed_at]

    def worker_stats(self) -> dict[str, int]:
        totals: collections.Counter = collections.Counter()
        for path in self.stats_dir.glob("*.json"):
            totals.update(json.loads(path.read_text()))
        return dict(totals)


def completed_jobs(driver: DatabaseQueueDriver) -> int | None:
    """How many jobs are completed, or None while the database is away."""
    try:
        return int(driver.fetch_stats()["completed"].sum())
    except sa.exc.DBAPIError:
        return None


def final_jobs(driver: DatabaseQueueDriver) -> int | None:
    """How many jobs are completed or dead-lettered, or None while the database is away."""
    try:
        stats = driver.fetch_stats()
    except sa.exc.DBAPIError:
        return None
    return int(stats["completed"].sum() + stats["failed"].sum())


# -- the test and its checks -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", SERVERS)
def test_no_job_is_lost_or_completed_twice_under_kills_dropped_connections_and_a_restart(
        backend, private_server, tmp_path, capsys):
    server = private_server
    table = unique_table()
    runs, audit = f"runs_{table}", f"audit_{table}"
    # pre-ping: the test's own connections outlive the server's stop/start too
    driver = DatabaseQueueDriver(sa.create_engine(server.url, pool_pre_ping=True), table=table)
    driver.create_table()
    chaos_jobs.create_runs_table(server.url, runs)
    create_audit(server.url, table, audit)
    with tagged_sessions(server.url) as (url, tag):
        chaos = Chaos(server, url, tag, table, runs, tmp_path)
        chaos.stats_dir.mkdir()
        (tmp_path / "release").mkdir()
        try:
            chaos.push(driver, JOBS)
            began = time.monotonic()
            for _ in range(WORKERS):
                chaos.start_worker()
            chaos.unleash(driver)
            chaos_elapsed = time.monotonic() - began
            wait_until(lambda: final_jobs(driver) == chaos.pushed, DEADLINE, "every job to be final after the chaos")
            drained = time.monotonic() - began
            exit_codes = chaos.stop()
            report = audit_chaos_jobs(driver, server.url, runs, audit, chaos.pushed, chaos.killed_at)
        finally:
            for process in chaos.alive():
                process.kill()
                process.wait()
            server.start()  # if the test failed while it was down
            driver.close()
            for name in (table, runs):
                drop_table(server.url, name)
            drop_audit(server.url, audit)

    stats = chaos.worker_stats()
    with capsys.disabled():  # the figures belong in the CI log, not only in a failure's captured output
        print(f"\nchaos on {backend}: {chaos.pushed} jobs, all final after {drained:.0f}s "
              f"({chaos_elapsed:.0f}s of faults, {len(CYCLE) * ROUNDS} rounds); "
              f"completed {report['completed']}, dead-lettered {report['dead']} "
              f"({report['dead_by_design']} by design, {report['dead_by_chaos']} used up their attempts in the chaos; "
              f"reasons {report['reasons']}); "
              f"kill -9 {len(chaos.killed_at)} (runs cut mid-job {report['cut_runs']}), "
              f"session kills {chaos.sessions_killed} in {chaos.session_faults} rounds, "
              f"server restarts {chaos.restarts} ({chaos.restart_seconds:.1f}s), "
              f"reconnects {stats.get('database_errors', 0)} (workers' database errors), "
              f"lease recoveries {stats.get('recovered', 0)}, re-executions {report['re_executed']} (at-least-once), "
              f"duplicates {report['duplicates']}, lost {report['lost']}")
    if report["problems"]:
        print(f"worker log: {chaos.log.read_text()[-3000:]}")

    assert exit_codes == [0] * len(exit_codes), chaos.log.read_text()[-3000:]
    assert report["duplicates"] == 0 and report["lost"] == 0
    assert report["problems"] == [], report["problems"][:20]
    # The faults really happened (the schedule makes sure of it): otherwise the test proves nothing.
    assert len(chaos.killed_at) == 3 * ROUNDS and report["cut_runs"] >= 3 * ROUNDS
    assert chaos.session_faults == 3 * ROUNDS and chaos.sessions_killed >= 3 * ROUNDS
    assert chaos.restarts == ROUNDS and stats.get("database_errors", 0) >= 1


def test_the_ownership_check_finds_overlapping_runs_and_ends_killed_runs_at_the_kill():
    """The checker itself: without this, an overlap check that never fires would pass every chaos run."""
    runs = [(1, 1, "chaos-100-a", 10.0, 11.0, 1), (1, 2, "chaos-200-b", 10.5, 12.0, 1),  # overlap
            (2, 1, "chaos-300-c", 10.0, None, None), (2, 2, "chaos-200-b", 15.0, 16.0, 1),  # killed at 11
            (3, 1, "chaos-400-d", 10.0, None, None), (3, 2, "chaos-200-b", 15.0, 16.0, 1)]  # never killed
    overlaps = overlapping_runs(runs, killed_at={300: 11.0})
    assert [(job, earlier[3], later[3]) for job, earlier, later in overlaps] == [
        (1, "chaos-100-a", "chaos-200-b"), (3, "chaos-400-d", "chaos-200-b")]
