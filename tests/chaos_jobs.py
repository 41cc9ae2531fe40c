"""The job and the worker process of the chaos test (tests/test_chaos.py).

A worker process is ``python -m chaos_jobs URL TABLE RUNS STATS_DIR LEASE``: a
real :class:`kronix_data.Worker` on the real driver, as ``kronix worker`` runs
it, with one job class registered through ``register_job_factory`` (a class
sees its own id, attempt and worker, which a ``@task`` function cannot).
Each run of a job writes its side effect into the runs table: a row with
(job, attempt, worker, started) when it starts and its end time when it ends,
so a run cut short by kill -9 stays visible as a row without an end.

A job whose payload has ``"hold": PATH`` stays in its run (after recording its
start) until PATH exists: the chaos test kill -9s the worker of such a run, so
a run really is cut mid-job, whatever the machine's speed.

A worker process stops cleanly on SIGTERM from the moment its first stats file
exists (a handler of its own covers the start, before ``Worker.run`` installs
the worker's), so the test can wait for that file instead of sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from functools import cache

import sqlalchemy as sa

from kronix_data import DatabaseQueueDriver, Job, RetryPolicy, Worker

NAME = "chaos.work"
MAX_RETRIES = 4


def fails_first_attempt(n: int) -> bool:
    """10 % of the jobs fail once, then succeed."""
    return n % 10 == 3


def always_fails(n: int) -> bool:
    """1 % of the jobs fail on every attempt and end as dead letters."""
    return n % 100 == 7


class ChaosFailure(Exception):
    """The failure a job is told to have (never a database error)."""


@cache
def _engine(url: str) -> sa.Engine:
    # READ COMMITTED: under MariaDB's default REPEATABLE READ, a run's UPDATE takes gap locks on the
    # index, and a worker cut off mid-write would block other workers' inserts of nearby runs.
    return sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=0, pool_timeout=60,
                            isolation_level="READ COMMITTED")


def create_runs_table(url: str, runs: str) -> None:
    """One row per run.  Indexed, so a run's update locks its own row only (InnoDB locks what it scans)."""
    with sa.create_engine(url).begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {runs} (job INTEGER NOT NULL, attempt INTEGER NOT NULL, "
                             "worker VARCHAR(100) NOT NULL, started DOUBLE PRECISION NOT NULL, "
                             "ended DOUBLE PRECISION, ok INTEGER)"))
        conn.execute(sa.text(f"CREATE INDEX {runs}_run ON {runs} (job, attempt, worker)"))


def _write(url: str, sql: str, values: dict) -> None:
    with _engine(url).begin() as conn:
        conn.execute(sa.text(sql), values)


def _finish(url: str, runs: str, key: dict, ended: float, ok: bool) -> None:
    """Record the end of a run, retrying through lost connections (only kill -9 leaves a run open)."""
    delay, deadline = 0.05, time.monotonic() + 120
    while True:
        try:
            _write(url, f"UPDATE {runs} SET ended = :ended, ok = :ok "
                        "WHERE job = :job AND attempt = :attempt AND worker = :worker",
                   {**key, "ended": ended, "ok": int(ok)})
            return
        except sa.exc.DBAPIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


class ChaosJob(Job):
    """Records its run, sleeps a little, and fails when its number says so."""

    retry = RetryPolicy(delay=0.2, backoff=2.0, max_delay=2.0)

    def handle(self):
        payload = self.payload
        # A worker on another host reaches the database at its own address (tests/test_network_partition.py).
        url = os.environ.get("CHAOS_RUNS_URL") or payload["url"]
        runs, n = payload["runs"], payload["n"]
        key = {"job": n, "attempt": self.attempts, "worker": self.reserved_by}
        try:
            _write(url, f"INSERT INTO {runs} (job, attempt, worker, started) VALUES (:job, :attempt, :worker, :started)",
                   {**key, "started": time.time()})
        except sa.exc.DBAPIError:
            # The insert may have committed before the connection died: close the run either way.
            _finish(url, runs, key, time.time(), ok=False)
            raise
        hold = payload.get("hold")
        if hold:
            deadline = time.monotonic() + 600  # released by the test once this run's worker is dead
            while not os.path.exists(hold) and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(payload.get("sleep", 0))
        failing = always_fails(n) or (fails_first_attempt(n) and self.attempts == 1)
        _finish(url, runs, key, time.time(), ok=not failing)
        if failing:
            raise ChaosFailure(f"job {n} {'always fails' if always_fails(n) else 'fails on its first attempt'}")
        return {"attempt": self.attempts, "worker": self.reserved_by}


def _dump_stats(worker: Worker, path: str) -> None:
    """Write the stats atomically (the dump thread and the last dump at exit may overlap: a file each)."""
    scratch = f"{path}.{threading.get_ident()}.tmp"
    with open(scratch, "w") as out:
        json.dump(vars(worker.stats), out)
    os.replace(scratch, path)


def main(url: str, table: str, stats_dir: str, lease_timeout: str) -> None:
    """One worker process: its stats are written every 0.2 s, so a killed one leaves them too."""
    driver = DatabaseQueueDriver(url, table=table, worker_id=f"chaos-{os.getpid()}-{os.urandom(3).hex()}")
    driver.register_job_factory(NAME, lambda payload: ChaosJob(NAME, payload))
    worker = Worker(driver, concurrency=8, lease_timeout=float(lease_timeout), poll_interval=0.2)
    path = os.path.join(stats_dir, f"{os.getpid()}.json")
    # Until Worker.run installs its own handler (and after it restores this one), SIGTERM stops the
    # worker gracefully too: stop() only sets events, and run() then stops before claiming anything.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: worker.stop(wait=False))

    def dump_forever():
        while True:
            _dump_stats(worker, path)
            time.sleep(0.2)

    threading.Thread(target=dump_forever, daemon=True).start()
    worker.run()
    _dump_stats(worker, path)


if __name__ == "__main__":
    main(*sys.argv[1:])
