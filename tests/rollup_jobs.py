"""The task the rollup tests run in worker processes: a little work, and a dead letter for every tenth job.

Importable as ``rollup_jobs`` because pytest puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import time

from kronix_data import task


@task(name="rollup.work", max_retries=0)
def work(payload):
    """Sleep ``sleep`` seconds; fail (at once a dead letter: no retries) when ``n % 10 == 3``."""
    time.sleep(payload.get("sleep", 0))
    if payload["n"] % 10 == 3:
        raise ValueError(f"job {payload['n']} fails")
    return payload["n"]
