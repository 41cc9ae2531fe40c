"""``driver.timeline()`` on each database: counts per interval and queue from rows with known times
(relative to the database's clock, so every expectation is exact), zero-filling, filters, the frame's
shape when empty, bad input, and that it reads where the other analytics read (``read_db``)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pandas as pd
import pytest

from helpers import database_url, db_now, finished_job, set_times, unique_table
from kronix_data import DatabaseQueueDriver, InvalidInputError, Job
from kronix_data.timeline import MAX_INTERVALS, TIMELINE_COLUMNS, interval_seconds


def minute(moment: datetime) -> pd.Timestamp:
    return pd.Timestamp(moment).floor("min")


def test_an_empty_table_gives_a_typed_empty_frame(driver):
    frame = driver.timeline()
    assert frame.empty and dict(frame.dtypes.astype(str)) == TIMELINE_COLUMNS
    assert frame.attrs["replica_lag_s"] == 0.0


def test_started_completed_and_failed_land_in_their_interval_per_queue(driver):
    now = db_now(driver)
    base = minute(now).to_pydatetime() - timedelta(minutes=10)  # a minute boundary, 10 minutes ago
    # Claimed at base+1s, finished at base+61s: started in one minute, completed in the next.
    finished_job(driver, due=base, wait=1, run=60)
    # Finished exactly on a boundary: counted in the minute that starts there, never the one before.
    finished_job(driver, queue="reports", due=base + timedelta(minutes=2), wait=30, run=30)
    finished_job(driver, queue="reports", status="failed", due=base + timedelta(minutes=2), wait=5, run=10,
                 last_error="ValueError: bad row")
    driver.push(Job("stats.job"))
    running = driver.pop()  # running now: started in the current minute
    assert running is not None
    claimed = driver.jobs(status="processing")["reserved_at"].iloc[0]
    frame = driver.timeline(freq="1min", since=timedelta(minutes=15))
    assert dict(frame.dtypes.astype(str)) == TIMELINE_COLUMNS
    assert frame["queue"].unique().tolist() == ["default", "reports"]
    nonzero = frame[(frame[["started", "completed", "failed"]] != 0).any(axis=1)]
    got = {(row.interval, row.queue): (row.started, row.completed, row.failed) for row in nonzero.itertuples()}
    at = lambda minutes: pd.Timestamp(base + timedelta(minutes=minutes))  # noqa: E731
    assert got == {
        (at(0), "default"): (1, 0, 0),
        (at(1), "default"): (0, 1, 0),
        (at(2), "reports"): (2, 0, 1),  # both claimed in minute 2; the failure finished in it too
        (at(3), "reports"): (0, 1, 0),  # finished at base+3min exactly
        (claimed.floor("min"), "default"): (1, 0, 0),
    }
    assert frame["started"].sum() == 4 and frame["completed"].sum() == 2 and frame["failed"].sum() == 1


def test_every_interval_is_there_zeros_included_and_the_span_is_since_to_now(driver):
    now = db_now(driver)
    finished_job(driver, due=now - timedelta(minutes=30), wait=0, run=1)
    before = db_now(driver)
    frame = driver.timeline("5min", since=timedelta(hours=1))
    after = db_now(driver)
    intervals = frame["interval"]
    assert intervals.is_monotonic_increasing and intervals.diff().dropna().eq(pd.Timedelta(minutes=5)).all()
    floors = lambda moment: {pd.Timestamp(at).floor("5min") for at in (before + moment, after + moment)}  # noqa: E731
    assert intervals.iloc[0] in floors(-timedelta(hours=1)) and intervals.iloc[-1] in floors(timedelta(0))
    assert len(frame) == (intervals.iloc[-1] - intervals.iloc[0]) / pd.Timedelta(minutes=5) + 1  # one queue
    assert all(moment.minute % 5 == 0 and moment.second == 0 for moment in intervals)  # on the clock
    assert frame["completed"].sum() == 1 and (frame["completed"] == 0).sum() == len(frame) - 1


def test_since_bounds_the_span_and_queue_filters(driver):
    now = db_now(driver)
    finished_job(driver, due=now - timedelta(hours=3), wait=0, run=1)  # before the span: not counted
    finished_job(driver, due=now - timedelta(minutes=20), wait=0, run=1)
    finished_job(driver, queue="reports", due=now - timedelta(minutes=20), wait=0, run=1)
    hour = driver.timeline("10min", since=timedelta(hours=1))
    assert hour.groupby("queue")["completed"].sum().to_dict() == {"default": 1, "reports": 1}
    assert driver.timeline("1h", since=now - timedelta(hours=4))["completed"].sum() == 3  # an aware datetime
    reports = driver.timeline("10min", since=timedelta(hours=1), queue="reports")
    assert set(reports["queue"]) == {"reports"} and reports["completed"].sum() == 1
    assert driver.timeline(queue="nothing-here").empty


def test_a_job_claimed_before_the_span_counts_only_its_finish(driver):
    now = db_now(driver)
    job_id = finished_job(driver, due=now - timedelta(hours=2), wait=0, run=1)
    set_times(driver, job_id, finished_at=now - timedelta(minutes=5))  # a two-hour run ending in the span
    frame = driver.timeline("1h", since=timedelta(hours=1))
    assert (frame["started"].sum(), frame["completed"].sum()) == (0, 1)


@pytest.mark.parametrize("freq, seconds", [("1min", 60), ("30s", 30), ("1h", 3600), (timedelta(minutes=5), 300),
                                           (90, 90), ("1D", 86400)])
def test_freq_may_be_a_pandas_span_a_timedelta_or_seconds(freq, seconds):
    assert interval_seconds(freq) == seconds


@pytest.mark.parametrize("freq", ["often", "1M", "0s", "1.5s", -60, 0.5, True, None, "500ms"])
def test_a_freq_that_is_not_whole_seconds_is_refused_by_name(driver, freq):
    with pytest.raises(InvalidInputError, match="freq"):
        driver.timeline(freq=freq)


def test_bad_since_and_queue_and_too_many_intervals_are_refused(driver):
    with pytest.raises(InvalidInputError, match="since"):
        driver.timeline(since=datetime(2026, 1, 1))  # naive
    with pytest.raises(InvalidInputError, match="since"):
        driver.timeline(since="yesterday")
    with pytest.raises(InvalidInputError, match="queue"):
        driver.timeline(queue="")
    with pytest.raises(InvalidInputError, match=f"at most {MAX_INTERVALS:,}"):
        driver.timeline("1s", since=timedelta(days=30))


def test_it_reads_from_read_db_like_the_other_analytics(tmp_path):
    """A second SQLite file stands in for a standby: what the timeline shows comes from it."""
    table = unique_table()
    primary_url, replica_url = database_url("sqlite", tmp_path), f"sqlite:///{tmp_path / 'replica.db'}"
    with DatabaseQueueDriver(replica_url, table=table) as replica:
        replica.create_table()
        finished_job(replica, queue="on-replica", due=db_now(replica) - timedelta(minutes=3), wait=0, run=1)
    with DatabaseQueueDriver(primary_url, table=table) as primary:
        primary.create_table()
        finished_job(primary, queue="on-primary", due=db_now(primary) - timedelta(minutes=3), wait=0, run=1)
    with DatabaseQueueDriver(primary_url, table=table, read_db=replica_url) as reading:
        assert set(reading.timeline()["queue"]) == {"on-replica"}


def test_on_postgresql_the_finished_jobs_are_read_by_an_index_range(tmp_path):
    """The statements the timeline runs, EXPLAINed on a table of 50,000 jobs finished over 50 days: the
    last half hour's come from a range of the ``<table>_finished`` index, as at 1M rows
    (benchmarks/stats_at_scale.py)."""
    import sqlalchemy as sa

    table = unique_table()
    with DatabaseQueueDriver(database_url("postgresql", tmp_path), table=table) as driver:
        driver.create_table()
        try:
            finished_job(driver, due=db_now(driver) - timedelta(minutes=5), wait=0, run=1)
            with driver.engine.begin() as conn:  # history: one job finished every 86.4 s, up to a day ago
                conn.execute(sa.text(
                    f"INSERT INTO {table} (id, name, queue, status, created_at, available_at, reserved_at, finished_at)"
                    " SELECT 'h' || i, 'old', 'default', 'completed', t, t, t, t FROM"
                    " (SELECT i, now() - interval '1 day' - i * interval '86.4 seconds' AS t"
                    "  FROM generate_series(1, 50000) AS i) AS history"))
                conn.execute(sa.text(f"ANALYZE {table}"))
            statements = []
            listener = lambda conn, cursor, statement, parameters, context, many: statements.append(  # noqa: E731
                (statement, parameters))
            sa.event.listen(driver.engine, "before_cursor_execute", listener)
            assert driver.timeline("1min", since=timedelta(minutes=30))["completed"].sum() == 1
            sa.event.remove(driver.engine, "before_cursor_execute", listener)
            grouped = [(statement, parameters) for statement, parameters in statements if "GROUP BY" in statement]
            assert len(grouped) == 2  # the finished jobs, the running ones
            with driver.engine.connect() as conn:
                cursor = conn.connection.dbapi_connection.cursor()
                cursor.execute("EXPLAIN " + grouped[0][0], grouped[0][1])
                plan = "\n".join(row[0] for row in cursor.fetchall())
                conn.rollback()
            assert f"Index Scan using {table}_finished" in plan or f"Bitmap Index Scan on {table}_finished" in plan, plan
            assert "Index Cond: (finished_at >=" in plan, plan
        finally:
            driver.drop_table()
