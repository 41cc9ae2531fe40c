"""The worker in this process (threads) on each database: retries, hooks, timeouts, limits."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from helpers import kill_session, run_burst, session_id, wait_until
from kronix_data import DatabaseQueueDriver, Job, JobStatus, RetryPolicy, Worker, task

FAST_RETRY = RetryPolicy(delay=0.05, backoff=2.0, jitter=0.0)


def test_a_task_runs_and_its_result_is_stored(driver):
    @task(name="w.double")
    def double(payload):
        return {"value": payload * 2}

    ids = driver.push_many([double.job(i) for i in range(20)])
    worker = run_burst(driver, concurrency=4)

    assert worker.stats.completed == 20 and worker.stats.claimed == 20
    assert [driver.get_job(job_id).result for job_id in ids] == [{"value": i * 2} for i in range(20)]
    assert double(21) == {"value": 42}  # a task is still a plain function


def test_failures_retry_with_backoff_then_dead_letter_with_hooks(driver):
    calls = []

    @task(name="w.always_fails", max_retries=2, retry=FAST_RETRY,
          on_failure=lambda job, error: calls.append(("retry", job.attempts, str(error))),
          on_permanent_failure=lambda job, error: calls.append(("dead", job.attempts, str(error))))
    def always_fails(payload):
        raise ValueError(f"bad row {payload}")

    job_id = driver.push(always_fails.job(7))
    started = time.monotonic()
    worker = run_burst(driver)

    assert calls == [("retry", 1, "bad row 7"), ("retry", 2, "bad row 7"), ("dead", 3, "bad row 7")]
    assert time.monotonic() - started >= 0.05 + 0.10  # the backoff doubled
    assert (worker.stats.retried, worker.stats.dead_lettered, worker.stats.completed) == (2, 1, 0)
    dead = driver.dead_letter_jobs()
    assert dead["id"].tolist() == [job_id] and dead["attempts"].tolist() == [3]
    error = dead["last_error"].iloc[0]
    assert error.startswith("ValueError: bad row 7\n") and "Traceback" in error and "always_fails" in error


def test_a_job_that_fails_then_succeeds_completes(driver):
    seen = []

    @task(name="w.flaky", max_retries=3, retry=FAST_RETRY)
    def flaky(payload):
        seen.append(payload)
        if len(seen) < 3:
            raise ConnectionError("upstream down")
        return "ok"

    job_id = driver.push(flaky.job("x"))
    run_burst(driver)

    job = driver.get_job(job_id)
    assert (job.status, job.attempts, job.result) == (JobStatus.COMPLETED, 3, "ok")


def test_the_concurrency_limit_is_never_exceeded(driver):
    lock, running, peak = threading.Lock(), [0], [0]

    @task(name="w.counted")
    def counted(payload):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    driver.push_many([counted.job(i) for i in range(30)])
    worker = run_burst(driver, concurrency=3)

    assert worker.stats.completed == 30 and peak[0] == 3


def test_quick_jobs_are_claimed_ahead_and_given_back_unstarted_on_stop(driver):
    gate, gate_started = threading.Event(), threading.Event()

    @task(name="w.gated")
    def gated(payload):
        if payload == "gate":
            gate_started.set()
            gate.wait(30)

    ids = driver.push_many([gated.job(i) for i in range(5)] + [gated.job("gate")] + [gated.job(i) for i in range(50)])
    worker = Worker(driver, concurrency=1, poll_interval=0.05, lease_timeout=30).start()
    assert gate_started.wait(30)  # the five quick jobs ran first (and taught it to claim ahead)
    wait_until(lambda: driver.size() == 0, 30, "the worker to claim every job ahead")
    worker.stop(wait=False)
    wait_until(lambda: driver.size() >= 40, 30, "the unstarted jobs to be given back while the gate job runs")
    gate.set()
    worker.stop(timeout=10)

    jobs = [driver.get_job(job_id) for job_id in ids]
    given_back = [job for job in jobs if job.status is JobStatus.PENDING]
    assert worker.stats.unclaimed == len(given_back) >= 40
    assert all(job.attempts == 0 and job.reserved_by is None for job in given_back)
    assert all(job.status is JobStatus.COMPLETED for job in jobs[:6])
    assert not [job for job in jobs if job.status is JobStatus.PROCESSING]


def test_slow_jobs_are_not_hoarded_by_one_worker(driver, other_driver):
    @task(name="w.slowish")
    def slowish(payload):
        time.sleep(0.1)

    driver.push_many([slowish.job(i) for i in range(12)])
    workers = [Worker(d, concurrency=1, poll_interval=0.02, burst=True) for d in (driver, other_driver)]
    threads = [threading.Thread(target=worker.run) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    shares = [worker.stats.completed for worker in workers]
    assert sum(shares) == 12 and min(shares) >= 4, shares


def test_a_job_past_its_timeout_is_failed_and_its_slot_stays_taken(driver):
    @task(name="w.slow", max_retries=0, timeout=0.2)
    def slow(payload):
        time.sleep(payload)

    slow_id, quick_id = driver.push_many([slow.job(1.0), slow.job(0.0)])
    worker = run_burst(driver, concurrency=1)

    assert worker.stats.timed_out == 1 and worker.stats.completed == 1
    dead = driver.dead_letter_jobs()
    assert dead["id"].tolist() == [slow_id] and dead["last_error"].iloc[0].startswith("TimeoutError:")
    slow_job, quick_job = driver.get_job(slow_id), driver.get_job(quick_id)
    # With one slot, the next job could start only when the slow thread really ended.
    assert (quick_job.reserved_at - slow_job.reserved_at).total_seconds() >= 0.9
    assert quick_job.status is JobStatus.COMPLETED


def test_a_timed_out_attempt_finishing_late_does_not_disturb_the_next_attempt(driver):
    attempts = []

    @task(name="w.slow_then_fast", max_retries=1, timeout=0.2, retry=RetryPolicy(delay=0.0))
    def slow_then_fast(payload):
        attempts.append(1)
        time.sleep(1.0 if len(attempts) == 1 else 0.0)
        return len(attempts)

    @task(name="w.keeper")
    def keeper(payload):
        time.sleep(1.5)  # keeps the worker busy until the first attempt's thread wakes up

    job_id, _ = driver.push_many([slow_then_fast.job(), keeper.job()])
    worker = run_burst(driver, concurrency=3)

    # The second attempt ran in the free slot while the first one's thread still slept,
    # and the first one's late outcome was discarded rather than taken for the second's.
    job = driver.get_job(job_id)
    assert (job.status, job.attempts, job.result) == (JobStatus.COMPLETED, 2, 2)
    assert (worker.stats.timed_out, worker.stats.retried, worker.stats.completed) == (1, 1, 2)


def test_an_unknown_job_is_dead_lettered_and_the_worker_goes_on(driver):
    @task(name="w.known")
    def known(payload):
        return payload

    driver.push_many([Job("nobody.registered.this", {"a": 1}), known.job(1)])
    worker = run_burst(driver)

    assert worker.stats.completed == 1 and worker.stats.dead_lettered == 1
    reason = driver.dead_letter_jobs()["last_error"].iloc[0]
    assert reason.startswith("LookupError: no task or job factory is registered for 'nobody.registered.this'")


def test_a_result_that_is_not_json_fails_the_job(driver):
    @task(name="w.bad_result", max_retries=0)
    def bad_result(payload):
        return {1, 2, 3}

    driver.push(bad_result.job())
    run_burst(driver)
    assert driver.dead_letter_jobs()["last_error"].iloc[0].startswith("InvalidInputError: result of job 'w.bad_result'")


class Resize(Job):
    """A job class (the seed's model) run by the worker through its factory."""

    def handle(self):
        return self.payload["width"] // 2


def test_job_classes_registered_as_factories_are_run(driver):
    driver.register_job_factory("resize", lambda payload: Resize("resize", payload))
    job_id = driver.push(Resize("resize", {"width": 640}))
    run_burst(driver)
    assert driver.get_job(job_id).result == 320


def test_a_background_worker_starts_and_stops_from_a_notebook(driver):
    @task(name="w.background")
    def background(payload):
        return payload

    worker = Worker(driver, concurrency=2, poll_interval=0.05).start()
    ids = driver.push_many([background.job(i) for i in range(10)])
    deadline = time.monotonic() + 20
    while driver.fetch_stats()["completed"].sum() < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.stop(timeout=10)

    assert not worker.is_running
    assert [driver.get_job(job_id).status for job_id in ids] == [JobStatus.COMPLETED] * 10


def test_worker_options_are_checked():
    driver = DatabaseQueueDriver("sqlite://")
    for bad in ({"queues": ()}, {"concurrency": 0}, {"lease_timeout": 0}):
        with pytest.raises(ValueError):
            Worker(driver, **bad)
    with pytest.raises(ValueError, match="backoff"):
        RetryPolicy(backoff=0.5)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_failed_completion_write_is_retried_never_turned_into_a_retry_of_the_job(db_url, table_name):
    driver = DatabaseQueueDriver(db_url, table=table_name)
    driver.create_table()
    killed = []

    @sa.event.listens_for(driver.engine, "before_cursor_execute")
    def kill_before_first_completion(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("UPDATE") and "result" in statement and not killed:
            killed.append(session_id(conn.connection.driver_connection))
            kill_session(driver.engine.url, killed[0])

    @task(name="w.once")
    def once(payload):
        return payload

    ids = driver.push_many([once.job(i) for i in range(5)])
    worker = Worker(driver, burst=True, concurrency=5, completion_batch=5, lease_timeout=10)
    worker.run()

    assert killed and worker.stats.database_errors >= 1
    assert worker.stats.retried == 0 and worker.stats.completed == 5
    jobs = [driver.get_job(job_id) for job_id in ids]
    assert [(job.status, job.attempts) for job in jobs] == [(JobStatus.COMPLETED, 1)] * 5
    driver.close()


def test_a_result_is_encoded_once_on_its_way_to_the_database(driver, monkeypatch):
    """The job's thread encodes it (a result that is not JSON is the job's failure there); the completion
    writes that text, not a second encoding."""
    import kronix_data.job

    encoded = []
    real_encode = kronix_data.job._encode

    def counting_encode(value, what):
        encoded.append(what)
        return real_encode(value, what)

    monkeypatch.setattr(kronix_data.job, "_encode", counting_encode)

    @task(name="w.records")
    def records(payload):
        return [{"n": payload, "text": "x" * 100}]

    ids = driver.push_many([records.job(i) for i in range(10)])
    encoded.clear()  # the payloads' encodings
    run_burst(driver, concurrency=2)
    assert sorted(encoded) == ["result of job 'w.records'"] * 10
    assert [driver.get_job(job_id).result for job_id in ids] == [[{"n": i, "text": "x" * 100}] for i in range(10)]
