"""Tasks of the pipeline tests (tests/test_pipelines.py), run in this process or in local worker processes.

Every run writes its side effect into a runs table named in the payload: one row per run with
the job id, its attempt, the worker process, and its start and end, so a test can count how
often a step ran and when, whatever process ran it.
"""

from __future__ import annotations

import os
import time
from functools import cache

import sqlalchemy as sa

from kronix_data import RetryPolicy, current_job, task

#: Chunk numbers that fail until a test adds them to FIXED (in-process workers only).
FIXED: set[int] = set()


@cache
def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url, pool_pre_ping=True)


def create_runs_table(url: str, runs: str) -> None:
    with _engine(url).begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {runs} (job VARCHAR(128), step VARCHAR(32), attempt INTEGER, "
                             "pid INTEGER, started DOUBLE PRECISION, ended DOUBLE PRECISION)"))


def drop_runs_table(url: str, runs: str) -> None:
    with _engine(url).begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {runs}"))


def fetch_runs(url: str, runs: str) -> list:
    with _engine(url).connect() as conn:
        return conn.execute(sa.text(f"SELECT job, step, attempt, pid, started, ended FROM {runs}")).all()


def _record(step: str, config: dict, work) -> object:
    """Record this run's start, do the work, record its end."""
    context = current_job()
    key = {"job": context.job.id, "step": step, "attempt": context.job.attempts, "pid": os.getpid()}
    with _engine(config["url"]).begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {config['runs']} (job, step, attempt, pid, started) "
                             "VALUES (:job, :step, :attempt, :pid, :started)"), {**key, "started": time.time()})
    try:
        return work()
    finally:
        with _engine(config["url"]).begin() as conn:
            conn.execute(sa.text(f"UPDATE {config['runs']} SET ended = :ended WHERE job = :job AND step = :step "
                                 "AND attempt = :attempt AND pid = :pid"), {**key, "ended": time.time()})


def _config(payload) -> dict:
    return payload["items"][0] if "items" in payload else payload


@task(name="pipe.extract", retry=RetryPolicy(delay=0.05, jitter=0))
def extract(payload):
    """Step 1: a chunk of numbers becomes records, after a short sleep."""
    config = _config(payload)

    def work():
        time.sleep(config.get("sleep", 0))
        return [{"n": item["n"], "square": item["n"] ** 2} for item in payload["items"]]

    return _record("extract", config, work)


@task(name="pipe.transform", retry=RetryPolicy(delay=0.05, jitter=0))
def transform(payload):
    """Step 2 (mapped after step 1): another chunk; it fails until its chunk number is FIXED if asked to."""
    config = _config(payload)

    def work():
        if config.get("fail_until_fixed") and payload["chunk"] not in FIXED:
            raise ValueError(f"chunk {payload['chunk']} is not fixed yet")
        time.sleep(config.get("sleep", 0))
        return [{"n": item["n"], "double": 2 * item["n"]} for item in payload["items"]]

    return _record("transform", config, work)


@task(name="pipe.load")
def load(payload):
    """Step 3 (then): sums what its parents returned."""

    def work():
        frame = current_job().parent_results()
        total = {column: int(frame[column].sum()) if column in frame else 0 for column in ("square", "double")}
        return {"rows": len(frame), "columns": sorted(frame.columns), "squares": total["square"],
                "doubles": total["double"]}

    return _record("load", payload, work)


@task(name="pipe.patient", max_retries=0)
def patient(payload):
    """Runs until asked to cancel (or for ``seconds``), checking in small steps like a real long chunk."""
    config = _config(payload)

    def work():
        deadline = time.monotonic() + config.get("seconds", 30)
        while time.monotonic() < deadline and not current_job().cancel_requested():
            time.sleep(0.01)
        return {"stopped_early": current_job().cancel_requested()}

    return _record("patient", config, work)
