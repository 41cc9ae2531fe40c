"""DataFrame chunks and results as Parquet bytes in ``<table>_data``: exact round trips on every database,
the JSON format kept selectable, the size cap, and the frame-taking task."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kronix_data import InvalidInputError, Job, JobStatus, Worker, as_frame, task
from kronix_data.columnar import concat_frames, frame_to_parquet, parquet_to_frame

from helpers import select

ZONES = ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"]


def _column(kind: str, draw, rows: int) -> pd.Series | pd.Categorical | np.ndarray:
    """One column of ``rows`` values of a kind, with missing values where the kind has them."""
    missing = draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    if kind == "int64":
        return np.array(draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=rows, max_size=rows)), dtype="int64")
    if kind == "uint8":
        return np.array(draw(st.lists(st.integers(0, 255), min_size=rows, max_size=rows)), dtype="uint8")
    if kind in ("float64", "float32"):
        values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32 if kind == "float32" else 64),
                               min_size=rows, max_size=rows))
        return np.array([np.nan if gap else value for value, gap in zip(values, missing)], dtype=kind)
    if kind == "Int64":
        values = draw(st.lists(st.integers(-2**40, 2**40), min_size=rows, max_size=rows))
        return pd.array([None if gap else value for value, gap in zip(values, missing)], dtype="Int64")
    if kind == "bool":
        return np.array(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)), dtype=bool)
    if kind == "object":  # text with None: the None comes back as None
        values = draw(st.lists(st.text(max_size=8), min_size=rows, max_size=rows))
        return pd.Series([None if gap else value for value, gap in zip(values, missing)], dtype=object).to_numpy()
    if kind in ("datetime", "datetime_tz"):
        values = draw(st.lists(st.integers(-2**50, 2**50), min_size=rows, max_size=rows))
        times = pd.to_datetime([None if gap else value for value, gap in zip(values, missing)], unit="us")
        times = times.astype(draw(st.sampled_from(["datetime64[ns]", "datetime64[us]"])))
        return times.tz_localize("UTC").tz_convert(draw(st.sampled_from(ZONES))) if kind == "datetime_tz" else times
    if kind == "timedelta":
        values = draw(st.lists(st.integers(-2**40, 2**40), min_size=rows, max_size=rows))
        return pd.to_timedelta([None if gap else value for value, gap in zip(values, missing)], unit="us")
    if kind in ("category", "category_int"):
        pool = ["north", "south", "east", "west", "ünï"] if kind == "category" else [3, 1, 4, 15, 9]
        categories = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=5, unique=True))
        values = draw(st.lists(st.sampled_from(categories), min_size=rows, max_size=rows))
        return pd.Categorical([None if gap else value for value, gap in zip(values, missing)],
                              categories=categories, ordered=draw(st.booleans()))  # unused categories too
    raise AssertionError(kind)


KINDS = ["int64", "uint8", "float64", "float32", "Int64", "bool", "object", "datetime", "datetime_tz",
         "timedelta", "category", "category_int"]


@st.composite
def frames(draw) -> pd.DataFrame:
    rows = draw(st.integers(1, 12))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=0, max_size=6))
    labels = draw(st.lists(st.one_of(st.text(min_size=1, max_size=6), st.integers(0, 50)),
                           min_size=len(kinds), max_size=len(kinds)))
    index_kind = draw(st.sampled_from(["range", "named range", "int", "text", "datetime_tz"]))
    if index_kind in ("range", "named range"):
        start, step = draw(st.integers(-100, 100)), draw(st.sampled_from([1, 2, -3]))
        index = pd.RangeIndex(start, start + step * rows, step, name="row" if index_kind == "named range" else None)
    elif index_kind == "int":
        index = pd.Index(draw(st.lists(st.integers(-1000, 1000), min_size=rows, max_size=rows)), dtype="int64",
                         name=draw(st.sampled_from([None, "id", 7])))
    elif index_kind == "text":
        index = pd.Index(draw(st.lists(st.text(max_size=5), min_size=rows, max_size=rows)), dtype=object, name="key")
    else:
        index = pd.date_range("2026-03-29", periods=rows, freq="37min", tz=draw(st.sampled_from(ZONES)), name="at")
        index.freq = None
    frame = pd.DataFrame(index=index)
    for position, (kind, label) in enumerate(zip(kinds, labels)):
        frame.insert(position, label, _column(kind, draw, rows), allow_duplicates=True)
    return frame


def assert_same(left: pd.DataFrame, right: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(left, right, check_exact=True, check_index_type=True, check_column_type=True,
                                  check_categorical=True, check_freq=False)
    assert type(left.index) is type(right.index)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(frame=frames(), chunk_size=st.integers(1, 5))
def test_random_frames_round_trip_exactly_through_the_database_as_chunks_and_as_results(driver, frame, chunk_size):
    """dtypes, NaN/None, tz-aware times, categoricals (unused categories, order), the index (RangeIndex,
    named, non-default) and the column labels: every chunk a worker gets, and every DataFrame a task
    returns, is the frame itself."""
    batch = driver.map("columnar.echo", frame, chunk_size, batch=f"b{uuid.uuid4().hex}")
    jobs = driver.pop_many(1000)
    assert len(jobs) == -(-len(frame) // chunk_size)
    for job in jobs:
        assert_same(as_frame(job.payload), frame.iloc[job.payload["start"]:job.payload["stop"]])
    for job, part in zip(jobs, (as_frame(job.payload) for job in jobs)):
        job.result = part
    assert driver.complete_many(jobs) == len(jobs)
    for job in jobs:
        assert_same(driver.get_job(job.id).result, as_frame(job.payload))
    assert batch.done


def test_chunks_travel_as_parquet_beside_the_row_not_in_its_payload(driver, db_url):
    frame = pd.DataFrame({"x": np.arange(1000.0), "label": ["a", "b"] * 500})
    batch = driver.map("columnar.echo", frame, 400)
    table = driver.table_name
    payloads = [json.loads(text) for (text,) in select(db_url, f"SELECT payload FROM {table} ORDER BY job_key")]
    assert payloads == [{"chunk": n, "start": start, "stop": stop, "format": "parquet"}
                        for n, (start, stop) in enumerate([(0, 400), (400, 800), (800, 1000)])]
    stored = select(db_url, f"SELECT kind, data FROM {table}_data")
    assert len(stored) == 3 and {kind for kind, _ in stored} == {"chunk"}
    assert all(bytes(data)[:4] == b"PAR1" for _, data in stored)
    assert batch.progress()["units_total"] == 1000  # rows are still the progress total of a chunk

    assert driver.map("columnar.echo", frame, 400) == batch  # the idempotent re-run writes nothing
    assert len(select(db_url, f"SELECT job_id FROM {table}_data")) == 3


@task(name="columnar.total", frame=True)
def total(frame: pd.DataFrame) -> pd.DataFrame:
    """Takes the chunk's DataFrame itself and returns one: a groupby per chunk."""
    return frame.groupby("carrier", observed=True).agg(flights=("delay", "size"), delay=("delay", "sum"))


@task(name="columnar.by_payload")
def by_payload(payload) -> list[dict]:
    frame = as_frame(payload)
    return frame.assign(delay=frame["delay"] * 2).to_dict("records")


def flights(rows: int = 90) -> pd.DataFrame:
    return pd.DataFrame({"carrier": pd.Categorical(["AA", "UA", "DL"] * (rows // 3)),
                         "delay": np.arange(rows, dtype="float64")})


@pytest.mark.parametrize("chunk_format", ["parquet", "json"])
def test_a_frame_task_takes_the_dataframe_and_its_frames_concatenate_through_arrow(driver, chunk_format):
    data = flights()
    batch = driver.map(total, data, 30, chunk_format=chunk_format)
    Worker(driver, burst=True, listen=False).run()

    results = batch.results()
    expected = pd.concat([total(data.iloc[start:start + 30]).reset_index().assign(chunk=n)
                          for n, start in enumerate(range(0, 90, 30))], ignore_index=True)
    assert list(results.columns) == ["chunk", "carrier", "flights", "delay"]
    assert results["chunk"].tolist() == expected["chunk"].tolist()
    assert results["carrier"].astype(str).tolist() == expected["carrier"].astype(str).tolist()
    assert results["delay"].tolist() == expected["delay"].tolist()
    assert total(data.iloc[:30]).equals(total({"chunk": 0, "format": "parquet",
                                               "parquet": frame_to_parquet(data.iloc[:30])}))


def test_a_json_chunk_stored_by_an_earlier_release_still_runs(driver, db_url):
    """Old payloads (rows in the JSON) are read as before, by as_frame and by frame tasks alike."""
    data = flights(9)
    batch = driver.map(by_payload, data, 3, chunk_format="json")
    framed = driver.map(total, data, 3, chunk_format="json", batch="old-json-total")
    assert not select(db_url, f"SELECT job_id FROM {driver.table_name}_data")
    Worker(driver, burst=True, listen=False).run()
    assert batch.results()["delay"].tolist() == [2.0 * n for n in range(9)]
    assert framed.results()["flights"].sum() == 9


def test_a_chunk_over_the_size_cap_is_refused_naming_it_and_nothing_is_written(driver, db_url):
    driver.store.dialect.data_cap_bytes = 50_000  # the cap as configured (MariaDB: at most max_allowed_packet/2)
    driver.store._data_cap = None
    noise = pd.DataFrame({"x": np.random.default_rng(1).random(20_000)})  # incompressible: ~160 kB a chunk
    with pytest.raises(InvalidInputError, match=r"chunk 0 of batch 'big'.* is [\d,]+ bytes of Parquet, over the "
                                                r"50,000 bytes one row of t_\w+_data may hold"):
        driver.map("columnar.echo", noise, 10_000, batch="big")
    assert driver.size() == 0 and not select(db_url, f"SELECT job_id FROM {driver.table_name}_data")


def test_the_cap_is_read_from_the_database(driver, backend, db_url):
    cap, why = driver.store.max_data_bytes()
    if backend == "mariadb":
        packet = int(select(db_url, "SELECT @@max_allowed_packet")[0][0])
        assert cap == min(64 * 1024 * 1024, (packet - 65536) // 2) and "max_allowed_packet" in why
    else:
        assert cap == 64 * 1024 * 1024 and "kronix's cap" in why


@task(name="columnar.big_result", frame=True)
def big_result(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"noise": np.random.default_rng(2).random(20_000)})


def test_a_dataframe_result_over_the_cap_fails_the_job_with_the_sizes(driver):
    driver.store.dialect.data_cap_bytes = 50_000
    driver.store._data_cap = None
    batch = driver.map(big_result, flights(3), 3, max_retries=0)
    Worker(driver, burst=True, listen=False).run()
    failure = batch.failures()
    assert len(failure) == 1 and "the DataFrame result of job 'columnar.big_result' is" in failure["last_error"][0]
    assert "over the 50,000 bytes" in failure["last_error"][0]


def test_pruned_jobs_take_their_data_with_them(driver, db_url):
    driver.map("columnar.echo", flights(6), 3)
    jobs = driver.pop_many(10)
    for job in jobs:
        job.result = as_frame(job.payload)
    driver.complete_many(jobs)
    assert len(select(db_url, f"SELECT job_id FROM {driver.table_name}_data")) == 4  # 2 chunks, 2 results
    driver.prune(0)
    assert not select(db_url, f"SELECT job_id FROM {driver.table_name}_data")


def test_a_plain_job_result_and_a_payload_stay_json(driver):
    driver.push(Job("plain", {"a": 1}))
    job = driver.pop()
    job.result = {"rows": 3}
    driver.complete(job)
    assert driver.get_job(job.id).result == {"rows": 3} and driver.get_job(job.id).status == JobStatus.COMPLETED


def test_parquet_that_is_not_a_frame_or_not_parquet_is_a_clear_error():
    with pytest.raises(InvalidInputError, match="is not Parquet"):
        parquet_to_frame(b"PAR1 but no more")
    with pytest.raises(InvalidInputError, match="not readable Parquet"):
        parquet_to_frame(b"PAR1" + b"\x00" * 64 + b"PAR1")
    with pytest.raises(InvalidInputError, match="column 'mixed'"):
        frame_to_parquet(pd.DataFrame({"ok": [1, 2], "mixed": [1, "a"]}))


def test_results_concatenate_with_missing_columns_as_nulls():
    parts = [(0, pd.DataFrame({"a": [1, 2]})), (1, pd.DataFrame({"a": [3], "b": ["x"]}))]
    combined = concat_frames(parts)
    assert combined["chunk"].tolist() == [0, 0, 1] and combined["a"].tolist() == [1, 2, 3]
    assert combined["b"].isna().tolist() == [True, True, False]


def test_a_frame_task_in_a_child_process_takes_and_returns_dataframes(driver):
    import os

    import isolation_jobs

    data = pd.DataFrame({"k": pd.Categorical(["a", "b"] * 6), "v": np.arange(12.0)})
    batch = driver.map(isolation_jobs.frame_total, data, 4)
    Worker(driver, burst=True, listen=False).run()
    results = batch.results()
    assert results["chunk"].tolist() == [0, 0, 1, 1, 2, 2] and results["v"].sum() == data["v"].sum()
    assert os.getpid() not in set(results["pid"])  # ran in the child
