"""A worker's options are checked when it is built; a wrong one is refused with its name."""

from __future__ import annotations

import pytest

from kronix_data import DatabaseQueueDriver, InvalidInputError, Worker, WorkerOptions, start_local_workers

COUNTS = ["concurrency", "completion_batch", "batch_size"]
POSITIVE_SECONDS = ["lease_timeout", "poll_interval"]
SECONDS = ["grace_period", "completion_delay", "prefetch_seconds"]
SWITCHES = ["burst", "listen"]


@pytest.fixture(scope="module")
def driver():
    with DatabaseQueueDriver("sqlite://") as queue:
        yield queue


@pytest.mark.parametrize("name, value", [(name, value) for name in COUNTS
                                         for value in (0, -1, 2.5, "4", True, None)])
def test_counts_refuse_zero_negatives_and_other_types(driver, name, value):
    with pytest.raises(InvalidInputError, match=f"{name} must be an int >= 1, got {value!r}"):
        Worker(driver, **{name: value})


@pytest.mark.parametrize("name, value", [(name, value) for name in POSITIVE_SECONDS
                                         for value in (0, -0.5, float("inf"), float("nan"), "1", True)])
def test_intervals_that_must_pass_refuse_zero_negatives_and_other_types(driver, name, value):
    with pytest.raises(InvalidInputError, match=f"{name} must be a number of seconds > 0"):
        Worker(driver, **{name: value})


@pytest.mark.parametrize("name, value", [(name, value) for name in SECONDS
                                         for value in (-0.01, float("inf"), "0", None)])
def test_delays_refuse_negatives_and_other_types_but_take_zero(driver, name, value):
    with pytest.raises(InvalidInputError, match=f"{name} must be a number of seconds >= 0"):
        Worker(driver, **{name: value})
    assert getattr(Worker(driver, **{name: 0}).options, name) == 0


@pytest.mark.parametrize("name", SWITCHES)
def test_switches_are_bools(driver, name):
    with pytest.raises(InvalidInputError, match=f"{name} must be True or False"):
        Worker(driver, **{name: "yes"})


def test_queues_an_unknown_option_and_the_defaults(driver):
    for queues, words in (((), "at least one queue"), (["ok", ""], "queue name must have 1 to 128"),
                          (42, "queues must be a queue name or a sequence")):
        with pytest.raises(InvalidInputError, match=words):
            Worker(driver, queues=queues)
    assert Worker(driver, queues="etl").options.queues == ("etl",)
    with pytest.raises(InvalidInputError, match="unknown worker option 'concurrancy'"):
        Worker(driver, concurrancy=4)
    options = Worker(driver).options
    assert options == WorkerOptions() and options.as_dict()["completion_batch"] == 100
    with pytest.raises(AttributeError):
        options.concurrency = 0  # frozen: validated once, then fixed


def test_local_workers_refuse_a_bad_option_before_starting_any_process(driver):
    with pytest.raises(InvalidInputError, match="concurrency must be an int >= 1"):
        start_local_workers(driver, 2, concurrency=0)
    with pytest.raises(InvalidInputError, match="processes must be an int >= 1"):
        start_local_workers(driver, 0)
