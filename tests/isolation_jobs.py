"""Tasks of the isolation tests: async jobs, and jobs that hang, bloat or crash their process.

Importable as ``isolation_jobs`` (pytest puts ``tests/`` on ``sys.path``); the process pool's
children import it by name, as a worker would.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

from kronix_data import RetryPolicy, task

#: (start, end) of each run of ``async_sleep`` in this process, from monotonic clocks.
ASYNC_RUNS: list[tuple[float, float]] = []
#: Ids of the ``async_hang`` runs whose coroutine saw its cancellation and ran its finally.
CANCELLED: list[str] = []
_lock = threading.Lock()


@task(name="iso.async_sleep")
async def async_sleep(payload):
    started = time.monotonic()
    await asyncio.sleep(payload["seconds"])
    with _lock:
        ASYNC_RUNS.append((started, time.monotonic()))
    return {"slept": payload["seconds"]}


@task(name="iso.async_hang", timeout=0.5, max_retries=0)
async def async_hang(payload):
    from kronix_data import current_job

    job_id = current_job().job.id
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        CANCELLED.append(job_id)
        raise
    finally:
        CANCELLED.append(f"finally {job_id}")
