"""Snooze: a job that asks to run later runs again after the delay, its attempts unchanged, no error recorded."""

from __future__ import annotations

from datetime import timedelta

import pytest

from helpers import db_now
from kronix_data import InvalidInputError, Job, Snooze, start_local_workers
from worker_jobs import fetch_runs


def test_a_snoozed_job_runs_again_after_the_delay_without_using_a_retry(driver, db_url, runs_table):
    """``test.snooze_once`` has max_retries=0: a snooze that counted as a failed attempt would dead-letter it."""
    seconds = 1.5
    job_id = driver.push(Job("test.snooze_once", {"n": 1, "seconds": seconds, "url": db_url, "runs": runs_table},
                             max_retries=0))
    with start_local_workers(driver, 1, modules=["worker_jobs"], burst=True) as workers:
        workers.join(timeout=120)  # a burst worker waits for the jobs it snoozed
    assert [process.exitcode for process in workers.processes] == [0]

    job = driver.get_job(job_id)
    assert (job.status.value, job.attempts, job.last_error, job.result) == ("completed", 1, None, 2)
    first, second = sorted(started for _, _, started, _ in fetch_runs(db_url, runs_table))
    assert second - first >= seconds - 0.01  # the second run waited for the delay (clock resolution aside)
    assert len(driver.dead_letter_jobs()) == 0


def test_a_held_job_snoozed_by_hand_is_pending_later_with_its_attempt_given_back(driver):
    driver.push(Job("report", {"day": 1}))
    job = driver.pop()
    assert job.attempts == 1
    before = db_now(driver)
    assert driver.snooze(job, timedelta(minutes=5)) is True
    assert driver.snooze(job, 1) is False  # no longer held
    stored = driver.get_job(job.id)
    assert (stored.status.value, stored.attempts, stored.last_error, stored.reserved_by) == ("pending", 0, None, None)
    assert before + timedelta(minutes=5) <= stored.available_at <= db_now(driver) + timedelta(minutes=5)
    assert driver.pop() is None  # not due yet


@pytest.mark.parametrize("delay", [-1, float("nan"), float("inf"), "10", True, timedelta(seconds=-1)])
def test_a_bad_snooze_delay_is_refused_naming_it(delay):
    with pytest.raises(InvalidInputError, match="Snooze needs a delay"):
        Snooze(delay)


def test_snooze_keeps_its_delay():
    assert Snooze(timedelta(minutes=2)).seconds == 120.0 and str(Snooze(3)) == "snoozed for 3s"
