"""The driver's contract, run unchanged against SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import sqlalchemy as sa

from kronix_data import DatabaseQueueDriver, Job, JobStatus
from kronix_data.analytics import DEAD_LETTER_COLUMNS, STATS_COLUMNS


class Greeting(Job):
    """A job class the way users write them: its own constructor and handle()."""

    def __init__(self, who: str):
        super().__init__("greet", {"who": who}, max_retries=1)

    def handle(self):
        return f"hello {self.payload['who']}"


def raw_insert(driver: DatabaseQueueDriver, **values) -> None:
    """Write a row behind the driver's back, as another program (or an attacker) could."""
    row = {"queue": "default", "status": "pending", "attempts": 0, "max_retries": 3,
           "created_at": datetime.now(timezone.utc), "available_at": datetime.now(timezone.utc)
           - timedelta(seconds=1), **values}
    with driver.engine.begin() as conn:
        conn.execute(driver.table.insert().values(row))


# -- push, pop, size --------------------------------------------------------

def test_push_then_pop_returns_the_stored_job(driver):
    job = Job("etl.clean", {"rows": [1, 2, 3], "name": "Zoë ✓"}, max_retries=5)
    job_id = driver.push(job)

    assert job.id == job_id and driver.size() == 1
    popped = driver.pop()
    assert popped.id == job_id
    assert (popped.name, popped.payload, popped.queue) == ("etl.clean", job.payload, "default")
    assert popped.attempts == 1 and popped.max_retries == 5
    assert popped.status is JobStatus.PROCESSING and popped.reserved_by == driver.worker_id
    assert popped.created_at.tzinfo is not None and popped.reserved_at >= popped.created_at
    assert driver.size() == 0
    assert driver.pop() is None


def test_queues_are_separate_and_push_queue_overrides_job_queue(driver):
    driver.push(Job("a", queue="reports"))
    driver.push(Job("b", queue="reports"), queue="emails")

    assert driver.size("reports") == 1 and driver.size("emails") == 1 and driver.size() == 0
    assert driver.pop() is None
    assert driver.pop("emails").name == "b"
    assert driver.pop("reports").name == "a"


def test_jobs_are_claimed_oldest_first(driver):
    first = driver.push_many([Job("n", i) for i in range(5)])
    second = driver.push_many([Job("n", i) for i in range(5, 10)])

    claimed = driver.pop_many(4) + driver.pop_many(100)
    assert [job.id for job in claimed] == first + second
    assert [job.payload for job in claimed] == list(range(10))


def test_a_job_is_not_claimed_before_it_is_due(driver):
    driver.push(Job("later", available_at=datetime.now(timezone.utc) + timedelta(hours=1)))
    driver.push(Job("soon", available_at=datetime.now(timezone.utc) + timedelta(seconds=0.3)))

    assert driver.size() == 2
    assert driver.pop() is None
    time.sleep(0.4)
    assert driver.pop().name == "soon"
    assert driver.pop() is None


def test_push_many_returns_ids_in_order_and_empty_is_a_no_op(driver):
    assert driver.push_many([]) == []
    jobs = [Job("n", i, id=f"custom-{i}") for i in range(3)]
    assert driver.push_many(jobs) == ["custom-0", "custom-1", "custom-2"]
    assert driver.size() == 3


def test_a_duplicate_id_is_refused_and_nothing_is_written(driver):
    driver.push(Job("n", id="same"))
    with pytest.raises(ValueError, match="already"):
        driver.push_many([Job("n", id="fresh"), Job("n", id="same")])
    assert driver.size() == 1


def test_a_large_push_round_trips_every_field(driver):
    # Large enough for PostgreSQL's COPY path, mixed due times and batch ids.
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    jobs = [Job("bulk", {"i": i, "text": "é\t\n\\ 🙂"}, queue="bulk", max_retries=i % 5,
                available_at=later if i % 2 else None, batch_id="b1" if i < 100 else None) for i in range(300)]
    ids = driver.push_many(jobs)
    assert len(set(ids)) == 300 and ids == [job.id for job in jobs]
    assert driver.size("bulk") == 300
    popped = driver.pop_many(300, "bulk")
    assert [job.payload["i"] for job in popped] == list(range(0, 300, 2))
    stored = driver.get_job(ids[7])
    assert stored.payload == {"i": 7, "text": "é\t\n\\ 🙂"} and stored.max_retries == 2
    assert abs((stored.available_at - later).total_seconds()) < 0.01 and stored.batch_id == "b1"
    assert stored.created_at <= datetime.now(timezone.utc) + timedelta(seconds=5)


def test_a_keyed_push_is_idempotent(driver):
    first = driver.push_many([Job("chunk", i, key=f"k{i}") for i in range(3)])
    again = [Job("chunk", i, key=f"k{i}") for i in range(5)]
    second = driver.push_many(again)
    assert second[:3] == first and len(set(second)) == 5
    assert [job.id for job in again] == second
    assert driver.size() == 5
    # A finished job's key still counts: re-running the cell after the work is done adds nothing.
    job = driver.pop()
    assert driver.complete(job)
    assert driver.push(Job("chunk", 0, key=job.key)) == job.id
    assert driver.size() == 4
    assert driver.get_job(job.id).key == job.key


def test_a_push_with_a_key_twice_or_a_duplicate_id_writes_nothing(driver):
    with pytest.raises(ValueError, match="share a key"):
        driver.push_many([Job("n", key="k"), Job("n", key="k")])
    driver.push(Job("n", id="same"))
    with pytest.raises(ValueError, match="already"):
        driver.push_many([Job("n", key="new"), Job("n", id="same", key="other")])
    assert driver.size() == 1


@pytest.mark.parametrize("payload, error", [
    ({"when": datetime.now()}, TypeError),
    ({1, 2}, TypeError),
    (float("nan"), ValueError),
    ({"x": float("inf")}, ValueError),
])
def test_a_payload_that_is_not_json_fails_at_push_naming_the_job(driver, payload, error):
    with pytest.raises(error, match="'etl.load'"):
        driver.push_many([Job("fine", 1), Job("etl.load", payload)])
    assert driver.size() == 0


@pytest.mark.parametrize("payload", [
    None, 0, -1.5, "text", "", [], {}, {"nested": {"deep": [1, [2, [3, {"é": "✓"}]]]}},
    "x" * 2_000_000, [{"row": i, "value": i / 7} for i in range(5_000)],
])
def test_payloads_round_trip_exactly(driver, payload):
    driver.push(Job("n", payload))
    assert driver.pop().payload == payload


@pytest.mark.parametrize("job, message", [
    (Job(""), "job name"),
    (Job("x" * 256), "job name"),
    (Job("bad\nname"), "control"),
    (Job("n", queue="q" * 129), "queue name"),
    (Job("n", id="i" * 129), "job id"),
    (Job("n", max_retries=-1), "max_retries"),
    (Job("n", available_at=datetime(2030, 1, 1)), "timezone-aware"),
])
def test_bad_names_and_options_are_refused_before_any_write(driver, job, message):
    with pytest.raises(ValueError, match=message):
        driver.push(job)
    assert driver.size(job.queue if len(job.queue) <= 128 else "default") == 0


# -- complete, release, fail and the ownership rule ---------------------------

def test_complete_stores_the_result_once(driver):
    driver.push(Job("n", 1))
    job = driver.pop()
    job.result = {"rows": 10}

    assert driver.complete(job) is True
    assert driver.complete(job) is False
    stored = driver.get_job(job.id)
    assert stored.status is JobStatus.COMPLETED and stored.result == {"rows": 10}
    assert stored.finished_at >= stored.reserved_at
    assert driver.get_job("no-such-id") is None


def test_complete_many_counts_only_held_jobs(driver, other_driver):
    driver.push_many([Job("n", i) for i in range(6)])
    mine = driver.pop_many(4)
    theirs = other_driver.pop_many(2)

    assert driver.complete_many(mine + theirs) == 4
    assert driver.complete_many(mine) == 0
    assert driver.complete_many([]) == 0
    assert other_driver.complete_many(theirs) == 2


def test_only_the_holder_can_finish_a_job(driver, other_driver):
    driver.push(Job("n"))
    job = driver.pop()

    assert other_driver.complete(job) is False
    assert other_driver.release(job) is False
    assert other_driver.fail(job) is False
    assert driver.get_job(job.id).status is JobStatus.PROCESSING
    assert driver.complete(job) is True


def test_a_stale_copy_of_an_earlier_attempt_cannot_finish_the_job(driver):
    driver.push(Job("n"))
    first = driver.pop()
    time.sleep(0.05)
    assert driver.recover_stale_jobs(timeout=0) == 1
    second = driver.pop()

    assert second.id == first.id and second.attempts == 2
    assert driver.complete(first) is False
    assert driver.complete(second) is True


def test_a_job_never_pushed_cannot_be_finished(driver):
    assert driver.complete(Job("n")) is False
    assert driver.fail(Job("n", id="ghost")) is False


def test_release_puts_the_job_back_with_its_error_and_attempt_count(driver):
    driver.push(Job("n"))
    job = driver.pop()
    job.last_error = "ValueError: try again"

    assert driver.release(job) is True
    assert driver.size() == 1
    again = driver.pop()
    assert again.id == job.id and again.attempts == 2 and again.last_error == "ValueError: try again"


def test_release_with_a_delay_uses_the_database_clock(driver):
    driver.push(Job("n"))
    job = driver.pop()

    assert driver.release(job, delay=timedelta(seconds=0.5)) is True
    assert driver.pop() is None
    time.sleep(0.6)
    assert driver.pop().id == job.id


def test_release_honours_the_jobs_available_at(driver):
    driver.push(Job("n"))
    job = driver.pop()
    job.available_at = datetime.now(timezone.utc) + timedelta(hours=1)

    assert driver.release(job) is True
    assert driver.size() == 1 and driver.pop() is None


def test_fail_moves_the_job_to_the_dead_letters(driver):
    driver.push(Job("etl.load", {"file": "a.csv"}, queue="etl", max_retries=2))
    job = driver.pop("etl")
    job.last_error = "KeyError: 'amount'"

    assert driver.fail(job) is True
    assert driver.size("etl") == 0
    dead = driver.dead_letter_jobs()
    assert list(dead.columns) == list(DEAD_LETTER_COLUMNS)
    row = dead.iloc[0]
    assert (row["id"], row["name"], row["queue"]) == (job.id, "etl.load", "etl")
    assert (row["attempts"], row["max_retries"], row["last_error"]) == (1, 2, "KeyError: 'amount'")
    assert row["payload"] == {"file": "a.csv"} and row["reserved_by"] == driver.worker_id
    assert str(dead["finished_at"].dtype) == "datetime64[ns, UTC]"
    assert row["finished_at"] >= row["created_at"]


def test_a_job_runs_at_most_max_retries_plus_one_times(driver):
    driver.push(Job("n", max_retries=2))
    runs = 0
    while (job := driver.pop()) is not None:
        runs += 1
        assert job.attempts == runs
        if job.attempts > job.max_retries:
            driver.fail(job)
        else:
            driver.release(job)
    assert runs == 3
    assert driver.dead_letter_jobs()["attempts"].tolist() == [3]


# -- maintenance --------------------------------------------------------------

def test_recover_stale_jobs_uses_the_reservation_time(driver):
    # Due long ago, claimed just now: the seed's available_at test would call it stale.
    raw_insert(driver, id="old", name="n", available_at=datetime.now(timezone.utc) - timedelta(hours=2))
    job = driver.pop()

    assert driver.recover_stale_jobs(timeout=timedelta(minutes=5)) == 0
    time.sleep(0.05)
    assert driver.recover_stale_jobs(timeout=0) == 1
    stored = driver.get_job(job.id)
    assert stored.status is JobStatus.PENDING and stored.attempts == 1 and stored.reserved_by is None
    assert "lease expired" in stored.last_error and driver.worker_id in stored.last_error


def test_recover_stale_jobs_dead_letters_a_job_whose_attempts_are_used_up(driver):
    driver.push(Job("crashes-its-worker", max_retries=1))
    for _ in range(2):
        assert driver.pop() is not None
        time.sleep(0.05)
        assert driver.recover_stale_jobs(timeout=0.01) == 1

    assert driver.size() == 0 and driver.pop() is None
    dead = driver.dead_letter_jobs()
    assert dead["attempts"].tolist() == [2]
    assert "attempts used up" in dead["last_error"].iloc[0]


def test_recover_stale_jobs_refuses_a_negative_timeout(driver):
    with pytest.raises(ValueError, match="timeout"):
        driver.recover_stale_jobs(timeout=-1)


def test_clear_removes_pending_jobs_but_never_running_ones(driver):
    driver.push_many([Job("n", i) for i in range(3)])
    driver.push(Job("n", queue="other"))
    running = driver.pop()

    assert driver.clear() == 2
    assert driver.size() == 0 and driver.size("other") == 1
    assert driver.complete(running) is True


def test_dead_letters_can_be_retried_and_cleared(driver):
    driver.push_many([Job("n", i, max_retries=0) for i in range(3)])
    for job in driver.pop_many(3):
        job.last_error = "boom"
        driver.fail(job)
    dead_ids = driver.dead_letter_jobs()["id"].tolist()

    assert driver.retry_dead_letter(dead_ids[0]) is True
    assert driver.retry_dead_letter(dead_ids[0]) is False
    assert driver.retry_dead_letter("unknown-id") is False
    retried = driver.pop()
    assert retried.id == dead_ids[0] and retried.attempts == 1 and retried.last_error is None
    assert driver.clear_dead_letters() == 2
    assert driver.dead_letter_jobs().empty
    assert driver.complete(retried) is True


# -- factories ---------------------------------------------------------------

def test_a_registered_factory_rebuilds_the_job_with_the_rows_identity(driver):
    driver.register_job_factory("greet", lambda payload: Greeting(payload["who"]))
    job_id = driver.push(Greeting("Ada"), queue="mail")

    popped = driver.pop("mail")
    assert isinstance(popped, Greeting) and popped.handle() == "hello Ada"
    assert (popped.id, popped.attempts, popped.queue) == (job_id, 1, "mail")
    assert popped.created_at is not None and popped.reserved_at is not None
    assert driver.complete(popped) is True


def test_an_unregistered_name_pops_as_a_plain_job_when_factories_exist(driver):
    driver.register_job_factory("greet", lambda payload: Greeting(payload["who"]))
    driver.push(Job("unknown.name", {"a": 1}))

    popped = driver.pop()
    assert type(popped) is Job and popped.payload == {"a": 1}
    with pytest.raises(NotImplementedError, match="unknown.name"):
        popped.handle()
    assert driver.complete(popped) is True


def test_a_job_that_cannot_be_rebuilt_is_dead_lettered_not_stranded(driver):
    driver.register_job_factory("greet", lambda payload: Greeting(payload["who"]))
    driver.push(Job("greet", {"wrong": "key"}))
    raw_insert(driver, id="not-json", name="n", payload="{not json")
    driver.push(Job("greet", {"who": "Bob"}))

    popped = driver.pop()
    assert popped.payload == {"who": "Bob"}
    assert driver.pop() is None
    dead = driver.dead_letter_jobs().set_index("id")
    assert len(dead) == 2
    assert "KeyError" in dead.loc[dead["name"] == "greet", "last_error"].iloc[0]
    assert "could not rebuild" in dead.loc["not-json", "last_error"]
    assert dead.loc["not-json", "payload"] == "{not json"


def test_a_factory_must_be_callable(driver):
    with pytest.raises(TypeError, match="callable"):
        driver.register_job_factory("x", "not a function")


# -- DataFrames ----------------------------------------------------------------

def test_stats_and_dead_letters_are_typed_empty_frames_on_an_empty_table(driver):
    stats, dead = driver.fetch_stats(), driver.dead_letter_jobs()
    assert stats.empty and dead.empty
    assert dict(stats.dtypes.astype(str)) == STATS_COLUMNS
    assert dict(dead.dtypes.astype(str)) == DEAD_LETTER_COLUMNS


def test_fetch_stats_counts_each_status_per_queue(driver):
    driver.push_many([Job("n", i) for i in range(6)])
    driver.push(Job("n", queue="other"))
    done, failed, running = driver.pop(), driver.pop(), driver.pop()
    time.sleep(0.02)
    driver.complete(done)
    driver.fail(failed)

    stats = driver.fetch_stats().set_index("queue")
    assert dict(stats.dtypes.astype(str)) == {k: v for k, v in STATS_COLUMNS.items() if k != "queue"}
    default = stats.loc["default"]
    assert (default["pending"], default["processing"], default["completed"], default["failed"]) == (3, 1, 1, 1)
    assert stats.loc["other", "pending"] == 1 and stats.loc["other", "completed"] == 0
    assert default["oldest_pending_age_s"] >= 0 and default["wait_s_mean"] >= 0
    assert 0.01 <= default["run_s_mean"] < 5
    assert pd.isna(stats.loc["other", "run_s_mean"])
    assert running.id is not None


# -- construction ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["jobs; DROP TABLE x", "my jobs", 'jobs"', "jobs'", "1jobs", "",
                                  "a.b.c", "x" * 49, "jobs--", "(select 1)"])
def test_invalid_table_names_are_refused_before_any_sql(name):
    # The URL points at nothing: a ValueError proves no connection was tried.
    with pytest.raises(ValueError, match="invalid table name"):
        DatabaseQueueDriver("postgresql://nobody:secret@127.0.0.1:1/none", table=name)


def test_worker_ids_are_unique_and_the_repr_hides_the_password():
    a = DatabaseQueueDriver("postgresql://alice:s3cret@127.0.0.1:1/db")
    b = DatabaseQueueDriver("postgresql://alice:s3cret@127.0.0.1:1/db", table="app.jobs")
    assert a.worker_id != b.worker_id
    assert "s3cret" not in repr(a) and "alice" in repr(a)
    assert DatabaseQueueDriver("sqlite://", worker_id="me").worker_id == "me"


def test_an_unsupported_database_is_named():
    with pytest.raises(ValueError, match="unsupported database 'oracle'"):
        DatabaseQueueDriver("oracle://scott@127.0.0.1:1/x")


def test_a_callers_engine_is_used_as_is(db_url, table_name):
    engine = sa.create_engine(db_url)
    queue = DatabaseQueueDriver(engine, table=table_name)
    queue.create_table()
    queue.push(Job("n"))
    assert queue.pop().name == "n"
    engine.dispose()


# -- what workers use ------------------------------------------------------------

def test_unclaim_gives_jobs_back_without_counting_the_attempt(driver, other_driver):
    driver.push_many([Job("n", i) for i in range(3)])
    jobs = driver.pop_many(3)

    assert other_driver.unclaim(jobs) == 0
    assert driver.unclaim(jobs) == 3
    assert driver.size() == 3
    assert [job.attempts for job in driver.pop_many(3)] == [1, 1, 1]


def test_heartbeat_keeps_a_held_job_from_being_taken_as_stale(driver, other_driver):
    driver.push(Job("n"))
    job = driver.pop()
    time.sleep(0.3)

    assert other_driver.heartbeat([job]) == 0
    assert driver.heartbeat([job]) == 1
    assert driver.recover_stale_jobs(timeout=0.25) == 0
    time.sleep(0.3)
    assert driver.recover_stale_jobs(timeout=0.25) == 1


def test_retry_dead_letters_filters_by_queue_and_name(driver):
    driver.push_many([Job("a", queue="q1"), Job("b", queue="q1"), Job("a", queue="q2")])
    for queue in ("q1", "q2"):
        for job in driver.pop_many(5, queue):
            driver.fail(job)

    assert driver.retry_dead_letters(queue="q1", name="a") == 1
    assert driver.retry_dead_letters(queue="q1") == 1
    assert driver.retry_dead_letters() == 1
    assert driver.retry_dead_letters() == 0
    assert driver.size("q1") == 2 and driver.size("q2") == 1
