"""The running job's context: what a task can ask about the job it is running.

``current_job()`` inside a ``@task`` function or a ``Job.handle()`` returns the
:class:`JobContext` the worker set for that job (a context variable, so each
job thread, and later each coroutine, sees its own).  It grows with the
pipeline features: today the job, its driver, whether a cancel was asked, and
the results of the jobs it waited for.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .job import Job

if TYPE_CHECKING:
    import pandas as pd

_current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar("kronix_current_job", default=None)


class JobContext:
    """What a running job can ask of the queue about itself.

    Attributes
    ----------
    job
        The job being run (its id, attempt, payload...).
    driver
        The ``DatabaseQueueDriver`` of the worker running it.
    """

    __slots__ = ("job", "driver", "_cancel_asked")

    def __init__(self, job: Job, driver: Any):
        self.job = job
        self.driver = driver
        self._cancel_asked = False  # set by the worker's loop thread, read by the job's (a plain flag: cheap)

    def __repr__(self) -> str:
        return f"JobContext(job={self.job.id!r}, name={self.job.name!r}, attempt={self.job.attempts})"

    def cancel_requested(self) -> bool:
        """Whether someone asked to cancel this job (``driver.cancel``, ``batch.cancel``).

        The worker passes it on within about a second; a job that checks it in
        its loop can stop early.  Whatever the job then returns or raises, the
        job is recorded as cancelled, not failed or retried.
        """
        return self._cancel_asked

    def request_cancel(self) -> None:
        """Mark the cancel as asked (the worker calls this when the database says so)."""
        self._cancel_asked = True

    def parent_results(self) -> pd.DataFrame:
        """The results of the jobs this one waited for (``depends_on``, ``map(after=)``, ``then``),
        as one DataFrame shaped like ``Batch.results()``."""
        from .batches import parent_results_frame

        return parent_results_frame(self.driver.store, self.job.id)


def current_job() -> JobContext:
    """The context of the job running here; RuntimeError outside a running job."""
    context = _current.get()
    if context is None:
        raise RuntimeError("current_job() is only available inside a running job (a @task function or "
                           "Job.handle() run by a Worker)")
    return context


@contextmanager
def running(context: JobContext) -> Iterator[JobContext]:
    """Make ``context`` the current job's for the code inside (the worker wraps each run in it)."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)
