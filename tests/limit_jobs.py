"""Tasks the limits tests run in worker processes: each returns when it started and ended, so the
tests read concurrency and rates from the jobs' own records (their results).

Importable as ``limit_jobs`` because pytest puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import time

from kronix_data import current_job, task


@task(name="limits.span")
def span(payload):
    """Sleep ``payload["sleep"]`` seconds; return the start and end (wall clock) and the claim time the
    database recorded for this attempt (``reserved_at``, the time the rate limit counts by)."""
    started = time.time()
    time.sleep(payload.get("sleep", 0))
    claimed = current_job().job.reserved_at
    return {"started": started, "ended": time.time(), "claimed": claimed.timestamp() if claimed else None}


@task(name="limits.hold", max_retries=5)
def hold(payload):
    """Run until killed (the first attempt), or return at once (a later attempt, after lease recovery)."""
    if current_job().job.attempts == 1 and payload.get("hold_first", True):
        time.sleep(600)
    return {"attempt": current_job().job.attempts, "started": time.time()}


@task(name="limits.pair", concurrency=2)
def pair(payload):
    """Like ``span``, but no more than two of its jobs run at once anywhere."""
    return span.function(payload)


@task(name="limits.paced", rate="3/min")
def paced(payload):
    """At most three of its jobs start in any minute."""
    return None
