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


# -- jobs for the process pool -------------------------------------------------------------------

@task(name="iso.where")
def where(payload):
    """The process that ran the job, and the payload back as it came."""
    return {"pid": os.getpid(), "payload": payload}


def _note_pid(payload) -> None:
    """Append this process's id to the file the test named, so it can check the process is gone."""
    if payload and payload.get("pid_file"):
        with open(payload["pid_file"], "a") as file:
            file.write(f"{os.getpid()}\n")


@task(name="iso.sleep_forever", timeout=1, max_retries=1, retry=RetryPolicy(delay=0.01, jitter=0))
def sleep_forever(payload):
    _note_pid(payload)
    while True:
        time.sleep(3600)


@task(name="iso.ignore_sigterm", timeout=1, max_retries=0)
def ignore_sigterm(payload):
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _note_pid(payload)
    while True:
        time.sleep(3600)


@task(name="iso.bloat", memory_limit="300MiB", max_retries=0)
def bloat(payload):
    """Allocate (and touch) 16 MiB at a time, up to 3 GiB: far past the limit, but bounded if no one kills it."""
    held = []
    for _ in range(3 * 64):
        held.append(b"x" * (16 << 20))
        time.sleep(0.01)
    return {"allocated_mib": 16 * len(held)}


@task(name="iso.abort", max_retries=0)
def abort(payload):
    _note_pid(payload)
    os.abort()


@task(name="iso.fail", max_retries=0)
def fail(payload):
    raise ValueError(f"bad input {payload!r}")


@task(name="iso.async_in_process", isolation="process")
async def async_in_process(payload):
    await asyncio.sleep(0.01)
    return {"pid": os.getpid()}


# -- jobs that need resources ------------------------------------------------------------------

@task(name="iso.gpu", requires={"gpu": 1}, max_retries=0)
def gpu(payload):
    """A job only a worker with a GPU may claim: records its run (start, end, process) like test.record."""
    from worker_jobs import record

    return record(payload)


@task(name="iso.frame_total", isolation="process", frame=True)
def frame_total(frame):
    """Takes a DataFrame chunk (Parquet bytes over the child's pipe) and returns one, in a child process."""
    return frame.assign(pid=os.getpid()).groupby("k", observed=True).agg(v=("v", "sum"), pid=("pid", "first"))
