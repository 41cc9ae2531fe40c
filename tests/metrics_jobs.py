"""Tasks the metrics test runs in a real ``kronix worker`` process: one that succeeds, one that fails
for good, and one that fails its first attempt and succeeds on the retry.

Importable as ``metrics_jobs`` because the test puts ``tests/`` on the worker's path.
"""

from __future__ import annotations

import time

from kronix_data import RetryPolicy, current_job, task


@task(name="test.metrics.ok")
def ok(payload):
    time.sleep(payload.get("sleep", 0))
    return payload.get("n")


@task(name="test.metrics.bad", max_retries=0)
def bad(payload):
    raise ValueError(f"bad row {payload.get('n')}")


@task(name="test.metrics.flaky", max_retries=1, retry=RetryPolicy(delay=0.01))
def flaky(payload):
    if current_job().job.attempts == 1:
        raise TimeoutError("the first attempt times out")
    return "second time lucky"
