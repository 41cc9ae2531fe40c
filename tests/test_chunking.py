"""Cutting data into chunk payloads, reading DataFrame chunks back, and idempotent enqueueing."""

from __future__ import annotations

import json
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from kronix_data import Batch, Job, as_frame, batches, enqueue_chunks, task
from kronix_data.chunking import chunks, default_batch_id, range_batch_id


@pytest.fixture
def frame() -> pd.DataFrame:
    """Every dtype a notebook user is likely to chunk, with missing values and a non-default index."""
    rows = 25
    frame = pd.DataFrame({
        "order": np.arange(rows, dtype="int64"),
        "amount": np.linspace(0.1, 1e6 / 3, rows),  # not representable in 10 digits: to_json would round it
        "customer": [f"c{i}" if i % 7 else None for i in range(rows)],
        "ordered_at": pd.date_range("2026-01-01 08:00", periods=rows, freq="37min"),
        "paid_at": pd.date_range("2026-03-29 00:30", periods=rows, freq="h", tz="Europe/Paris"),  # crosses DST
        "discount": [None if i % 5 == 0 else i / 10 for i in range(rows)],
        "express": [i % 2 == 0 for i in range(rows)],
        "items": pd.array([None if i == 3 else i for i in range(rows)], dtype="Int64"),
        "region": pd.Categorical(["north" if i % 3 else "south" for i in range(rows)], categories=["north", "south", "west"]),
        "delay": pd.to_timedelta(np.arange(rows) * 1.5, unit="s"),
    }, index=pd.RangeIndex(100, 100 + rows, name="row"))
    frame.loc[104, "ordered_at"] = pd.NaT
    return frame


def test_a_dataframe_is_cut_by_rows_and_every_chunk_reads_back_with_its_dtypes(frame):
    payloads = list(chunks(frame, 10, "json"))

    assert [(p["chunk"], p["start"], p["stop"]) for p in payloads] == [(0, 0, 10), (1, 10, 20), (2, 20, 25)]
    json.dumps(payloads, allow_nan=False)  # plain JSON, as stored
    first = payloads[0]["frame"]
    assert first["columns"] == list(frame.columns) and first["index"] == list(range(100, 110))
    assert first["data"][0][3] == "2026-01-01T08:00:00.000000"  # dates as ISO text
    assert first["data"][0][2] is None and first["data"][4][3] is None  # missing values are null
    restored = pd.concat([as_frame(json.loads(json.dumps(p))) for p in payloads])
    pd.testing.assert_frame_equal(restored, frame)  # exact floats, dtypes, categories, index


def test_as_frame_reads_pandas_own_split_json_text():
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    payload = {"chunk": 0, "frame": frame.to_json(orient="split")}
    pd.testing.assert_frame_equal(as_frame(payload), frame, check_dtype=False)


def test_as_frame_refuses_a_payload_that_is_not_a_dataframe_chunk():
    with pytest.raises(ValueError, match=r"'frame' key.*\['chunk', 'items'\]"):
        as_frame({"chunk": 0, "items": [1, 2]})


def test_a_range_is_cut_into_sub_ranges_without_materialising_it():
    huge = range(0, 10**15, 3)  # a list of it would not fit in memory
    payloads = chunks(huge, 10**14)
    assert next(payloads) == {"chunk": 0, "start": 0, "stop": 3 * 10**14, "step": 3}
    assert list(chunks(range(10, 35), 10)) == [
        {"chunk": 0, "start": 10, "stop": 20}, {"chunk": 1, "start": 20, "stop": 30}, {"chunk": 2, "start": 30, "stop": 35}]
    covered = [n for p in chunks(range(50, 0, -4), 3) for n in range(p["start"], p["stop"], p.get("step", 1))]
    assert covered == list(range(50, 0, -4))


def test_an_iterable_is_cut_into_json_items_with_dates_as_iso_text(tmp_path):
    values = [tmp_path / "a.csv", date(2026, 11, 28), datetime(2026, 11, 28, 6, 30, tzinfo=timezone.utc),
              pd.Timestamp("2026-11-28 07:00"), np.int64(7), np.float64(0.5), None, {"file": "x", "rows": [1, 2]}]
    assert list(chunks(iter(values), 3)) == [
        {"chunk": 0, "items": [str(tmp_path / "a.csv"), "2026-11-28", "2026-11-28T06:30:00+00:00"]},
        {"chunk": 1, "items": ["2026-11-28T07:00:00", 7, 0.5]},
        {"chunk": 2, "items": [None, {"file": "x", "rows": [1, 2]}]},
    ]
    days = pd.date_range("2026-11-01", "2026-11-30", freq="D")
    payloads = list(chunks(days, 7))
    assert len(payloads) == 5 and payloads[0]["items"][0] == "2026-11-01T00:00:00"


@pytest.mark.parametrize("data, error, message", [
    ("s3://bucket/file.csv", TypeError, "cut into characters"),
    ({"a": 1}, TypeError, "mapping"),
    (42, TypeError, "must be a DataFrame, a range or an iterable"),
    ([1, 2, float("nan")], ValueError, "item 2 of data is nan"),
    ([1, object()], TypeError, "item 1 of data has type object"),
    (pd.DataFrame({"x": [1.0, np.inf]}), ValueError, "column 'x'.*infinity"),
])
def test_data_that_cannot_travel_as_json_is_refused_naming_what(data, error, message):
    with pytest.raises(error, match=message):
        list(chunks(data, 2, "json"))


@pytest.mark.parametrize("size", [0, -1, 2.5, True, "10"])
def test_chunk_size_must_be_a_positive_int(size):
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        chunks([1, 2], size)


def stored_jobs(driver) -> list[tuple]:
    c = driver.table.c
    with driver.engine.connect() as conn:
        return conn.execute(sa.select(c.job_key, c.batch_id, c.name, c.queue, c.max_retries, c.payload)
                            .order_by(c.job_key)).all()


def test_enqueueing_a_dataframe_stores_one_keyed_job_per_chunk(driver, frame):
    batch = enqueue_chunks(driver, "etl.clean", frame, chunk_size=10, queue="etl", max_retries=5)

    assert isinstance(batch, Batch) and batch.name == "etl.clean" and batch.id.startswith("etl.clean-")
    rows = stored_jobs(driver)
    assert [row.job_key for row in rows] == [f"{batch.id}:{n}" for n in range(3)]
    assert {(row.batch_id, row.name, row.queue, row.max_retries) for row in rows} == {(batch.id, "etl.clean", "etl", 5)}
    jobs = sorted(driver.pop_many(10, "etl"), key=lambda job: job.payload["chunk"])  # with their Parquet bytes
    pd.testing.assert_frame_equal(pd.concat(as_frame(job.payload) for job in jobs), frame)


def test_re_running_the_same_cell_enqueues_nothing_and_returns_the_same_batch(driver, frame):
    first = driver.map("etl.clean", frame, chunk_size=10)
    before = stored_jobs(driver)
    job = driver.pop(); driver.complete(job)  # some chunks already done, as after a real run

    again = driver.map("etl.clean", frame.copy(), chunk_size=10)

    assert again == first and again.id == first.id
    assert stored_jobs(driver) == before and again.progress()["total"] == 3
    assert again.progress()["completed"] == 1  # the done chunk was not enqueued again


def test_different_data_chunking_or_queue_make_a_different_batch(driver, frame):
    base = driver.map("etl.clean", frame, chunk_size=10)
    changed = frame.copy()
    changed.loc[100, "amount"] += 1e-9
    others = [driver.map("etl.clean", changed, chunk_size=10), driver.map("etl.clean", frame, chunk_size=5),
              driver.map("etl.clean", frame, chunk_size=10, queue="other"), driver.map("etl.load", frame, chunk_size=10)]
    assert len({base.id, *(batch.id for batch in others)}) == 5
    assert len(stored_jobs(driver)) == 3 + 3 + 5 + 3 + 3


def test_an_explicit_batch_name_keys_the_chunks_under_it(driver):
    days = pd.date_range("2026-11-01", periods=10, freq="D")
    batch = driver.map("etl.daily", days, chunk_size=4, batch="nightly-2026-11-28")

    assert batch.id == "nightly-2026-11-28"
    assert [row.job_key for row in stored_jobs(driver)] == [f"nightly-2026-11-28:{n}" for n in range(3)]
    assert driver.map("etl.daily", days, chunk_size=4, batch="nightly-2026-11-28") == batch
    assert len(stored_jobs(driver)) == 3


def test_a_range_and_a_list_of_paths_enqueue_as_chunks(driver, tmp_path):
    ids = driver.map("etl.ids", range(1_000_000), chunk_size=250_000)
    files = driver.map("etl.files", [tmp_path / f"part-{n}.csv" for n in range(5)], chunk_size=2)
    payloads = {row.job_key: json.loads(row.payload) for row in stored_jobs(driver)}
    assert payloads[f"{ids.id}:3"] == {"chunk": 3, "start": 750_000, "stop": 1_000_000}
    assert payloads[f"{files.id}:2"] == {"chunk": 2, "items": [str(tmp_path / "part-4.csv")]}


def test_a_task_gives_its_name_queue_and_retries(driver):
    @task(name="chunking.task", queue="heavy", max_retries=7)
    def heavy(payload):
        return None

    batch = driver.map(heavy, [1, 2, 3], chunk_size=2)
    rows = stored_jobs(driver)
    assert batch.name == "chunking.task"
    assert {(row.name, row.queue, row.max_retries) for row in rows} == {("chunking.task", "heavy", 7)}
    assert driver.pop("heavy").runnable  # rebuilt as the task's job


def test_bad_input_writes_nothing(driver):
    with pytest.raises(ValueError, match="empty"):
        driver.map("etl.clean", pd.DataFrame({"a": []}))
    with pytest.raises(ValueError, match="item 3 of data"):
        driver.map("etl.clean", [1, 2, 3, float("inf")], chunk_size=1)
    with pytest.raises(ValueError, match="batch"):
        driver.map("etl.clean", [1], batch="x" * 129)
    with pytest.raises(TypeError, match="name must be"):
        driver.map(None, [1])
    assert stored_jobs(driver) == []


def test_re_running_restores_only_the_chunks_that_are_gone(driver, frame):
    batch = driver.map("etl.clean", frame, chunk_size=10)
    with driver.engine.begin() as conn:  # say chunk 1 was pruned
        conn.execute(driver.table.delete().where(driver.table.c.job_key == f"{batch.id}:1"))
    assert driver.map("etl.clean", frame, chunk_size=10) == batch
    assert [row.job_key for row in stored_jobs(driver)] == [f"{batch.id}:{n}" for n in range(3)]


def test_a_frame_with_list_cells_is_idempotent_too(driver):
    frame = pd.DataFrame({"file": ["a", "b", "c"], "tags": [["x"], [], ["y", "z"]]})
    batch = driver.map("etl.tags", frame, chunk_size=2)
    assert driver.map("etl.tags", frame.copy(), chunk_size=2) == batch and len(stored_jobs(driver)) == 2
    jobs = sorted(driver.pop_many(10), key=lambda job: job.payload["chunk"])
    assert as_frame(jobs[1].payload)["tags"].tolist() == [["y", "z"]]


# -- window by window (map at the speed of push_many) -----------------------------


def test_a_range_cut_from_a_later_chunk_numbers_its_chunks_from_there():
    assert list(chunks(range(10, 35), 10, first=1)) == [{"chunk": 1, "start": 20, "stop": 30},
                                                        {"chunk": 2, "start": 30, "stop": 35}]
    with pytest.raises(ValueError, match="only a DataFrame or a range"):
        chunks([1, 2, 3], 1, first=1)


def test_a_range_batch_id_comes_from_its_bounds():
    assert range_batch_id("n", "q", range(0, 10, 3), 2) == range_batch_id("n", "q", range(0, 11, 3), 2)
    assert len({range_batch_id("n", "q", range(0, 10), 2), range_batch_id("n", "q", range(1, 11), 2),
                range_batch_id("n", "q", range(0, 10), 3), range_batch_id("n", "other", range(0, 10), 2)}) == 4


@pytest.fixture
def small_windows(monkeypatch):
    """Windows of 4 chunks, so a few chunks span several windows (the look-up, rows and insert of each),
    and inserts of about 100 bytes of payload, so a window is inserted in parts."""
    monkeypatch.setattr(batches, "CHUNK_WINDOW", 4)
    monkeypatch.setattr(batches, "_INSERT_BYTES", 100)


def test_a_batch_over_many_windows_is_stored_once_and_re_run_window_by_window(driver, small_windows):
    batch = driver.map("etl.ids", range(50), chunk_size=3)  # 17 chunks: windows of 4, 4, 4, 4, 1
    keys = [f"{batch.id}:{n}" for n in range(17)]
    assert sorted(row.job_key for row in stored_jobs(driver)) == sorted(keys)
    with driver.engine.begin() as conn:  # chunks of the second and last windows were pruned
        conn.execute(driver.table.delete().where(driver.table.c.job_key.in_([keys[5], keys[16]])))

    assert driver.map("etl.ids", range(50), chunk_size=3) == batch
    payloads = {row.job_key: json.loads(row.payload) for row in stored_jobs(driver)}
    assert sorted(payloads) == sorted(keys)
    assert payloads[keys[16]] == {"chunk": 16, "start": 48, "stop": 50}
    assert driver.map("etl.ids", range(50), chunk_size=3) == batch and len(stored_jobs(driver)) == 17


def test_an_iterable_read_once_keeps_its_content_hash_as_batch_id(driver, small_windows):
    items = [f"file-{n}.csv" for n in range(23)]
    batch = driver.map("etl.files", (item for item in items), chunk_size=2)  # a generator: read once

    assert batch.id == default_batch_id("etl.files", "default", chunks(items, 2))  # the id it always had
    assert driver.map("etl.files", iter(items), chunk_size=2) == batch and len(stored_jobs(driver)) == 12
    stored = {row.job_key: json.loads(row.payload) for row in stored_jobs(driver)}
    assert stored[f"{batch.id}:11"] == {"chunk": 11, "items": ["file-22.csv"]}


def test_a_key_stored_meanwhile_outside_the_batch_is_skipped_not_an_error(driver, small_windows):
    # The batch has no job, so its chunks go through the fast insert; one key is taken: the batch is
    # stored again, carefully, and that chunk skipped, as the INSERT skipping stored keys always did.
    driver.push(Job("by.hand", {"n": 1}, key="nightly:5"))
    batch = driver.map("etl.ids", range(30), chunk_size=3, batch="nightly")
    rows = stored_jobs(driver)
    assert sorted(row.job_key for row in rows) == sorted(f"nightly:{n}" for n in range(10))
    assert {row.name for row in rows if row.job_key == "nightly:5"} == {"by.hand"}
    assert batch.progress()["total"] == 9


def test_chunks_of_every_window_wait_for_after_or_are_cancelled_with_it(driver, small_windows):
    parent = driver.push(Job("parent", {}))
    waiting = driver.map("child", range(20), chunk_size=2, after=parent)  # 10 chunks, 3 windows
    assert waiting.progress()["waiting"] == 10
    gone = driver.push(Job("gone", {}))
    driver.cancel(gone)
    cancelled = driver.map("child", range(100, 120), chunk_size=2, after=gone)
    assert cancelled.progress()["cancelled"] == 10


def test_turns_and_row_totals_hold_across_windows(driver, small_windows):
    frame = pd.DataFrame({"a": range(25)})
    batch = driver.map("etl.rows", frame, chunk_size=3)  # 9 chunks, the last of 1 row
    c = driver.table.c
    with driver.engine.connect() as conn:
        rows = conn.execute(sa.select(c.job_key, c.fair_rank, c.progress_total)).all()
    by_chunk = {int(key.rsplit(":", 1)[1]): (rank, total) for key, rank, total in rows}
    assert [by_chunk[n][0] - by_chunk[0][0] for n in range(9)] == list(range(9))
    assert [by_chunk[n][1] for n in range(9)] == [3] * 8 + [1]
    assert batch.progress()["units_total"] == 25
