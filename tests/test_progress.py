"""Progress from inside a job, checkpoints that resume, a batch's ETA and stragglers, and the worker
registry, on all three databases; with worker processes killed by SIGKILL where it spans processes.

The chunks whose timing is measured sleep (``progress_jobs.nap``), so what is compared is set by the
sleeps and not by how busy the machine is; waits are on conditions, never on sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from datetime import timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

import progress_jobs
from helpers import kronix, run_burst, wait_until
from kronix_data import (DatabaseQueueDriver, InvalidInputError, Job, JobContext, NotHeldError, Worker, current_job,
                         frame_slices, start_local_workers, task)
from kronix_data.chunking import as_frame, chunks
from kronix_data.monitor import QueueMonitor
from kronix_data.store import JobStore
from kronix_data.workers import forget_gone_workers


@pytest.fixture
def records(db_url, monkeypatch):
    """A table where ``progress_jobs.sliced`` records the slices it works (the worker processes inherit where)."""
    name = f"records_{uuid.uuid4().hex[:10]}"
    progress_jobs.create_records_table(db_url, name)
    monkeypatch.setenv(progress_jobs.RECORDS_ENV, f"{db_url}|{name}")
    yield name
    progress_jobs.drop_records_table(db_url, name)


# -- progress from inside a job -----------------------------------------------------------------

CALLS = 1_000_000
#: What the million-call job tells the test (it runs on a thread of this process).
told: dict[str, float] = {}
let_it_finish = threading.Event()


@task(name="test.progress.million")
def million(payload):
    context = current_job()
    started = time.perf_counter()
    for done in range(1, CALLS + 1):
        context.progress(done, CALLS)
    told["loop_s"] = time.perf_counter() - started
    told["last_report_at"] = time.monotonic()
    let_it_finish.wait(60)
    return done


def test_a_million_progress_calls_make_a_bounded_number_of_writes_and_show_within_a_heartbeat(driver):
    told.clear()
    let_it_finish.clear()
    writes = []

    @sa.event.listens_for(driver.engine, "before_cursor_execute")
    def count_progress_writes(_conn, _cursor, statement, _parameters, _context, _executemany):
        if statement.lstrip().upper().startswith("UPDATE") and "progress_done" in statement:
            writes.append(statement)  # an executemany of many jobs' reports is one write

    lease = 4.0  # a heartbeat every second
    batch = driver.map(million, range(1), chunk_size=1)
    worker = Worker(driver, concurrency=1, lease_timeout=lease).start()
    try:
        seen_at = wait_until(lambda: batch.progress()["units_running"] == CALLS and time.monotonic(), 60,
                             "the last report to show in batch.progress()", interval=0.02)
        wait_until(lambda: "last_report_at" in told, 10, "the job to note its last report")
        assert seen_at - told["last_report_at"] <= lease / 4 + 0.5  # within one heartbeat
        [row] = driver.jobs(batch=batch.id).to_dict("records")
        assert (row["status"], row["progress_done"], row["progress_total"]) == ("processing", CALLS, CALLS)
        assert batch.progress()["units_total"] == CALLS
        registry = wait_until(lambda: [record for record in driver.workers().to_dict("records")
                                       if record["running"] == 1], 10, "the heartbeat to count the running job")
        assert registry[0]["worker_id"] == driver.worker_id and registry[0]["state"] == "live"
    finally:
        let_it_finish.set()
        worker.stop(timeout=30)
    assert batch.progress()["completed"] == 1
    per_call_us = told["loop_s"] / CALLS * 1e6
    assert per_call_us < 10, f"progress() costs {per_call_us:.2f} µs a call"
    # At most one write per progress_interval (1 s) and one per heartbeat while the job reported, and a last one.
    assert 1 <= len(writes) <= 2 * (told["loop_s"] + 1) + 3, (len(writes), told["loop_s"])


def test_progress_shows_in_jobs_batch_progress_and_the_bar_of_wait_in_rows(driver, capsys):
    @task(name="test.progress.rows")
    def rows(payload):
        current_job().progress(len(as_frame(payload)) // 2, stage="half")  # the total stays the chunk's rows
        return None

    data = pd.DataFrame({"x": range(250)})
    batch = driver.map(rows, data, chunk_size=100)
    assert batch.progress() == {"total": 3, "pending": 3, "processing": 0, "completed": 0, "failed": 0, "waiting": 0,
                                "cancelled": 0, "units_done": 0, "units_total": 250, "units_running": 0}
    assert batch.unit == "row" and driver.map("n", range(3)).unit == "unit"
    assert sorted(driver.jobs(batch=batch.id)["progress_total"]) == [50, 100, 100]
    job = driver.pop_many(1)[0]
    context = JobContext(job, driver)
    context.progress(40, info_file="a.csv", rows_bad=0)
    assert driver.write_progress([context.take_report(time.monotonic())]) == 1
    assert context.take_report(time.monotonic()) is None  # nothing new to write
    progress = batch.progress()
    assert (progress["units_done"], progress["units_running"], progress["processing"]) == (40, 40, 1)
    [running] = driver.jobs(status="processing").to_dict("records")
    assert running["progress_info"] == {"info_file": "a.csv", "rows_bad": 0} and running["progress_total"] == 100
    assert running["progress_at"] <= driver.store.database_now()
    driver.complete(job)
    run_burst(driver)
    capsys.readouterr()
    assert batch.wait(progress=True).progress()["units_done"] == 250
    bar = capsys.readouterr().err
    assert "250/250 rows" in bar and "eta=0s" in bar and "failed=0" in bar

    files = driver.map("n", ["a.csv", "b.csv", "c.csv"], chunk_size=1)  # no totals: the bar counts chunks
    first, second = driver.pop_many(2)
    driver.complete(first)
    context = JobContext(second, driver)
    context.progress(1, 2)  # half of the second chunk
    driver.write_progress([context.take_report(time.monotonic())])
    assert files.progress()["units_total"] is None
    with pytest.raises(TimeoutError):
        files.wait(progress=True, timeout=0.2, poll_interval=0.05)
    bar = capsys.readouterr().err
    assert "1.5/3 chunks" in bar and "running=1" in bar


def test_progress_and_checkpoints_refuse_bad_values(driver):
    driver.push(Job("n", id="bad-values"))
    context = JobContext(driver.pop(), driver)
    for done in (-1, float("nan"), float("inf"), "3", None, True):
        with pytest.raises(InvalidInputError, match="progress done must be"):
            context.progress(done)
    with pytest.raises(InvalidInputError, match="progress total must be"):
        context.progress(1, -5)
    for value in (object(), [1, 2], {"a": 1}, float("nan"), "x" * 1001):
        with pytest.raises(InvalidInputError, match="progress detail where="):
            context.progress(1, 2, where=value)
    import numpy as np

    context.progress(np.int64(3), np.float32(4.0))  # numpy numbers are numbers
    assert context.take_report(time.monotonic()).done == 3
    with pytest.raises(InvalidInputError, match="checkpoint of job 'n' is not JSON-serialisable"):
        context.checkpoint({"when": object()})
    with pytest.raises(InvalidInputError, match="progress_interval must be a number of seconds > 0"):
        Worker(driver, progress_interval=0)
    with pytest.raises(InvalidInputError, match="factor must be a finite number > 0"):
        driver.map("n", [1]).stragglers(factor=0)
    with pytest.raises(InvalidInputError, match="rows must be an int >= 1"):
        frame_slices({}, rows=0)
    with pytest.raises(RuntimeError, match="only available inside a running job"):
        frame_slices(next(chunks(pd.DataFrame({"x": [1]}), 1)))


# -- checkpoints ---------------------------------------------------------------------------------

def test_a_stale_attempt_can_overwrite_neither_a_newer_checkpoint_nor_the_newer_progress(driver, other_driver):
    driver.push(Job("n", id="cursor"))
    first = JobContext(driver.pop(), driver)
    assert first.checkpoint_state is None
    first.checkpoint({"row": 1000})
    assert first.checkpoint_state == {"row": 1000}
    time.sleep(0.01)  # the lease below is older than 0 s
    assert other_driver.recover_stale_jobs(0) == 1  # attempt 1's worker is taken for dead
    second = JobContext(other_driver.pop(), other_driver)
    assert second.job.attempts == 2 and second.checkpoint_state == {"row": 1000}  # the later attempt resumes there
    second.checkpoint({"row": 3000})
    with pytest.raises(NotHeldError, match="attempt 1.* is no longer held .* not saved"):
        first.checkpoint({"row": 2000})
    first.progress(2000, 10_000)
    second.progress(3000, 10_000)
    now = time.monotonic()
    assert driver.write_progress([first.take_report(now)]) == 0
    assert other_driver.write_progress([second.take_report(now)]) == 1
    stale_copy = JobContext(Job("n", id="cursor", attempts=1), other_driver)  # the right worker, an old attempt
    with pytest.raises(NotHeldError):
        stale_copy.checkpoint({"row": 0})
    assert json.loads(driver.store.read_checkpoint("cursor")) == {"row": 3000}
    assert driver.jobs()["progress_done"].tolist() == [3000]
    assert other_driver.complete(second.job)
    with pytest.raises(NotHeldError):  # a finished job's checkpoint is final
        second.checkpoint({"row": 4000})
    assert json.loads(driver.store.read_checkpoint("cursor")) == {"row": 3000}
    assert not driver.jobs()["checkpoint_at"].isna().any()


def test_a_worker_killed_mid_chunk_resumes_from_its_last_checkpoint(driver, db_url, records):
    rows, chunk, slice_rows = 30_000, 10_000, 1_000
    frame = pd.DataFrame({"n": range(rows), "value": [(n * 7) % 13 for n in range(rows)]})
    batch = driver.map(progress_jobs.sliced, frame, chunk_size=chunk)
    chunk_of = {row["id"]: int(row["key"].rsplit(":", 1)[1]) for row in driver.jobs(batch=batch.id).to_dict("records")}

    with start_local_workers(driver, 2, modules=["progress_jobs"], concurrency=1, lease_timeout=2.0) as workers:
        victim = workers.processes[0]

        def victim_in_the_middle_of_a_chunk():
            worked = [record for record in progress_jobs.fetch_records(db_url, records) if record[2] == victim.pid]
            if not worked:
                return None
            job = worked[-1][0]
            return job if 3 <= sum(record[0] == job for record in worked) <= 6 else None

        killed_job = wait_until(victim_in_the_middle_of_a_chunk, 60, "the victim to be in the middle of a chunk",
                                interval=0.02)
        os.kill(victim.pid, signal.SIGKILL)
        wait_until(lambda: batch.done, 120, "the batch to finish without the victim")

    progress = batch.progress()
    assert (progress["completed"], progress["units_done"], progress["units_total"]) == (3, rows, rows)
    outcome = {record["chunk"]: record["result"] for record in batch.results().to_dict("records")}
    assert sum(result["sum"] for result in outcome.values()) == frame["value"].sum()  # the batch is right
    assert sum(result["rows"] for result in outcome.values()) == rows

    worked = progress_jobs.fetch_records(db_url, records)
    base = chunk_of[killed_job] * chunk
    first_attempt = [(first, last) for job, attempt, pid, first, last in worked if job == killed_job and attempt == 1]
    later = [(first, last) for job, attempt, pid, first, last in worked if job == killed_job and attempt > 1]
    assert {pid for job, attempt, pid, *_ in worked if job == killed_job and attempt == 1} == {victim.pid}
    assert 3 <= len(first_attempt) <= 7 and later
    # Every slice but the last one attempt 1 started was checkpointed before the next began: attempt 2
    # resumes after them, at the start or the end of the slice the kill cut short.
    resumed_at = later[0][0] - base
    cut_short = first_attempt[-1][0] - base
    assert resumed_at in (cut_short, cut_short + slice_rows)
    killed_result = outcome[chunk_of[killed_job]]
    assert killed_result["resumed_from"] == resumed_at > 0 and killed_result["attempt"] >= 2
    before, after = rows_in(first_attempt), rows_in(later)
    assert not [n for n in after if n < base + resumed_at]  # no row before the checkpoint was worked twice
    assert len(set(before) & set(after)) <= slice_rows  # at most one slice was repeated
    assert set(before) | set(after) == set(range(base, base + chunk))
    assert json.loads(driver.store.read_checkpoint(killed_job))["row"] == chunk
    other = [(job, first) for job, attempt, pid, first, last in worked if job != killed_job]
    assert Counter(first for _, first in other) == Counter(range(0, rows, slice_rows)) - Counter(
        range(base, base + chunk, slice_rows))  # the other chunks ran once each, from their start


def rows_in(spans: list[tuple[int, int]]) -> Counter:
    """How often each row was worked, from ``(first_row, last_row)`` slices."""
    return Counter(n for first, last in spans for n in range(first, last + 1))


# -- ETA and stragglers ----------------------------------------------------------------------------

def test_the_eta_of_uniform_chunks_at_halfway_is_within_30_percent_of_the_time_left(driver):
    # 4 slots: 4 waves of 2 s. Chunks long beside a claim and a poll, so a loaded machine's delays
    # (which slow some waves more than others) stay small beside the time left (about 4 s at halfway).
    chunks, seconds = 16, 2.0
    batch = driver.map(progress_jobs.nap, [seconds] * chunks, chunk_size=1)
    assert batch.eta() is None  # nothing ran yet: nothing to go by
    with start_local_workers(driver, 2, modules=["progress_jobs"], concurrency=2, lease_timeout=10) as workers:
        wait_until(lambda: batch.progress()["completed"] >= chunks // 2, 90, "half the chunks to complete",
                   interval=0.02)
        eta, asked = batch.eta(), time.monotonic()
        wait_until(lambda: batch.done, 60, "the batch to finish", interval=0.02)
        left = time.monotonic() - asked
        workers.stop()
    assert eta is not None and abs(eta.total_seconds() - left) <= 0.3 * left, (eta, left)
    assert batch.eta() == timedelta(0)


slow_chunk_started = threading.Event()


@task(name="test.progress.maybe_slow", max_retries=0)
def maybe_slow(payload):
    """Chunk "slow" runs until cancelled, reporting that it is stuck; the others take a tenth of a second."""
    if payload["items"][0] != "slow":
        time.sleep(0.1)
        return "quick"
    context = current_job()
    slow_chunk_started.set()
    ticks = 0
    while not context.cancel_requested():
        ticks += 1
        context.progress(min(ticks, 99), 100, stage="stuck")
        time.sleep(0.02)
    return "stopped"


def test_a_deliberately_slow_chunk_shows_up_in_stragglers_with_its_worker_and_progress(driver):
    slow_chunk_started.clear()
    batch = driver.map(maybe_slow, ["slow"] + ["quick"] * 9, chunk_size=1)
    assert batch.stragglers().empty  # nothing has completed: nothing to compare with
    worker = Worker(driver, concurrency=2, lease_timeout=10, progress_interval=0.1, cancel_check_interval=0.1).start()
    try:
        wait_until(lambda: batch.progress()["completed"] == 9, 60, "the quick chunks to complete")

        def reported_straggler():
            frame = batch.stragglers()
            return [frame] if len(frame) and frame["progress_done"].notna().all() else None

        [stragglers] = wait_until(reported_straggler, 30, "the slow chunk to be a straggler")
        [slow] = stragglers.to_dict("records")
        assert (slow["chunk"], slow["reserved_by"], slow["progress_total"]) == (0, driver.worker_id, 100)
        assert slow["elapsed_s"] > 3 * slow["p95_run_s"] > 0 and slow["progress_info"] == {"stage": "stuck"}
        assert batch.stragglers(factor=1e9).empty
        assert batch.eta() is not None and batch.progress()["units_running"] > 0
        monitor = QueueMonitor(driver, batches=[batch], start=False)
        assert monitor.stragglers["chunk"].tolist() == [0] and batch.id in monitor.batch_eta
        assert "eta " in monitor._batch_label(batch.id).value
        assert "1 straggler" in monitor._batch_label(batch.id).value
        assert driver.worker_id in monitor.workers_table.value and "live" in monitor.workers_table.value
        monitor.close()
        batch.cancel()
        wait_until(lambda: batch.done, 30, "the slow chunk to stop")
    finally:
        worker.stop(timeout=30)
    assert batch.progress()["cancelled"] == 1


# -- the worker registry ---------------------------------------------------------------------------

def test_workers_lists_two_live_local_workers_then_one_as_gone_after_kill_9(driver, tmp_path):
    with start_local_workers(driver, 2, modules=["progress_jobs"], queues=["default", "reports"], concurrency=3,
                             lease_timeout=2.0) as workers:
        def two_live():
            frame = driver.workers()
            live = frame[frame["state"] == "live"]
            return [live] if sorted(live["pid"]) == sorted(workers.pids) else None

        [live] = wait_until(two_live, 60, "both workers to be listed live")
        assert set(live["host"]) == {socket.gethostname()} and live["concurrency"].tolist() == [3, 3]
        assert live["queues"].tolist() == [["default", "reports"]] * 2 and live["running"].tolist() == [0, 0]
        victim, survivor = workers.processes
        os.kill(victim.pid, signal.SIGKILL)

        def state(pid):
            frame = driver.workers()
            return dict(zip(frame["pid"], frame["state"])).get(pid)

        wait_until(lambda: state(victim.pid) == "gone", 30, "the killed worker to show as gone")
        assert state(survivor.pid) == "live"
        listed = kronix("workers", "--db", driver.store.url_with_password, "--table", driver.table_name,
                        cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert " gone " in listed.stdout and " live " in listed.stdout and str(victim.pid) in listed.stdout
    assert state(survivor.pid) == "stopped" and state(victim.pid) == "gone"  # stopped with SIGTERM: it said so

    workers_table = driver.store.tables.workers
    with driver.engine.begin() as conn:  # an hour and more without a heartbeat
        conn.execute(workers_table.update().where(workers_table.c.pid == victim.pid).values(
            last_seen=driver.store.database_now() - timedelta(hours=2)))
    assert victim.pid not in driver.workers()["pid"].tolist()  # aged out of the listing...
    assert forget_gone_workers(driver.store) == 1  # ...and deleted by the next recovery pass of any worker
    assert driver.workers()["pid"].tolist() == [survivor.pid]


# -- the command line ---------------------------------------------------------------------------

def test_kronix_stats_shows_the_progress_of_running_jobs(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with DatabaseQueueDriver(url) as driver:
        driver.create_table()
        driver.push_many([Job("etl.load", {"file": "a.csv"}), Job("etl.quiet")])
        loading, quiet = driver.pop_many(2)
        context = JobContext(loading, driver)
        context.progress(1200, 5000, file="a.csv")
        driver.write_progress([context.take_report(time.monotonic())])
    human = kronix("stats", "--db", url, cwd=tmp_path)
    machine = kronix("stats", "--db", url, "--json", cwd=tmp_path)
    assert human.returncode == machine.returncode == 0, human.stderr
    assert "progress of running jobs" in human.stdout and "1,200/5,000 (24%)" in human.stdout
    assert quiet.id not in human.stdout  # a job that reports nothing is not listed
    [default] = json.loads(machine.stdout)
    assert default["processing"] == 2 and [(item["id"], item["done"], item["total"], item["info"])
                                           for item in default["running_progress"]] == [
        (loading.id, 1200, 5000, {"file": "a.csv"})]
    empty = kronix("workers", "--db", url, cwd=tmp_path)
    assert empty.returncode == 0 and "no worker seen in the last hour" in empty.stdout


# -- the upgrade ---------------------------------------------------------------------------------

PROGRESS_COLUMNS = {"progress_done", "progress_total", "progress_info", "progress_at", "checkpoint_state",
                    "checkpoint_at"}


def test_a_table_of_the_previous_release_is_upgraded_in_place(db_url, table_name):
    """The pipelines release's tables (no progress or checkpoint columns, no workers table), with a job
    running on it, upgraded by create_table(): the job can then report, checkpoint and complete."""
    engine = sa.create_engine(db_url)
    current = JobStore(db_url, table_name).tables  # this release's tables for this database (nothing is made)
    metadata = sa.MetaData()
    old = sa.Table(table_name, metadata, *(column._copy() for column in current.jobs.columns
                                           if column.name not in PROGRESS_COLUMNS),
                   mysql_charset="utf8mb4", mysql_collate="utf8mb4_bin")
    for companion in (current.deps, current.waits, current.queues):
        companion.to_metadata(metadata)
    metadata.create_all(engine)
    engine.dispose()
    before = DatabaseQueueDriver(db_url, table=table_name)
    try:
        assert not {f"column {name}" for name in PROGRESS_COLUMNS} & before.store.table_parts()
        with pytest.raises(sa.exc.DBAPIError):
            before.workers()  # the workers table is not there yet
    finally:
        before.close()

    driver = DatabaseQueueDriver(db_url, table=table_name)
    try:
        driver.create_table()
        driver.create_table()
        parts = driver.store.table_parts()
        assert {f"column {name}" for name in PROGRESS_COLUMNS} | {f"table {table_name}_workers"} <= parts
        driver.push(Job("n", id="after-upgrade"))
        context = JobContext(driver.pop(), driver)
        context.checkpoint({"row": 5})
        context.progress(5, 10)
        assert driver.heartbeat([context.job], progress=[context.take_report(time.monotonic())]) == 1
        assert driver.complete(context.job)
        assert driver.jobs()["progress_done"].tolist() == [5]
        assert driver.workers().empty
    finally:
        driver.drop_table()
        driver.close()
