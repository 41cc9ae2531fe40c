"""Chaos on PostgreSQL and MariaDB: worker processes drain thousands of jobs while the test
kill -9s workers, terminates their database sessions and restarts the server.

At the end every job is completed or dead-lettered with a reason (never both, never
missing), every completion is backed by the side effect of the very attempt that
completed, no attempt was handed out twice, and no two runs of a job overlapped in time.

Bounded for CI (about a minute per database); longer by hand:
``KRONIX_CHAOS_SECONDS=600 KRONIX_CHAOS_JOBS=100000 pytest tests/test_chaos.py -s``.
Outside CI, ``KRONIX_CHAOS_RESTART=0`` leaves the shared server alone while iterating.
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
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

import chaos_jobs
from helpers import IN_CI, drop_table
from db_faults import kill_sessions_tagged, restart_server
from kronix_data import DatabaseQueueDriver, Job

TESTS = Path(__file__).resolve().parent
CHAOS_SECONDS = float(os.environ.get("KRONIX_CHAOS_SECONDS", "45"))
JOBS = int(os.environ.get("KRONIX_CHAOS_JOBS", "10000"))
RESTART = IN_CI or os.environ.get("KRONIX_CHAOS_RESTART", "1") != "0"
WORKERS = 4
LEASE_SECONDS = 4.0


# -- the database: a tag on every worker session, and an audit of every status change ----------

@pytest.fixture
def tagged_url(backend, db_url):
    """The URL the workers use: their sessions carry a tag, so the test can kill theirs and no one else's."""
    tag = f"kx_chaos_{uuid.uuid4().hex[:8]}"
    url = sa.make_url(db_url)
    if backend == "postgresql":
        yield url.update_query_dict({"application_name": tag}).render_as_string(hide_password=False), tag
        return
    engine = sa.create_engine(db_url, pool_pre_ping=True)  # it outlives the server restart
    hosts = ("localhost", "127.0.0.1")
    try:
        with engine.begin() as conn:
            for host in hosts:
                conn.exec_driver_sql(f"CREATE USER '{tag}'@'{host}'")  # tag is ours: letters, digits, _
                conn.exec_driver_sql(f"GRANT ALL ON `{url.database}`.* TO '{tag}'@'{host}'")
        yield url.set(username=tag, password=None).render_as_string(hide_password=False), tag
    finally:
        with engine.begin() as conn:
            for host in hosts:
                conn.exec_driver_sql(f"DROP USER IF EXISTS '{tag}'@'{host}'")
        engine.dispose()


def create_audit(url: str, table: str, audit: str) -> None:
    """A trigger logs every status change of a job (and every write of a final status) as the database saw it."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {audit} (job VARCHAR(128), status VARCHAR(16), attempts INTEGER, "
                             "reserved_by VARCHAR(255), at DOUBLE PRECISION)")
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"""
                CREATE FUNCTION {audit}_log() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                  INSERT INTO {audit} VALUES (NEW.id, NEW.status, NEW.attempts, NEW.reserved_by,
                                              extract(epoch FROM clock_timestamp()));
                  RETURN NEW;
                END $$""")
            conn.exec_driver_sql(f"""
                CREATE TRIGGER {audit}_trigger AFTER UPDATE ON {table} FOR EACH ROW
                WHEN (NEW.status <> OLD.status OR NEW.status IN ('completed', 'failed'))
                EXECUTE FUNCTION {audit}_log()""")
        else:
            conn.exec_driver_sql(f"""
                CREATE TRIGGER {audit}_trigger AFTER UPDATE ON {table} FOR EACH ROW
                INSERT INTO {audit} SELECT NEW.id, NEW.status, NEW.attempts, NEW.reserved_by,
                                           UNIX_TIMESTAMP(NOW(6)) FROM DUAL
                WHERE NEW.status <> OLD.status OR NEW.status IN ('completed', 'failed')""")
    engine.dispose()


def drop_audit(url: str, audit: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {audit}")
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {audit}_log() CASCADE")
    engine.dispose()


# -- the workers and the faults ----------------------------------------------------------------------

@dataclass
class Chaos:
    """Worker processes and what was done to them."""

    url: str
    table: str
    stats_dir: Path
    log: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    killed_at: dict[int, float] = field(default_factory=dict)  # pid -> wall-clock time of its kill -9
    sessions_killed: int = 0
    session_faults: int = 0
    restarts: int = 0
    restart_seconds: float = 0.0

    def start_worker(self) -> None:
        with open(self.log, "a") as log:
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "chaos_jobs", self.url, self.table, str(self.stats_dir), str(LEASE_SECONDS)],
                cwd=TESTS, stdout=log, stderr=log))

    def alive(self) -> list[subprocess.Popen]:
        return [process for process in self.processes if process.poll() is None]

    def kill_a_worker(self) -> None:
        """kill -9 a random worker that is at work (not one still starting) and start a new one in its place."""
        working = [process for process in self.alive() if self.stats_of(process.pid).get("claimed", 0)]
        victim = random.choice(working or self.alive())
        self.killed_at[victim.pid] = time.time()
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.start_worker()

    def stop(self) -> list[int]:
        # A worker started by the last kill may still be importing: SIGTERM before its
        # handlers exist would end it with -15 (harmless, it holds nothing, but not a clean stop).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all((self.stats_dir / f"{p.pid}.json").exists()
                                                      for p in self.alive()):
            time.sleep(0.1)
        time.sleep(0.5)  # the stats file is written just before Worker.run installs its handlers
        for process in self.alive():
            process.send_signal(signal.SIGTERM)
        return [process.wait(timeout=60) for process in self.processes if process.pid not in self.killed_at]

    def stats_of(self, pid: int) -> dict[str, int]:
        path = self.stats_dir / f"{pid}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def worker_stats(self) -> dict[str, int]:
        totals: collections.Counter = collections.Counter()
        for path in self.stats_dir.glob("*.json"):
            totals.update(json.loads(path.read_text()))
        return dict(totals)


def final_jobs(driver: DatabaseQueueDriver) -> int | None:
    """How many jobs are completed or dead-lettered, or None while the database is away."""
    try:
        stats = driver.fetch_stats()
    except sa.exc.DBAPIError:
        return None
    return int(stats["completed"].sum() + stats["failed"].sum())


def unleash(chaos: Chaos, driver: DatabaseQueueDriver, admin_url: str, tag: str) -> float:
    """Faults every 0.5-1.5 s for CHAOS_SECONDS (the server restart once, early); returns the elapsed time.

    The time the server takes to come back is not counted: nothing can fail while it is away.
    """
    started = time.monotonic()
    restart_at = started + min(10.0, CHAOS_SECONDS / 3)
    while True:
        time.sleep(random.uniform(0.5, 1.5))
        now = time.monotonic()
        if RESTART and not chaos.restarts and now >= restart_at:
            chaos.restart_seconds = restart_server(admin_url)
            chaos.restarts += 1
            started += chaos.restart_seconds
        elif random.random() < 0.5:
            chaos.kill_a_worker()
        else:
            chaos.sessions_killed += kill_sessions_tagged(admin_url, tag, fraction=random.choice([0.5, 1.0]))
            chaos.session_faults += 1
        done = final_jobs(driver)
        if now - started >= CHAOS_SECONDS or (done == JOBS and (chaos.restarts or not RESTART)):
            return time.monotonic() - started


def wait_for_the_drain(driver: DatabaseQueueDriver, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while final_jobs(driver) != JOBS:
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs still not final {timeout}s after the chaos: {driver.fetch_stats()}")
        time.sleep(0.5)


# -- the checks ------------------------------------------------------------------------------------

def select(url: str, sql: str) -> list:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(sql)).all()
    engine.dispose()
    return rows


def overlapping_runs(runs, killed_at: dict[int, float]) -> list:
    """Pairs of runs of one job that overlap in time.

    A run lasts from its start to its recorded end; a run without an end was cut
    by kill -9 and lasts until its worker's kill (a run without an end on a worker
    that was never killed is itself reported).
    """
    spans = collections.defaultdict(list)
    for job, attempt, worker, started, ended, _ok in runs:
        if ended is None:
            pid = int(worker.split("-")[1])
            ended = max(started, killed_at.get(pid, float("inf")))
        spans[job].append((started, ended, attempt, worker))
    overlaps = []
    for job, runs_of_job in spans.items():
        runs_of_job.sort()
        for earlier, later in zip(runs_of_job, runs_of_job[1:]):
            if later[0] < earlier[1]:
                overlaps.append((job, earlier, later))
    return overlaps


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_no_job_is_lost_or_completed_twice_under_kills_dropped_connections_and_a_restart(
        backend, db_url, table_name, tagged_url, tmp_path, capsys):
    url, tag = tagged_url
    runs, audit = f"runs_{table_name}", f"audit_{table_name}"
    driver = DatabaseQueueDriver(db_url, table=table_name)
    driver.create_table()
    chaos_jobs.create_runs_table(db_url, runs)
    create_audit(db_url, table_name, audit)
    chaos = Chaos(url, table_name, tmp_path / "stats", tmp_path / "workers.log")
    chaos.stats_dir.mkdir()
    try:
        driver.push_many(Job(chaos_jobs.NAME, {"n": n, "url": url, "runs": runs, "sleep": 0.005},
                             id=f"c{n:07d}", max_retries=chaos_jobs.MAX_RETRIES) for n in range(JOBS))
        began = time.monotonic()
        for _ in range(WORKERS):
            chaos.start_worker()
        chaos_elapsed = unleash(chaos, driver, db_url, tag)
        wait_for_the_drain(driver, timeout=120)
        drained = time.monotonic() - began
        exit_codes = chaos.stop()
        report = audit_everything(driver, db_url, runs, audit, chaos)
    finally:
        for process in chaos.alive():
            process.kill()
        driver.close()
        drop_table(db_url, runs)
        drop_audit(db_url, audit)

    stats = chaos.worker_stats()
    with capsys.disabled():  # the figures belong in the CI log, not only in a failure's captured output
        print(f"\nchaos on {backend}: {JOBS} jobs, all final after {drained:.0f}s ({chaos_elapsed:.0f}s of faults); "
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
    # The faults really happened: otherwise the test proves nothing.
    assert len(chaos.killed_at) >= 3 and report["cut_runs"] >= 1
    assert chaos.session_faults >= 3 and chaos.sessions_killed >= 3
    assert chaos.restarts == (1 if RESTART else 0)
    assert stats.get("database_errors", 0) >= 1


def audit_everything(driver: DatabaseQueueDriver, url: str, runs_table: str, audit: str, chaos: Chaos) -> dict:
    """Check the jobs, the audit log and the runs against each other; returns figures and problems."""
    problems: list[str] = []
    c = driver.table.c
    with driver.engine.connect() as conn:
        jobs = {row.id: row for row in conn.execute(
            sa.select(c.id, c.status, c.attempts, c.max_retries, c.reserved_by, c.last_error, c.result,
                      c.payload))}
    runs = select(url, f"SELECT job, attempt, worker, started, ended, ok FROM {runs_table}")
    changes = select(url, f"SELECT job, status, attempts, reserved_by FROM {audit} ORDER BY at")

    # Every job is there, and final.
    expected = {f"c{n:07d}" for n in range(JOBS)}
    missing = expected - jobs.keys()
    not_final = [job_id for job_id, row in jobs.items() if row.status not in ("completed", "failed")]
    problems += [f"missing {job_id}" for job_id in sorted(missing)] + [f"not final {job_id}" for job_id in not_final]

    # The audit: each attempt handed out once; one final write per job, matching the row; never both.
    claims = collections.Counter((job, attempts) for job, status, attempts, _ in changes if status == "processing")
    problems += [f"attempt {key} handed out {count} times" for key, count in claims.items() if count > 1]
    finals = collections.defaultdict(list)
    for job, status, attempts, reserved_by in changes:
        if status in ("completed", "failed"):
            finals[job].append((status, attempts, reserved_by))
    duplicates = [job for job, writes in finals.items() if len(writes) > 1]
    problems += [f"{job} finished {len(finals[job])} times: {finals[job]}" for job in duplicates]

    runs_by_attempt = collections.defaultdict(list)
    for job, attempt, worker, started, ended, ok in runs:
        runs_by_attempt[f"c{job:07d}", attempt].append((worker, ended, ok))
    problems += [f"attempt {key} ran {len(found)} times" for key, found in runs_by_attempt.items() if len(found) > 1]

    lost, dead_by_design, dead_by_chaos, reasons = [], 0, 0, collections.Counter()
    for job_id, row in jobs.items():
        n = int(job_id[1:])
        if [status for status, _, _ in finals.get(job_id, [])][:1] != [row.status] and row.status in (
                "completed", "failed"):
            problems.append(f"{job_id} is {row.status} but the audit says {finals.get(job_id)}")
        if row.status == "completed":
            result = json.loads(row.result)
            backing = [(worker, ok) for worker, ended, ok in runs_by_attempt.get((job_id, row.attempts), [])]
            if result != {"attempt": row.attempts, "worker": row.reserved_by}:
                problems.append(f"{job_id} completed by attempt {row.attempts} of {row.reserved_by}, result {result}")
            if backing != [(row.reserved_by, 1)]:
                lost.append(job_id)  # completed, but the completing attempt's side effect is not there
            if chaos_jobs.always_fails(n):
                problems.append(f"{job_id} should always fail but completed")
        elif row.status == "failed":
            # A dead letter has used up its attempts, and says why: its own failure, or (when its last
            # attempt died with its worker) the expired lease.
            reasons.update([(row.last_error or "").split(":")[0]])
            if not row.last_error or row.attempts <= row.max_retries:
                problems.append(f"{job_id} dead-lettered after {row.attempts} attempts: {row.last_error!r}")
            if chaos_jobs.always_fails(n):
                dead_by_design += 1
            else:
                dead_by_chaos += 1
    lost += sorted(missing) + not_final

    overlaps = overlapping_runs(runs, chaos.killed_at)
    problems += [f"runs overlap: {overlap}" for overlap in overlaps]
    successes = collections.Counter(job for job, _, _, _, _, ok in runs if ok == 1)
    statuses = collections.Counter(row.status for row in jobs.values())
    return {"completed": statuses["completed"], "dead": statuses["failed"], "dead_by_design": dead_by_design,
            "dead_by_chaos": dead_by_chaos, "cut_runs": sum(ended is None for *_, ended, _ in runs),
            "re_executed": sum(count > 1 for count in successes.values()), "duplicates": len(duplicates),
            "lost": len(lost), "problems": problems, "reasons": dict(reasons)}


def test_the_ownership_check_finds_overlapping_runs_and_ends_killed_runs_at_the_kill():
    """The checker itself: without this, an overlap check that never fires would pass every chaos run."""
    runs = [(1, 1, "chaos-100-a", 10.0, 11.0, 1), (1, 2, "chaos-200-b", 10.5, 12.0, 1),  # overlap
            (2, 1, "chaos-300-c", 10.0, None, None), (2, 2, "chaos-200-b", 15.0, 16.0, 1),  # killed at 11
            (3, 1, "chaos-400-d", 10.0, None, None), (3, 2, "chaos-200-b", 15.0, 16.0, 1)]  # never killed
    overlaps = overlapping_runs(runs, killed_at={300: 11.0})
    assert [(job, earlier[3], later[3]) for job, earlier, later in overlaps] == [
        (1, "chaos-100-a", "chaos-200-b"), (3, "chaos-400-d", "chaos-200-b")]
