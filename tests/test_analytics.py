"""The DataFrame views on each database: stats with percentiles over a window, dead letters, history, pruning."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from kronix_data import Job
from kronix_data.analytics import DEAD_LETTER_COLUMNS, STATS_COLUMNS, split_error
from kronix_data.history import JOB_COLUMNS


def db_now(driver) -> datetime:
    return driver.store.database_now()


def set_times(driver, job_id: str, **values) -> None:
    """Put known timestamps on a row, as if it had run then."""
    with driver.engine.begin() as conn:
        conn.execute(driver.table.update().where(driver.table.c.id == job_id).values(**values))


def finished_job(driver, *, queue="default", status="completed", due: datetime, wait: float, run: float,
                 last_error: str | None = None) -> str:
    """A job that really went through push, pop and complete/fail, then got controlled times."""
    job_id = driver.push(Job("stats.job", queue=queue))
    job = driver.pop(queue)
    job.last_error = last_error
    assert driver.complete(job) if status == "completed" else driver.fail(job)
    set_times(driver, job_id, created_at=due, available_at=due, reserved_at=due + timedelta(seconds=wait),
              finished_at=due + timedelta(seconds=wait + run))
    return job_id


# -- fetch_stats ---------------------------------------------------------------------


def test_fetch_stats_is_a_typed_empty_frame_on_an_empty_table(driver):
    stats = driver.fetch_stats()
    assert stats.empty and dict(stats.dtypes.astype(str)) == STATS_COLUMNS


def test_fetch_stats_percentiles_means_and_throughput_over_the_window(driver):
    now = db_now(driver)
    start = now - timedelta(minutes=30)
    waits = [0.25 * i for i in range(20)]
    runs = [0.5 + (i * 7 % 20) * 0.125 for i in range(20)]  # not in the same order as the waits
    for i, (wait, run) in enumerate(zip(waits, runs)):
        finished_job(driver, due=start + timedelta(seconds=i), wait=wait, run=run)
    dead_wait = 30.0
    finished_job(driver, status="failed", due=start, wait=dead_wait, run=1.0, last_error="ValueError: x")
    old = finished_job(driver, due=now - timedelta(hours=2), wait=100.0, run=100.0)  # outside a 1 h window

    stats = driver.fetch_stats(window=timedelta(hours=1))
    assert dict(stats.dtypes.astype(str)) == STATS_COLUMNS
    stats = stats.set_index("queue")
    row = stats.loc["default"]
    assert (row["pending"], row["processing"], row["completed"], row["failed"]) == (0, 0, 21, 1)
    assert np.isnan(row["oldest_pending_age_s"])
    all_waits = waits + [dead_wait]  # the dead letter waited too; it did not complete a run
    expected = {
        "wait_s_mean": np.mean(all_waits), "wait_s_p50": np.percentile(all_waits, 50),
        "wait_s_p95": np.percentile(all_waits, 95),
        "run_s_mean": np.mean(runs), "run_s_p50": np.percentile(runs, 50), "run_s_p95": np.percentile(runs, 95),
        "throughput_per_s": 20 / 3600,
    }
    assert {key: row[key] for key in expected} == pytest.approx(expected, abs=1e-3)

    wide = driver.fetch_stats(window=3 * 3600).set_index("queue").loc["default"]  # seconds work too
    assert wide["throughput_per_s"] == pytest.approx(21 / (3 * 3600))
    assert wide["run_s_p95"] == pytest.approx(np.percentile(runs + [100.0], 95), abs=1e-3)
    set_times(driver, old, finished_at=now + timedelta(days=1))  # the window is by finish time
    assert driver.fetch_stats(window=60).set_index("queue").loc["default", "throughput_per_s"] == pytest.approx(1 / 60)


def test_fetch_stats_counts_every_status_and_the_oldest_pending_age_per_queue(driver):
    now = db_now(driver)
    driver.push_many([Job("n", i) for i in range(4)])
    held = driver.pop()
    waiting = driver.push(Job("n", "waiting"))
    set_times(driver, waiting, available_at=now - timedelta(seconds=100))
    driver.push(Job("n", queue="later", available_at=now + timedelta(hours=1)))
    finished_job(driver, queue="quiet", due=now - timedelta(days=3), wait=1, run=1)
    finished_job(driver, queue="broken", status="failed", due=now - timedelta(minutes=5), wait=2, run=1)

    stats = driver.fetch_stats().set_index("queue")
    assert stats.index.tolist() == ["broken", "default", "later", "quiet"]
    broken = stats.loc["broken"]  # only a dead letter finished: it waited, but no run completed
    assert broken["wait_s_p50"] == pytest.approx(2.0, abs=1e-3) and broken["wait_s_p95"] == pytest.approx(2.0, abs=1e-3)
    assert broken[["run_s_mean", "run_s_p50", "run_s_p95"]].isna().all() and broken["throughput_per_s"] == 0.0
    assert stats[["pending", "processing", "completed", "failed"]].drop(index="broken").to_dict("index") == {
        "default": {"pending": 4, "processing": 1, "completed": 0, "failed": 0},
        "later": {"pending": 1, "processing": 0, "completed": 0, "failed": 0},
        "quiet": {"pending": 0, "processing": 0, "completed": 1, "failed": 0}}
    assert 100 <= stats.loc["default", "oldest_pending_age_s"] < 160
    assert stats.loc["later", "oldest_pending_age_s"] == 0.0  # scheduled, not late
    quiet = stats.loc["quiet"]  # nothing finished in the window: no timings, no throughput
    assert quiet[["wait_s_mean", "wait_s_p50", "run_s_p95"]].isna().all() and quiet["throughput_per_s"] == 0.0
    assert held.id is not None


@pytest.mark.parametrize("window", [0, -5, timedelta(0), "1h", None])
def test_fetch_stats_refuses_a_window_that_is_not_a_positive_span(driver, window):
    with pytest.raises(ValueError, match="window must be a positive"):
        driver.fetch_stats(window=window)


def test_the_driver_shows_its_stats_in_a_notebook(driver):
    driver.push_many([Job("n", queue="imports"), Job("n", queue="reports")])
    page = driver._repr_html_()
    assert driver.table_name in page and "imports" in page and "reports" in page and "<table" in page
    driver.drop_table()
    assert "stats unavailable" in driver._repr_html_()  # a repr never raises


# -- dead letters --------------------------------------------------------------------


@pytest.mark.parametrize("last_error, expected", [
    ("ValueError: bad row 3\n\nTraceback (most recent call last):\n  ...", ("ValueError", "bad row 3")),
    ("pkg.errors.SchemaError: column x: missing", ("pkg.errors.SchemaError", "column x: missing")),
    ("KeyError: ", ("KeyError", "")),
    ("lease expired: no heartbeat for 60s from worker w1; attempts used up",
     ("LeaseExpired", "lease expired: no heartbeat for 60s from worker w1; attempts used up")),
    ("could not rebuild job 'etl': KeyError: 'x'", ("UnbuildableJob", "could not rebuild job 'etl': KeyError: 'x'")),
    ("boom", ("UnknownError", "boom")),
    (None, ("UnknownError", "")),
])
def test_split_error_reads_the_first_line(last_error, expected):
    assert split_error(last_error) == expected


def test_dead_letters_split_the_error_so_groupby_works(driver):
    now = db_now(driver)
    for n, error in enumerate(["ValueError: bad row 1\n\ntrace", "ValueError: bad row 2\n\ntrace",
                               "KeyError: 'amount'\n\ntrace", "boom"]):
        finished_job(driver, status="failed", due=now - timedelta(minutes=10 - n), wait=0, run=1, last_error=error)
    driver.push(Job("stats.job", max_retries=0, queue="leases"))
    driver.pop("leases")  # its worker dies: the lease runs out with its only attempt used
    assert driver.recover_stale_jobs(timeout=0) == 1

    dead = driver.dead_letter_jobs()
    assert dict(dead.dtypes.astype(str)) == DEAD_LETTER_COLUMNS
    assert dead.groupby("error_type").size().to_dict() == {"KeyError": 1, "LeaseExpired": 1, "UnknownError": 1,
                                                           "ValueError": 2}
    assert dead["error_message"].tolist()[:4] == ["lease expired: no heartbeat for 0s from worker "
                                                  f"{driver.worker_id}; attempts used up", "boom", "'amount'",
                                                  "bad row 2"]  # newest first
    assert driver.dead_letter_jobs(queue="leases")["error_type"].tolist() == ["LeaseExpired"]


def test_dead_letters_of_one_batch(driver):
    batch = driver.map("stats.chunk", ["a", "b", "c"], chunk_size=1)
    driver.push(Job("stats.chunk", "loose"))
    for job in driver.pop_many(4):
        job.last_error = f"RuntimeError: {job.payload}"
        driver.fail(job)
    assert len(driver.dead_letter_jobs()) == 4
    failures = driver.dead_letter_jobs(batch=batch.id)
    assert sorted(failures["error_message"]) == ["{'chunk': 0, 'items': ['a']}", "{'chunk': 1, 'items': ['b']}",
                                                 "{'chunk': 2, 'items': ['c']}"]
    assert set(failures["batch_id"]) == {batch.id}
    assert driver.dead_letter_jobs(batch="nope").empty


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
    ids = driver.push_many([Job("etl.b", i, queue="etl") for i in range(3)] + [Job("mail", i) for i in range(2)])
    for age, job_id in zip((50, 40, 30, 20, 10), ids):
        set_times(driver, job_id, created_at=now - timedelta(minutes=age))
    running = driver.pop("etl")  # the oldest due: a batch chunk
    failed = driver.pop("etl"); failed.last_error = "ValueError: x"; driver.fail(failed)

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
])
def test_jobs_refuses_bad_filters(driver, options, error, message):
    with pytest.raises(error, match=message):
        driver.jobs(**options)


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

    def count_deletes(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("DELETE"):
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


@pytest.mark.parametrize("older_than, chunk_size", [(-1, 10), ("1d", 10), (timedelta(days=-1), 10), (60, 0)])
def test_prune_refuses_bad_arguments(driver, older_than, chunk_size):
    with pytest.raises(ValueError, match="older_than|chunk_size"):
        driver.prune(older_than, chunk_size=chunk_size)
