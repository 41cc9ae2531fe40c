"""Batch handles over real chunk jobs run by a real in-process Worker, on each database."""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from kronix_data import DatabaseQueueDriver, Worker, as_frame, task
from kronix_data.analytics import DEAD_LETTER_COLUMNS
from kronix_data.batches import BATCH_COLUMNS

from helpers import run_burst

#: Flipped by a test to "fix the bug" before retrying the failed chunks.
accept_negative = {"value": False}


@task(name="batches.clean", max_retries=0)
def clean(payload):
    """Double the amounts of a chunk; a chunk with a negative amount fails."""
    frame = as_frame(payload)
    if (frame["amount"] < 0).any() and not accept_negative["value"]:
        bad = int(frame.index[frame["amount"] < 0][0])
        raise ValueError(f"negative amount in row {bad}")
    return frame.assign(doubled=frame["amount"] * 2)[["order", "doubled"]].to_dict("records")


@task(name="batches.summary")
def summary(payload):
    return {"first": payload["items"][0], "count": len(payload["items"])}


@task(name="batches.columns")
def columns(payload):
    return {"n": list(range(payload["start"], payload["stop"])), "square": [n * n for n in range(payload["start"], payload["stop"])]}


@pytest.fixture(autouse=True)
def _reset_the_fix():
    accept_negative["value"] = False
    yield
    accept_negative["value"] = False


def sales(rows: int = 50, bad_rows: tuple[int, ...] = ()) -> pd.DataFrame:
    frame = pd.DataFrame({"order": np.arange(rows), "amount": np.arange(rows) * 1.5})
    frame.loc[list(bad_rows), "amount"] = -1.0
    return frame


def test_progress_counts_and_results_concatenate_record_chunks(driver):
    batch = driver.map(clean, sales(50), chunk_size=10)

    assert batch.progress() == {"total": 5, "pending": 5, "processing": 0, "completed": 0, "failed": 0, "waiting": 0, "cancelled": 0,
                                "units_done": 0, "units_total": 50, "units_running": 0}  # rows: a DataFrame's chunks
    assert not batch.done
    assert run_burst(driver, concurrency=3).stats.completed == 5

    assert batch.done and batch.progress() == {"total": 5, "pending": 0, "processing": 0, "completed": 5, "failed": 0, "waiting": 0, "cancelled": 0,
                                               "units_done": 50, "units_total": 50, "units_running": 0}
    results = batch.wait(progress=False).results()
    assert list(results.columns) == ["chunk", "order", "doubled"]
    assert results["order"].tolist() == list(range(50))  # chunk order, each chunk's rows in order
    assert results["chunk"].tolist() == [n // 10 for n in range(50)]
    assert results["doubled"].tolist() == [n * 3.0 for n in range(50)]
    assert batch.failures().empty


def test_results_are_one_row_per_chunk_when_they_are_not_records(driver):
    batch = driver.map(summary, [f"file-{n}.csv" for n in range(7)], chunk_size=3)
    run_burst(driver, concurrency=3)

    results = batch.results()
    assert list(results.columns) == ["chunk", "job_id", "result"]
    assert dict(results.dtypes.astype(str)) == {"chunk": "int64", "job_id": "object", "result": "object"}
    assert results["chunk"].tolist() == [0, 1, 2]
    assert results["result"].tolist() == [{"first": "file-0.csv", "count": 3}, {"first": "file-3.csv", "count": 3},
                                          {"first": "file-6.csv", "count": 1}]
    assert set(results["job_id"]) == set(driver.jobs(batch=batch.id)["id"])


def test_results_concatenate_dicts_of_columns(driver):
    batch = driver.map(columns, range(8), chunk_size=3)
    run_burst(driver, concurrency=3)
    results = batch.results()
    assert results.to_dict("list") == {"chunk": [0, 0, 0, 1, 1, 1, 2, 2], "n": list(range(8)),
                                       "square": [n * n for n in range(8)]}


def test_results_of_a_batch_with_nothing_completed_is_a_typed_empty_frame(driver):
    batch = driver.map(summary, ["a"], chunk_size=1)
    results = batch.results()
    assert results.empty and dict(results.dtypes.astype(str)) == {"chunk": "int64", "job_id": "object", "result": "object"}


def test_failures_are_the_batchs_dead_letters_and_retry_failures_runs_them_again(driver):
    batch = driver.map(clean, sales(40, bad_rows=(13, 35)), chunk_size=10)
    other = driver.map(clean, sales(10, bad_rows=(2,)), chunk_size=10, batch="someone-else")
    run_burst(driver, concurrency=3)

    assert batch.done and batch.progress()["failed"] == 2 and batch.progress()["completed"] == 2
    failures = batch.failures()
    assert dict(failures.dtypes.astype(str)) == DEAD_LETTER_COLUMNS
    assert sorted(failures["error_message"]) == ["negative amount in row 13", "negative amount in row 35"]
    assert failures["error_type"].tolist() == ["ValueError", "ValueError"]
    assert set(failures["batch_id"]) == {batch.id}
    assert sorted(chunk["chunk"] for chunk in failures["payload"]) == [1, 3]
    assert batch.results()["order"].tolist() == list(range(0, 10)) + list(range(20, 30))

    accept_negative["value"] = True  # the fix
    assert batch.retry_failures() == 2
    assert batch.progress()["pending"] == 2 and other.progress()["failed"] == 1  # only this batch's
    run_burst(driver, concurrency=3)

    assert batch.progress()["completed"] == 4 and batch.failures().empty
    assert batch.results()["order"].tolist() == list(range(40))
    assert batch.retry_failures() == 0


def test_a_batch_is_found_again_from_a_new_driver_after_a_restart(driver, db_url, table_name):
    batch = driver.map(clean, sales(30, bad_rows=(25,)), chunk_size=10)
    run_burst(driver, concurrency=3)
    driver.close()

    restarted = DatabaseQueueDriver(db_url, table=table_name)  # a new kernel: nothing kept but the id
    try:
        found = restarted.batch(batch.id)
        assert found == batch and found.name == "batches.clean" and found.driver is restarted
        assert found.progress() == {"total": 3, "pending": 0, "processing": 0, "completed": 2, "failed": 1, "waiting": 0, "cancelled": 0,
                                    "units_done": 20, "units_total": 30, "units_running": 0}
        assert found.results()["order"].tolist() == list(range(20))
        assert found.failures()["error_message"].tolist() == ["negative amount in row 25"]
    finally:
        restarted.close()


def test_an_unknown_batch_id_is_a_lookup_error_naming_it(driver):
    driver.map(summary, ["a"], chunk_size=1)
    with pytest.raises(LookupError, match="no job has batch id 'nightly-1999-01-01' in table"):
        driver.batch("nightly-1999-01-01")


def test_wait_times_out_while_chunks_are_pending(driver):
    batch = driver.map(summary, ["a", "b"], chunk_size=1)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"batch '{batch.id}' is not done after 0.3s.*'pending': 2"):
        batch.wait(progress=False, timeout=0.3, poll_interval=0.05)
    assert 0.3 <= time.monotonic() - started < 2
    assert batch.progress()["pending"] == 2  # nothing was touched


def test_wait_follows_a_running_worker_with_a_progress_bar(driver, capsys):
    batch = driver.map(clean, sales(60, bad_rows=(55,)), chunk_size=10)
    worker = Worker(driver, concurrency=2, lease_timeout=10).start()  # as in a notebook
    try:
        assert batch.wait(progress=True, timeout=60, poll_interval=0.05) is batch
    finally:
        worker.stop()
    assert batch.progress()["completed"] == 5 and batch.progress()["failed"] == 1
    drawn = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    bar = drawn[-1]
    assert "batches.clean" in bar and "60/60 rows" in bar and "failed=1" in bar  # a DataFrame's batch counts rows
    assert "\x1b[31m" in bar  # red once a chunk failed (tqdm's colour in a terminal)
    assert not any("\x1b[31m" in line for line in drawn if "failed=0" in line)  # not before
    assert not any(re.search(r"\b0/0\b|0chunk", line) for line in drawn)  # its real length from the start


def test_repr_and_html_summary(driver):
    batch = driver.map(summary, ["a", "b", "c"], chunk_size=1, batch="report-<1>")
    run_burst(driver, concurrency=3)
    assert repr(batch) == f"Batch('report-<1>', name='batches.summary', table='{driver.table_name}')"
    page = batch._repr_html_()
    assert "report-&lt;1&gt;" in page and "batches.summary" in page and "3/3 finished · 3 completed" in page
    assert "kronix-bar" in page and "width: 100.0%" in page and "padding: 3px 8px" in page  # a bar, a padded table
    assert "<style" not in page  # inline styles: an untrusted notebook drops style blocks


def test_batches_lists_every_batch_with_its_counts(driver):
    empty = driver.batches()
    assert empty.empty and dict(empty.dtypes.astype(str)) == BATCH_COLUMNS

    first = driver.map(clean, sales(20, bad_rows=(3,)), chunk_size=10)
    run_burst(driver, concurrency=3)
    time.sleep(0.01)
    second = driver.map(summary, ["x", "y", "z"], chunk_size=2)
    driver.push_many([clean.job({"not": "a batch"})])  # jobs without a batch are not listed

    frame = driver.batches()
    assert dict(frame.dtypes.astype(str)) == BATCH_COLUMNS
    assert frame["batch_id"].tolist() == [second.id, first.id]  # newest first
    rows = frame.set_index("batch_id")
    assert rows.loc[first.id, ["name", "total", "pending", "processing", "completed", "failed"]].tolist() == [
        "batches.clean", 2, 0, 0, 1, 1]
    assert rows.loc[second.id, ["total", "pending", "completed"]].tolist() == [2, 2, 0]
    assert pd.isna(rows.loc[second.id, "finished_at"]) and rows.loc[first.id, "finished_at"] >= rows.loc[
        first.id, "created_at"]
    assert driver.batches(since=timedelta(minutes=10))["batch_id"].tolist() == [second.id, first.id]
    with driver.engine.begin() as conn:  # the first batch's jobs were all made long ago
        conn.execute(driver.table.update().where(driver.table.c.batch_id == first.id)
                     .values(created_at=datetime(2020, 1, 1, tzinfo=timezone.utc)))
    recent = driver.batches(since=timedelta(minutes=10))
    assert recent["batch_id"].tolist() == [second.id] and recent["total"].tolist() == [2]
    assert driver.batches(since=datetime(2019, 12, 31, tzinfo=timezone.utc))["batch_id"].tolist() == [second.id, first.id]
    assert driver.batches(since=pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=1)).empty
