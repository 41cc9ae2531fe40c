"""The @task registry: names, registering again, clashes, options, ``task.job()``, and the jobs
that ``pop`` rebuilds from it (their hooks, timeout and retry policy come from the Task)."""

from __future__ import annotations

import time
import uuid

import pytest

from helpers import run_burst
from kronix_data import InvalidInputError, Job, JobStatus, RetryPolicy, Task, task
from kronix_data.tasks import TaskJob


@task()
def module_level_task(payload):
    return {"echo": payload}


def unique_name(what: str) -> str:
    """A task name no other test registered (the registry lives as long as the process)."""
    return f"tasks_test.{what}.{uuid.uuid4().hex[:8]}"


def a_cell(version: int, name: str) -> Task:
    """What a notebook cell does when it is run again: the same function (module and name), a new body."""

    @task(name=name)
    def cell(payload):
        return {"version": version, "payload": payload}

    return cell


# -- naming and registering --------------------------------------------------------------------

def test_the_name_defaults_to_the_module_and_the_functions_qualified_name():
    assert isinstance(module_level_task, Task)
    assert module_level_task.name == f"{__name__}.module_level_task"

    @task()
    def nested(payload):
        return payload

    test = "test_the_name_defaults_to_the_module_and_the_functions_qualified_name"
    assert nested.name == f"{__name__}.{test}.<locals>.nested"


def test_options_are_kept_on_the_task_and_default_sensibly():
    policy = RetryPolicy(delay=0.5, backoff=3.0, max_delay=10.0, jitter=0.0)
    hooks = (lambda job, error: None, lambda job, error: None)

    @task(name=unique_name("options"), queue="etl", max_retries=7, timeout=12.5, retry=policy,
          on_failure=hooks[0], on_permanent_failure=hooks[1])
    def configured(payload):
        return payload

    assert (configured.queue, configured.max_retries, configured.timeout, configured.retry) == ("etl", 7, 12.5, policy)
    assert (configured.on_failure, configured.on_permanent_failure) == hooks

    @task(name=unique_name("defaults"))
    def plain(payload):
        return payload

    assert (plain.queue, plain.max_retries, plain.timeout, plain.retry) == ("default", 3, None, RetryPolicy())
    assert plain.on_failure is None and plain.on_permanent_failure is None


def test_registering_the_same_function_again_is_allowed_and_the_newest_definition_wins(driver):
    name = unique_name("rerun")
    first, second = a_cell(1, name), a_cell(2, name)  # no error: a re-run cell or a module imported twice
    assert first.name == second.name == name

    job_id = driver.push(Job(name, "x"))
    popped = driver.pop()
    assert popped.id == job_id and isinstance(popped, TaskJob)
    assert popped.handle() == {"version": 2, "payload": "x"}


def test_a_different_function_under_a_taken_name_is_refused_and_the_first_keeps_the_name(driver):
    name = unique_name("clash")

    @task(name=name)
    def original(payload):
        return "original"

    def impostor(payload):
        return "impostor"

    with pytest.raises(ValueError, match=rf"task name '{name}' is already registered to .*original"):
        task(name=name)(impostor)

    driver.push(Job(name))
    assert driver.pop().handle() == "original"


# -- task.job() and calling a task ------------------------------------------------------------

def test_task_job_carries_the_tasks_queue_and_retries_and_options_override_them():
    name = unique_name("job")

    @task(name=name, queue="reports", max_retries=5)
    def report(payload):
        return payload

    job = report.job({"day": "2026-12-01"})
    assert isinstance(job, TaskJob) and job.task is report
    assert (job.name, job.payload, job.queue, job.max_retries) == (name, {"day": "2026-12-01"}, "reports", 5)
    assert (job.id, job.key, job.status, job.attempts) == (None, None, JobStatus.PENDING, 0)

    other = report.job("p", queue="urgent", max_retries=0, id="fixed-id", key="once")
    assert (other.queue, other.max_retries, other.id, other.key) == ("urgent", 0, "fixed-id", "once")
    assert report.job().payload is None


def test_calling_a_task_runs_the_function_here_and_now():
    assert module_level_task({"a": 1}) == {"echo": {"a": 1}}
    assert module_level_task() == {"echo": None}


def test_a_task_jobs_timeout_retry_and_hooks_come_from_its_task():
    calls = []
    policy = RetryPolicy(delay=2.0, backoff=1.0, jitter=0.0)

    @task(name=unique_name("hooks"), timeout=3.0, retry=policy,
          on_failure=lambda job, error: calls.append(("retry", job.payload, str(error))),
          on_permanent_failure=lambda job, error: calls.append(("dead", job.payload, str(error))))
    def hooked(payload):
        return payload

    job = hooked.job("p")
    assert job.timeout == 3.0 and job.retry is policy
    job.on_failure(RuntimeError("first"))
    job.on_permanent_failure(RuntimeError("last"))
    assert calls == [("retry", "p", "first"), ("dead", "p", "last")]
    assert Job.timeout is None and Job.retry == RetryPolicy()  # the Task's settings stay on its jobs

    @task(name=unique_name("no_hooks"))
    def hookless(payload):
        return payload

    quiet = hookless.job()
    quiet.on_failure(RuntimeError("ignored"))  # no hook: nothing happens, nothing raises
    quiet.on_permanent_failure(RuntimeError("ignored"))
    assert quiet.timeout is None and quiet.retry == RetryPolicy()


# -- through the database -----------------------------------------------------------------------

def test_a_pushed_task_job_is_stored_with_the_tasks_queue_and_retries(driver):
    @task(name=unique_name("stored"), queue="imports", max_retries=9)
    def stored(payload):
        return payload

    job_id = driver.push(stored.job({"file": "a.csv"}))
    row = driver.get_job(job_id)
    assert (row.name, row.queue, row.max_retries, row.payload) == (stored.name, "imports", 9, {"file": "a.csv"})
    assert driver.size("imports") == 1 and driver.size() == 0


def test_pop_rebuilds_a_registered_task_even_from_a_plain_job_with_its_timeout_and_retry(driver):
    """A producer need not import the task: a plain Job with its name is run as the task by a worker that has it."""
    policy = RetryPolicy(delay=0.25, backoff=1.0, jitter=0.0)

    @task(name=unique_name("rebuilt"), timeout=30.0, retry=policy)
    def rebuilt(payload):
        return {"doubled": payload * 2}

    driver.push(Job(rebuilt.name, 21))
    job = driver.pop()
    assert isinstance(job, TaskJob) and job.task is rebuilt
    assert (job.timeout, job.retry, job.attempts) == (30.0, policy, 1)
    assert job.handle() == {"doubled": 42}

    driver.push(Job(unique_name("nobody_registered_this")))
    stranger = driver.pop()
    assert not isinstance(stranger, TaskJob) and not stranger.runnable


def test_a_worker_retries_a_failing_task_after_its_tasks_delay_and_runs_its_hooks(driver):
    delay, seen, hooks = 0.3, [], []

    @task(name=unique_name("flaky"), max_retries=2, retry=RetryPolicy(delay=delay, backoff=1.0, jitter=0.0),
          on_failure=lambda job, error: hooks.append(("retry", job.attempts)),
          on_permanent_failure=lambda job, error: hooks.append(("dead", job.attempts)))
    def flaky(payload):
        seen.append(time.monotonic())
        if len(seen) < 3:
            raise ConnectionError("upstream down")
        return "done"

    job_id = driver.push(flaky.job())
    worker = run_burst(driver, concurrency=1)

    job = driver.get_job(job_id)
    assert (job.status, job.attempts, job.result) == (JobStatus.COMPLETED, 3, "done")
    assert hooks == [("retry", 1), ("retry", 2)] and worker.stats.retried == 2
    assert all(later - earlier >= delay for earlier, later in zip(seen, seen[1:]))  # never before its delay


def test_a_bare_decorator_registers_the_function_under_its_default_name(driver):
    @task
    def bare(payload):
        return payload + 1

    assert isinstance(bare, Task) and bare.name.endswith("bare") and bare(1) == 2
    job_id = driver.push(bare.job(41))
    run_burst(driver)
    assert driver.get_job(job_id).result == 42
    with pytest.raises(InvalidInputError, match="task name must be a str, got int"):
        task(7)
