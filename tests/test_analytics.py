"""The DataFrame views on each database: stats with percentiles over a window, and dead letters.

The history (``driver.jobs()``) and pruning are in test_history.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from kronix_data import Job
from kronix_data.analytics import DEAD_LETTER_COLUMNS, STATS_COLUMNS, split_error, typed_frame

from helpers import db_now, finished_job, set_times


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


def test_typed_frame_reads_every_form_a_driver_gives_a_timestamp_as_the_same_utc_instant():
    at = datetime(2026, 12, 1, 19, 10, 10, 892324, tzinfo=timezone.utc)
    forms = [at, at.replace(tzinfo=None), "2026-12-01 19:10:10.892324", int(at.timestamp()) * 1_000_000 + 892324]
    for form in forms:  # aware (psycopg), naive UTC (MariaDB), text (SQLite), epoch microseconds (raw_timestamp)
        frame = typed_frame([("a", 1, form), ("b", 2, None)],
                            {"id": "object", "n": "int64", "at": "datetime64[ns, UTC]"}, ["id", "n", "at"])
        assert frame["at"].tolist()[0] == at and frame["at"].isna().tolist() == [False, True], form
        assert dict(frame.dtypes.astype(str)) == {"id": "object", "n": "int64", "at": "datetime64[ns, UTC]"}
    names = typed_frame([("a", "etl"), ("b", None)], {"id": "object", "name": "object"}, ["id", "name"])
    assert names["name"].iloc[0] == "etl" and pd.isna(names["name"].iloc[1])  # as from_records reads text
    empty = typed_frame([], {"id": "object", "at": "datetime64[ns, UTC]"}, ["at", "id"])
    assert empty.empty and list(empty.columns) == ["id", "at"]
