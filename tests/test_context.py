"""The running job's context: current_job() inside a task or a Job.handle(), a clear error outside."""

from __future__ import annotations

import threading

import pytest

from kronix_data import Job, JobContext, Worker, current_job, task


def test_outside_a_running_job_current_job_is_a_clear_runtime_error():
    with pytest.raises(RuntimeError, match=r"current_job\(\) is only available inside a running job"):
        current_job()
    seen = []
    thread = threading.Thread(target=lambda: seen.append(pytest.raises(RuntimeError, current_job)))
    thread.start()
    thread.join()
    assert seen


def test_a_task_and_a_job_class_see_their_own_job_driver_and_attempt(driver):
    @task(name="context.seen")
    def seen(payload):
        context = current_job()
        assert isinstance(context, JobContext) and context.driver is driver
        return {"id": context.job.id, "attempt": context.job.attempts, "payload": context.job.payload,
                "cancel": context.cancel_requested(), "repr": repr(context)}

    class Handled(Job):
        def handle(self):
            return {"id": current_job().job.id, "same": current_job().job is self}

    driver.register_job_factory("context.handled", lambda payload: Handled("context.handled", payload))
    ids = driver.push_many([seen.job(i) for i in range(6)] + [Job("context.handled", 7)])
    Worker(driver, burst=True, concurrency=3, lease_timeout=10).run()
    results = [driver.get_job(job_id).result for job_id in ids]
    assert [(r["id"], r["attempt"], r["payload"], r["cancel"]) for r in results[:6]] == [
        (job_id, 1, i, False) for i, job_id in enumerate(ids[:6])]
    assert results[0]["repr"].startswith(f"JobContext(job={ids[0]!r}, name='context.seen', attempt=1")
    assert results[6] == {"id": ids[6], "same": True}
    with pytest.raises(RuntimeError):
        current_job()  # nothing leaks into the calling thread


def test_a_job_without_parents_has_empty_parent_results(driver):
    @task(name="context.orphan")
    def orphan(payload):
        return {"rows": len(current_job().parent_results())}

    job_id = driver.push(orphan.job())
    Worker(driver, burst=True, lease_timeout=10).run()
    assert driver.get_job(job_id).result == {"rows": 0}
