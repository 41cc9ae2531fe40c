"""A task with a cron schedule, for the scheduler tests' worker processes (only they import it).

The test process never imports this module: a ``@task(cron=...)`` registered there would be stored
as a schedule by every in-process worker of every later test.
"""

from __future__ import annotations

from kronix_data import current_job, task


@task(name="sched.tick", cron="* * * * * *")
def tick(payload):
    """Every second: returns its own key (schedule:sched.tick:<slot>)."""
    return current_job().job.key
