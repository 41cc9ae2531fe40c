"""The jobs' history on each database: ``driver.jobs()`` (filters, limits, ordering, columns, errors)
and ``driver.prune()``.  Timestamps are put on rows with known values relative to the database's
clock, so every expectation is exact."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from helpers import db_now, finished_job, set_times
from kronix_data import Job
from kronix_data.history import JOB_COLUMNS


# -- jobs() ------------------------------------------------------------------------


def test_jobs_is_a_typed_frame_empty_or_not(driver):
    empty = driver.jobs()
    assert empty.empty and dict(empty.dtypes.astype(str)) == JOB_COLUMNS
    now = db_now(driver)
    finished_job(driver, due=now - timedelta(minutes=5), wait=2.5, run=4.0)
    driver.push(Job("stats.job", key="only-once"))
    frame = driver.jobs()
    assert dict(frame.dtypes.astype(str)) == JOB_COLUMNS
    assert frame["status"].tolist() == ["pending", "completed"]  # newest first
    assert frame["key"].tolist()[0] == "only-once"
    assert frame["wait_s"].tolist()[1] == pytest.approx(2.5, abs=1e-3)
    assert frame["run_s"].tolist()[1] == pytest.approx(4.0, abs=1e-3)
    assert np.isnan(frame["wait_s"].iloc[0]) and np.isnan(frame["run_s"].iloc[0])


def test_jobs_filters_combine(driver):
    now = db_now(driver)
    batch = driver.map("etl.a", [1, 2, 3, 4], chunk_size=1, queue="etl")
    running = driver.pop("etl")  # chunks of the batch: the only jobs yet (fair share mixes later pushes in)
    failed = driver.pop("etl"); failed.last_error = "ValueError: x"; driver.fail(failed)
    ids = driver.push_many([Job("etl.b", i, queue="etl") for i in range(3)] + [Job("mail", i) for i in range(2)])
    for age, job_id in zip((50, 40, 30, 20, 10), ids):
        set_times(driver, job_id, created_at=now - timedelta(minutes=age))

    assert len(driver.jobs()) == 9 and len(driver.jobs(limit=4)) == 4 and len(driver.jobs(limit=None)) == 9
    assert driver.jobs(queue="default")["id"].tolist() == [ids[4], ids[3]]
    assert driver.jobs(name="etl.b")["id"].tolist() == [ids[2], ids[1], ids[0]]
    assert driver.jobs(status="processing")["id"].tolist() == [running.id]
    assert set(driver.jobs(status=["processing", "failed"])["id"]) == {running.id, failed.id}
    assert set(driver.jobs(batch=batch.id)["id"]) == set(driver.jobs(name="etl.a")["id"])
    assert driver.jobs(since=timedelta(minutes=35), until=timedelta(minutes=15))["id"].tolist() == [ids[3], ids[2]]
    assert driver.jobs(since=now - timedelta(minutes=45), until=now - timedelta(minutes=25),
                       queue="etl")["id"].tolist() == [ids[2], ids[1]]
    assert driver.jobs(queue="etl", status="pending", name="etl.b", until=pd.Timestamp(now - timedelta(minutes=45))
                       )["id"].tolist() == [ids[0]]


@pytest.mark.parametrize("options, error, message", [
    ({"status": "done"}, ValueError, "unknown status.*pending, processing, completed, failed, waiting, cancelled"),
    ({"status": ["pending", "dead"]}, ValueError, "unknown status"),
    ({"since": datetime(2026, 1, 1)}, ValueError, "since must be timezone-aware"),
    ({"until": "yesterday"}, TypeError, "until must be a timezone-aware datetime or a timedelta"),
    ({"limit": 0}, ValueError, "limit must be an int >= 1"),
    ({"queue": 3}, TypeError, "queue must be a str"),
    ({"name": b"etl"}, TypeError, "name must be a str"),
    ({"batch": 7}, TypeError, "batch must be a str"),
    ({"status": []}, ValueError, "unknown status"),
    ({"since": "2026-01-01"}, TypeError, "since must be a timezone-aware datetime or a timedelta"),
    ({"limit": True}, ValueError, "limit must be an int >= 1"),
    ({"limit": -3}, ValueError, "limit must be an int >= 1"),
    ({"limit": 2.5}, ValueError, "limit must be an int >= 1"),
])
def test_jobs_refuses_bad_filters(driver, options, error, message):
    with pytest.raises(error, match=message):
        driver.jobs(**options)


def test_jobs_has_the_history_columns_in_order_and_never_reads_payloads_or_results(driver):
    driver.push(Job("history.big", {"rows": list(range(1000))}))
    frame = driver.jobs()
    assert list(frame.columns) == list(JOB_COLUMNS)
    assert "payload" not in frame.columns and "result" not in frame.columns
    assert frame["attempts"].tolist() == [0] and frame["max_retries"].tolist() == [3]


def test_jobs_orders_newest_first_then_by_id_for_equal_creation_times(driver):
    now = db_now(driver)
    ids = driver.push_many([Job("history.n", n, id=f"job-{n}") for n in range(4)])
    for job_id, age in zip(ids, (5, 1, 1, 9)):  # job-1 and job-2 were created at the same instant
        set_times(driver, job_id, created_at=now - timedelta(minutes=age))
    assert driver.jobs()["id"].tolist() == ["job-2", "job-1", "job-0", "job-3"]
    assert driver.jobs(limit=2)["id"].tolist() == ["job-2", "job-1"]  # the limit keeps the newest


def test_jobs_returns_at_most_1000_rows_by_default(driver):
    driver.push_many([Job("history.n", n) for n in range(1005)])
    assert len(driver.jobs()) == 1000
    assert len(driver.jobs(limit=None)) == 1005 and len(driver.jobs(limit=1005)) == 1005


def test_since_includes_its_instant_and_until_excludes_its_own(driver):
    start = db_now(driver) - timedelta(hours=1)
    ids = driver.push_many([Job("history.n", n) for n in range(3)])
    for minutes, job_id in zip((0, 10, 20), ids):
        set_times(driver, job_id, created_at=start + timedelta(minutes=minutes))
    window = driver.jobs(since=start, until=start + timedelta(minutes=20))["id"].tolist()
    assert window == [ids[1], ids[0]]  # created_at == since is in, created_at == until is out
    assert driver.jobs(since=start + timedelta(minutes=10))["id"].tolist() == [ids[2], ids[1]]
    assert driver.jobs(until=start + timedelta(minutes=10))["id"].tolist() == [ids[0]]
    # Other time zones are the same instants.
    east = timezone(timedelta(hours=5, minutes=30))
    assert driver.jobs(since=(start + timedelta(minutes=5)).astimezone(east))["id"].tolist() == [ids[2], ids[1]]


def test_wait_and_run_times_of_jobs_that_got_that_far(driver):
    now = db_now(driver)
    done = finished_job(driver, due=now - timedelta(minutes=9), wait=3.0, run=2.0)
    dead = finished_job(driver, status="failed", due=now - timedelta(minutes=8), wait=1.0, run=0.5,
                        last_error="ValueError: x")
    running = driver.push(Job("history.n"))
    driver.pop()
    set_times(driver, running, created_at=now - timedelta(minutes=7), available_at=now - timedelta(minutes=7),
              reserved_at=now - timedelta(minutes=7) + timedelta(seconds=4))
    waiting = driver.push(Job("history.n"))

    frame = driver.jobs().set_index("id")
    assert frame.loc[done, ["wait_s", "run_s"]].tolist() == pytest.approx([3.0, 2.0], abs=1e-3)
    assert frame.loc[dead, ["wait_s", "run_s"]].tolist() == pytest.approx([1.0, 0.5], abs=1e-3)
    assert frame.loc[running, "wait_s"] == pytest.approx(4.0, abs=1e-3) and np.isnan(frame.loc[running, "run_s"])
    assert np.isnan(frame.loc[waiting, "wait_s"]) and np.isnan(frame.loc[waiting, "run_s"])
    assert frame.loc[dead, "last_error"] == "ValueError: x" and frame.loc[done, "status"] == "completed"


def test_statuses_can_be_given_as_any_collection(driver):
    driver.push_many([Job("history.n", n) for n in range(3)])
    driver.pop()
    assert len(driver.jobs(status=("pending", "processing"))) == 3
    assert len(driver.jobs(status={"processing"})) == 1
    assert driver.jobs(status="completed").empty and list(driver.jobs(status="failed").columns) == list(JOB_COLUMNS)


# -- prune -------------------------------------------------------------------------


def test_prune_deletes_only_old_completed_jobs_in_bounded_chunks(driver):
    now = db_now(driver)
    old = [finished_job(driver, due=now - timedelta(days=3, minutes=n), wait=1, run=1) for n in range(10)]
    recent = finished_job(driver, due=now - timedelta(hours=1), wait=1, run=1)
    old_dead = finished_job(driver, status="failed", due=now - timedelta(days=3), wait=1, run=1, last_error="E: x")
    pending = driver.push(Job("n"))
    running = driver.push(Job("n", queue="busy"))
    driver.pop("busy")
    set_times(driver, pending, created_at=now - timedelta(days=9))
    set_times(driver, running, created_at=now - timedelta(days=9))

    deletes = []

    jobs_delete = re.compile(rf"\s*DELETE FROM [`\"]?{driver.table.name}[`\"]?\s", re.IGNORECASE)

    def count_deletes(conn, cursor, statement, parameters, context, executemany):
        if jobs_delete.match(statement):  # the jobs' own DELETEs (not their <table>_data rows')
            deletes.append(cursor.rowcount)

    sa.event.listen(driver.engine, "after_cursor_execute", count_deletes)
    try:
        assert driver.prune(timedelta(days=1), chunk_size=3) == 10
    finally:
        sa.event.remove(driver.engine, "after_cursor_execute", count_deletes)
    assert deletes == [3, 3, 3, 1]  # one transaction per chunk, oldest first
    remaining = set(driver.jobs(limit=None)["id"])
    assert remaining == {recent, old_dead, pending, running} and not remaining & set(old)

    assert driver.prune(timedelta(days=1)) == 0
    assert driver.prune(86400, dead_letters=True) == 1
    assert set(driver.jobs(limit=None)["id"]) == {recent, pending, running}
    assert driver.prune(0) == 1  # everything completed, however recent
    assert set(driver.jobs(limit=None)["id"]) == {pending, running}


@pytest.mark.parametrize("older_than, chunk_size", [(-1, 10), ("1d", 10), (timedelta(days=-1), 10), (60, 0),
                                                    (True, 10), (None, 10), (60, -5), (60, 2.5), (60, True)])
def test_prune_refuses_bad_arguments(driver, older_than, chunk_size):
    with pytest.raises(ValueError, match="older_than|chunk_size"):
        driver.prune(older_than, chunk_size=chunk_size)


def test_prune_on_an_empty_table_or_with_nothing_old_enough_deletes_nothing(driver):
    assert driver.prune(0) == 0
    now = db_now(driver)
    recent = finished_job(driver, due=now - timedelta(minutes=30), wait=1, run=1)
    assert driver.prune(timedelta(hours=1)) == 0 and driver.prune(3600.0, dead_letters=True) == 0
    assert driver.jobs()["id"].tolist() == [recent]


def test_prune_goes_by_finish_time_not_creation_time(driver):
    now = db_now(driver)
    made_long_ago = finished_job(driver, due=now - timedelta(days=30), wait=1, run=1)
    set_times(driver, made_long_ago, finished_at=now - timedelta(minutes=5))  # but it finished only now
    finished_long_ago = finished_job(driver, due=now - timedelta(days=2), wait=1, run=1)
    assert driver.prune(timedelta(days=1)) == 1
    assert driver.jobs()["id"].tolist() == [made_long_ago]
    assert finished_long_ago not in set(driver.jobs(limit=None)["id"])


def test_prune_counts_what_it_deleted_and_the_jobs_are_gone_for_good(driver):
    now = db_now(driver)
    ids = [finished_job(driver, due=now - timedelta(days=2, minutes=n), wait=1, run=1) for n in range(5)]
    assert driver.prune(timedelta(days=1), chunk_size=2) == 5
    assert all(driver.get_job(job_id) is None for job_id in ids)
    assert driver.jobs(limit=None).empty
