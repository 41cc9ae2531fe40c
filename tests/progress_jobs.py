"""Tasks of the progress and checkpoint tests (tests/test_progress.py), run in local worker processes.

``progress.sliced`` works a DataFrame chunk in checkpointed slices and writes one row per slice it
works into a records table (job, attempt, process, first and last row), so a test can tell which
rows each attempt processed, also after it killed the process that ran the first one.  Where the
records go is the environment's ``KRONIX_TEST_RECORDS`` (``url|table``): spawned workers inherit it.
"""

from __future__ import annotations

import os
import time
from functools import cache

import sqlalchemy as sa

from kronix_data import RetryPolicy, current_job, frame_slices, task

RECORDS_ENV = "KRONIX_TEST_RECORDS"
#: Seconds each slice of ``progress.sliced`` takes, so that a kill lands in the middle of a chunk.
SLICE_SECONDS = 0.15


@cache
def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url, pool_pre_ping=True)


def create_records_table(url: str, records: str) -> None:
    with _engine(url).begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {records} (job VARCHAR(128), attempt INTEGER, pid INTEGER, "
                             "first_row INTEGER, last_row INTEGER, at DOUBLE PRECISION)"))


def drop_records_table(url: str, records: str) -> None:
    with _engine(url).begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {records}"))


def fetch_records(url: str, records: str) -> list:
    """``(job, attempt, pid, first_row, last_row)`` of every slice worked, in the order they were worked."""
    with _engine(url).connect() as conn:
        return conn.execute(sa.text(f"SELECT job, attempt, pid, first_row, last_row FROM {records} "
                                    "ORDER BY at")).all()


@task(name="progress.sliced", max_retries=3, retry=RetryPolicy(delay=0.05, jitter=0))
def sliced(payload):
    """Sum a chunk's ``value`` column slice by slice (1,000 rows each), recording every slice it works."""
    url, records = os.environ[RECORDS_ENV].split("|")
    context = current_job()
    slices = frame_slices(payload, rows=1_000, state={"sum": 0, "rows": 0})
    for part in slices:
        with _engine(url).begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {records} (job, attempt, pid, first_row, last_row, at) "
                                 "VALUES (:job, :attempt, :pid, :first, :last, :at)"),
                         {"job": context.job.id, "attempt": context.job.attempts, "pid": os.getpid(),
                          "first": int(part["n"].iloc[0]), "last": int(part["n"].iloc[-1]), "at": time.time()})
        time.sleep(SLICE_SECONDS)
        slices.state["sum"] += int(part["value"].sum())
        slices.state["rows"] += len(part)
    return {**slices.state, "resumed_from": slices.start_row, "attempt": context.job.attempts}


@task(name="progress.nap", max_retries=0)
def nap(payload):
    """Sleep for the chunk's one item (seconds), reporting progress in tenths: a chunk of known length."""
    seconds = float(payload["items"][0])
    for tenth in range(10):
        current_job().progress(tenth, 10)
        time.sleep(seconds / 10)
    return seconds
