"""Tasks that the worker tests run, in this process or in spawned worker processes.

Importable as ``worker_jobs`` because pytest puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import os
import time
from functools import cache

import sqlalchemy as sa

from kronix_data import RetryPolicy, task


@task(name="test.noop")
def noop(payload):
    return None


@cache
def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url, pool_pre_ping=True)


def create_runs_table(url: str, runs: str) -> None:
    with _engine(url).begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {runs} (job INTEGER, pid INTEGER, "
                             "started DOUBLE PRECISION, ended DOUBLE PRECISION)"))


def fetch_runs(url: str, runs: str) -> list:
    with _engine(url).connect() as conn:
        return conn.execute(sa.text(f"SELECT job, pid, started, ended FROM {runs}")).all()


@task(name="test.record", max_retries=5, retry=RetryPolicy(delay=0.01))
def record(payload):
    """Record the run's start, sleep, then record its end: the side effect a test can audit."""
    engine, runs = _engine(payload["url"]), payload["runs"]
    started = time.time()
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {runs} (job, pid, started) VALUES (:job, :pid, :started)"),
                     {"job": payload["n"], "pid": os.getpid(), "started": started})
    time.sleep(payload.get("sleep", 0))
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {runs} SET ended = :ended WHERE job = :job AND pid = :pid AND started = :started"),
                     {"ended": time.time(), "job": payload["n"], "pid": os.getpid(), "started": started})
    return payload["n"]


@task(name="test.whoami")
def whoami(payload):
    """The worker process that ran the job (the local-workers tests check which processes did the work)."""
    return os.getpid()


@task(name="test.meet", max_retries=0)
def meet(payload):
    """Record this process in the runs table, then wait until ``parties`` processes have: a barrier, so a
    test can know that several workers each ran part of a queue, whatever their start-up speed."""
    engine, runs = _engine(payload["url"]), payload["runs"]
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {runs} (job, pid, started) VALUES (:job, :pid, :started)"),
                     {"job": payload["n"], "pid": os.getpid(), "started": time.time()})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            met = conn.execute(sa.text(f"SELECT COUNT(DISTINCT pid) FROM {runs}")).scalar_one()
        if met >= payload["parties"]:
            return met
        time.sleep(0.02)
    raise TimeoutError(f"only {met} of {payload['parties']} worker processes came to the meeting")


@task(name="test.snooze_once", max_retries=0)
def snooze_once(payload):
    """Record the run; the first run of job ``n`` snoozes for ``seconds`` (with max_retries=0, a snooze that
    counted as a failure would dead-letter it), the second returns how many runs there were."""
    from kronix_data import Snooze

    engine, runs = _engine(payload["url"]), payload["runs"]
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {runs} (job, pid, started) VALUES (:job, :pid, :started)"),
                     {"job": payload["n"], "pid": os.getpid(), "started": time.time()})
        runs_so_far = conn.execute(sa.text(f"SELECT COUNT(*) FROM {runs} WHERE job = :job"),
                                   {"job": payload["n"]}).scalar_one()
    if runs_so_far == 1:
        raise Snooze(payload["seconds"])
    return runs_so_far
