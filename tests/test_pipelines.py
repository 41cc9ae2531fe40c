"""Pipelines on all three databases: steps that wait for steps, cancel, pause and priorities.

The steps' tasks live in tests/pipeline_jobs.py and write a row per run into a runs table,
so "ran exactly once, after every parent completed" is read from the runs themselves, also
when they ran in worker processes that the test kills.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
import sqlalchemy as sa

import pipeline_jobs
from helpers import run_burst, wait_until
from kronix_data import (InvalidInputError, Job, JobStatus, NotFoundError, Worker, current_job,
                         start_local_workers, task)
from kronix_data.job import MAX_PRIORITY, MIN_PRIORITY

SERVERS = ["postgresql", "mariadb"]


@pytest.fixture
def runs(db_url):
    name = f"runs_{uuid.uuid4().hex[:10]}"
    pipeline_jobs.create_runs_table(db_url, name)
    yield {"url": db_url, "runs": name}
    pipeline_jobs.drop_runs_table(db_url, name)


def items(config: dict, numbers, **extra) -> list[dict]:
    return [{"n": n, **config, **extra} for n in numbers]


def status_of(driver, job_id: str) -> JobStatus:
    return driver.get_job(job_id).status


def snapshot(driver) -> list:
    with driver.engine.connect() as conn:
        jobs = conn.execute(sa.select(driver.table).order_by(driver.table.c.id)).all()
        groups = conn.execute(sa.select(driver.store.tables.waits)).all()
        edges = conn.execute(sa.select(driver.store.tables.deps)).all()
    return [jobs, groups, edges]


# -- dependencies ------------------------------------------------------------------------------

def test_a_three_step_pipeline_runs_each_step_after_its_parents_and_the_last_exactly_once(driver, runs):
    extract = driver.map(pipeline_jobs.extract, items(runs, range(40)), chunk_size=5)
    transform = driver.map(pipeline_jobs.transform, items(runs, range(40, 60)), chunk_size=5, after=extract)
    load = transform.then(pipeline_jobs.load, runs)
    assert transform.progress()["waiting"] == 4 and status_of(driver, load.id) is JobStatus.WAITING
    assert transform.then(pipeline_jobs.load, runs).id == load.id  # a re-run cell adds nothing
    assert driver.map(pipeline_jobs.transform, items(runs, range(40, 60)), chunk_size=5, after=extract) == transform

    run_burst(driver, concurrency=4)

    assert extract.done and transform.done and status_of(driver, load.id) is JobStatus.COMPLETED
    result = driver.get_job(load.id).result
    assert result == {"rows": 20, "columns": ["chunk", "double", "n"], "squares": 0,
                      "doubles": 2 * sum(range(40, 60))}
    started = {(job, step): start for job, step, _, _, start, _ in pipeline_jobs.fetch_runs(runs["url"], runs["runs"])}
    ended = {(job, step): end for job, step, _, _, _, end in pipeline_jobs.fetch_runs(runs["url"], runs["runs"])}
    extract_end = max(end for (_, step), end in ended.items() if step == "extract")
    assert min(start for (_, step), start in started.items() if step == "transform") >= extract_end
    assert started[load.id, "load"] >= max(end for (_, step), end in ended.items() if step == "transform")
    assert sum(step == "load" for _, step in started) == 1


def test_a_pipeline_across_two_worker_processes_survives_one_killed_mid_run(driver, runs):
    extract = driver.map(pipeline_jobs.extract, items(runs, range(40), sleep=0.2), chunk_size=2)
    transform = driver.map(pipeline_jobs.transform, items(runs, range(40, 52), sleep=0.05), chunk_size=2,
                           after=extract)
    load = transform.then(pipeline_jobs.load, runs)
    with start_local_workers(driver, 2, modules=["pipeline_jobs"], concurrency=2, lease_timeout=2.0) as workers:
        victim = workers.processes[0]
        wait_until(lambda: any(pid == victim.pid and ended is None and step == "extract" for _, step, _, pid, _, ended
                               in pipeline_jobs.fetch_runs(runs["url"], runs["runs"])), 60,
                   "the victim to be in the middle of a chunk")
        os.kill(victim.pid, signal.SIGKILL)
        wait_until(lambda: status_of(driver, load.id).finished, 120, "the last step to finish")
    assert status_of(driver, load.id) is JobStatus.COMPLETED
    assert driver.get_job(load.id).result["rows"] == 12 and extract.progress()["completed"] == 20
    every_run = pipeline_jobs.fetch_runs(runs["url"], runs["runs"])
    cut = [run for run in every_run if run[5] is None]
    assert cut and all(pid == victim.pid for _, _, _, pid, _, _ in cut)  # the kill cut a chunk short...
    assert {job for job, *_ in cut} <= {job for job, _, _, _, _, ended in every_run if ended is not None}  # ...re-run
    ended = {step: max(end for _, s, _, _, _, end in every_run if s == step and end is not None)
             for step in ("extract", "transform")}
    started = {step: min(start for _, s, _, _, start, _ in every_run if s == step) for step in ("transform", "load")}
    assert started["transform"] >= ended["extract"] and started["load"] >= ended["transform"]
    assert [step for _, step, *_ in every_run].count("load") == 1


def test_parent_results_are_the_batchs_results_and_depends_on_names_jobs(driver):
    @task(name="pipe.double")
    def double(payload):
        return {"value": 2 * payload} if isinstance(payload, int) else [{"v": v} for v in payload["items"]]

    @task(name="pipe.collect")
    def collect(payload):
        return current_job().parent_results().to_dict("list")

    first, second = driver.push(double.job(1)), driver.push(double.job(2))
    both = Job("pipe.collect", depends_on=[first, second])
    driver.push(both)
    batch = driver.map(double, [3, 4, 5], chunk_size=2)
    after_batch = batch.then(collect)
    run_burst(driver)

    assert driver.get_job(both.id).result["result"] == [{"value": 2}, {"value": 4}]
    assert driver.get_job(after_batch.id).result == {"chunk": [0, 0, 1], "v": [3, 4, 5]}
    assert batch.results().to_dict("list") == driver.get_job(after_batch.id).result


def test_a_dead_lettered_parent_blocks_its_dependents_until_retried_and_completed(driver, runs):
    pipeline_jobs.FIXED.clear()
    first = driver.map(pipeline_jobs.transform, items(runs, range(6), fail_until_fixed=True), chunk_size=2,
                       max_retries=0)
    pipeline_jobs.FIXED.update({0, 2})  # chunk 1 keeps failing
    last = first.then(pipeline_jobs.load, runs)
    run_burst(driver)
    assert first.progress()["failed"] == 1 and first.progress()["completed"] == 2
    assert status_of(driver, last.id) is JobStatus.WAITING  # it keeps waiting for the dead letter

    pipeline_jobs.FIXED.add(1)
    assert first.retry_failures() == 1
    run_burst(driver)
    assert first.progress()["completed"] == 3 and status_of(driver, last.id) is JobStatus.COMPLETED
    assert driver.get_job(last.id).result["rows"] == 6


def test_a_job_may_wait_for_another_of_the_same_push_and_for_an_already_completed_one(driver):
    done = driver.push(Job("n", 0))
    claimed = driver.pop()
    driver.complete(claimed)
    parent = Job("n", 1)
    child = Job("n", 2, depends_on=[parent, done])
    driver.push_many([child, parent])
    assert (status_of(driver, parent.id), status_of(driver, child.id)) == (JobStatus.PENDING, JobStatus.WAITING)
    job = driver.pop()
    assert job.id == parent.id and driver.pop() is None  # the waiting child is not claimable
    driver.complete(job)
    assert status_of(driver, child.id) is JobStatus.PENDING and driver.pop().id == child.id


def test_cycles_unknown_parents_and_bad_priorities_are_refused_and_nothing_is_written(driver):
    driver.push(Job("kept", id="kept"))
    before = snapshot(driver)
    a, b, c = Job("a", id="a"), Job("b", id="b"), Job("c", id="c")
    a.depends_on, b.depends_on, c.depends_on = [c], [a], [b]
    with pytest.raises(InvalidInputError, match="cycle: .*a.*"):
        driver.push_many([a, b, c])
    with pytest.raises(InvalidInputError, match="cycle"):
        driver.push(Job("self", id="self", depends_on=["self"]))
    with pytest.raises(InvalidInputError, match="job 'nope' to depend on is not in table"):
        driver.push_many([Job("x"), Job("y", depends_on=["kept", "nope"])])
    with pytest.raises(InvalidInputError, match="no job has batch id 'no-batch' to depend on"):
        driver.map("n", [1, 2], after=_batch(driver, "no-batch"))
    with pytest.raises(InvalidInputError, match="a dependency must be a Batch, a Job or a job id, got int"):
        driver.push(Job("z", depends_on=[42]))
    with pytest.raises(InvalidInputError, match="has no id yet"):
        driver.push(Job("z", depends_on=[Job("never pushed")]))
    for priority in (MAX_PRIORITY + 1, MIN_PRIORITY - 1, 1.5, "high", True):
        with pytest.raises(InvalidInputError, match="priority of job 'p' must be an int from -100 to 100"):
            driver.push(Job("p", priority=priority))
    with pytest.raises(InvalidInputError, match="priority"):
        driver.map("p", [1], priority=101)
    with pytest.raises(InvalidInputError, match="priority of task"):
        task(name="pipe.too_high", priority=500)(lambda payload: None)
    assert snapshot(driver) == before


def _batch(driver, batch_id):
    from kronix_data import Batch

    return Batch(batch_id, driver)


# -- cancel ----------------------------------------------------------------------------------

def test_cancelling_a_pending_job_cancels_what_waits_for_it_all_the_way_down(driver):
    root = driver.push(Job("root"))
    middle = Job("middle", depends_on=[root])
    driver.push(middle)
    batch = driver.map("leaf", [1, 2, 3], chunk_size=1, after=middle)
    last = batch.then("last")
    other = driver.push(Job("other"))

    assert driver.cancel(root) is True
    assert [status_of(driver, job_id) for job_id in (root, middle.id, last.id)] == [JobStatus.CANCELLED] * 3
    assert batch.progress()["cancelled"] == 3 and batch.done
    assert status_of(driver, other) is JobStatus.PENDING
    assert driver.cancel(root) is False  # already finished
    assert "cancelled" in driver.get_job(middle.id).last_error
    with pytest.raises(NotFoundError, match="no job has id 'nope'"):
        driver.cancel("nope")
    with pytest.raises(InvalidInputError):
        driver.cancel("bad\x00id")
    stats = driver.fetch_stats().set_index("queue").loc["default"]
    assert (stats["cancelled"], stats["pending"], stats["waiting"]) == (6, 1, 0)
    assert driver.prune(0) == 6 and driver.jobs(status="cancelled").empty


def test_a_running_job_sees_the_cancel_and_ends_cancelled_not_failed_nor_retried(driver, runs):
    job = driver.push(pipeline_jobs.patient.job({**runs, "seconds": 60}, max_retries=3))
    waiter = Job("after", depends_on=[job])
    driver.push(waiter)
    worker = Worker(driver, concurrency=1, lease_timeout=10, cancel_check_interval=0.1).start()
    try:
        wait_until(lambda: pipeline_jobs.fetch_runs(runs["url"], runs["runs"]), 30, "the job to start")
        assert driver.cancel(job) is True
        wait_until(lambda: status_of(driver, job).finished, 30, "the job to end")
    finally:
        worker.stop(timeout=30)
    stored = driver.get_job(job)
    assert stored.status is JobStatus.CANCELLED and stored.attempts == 1 and stored.result is None
    assert status_of(driver, waiter.id) is JobStatus.CANCELLED
    assert worker.stats.cancelled == 1 and worker.stats.retried == worker.stats.dead_lettered == 0
    [(_, _, _, _, started, ended)] = pipeline_jobs.fetch_runs(runs["url"], runs["runs"])
    assert ended - started < 30  # it stopped early, long before its 60 s


def test_a_cancel_that_races_the_end_of_the_job_still_wins(driver):
    """The worker has not seen the cancel yet when the job ends: the store records it cancelled anyway."""
    driver.push_many([Job("n", i, id=f"j{i}") for i in range(3)])
    done, failed, released = driver.pop_many(3)
    for job in (done, failed, released):
        assert driver.cancel(job.id) is True
    failed.last_error = released.last_error = "boom"
    assert driver.complete(done) and driver.fail(failed) and driver.release(released)
    assert [status_of(driver, f"j{i}") for i in range(3)] == [JobStatus.CANCELLED] * 3


def test_a_cancelled_job_whose_worker_died_ends_cancelled_when_its_lease_expires(driver, other_driver):
    driver.push(Job("n", id="lost"))
    driver.pop()
    driver.cancel("lost")
    time.sleep(0.05)
    assert other_driver.recover_stale_jobs(0) == 1
    assert status_of(driver, "lost") is JobStatus.CANCELLED and "lease expired" in driver.get_job("lost").last_error


@pytest.mark.parametrize("backend", SERVERS)
def test_cancelling_a_batch_while_workers_run_it_starts_none_of_its_pending_chunks(driver, runs):
    doomed = driver.map(pipeline_jobs.patient, items(runs, range(1000), seconds=0.02), chunk_size=1)
    other = driver.map(pipeline_jobs.extract, items(runs, range(1000, 1040)), chunk_size=10)
    with start_local_workers(driver, 2, modules=["pipeline_jobs"], concurrency=2, lease_timeout=10,
                             cancel_check_interval=0.2) as workers:
        wait_until(lambda: doomed.progress()["completed"] >= 20, 60, "the batch to be under way")
        counts = doomed.cancel()
        cancelled_at = time.time()
        wait_until(lambda: doomed.done and other.done, 60, "both batches to be done")
        workers.stop()
    progress = doomed.progress()
    assert counts["pending"] > 500 and counts["running"] <= 2 * 2 + 2 * 100  # at most what the workers held
    assert progress["cancelled"] >= counts["pending"] and progress["completed"] + progress["cancelled"] == 1000
    assert other.progress()["completed"] == 4  # the other batch is untouched
    with driver.engine.connect() as conn:
        c = driver.table.c
        never_claimed = conn.execute(sa.select(sa.func.count()).where(
            c.batch_id == doomed.id, c.status == "cancelled", c.attempts == 0)).scalar_one()
        claimed_late = conn.execute(sa.select(sa.func.count()).where(
            c.batch_id == doomed.id, c.reserved_at > sa.bindparam("t", _as_utc(cancelled_at), type_=c.reserved_at.type)
        )).scalar_one()
    assert never_claimed == counts["pending"] and claimed_late == 0
    starts = [start for job, step, _, _, start, _ in pipeline_jobs.fetch_runs(runs["url"], runs["runs"])
              if step == "patient"]
    assert len(starts) <= progress["completed"] + counts["running"]  # no chunk cancelled while pending ran


def _as_utc(timestamp: float):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(timestamp, timezone.utc)


# -- pause -------------------------------------------------------------------------------------

def test_a_paused_queue_is_not_claimed_and_resume_lets_it_go(driver, other_driver):
    driver.push_many([Job("n", i, queue="load") for i in range(3)] + [Job("n", 9, queue="other")])
    driver.pause("load")
    assert other_driver.pop("load") is None and other_driver.pop("other").payload == 9
    frame = driver.queues().set_index("queue")
    assert bool(frame.loc["load", "paused"]) and not bool(frame.loc["other", "paused"])
    assert frame.loc["load", "pending"] == 3
    driver.pause("load")  # idempotent
    driver.resume("load")
    assert [job.payload for job in other_driver.pop_many(5, "load")] == [0, 1, 2]
    assert not driver.queues().set_index("queue").loc["load", "paused"]
    with pytest.raises(InvalidInputError, match="queue name"):
        driver.pause("")


@pytest.mark.parametrize("backend", SERVERS)
def test_pause_stops_every_worker_process_from_claiming_and_resume_restarts_them(driver, runs):
    """Proof by a marker: after the pause, the workers claim a job of another queue they serve (so
    they are polling), yet the paused queue's pending jobs stay where they are; then resume drains it."""
    driver.push_many([pipeline_jobs.extract.job({"items": [{"n": n, **runs, "sleep": 0.02}]}, queue="paused")
                      for n in range(400)])
    with start_local_workers(driver, 2, modules=["pipeline_jobs"], queues=["paused", "marker"], concurrency=2,
                             poll_interval=0.1, lease_timeout=10) as workers:
        wait_until(lambda: driver.fetch_stats().set_index("queue").loc["paused", "completed"] >= 10, 60,
                   "the queue to be worked")
        driver.pause("paused")
        wait_until(lambda: driver.fetch_stats().set_index("queue").loc["paused", "processing"] == 0, 60,
                   "the jobs claimed before the pause to finish")
        pending = driver.fetch_stats().set_index("queue").loc["paused", "pending"]
        for marker in range(2):  # one marker per worker, each claimed after the pause
            marker_id = driver.push(pipeline_jobs.extract.job({"items": [{"n": -1, **runs}]}, queue="marker"))
            wait_until(lambda: status_of(driver, marker_id) is JobStatus.COMPLETED, 30, "a marker to be worked")
        assert pending > 0 and driver.fetch_stats().set_index("queue").loc["paused", "pending"] == pending
        driver.resume("paused")
        wait_until(lambda: driver.fetch_stats().set_index("queue").loc["paused", "completed"] == 400, 120,
                   "the resumed queue to drain")
        assert len(workers.alive()) == 2


# -- priorities ----------------------------------------------------------------------------------

def test_one_worker_starts_jobs_in_priority_order_then_oldest_first(driver):
    @task(name="pipe.order")
    def order(payload):
        return time.monotonic_ns()

    priorities = [0, 5, -3, 5, 100, -100, 0, 7, 7, 1]
    ids = driver.push_many([order.job(i, priority=p) for i, p in enumerate(priorities)])
    run_burst(driver, concurrency=1, batch_size=1)
    started = sorted(ids, key=lambda job_id: driver.get_job(job_id).result)
    expected = sorted(ids, key=lambda job_id: (-priorities[ids.index(job_id)], ids.index(job_id)))
    assert started == expected


def test_task_and_map_priorities_and_jobs_show_them(driver):
    @task(name="pipe.urgent", priority=9)
    def urgent(payload):
        return payload

    driver.push(urgent.job(1))
    driver.push(urgent.job(2, priority=-1))
    batch = driver.map(urgent, [3, 4], chunk_size=1, priority=50)
    claimed = driver.pop_many(4)
    assert [job.priority for job in claimed] == [50, 50, 9, -1]
    assert {job.batch_id for job in claimed[:2]} == {batch.id}


# -- the upgrade -----------------------------------------------------------------------------------

def test_a_table_of_the_previous_release_is_upgraded_in_place(db_url, table_name):
    """0.1.0's table: no priority, no wait groups, the claim index without priority; rows of every status."""
    from datetime import datetime, timezone

    from kronix_data.schema import UTCDateTime

    engine = sa.create_engine(db_url)
    metadata = sa.MetaData()
    key = sa.Text().with_variant(sa.String(255), "mysql", "mariadb")
    old = sa.Table(table_name, metadata, sa.Column("id", key, primary_key=True),
                   *(sa.Column(name, key) for name in ("name", "queue", "status")),
                   sa.Column("attempts", sa.Integer), sa.Column("max_retries", sa.Integer),
                   sa.Column("payload", sa.Text), sa.Column("last_error", sa.Text),
                   sa.Column("created_at", UTCDateTime()), sa.Column("available_at", UTCDateTime()),
                   sa.Column("finished_at", UTCDateTime()), sa.Column("reserved_by", key),
                   sa.Column("reserved_at", UTCDateTime()), sa.Column("heartbeat_at", UTCDateTime()),
                   sa.Column("result", sa.Text), sa.Column("job_key", key), sa.Column("batch_id", key))
    sa.Index(f"{table_name}_claim", old.c.queue, old.c.status, old.c.available_at, old.c.id)
    metadata.create_all(engine)
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        conn.execute(old.insert(), [
            {"id": f"old{i}", "name": "n", "queue": "default", "status": status, "attempts": 0, "max_retries": 3,
             "payload": str(i), "created_at": now, "available_at": now, "finished_at": None if i == 0 else now}
            for i, status in enumerate(["pending", "completed", "failed"])])
    engine.dispose()

    from kronix_data import DatabaseQueueDriver

    driver = DatabaseQueueDriver(db_url, table=table_name)
    try:
        driver.create_table()
        driver.create_table()
        parts = driver.store.table_parts()
        assert {"column priority", "column wait_id", "column has_dependents", "column cancel_requested_at",
                f"index {table_name}_due", f"table {table_name}_deps", f"table {table_name}_waits",
                f"table {table_name}_queues"} <= parts
        assert f"index {table_name}_claim" not in parts
        # and the driver works on it:
        follow = Job("n", "after", depends_on=["old0"])
        driver.push(follow)
        job = driver.pop()
        assert job.id == "old0" and job.priority == 0
        driver.complete(job)
        assert status_of(driver, follow.id) is JobStatus.PENDING
        assert int(driver.fetch_stats()["completed"].sum()) == 2
    finally:
        driver.drop_table()
        driver.close()


def test_one_job_with_dependents_in_a_batch_of_completions_costs_a_look_up_not_two_statements_a_job(driver):
    """The fast path completes the plain jobs; only the one that has dependents is finished on its own."""
    ids = driver.push_many([Job("n", i) for i in range(50)])
    waiter = Job("after", depends_on=[ids[25]])
    driver.push(waiter)
    jobs = driver.pop_many(50)
    statements = []
    sa.event.listen(driver.engine, "before_cursor_execute",
                    lambda _c, _cur, statement, *_: statements.append(statement.split()[0]))
    assert driver.complete_many(jobs) == 50
    assert statements.count("UPDATE") <= 5 and len(statements) <= 12, statements
    assert status_of(driver, waiter.id) is JobStatus.PENDING and driver.fetch_stats()["completed"].sum() == 50
