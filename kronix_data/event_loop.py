"""The worker's event loop: ``async def`` jobs run here, many at once on one thread.

An ``async def`` task or ``Job.handle`` returns a coroutine; the job's pool
thread hands it to this loop and waits for it, so an async job holds one of
the worker's ``concurrency`` slots like any other job (the limit means the
same thing for every kind of job).  The waiting threads cost little: while
they wait, the loop interleaves all the coroutines, so 100 slots of jobs that
mostly ``await`` I/O take the time of one.

A timeout here is real: the coroutine is cancelled (``asyncio`` raises
``CancelledError`` at its ``await``, its ``finally`` blocks run) and the job
fails with a ``TimeoutError``.  A coroutine that blocks the loop with
synchronous work cannot be cancelled until it yields; the worker's thread
timeout is the backstop for that.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Coroutine
from typing import Any

from .context import JobContext, running as running_job


def is_coroutine_job(job: Any) -> bool:
    """Whether ``job`` runs as a coroutine (an ``async def`` task, or an ``async def handle``)."""
    task = getattr(job, "task", None)
    function = task.function if task is not None else getattr(type(job), "handle", None)
    return inspect.iscoroutinefunction(function)


class EventLoopThread:
    """One asyncio loop on a daemon thread of its own, started at the first coroutine."""

    def __init__(self, name: str = "kronix-asyncio"):
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name=self._name, daemon=True)
                self._thread.start()
            return self._loop

    def run(self, coroutine: Coroutine, context: JobContext, timeout: float | None) -> Any:
        """Run ``coroutine`` on the loop as the job of ``context``, wait for it, and return its value.

        Raises what the coroutine raised, or ``TimeoutError`` once it was cancelled for its timeout.
        """
        future = asyncio.run_coroutine_threadsafe(_as_job(coroutine, context, timeout), self._started())
        value = future.result()
        if value is _TIMED_OUT:  # raised here: a TimeoutError crossing threads in a Future is rebuilt bare
            error = TimeoutError(f"job {context.job.name!r} ran past its timeout of {timeout}s; "
                                 "its coroutine was cancelled")
            error.kronix_timeout = True  # the worker counts it in stats.timed_out
            raise error
        return value

    def close(self) -> None:
        """Cancel what still runs, stop the loop and its thread."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(timeout=5)
        except TimeoutError:  # a coroutine that ignores its cancellation: the daemon thread is left to it
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()


_TIMED_OUT = object()


async def _as_job(coroutine: Coroutine, context: JobContext, timeout: float | None) -> Any:
    # Each asyncio task has its own copy of the context variables, so current_job() is this job's.
    with running_job(context):
        if not timeout:
            return await coroutine
        timer = asyncio.timeout(timeout)
        try:
            async with timer:
                return await coroutine
        except TimeoutError:
            if timer.expired():
                return _TIMED_OUT
            raise


async def _cancel_all() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
