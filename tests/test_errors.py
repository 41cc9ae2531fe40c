"""The error hierarchy: one base to catch, and the built-in types callers caught before it existed."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import kronix_data
from kronix_data import (DatabaseQueueDriver, DatabaseUnavailableError, InvalidInputError, Job, KronixError,
                         NotFoundError, NotHeldError, Worker)


def test_each_error_is_a_kronix_error_and_keeps_its_built_in_type():
    assert issubclass(InvalidInputError, ValueError) and issubclass(InvalidInputError, TypeError)
    assert issubclass(NotFoundError, LookupError)
    assert issubclass(DatabaseUnavailableError, sa.exc.OperationalError)
    for error in (InvalidInputError, NotFoundError, NotHeldError, DatabaseUnavailableError):
        assert issubclass(error, KronixError) and getattr(kronix_data, error.__name__) is error


def test_bad_input_anywhere_is_an_invalid_input_error_that_names_what_is_wrong(driver):
    driver.push(Job("kept"))
    calls = {
        "not a Job": (lambda: driver.push({"name": "x"}), "push takes Job objects"),
        "payload": (lambda: driver.push(Job("n", {1, 2})), "payload of job 'n' is not JSON-serialisable"),
        "NaN": (lambda: driver.push(Job("n", float("nan"))), "payload of job 'n' is not valid JSON"),
        "queue": (lambda: driver.size("bad\x00queue"), "queue name"),
        "pop_many": (lambda: driver.pop_many(0), "pop_many needs n >= 1"),
        "timeout": (lambda: driver.recover_stale_jobs(-1), "timeout must not be negative"),
        "window": (lambda: driver.fetch_stats(window=0), "window must be a positive"),
        "status": (lambda: driver.jobs(status="done"), "unknown status"),
        "chunk_size": (lambda: driver.map("n", [1], chunk_size=0), "chunk_size must be an int >= 1"),
        "worker option": (lambda: Worker(driver, completion_batch=0), "completion_batch must be an int >= 1"),
        "table name": (lambda: DatabaseQueueDriver("sqlite://", table="x; DROP"), "invalid table name"),
        "database": (lambda: DatabaseQueueDriver("oracle://scott@db/x"), "unsupported database 'oracle'"),
    }
    for what, (call, words) in calls.items():
        with pytest.raises(InvalidInputError, match=words):
            call()
    assert driver.size() == 1  # nothing was written by any of them


def test_not_found_is_a_lookup_error_for_a_handle_and_none_or_false_for_a_read_or_an_action(driver):
    with pytest.raises(NotFoundError, match="no job has batch id 'nope'"):
        driver.batch("nope")
    with pytest.raises(LookupError):
        driver.batch("nope")
    assert driver.get_job("nope") is None
    assert driver.retry_dead_letter("nope") is False
    assert driver.retry_dead_letters(batch="nope") == 0


def test_a_lost_job_is_false_from_the_seeds_calls(driver, other_driver):
    driver.push(Job("n"))
    job = driver.pop()
    assert other_driver.complete(job) is False and other_driver.fail(job) is False
    assert other_driver.release(job) is False and driver.complete(job) is True
