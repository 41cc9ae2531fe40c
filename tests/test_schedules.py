"""Schedules on every database, fired by real worker processes: each slot once, a missed slot once,
schedules stored in the database, the ``kronix schedules`` table, and bad input."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from helpers import db_now, kronix, set_schedule_next_run, wait_until
from kronix_data import InvalidInputError, start_local_workers, task
from kronix_data.cron import slot_of

ONE_SECOND = timedelta(seconds=1)


def scheduled_jobs(driver, name: str | None = None):
    """The jobs the schedules fired, with their slots (from their keys), oldest slot first."""
    frame = driver.jobs(limit=None)
    frame = frame[frame["key"].fillna("").str.startswith("schedule:" + (f"{name}:" if name else ""))].copy()
    frame["slot"] = [slot_of(key) for key in frame["key"]]
    return frame.sort_values("slot")


def test_three_worker_processes_fire_each_slot_exactly_once(driver):
    """Every worker runs the scheduler on an every-second @task(cron=...) that each of them stores when it
    imports the module: over several slots, every slot from the first is one job, none twice, none skipped."""
    with start_local_workers(driver, 3, modules=["schedule_jobs"], concurrency=2) as workers:
        wait_until(lambda: (driver.jobs(name="sched.tick", status="completed", limit=None).shape[0] >= 6), 120,
                   "six slots of the every-second schedule to complete")
        assert len(workers.alive()) == 3
    assert [process.exitcode for process in workers.processes] == [0, 0, 0]

    jobs = scheduled_jobs(driver, "sched.tick")
    slots = list(jobs["slot"])
    assert len(slots) == len(set(slots)), "a slot was fired twice"
    assert all(later - earlier == ONE_SECOND for earlier, later in zip(slots, slots[1:])), slots  # none skipped
    assert set(jobs["status"]) <= {"completed", "pending"}  # the last slots may have come after the stop
    completed = jobs[jobs["status"] == "completed"]
    assert len(completed) >= 6 and set(completed["attempts"]) == {1}
    assert [driver.get_job(job_id).result for job_id in completed["id"]] == list(completed["key"])  # its own slot
    (schedule,) = driver.schedules().to_dict(orient="records")
    assert (schedule["name"], schedule["cron"], schedule["timezone"]) == ("sched.tick", "* * * * * *", "UTC")
    assert schedule["last_run_at"] == slots[-1] and schedule["next_run_at"] > slots[-1]
    assert len(driver.workers()) == 3


def test_a_slot_missed_while_no_worker_ran_fires_once_when_a_worker_starts(driver):
    """A nightly schedule last fired ten nights ago: the first worker to start fires the latest missed
    night, once, and the schedule goes on from tomorrow."""
    driver.schedule("test.noop", cron="0 3 * * *", name="nightly", payload={"report": "sales"})
    now = db_now(driver)
    latest = now.replace(hour=3, minute=0, second=0, microsecond=0)
    latest -= timedelta(days=1) if latest > now else timedelta(0)
    set_schedule_next_run(driver, "nightly", latest - timedelta(days=10))

    with start_local_workers(driver, 1, modules=["worker_jobs"], burst=True) as workers:
        workers.join(timeout=120)
    assert [process.exitcode for process in workers.processes] == [0]

    jobs = scheduled_jobs(driver, "nightly")
    assert list(jobs["slot"]) == [latest]  # one job, not eleven
    assert list(jobs["status"]) == ["completed"]
    assert driver.get_job(jobs["id"].iloc[0]).payload == {"report": "sales"}
    (schedule,) = driver.schedules().to_dict(orient="records")
    assert schedule["last_run_at"] == latest and schedule["next_run_at"] == latest + timedelta(days=1)
    assert schedule["last_job_id"] == jobs["id"].iloc[0]


def test_a_schedule_made_by_the_driver_is_stored_for_every_machine_and_can_be_removed(driver, other_driver):
    name = driver.schedule("test.noop", cron="0 9 * * *", timezone="Europe/Paris", payload=[1, 2], queue="reports")
    assert name == "test.noop"
    (seen,) = other_driver.schedules().to_dict(orient="records")  # another connection: it is in the database
    paris = ZoneInfo("Europe/Paris")
    local = datetime.now(paris)
    expected = local.replace(hour=9, minute=0, second=0, microsecond=0)
    expected += timedelta(days=1) if expected <= local else timedelta(0)
    assert seen["next_run_at"] == expected.astimezone(timezone.utc)
    assert (seen["timezone"], seen["queue"], seen["payload"]) == ("Europe/Paris", "reports", [1, 2])
    assert 0 < seen["next_in_s"] <= 86_400

    # Saved again with the same cron: the next slot stays; with another cron, it moves.
    driver.schedule("test.noop", cron="0 9 * * *", timezone="Europe/Paris", payload=[3])
    assert other_driver.schedules()["next_run_at"].iloc[0] == seen["next_run_at"]
    driver.schedule("test.noop", cron="0 10 * * *", timezone="Europe/Paris")
    assert other_driver.schedules()["next_run_at"].iloc[0] == seen["next_run_at"] + timedelta(hours=1)

    assert other_driver.unschedule("test.noop") is True
    assert driver.unschedule("test.noop") is False
    assert len(driver.schedules()) == 0


def test_bad_schedules_are_refused_with_the_reason_and_nothing_is_written(driver):
    with pytest.raises(InvalidInputError, match=r"invalid cron expression '61 \* \* \* \*'"):
        driver.schedule("test.noop", cron="61 * * * *")
    with pytest.raises(InvalidInputError, match="unknown time zone 'Mars/Olympus_Mons'"):
        driver.schedule("test.noop", cron="* * * * *", timezone="Mars/Olympus_Mons")
    with pytest.raises(InvalidInputError, match="needs a cron expression"):
        driver.schedule("no.such.task")
    with pytest.raises(InvalidInputError, match="not JSON-serialisable"):
        driver.schedule("test.noop", cron="* * * * *", payload={"when": object()})
    with pytest.raises(InvalidInputError, match="schedule name"):
        driver.schedule("test.noop", cron="* * * * *", name="x" * 201)
    with pytest.raises(InvalidInputError, match="queue name"):
        driver.schedule("test.noop", cron="* * * * *", queue="")
    assert len(driver.schedules()) == 0
    # The decorator checks when the module is imported, before anything registers.
    with pytest.raises(InvalidInputError, match="invalid cron expression 'every monday'"):
        task(name="test.bad_cron", cron="every monday")(lambda payload: None)
    with pytest.raises(InvalidInputError, match="unknown time zone 'Nowhere/Land'"):
        task(name="test.bad_zone", cron="* * * * *", timezone="Nowhere/Land")(lambda payload: None)


def test_kronix_schedules_lists_them_and_unschedule_removes_one(driver, db_url, table_name, tmp_path):
    driver.schedule("test.noop", cron="*/5 * * * *", name="five")
    listed = kronix("--db", db_url, "--table", table_name, "schedules", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["name", "task", "cron", "timezone", "queue", "next_run_at", "last_run_at"]
    assert row.startswith("five") and "*/5 * * * *" in row and "UTC" in row
    as_json = json.loads(kronix("--db", db_url, "--table", table_name, "schedules", "--json", cwd=tmp_path).stdout)
    assert [(entry["name"], entry["last_run_at"]) for entry in as_json] == [("five", None)]
    assert datetime.fromisoformat(as_json[0]["next_run_at"]).minute % 5 == 0

    removed = kronix("--db", db_url, "--table", table_name, "unschedule", "five", cwd=tmp_path)
    assert removed.returncode == 0 and "removed schedule 'five'" in removed.stdout
    again = kronix("--db", db_url, "--table", table_name, "unschedule", "five", cwd=tmp_path)
    assert again.returncode == 1 and "no schedule named 'five'" in again.stderr


def test_a_stored_schedule_that_cannot_fire_is_stopped_not_retried_in_a_loop(driver):
    """A row no validation made (edited by hand, or a time zone this machine lacks) stops, with a log line."""
    driver.schedule("test.noop", cron="* * * * *", name="broken")
    schedules = driver.store.tables.schedules
    with driver.engine.begin() as conn:
        conn.execute(schedules.update().values(timezone="Mars/Olympus_Mons"))
    set_schedule_next_run(driver, "broken", db_now(driver) - timedelta(seconds=5))
    assert driver.run_scheduler() is None  # nothing due any more: no schedule has a next slot
    (schedule,) = driver.schedules().to_dict(orient="records")
    assert schedule["next_run_at"] != schedule["next_run_at"] and schedule["last_job_id"] is None  # NaT
    assert len(scheduled_jobs(driver)) == 0
