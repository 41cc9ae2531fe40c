"""The running job's context: what a task can ask about the job it is running.

``current_job()`` inside a ``@task`` function or a ``Job.handle()`` returns the
:class:`JobContext` the worker set for that job (a context variable, so each
job thread, and later each coroutine, sees its own).  It grows with the
queue's features: the job, its driver, whether a cancel was asked, the results
of the jobs it waited for, its progress (:meth:`JobContext.progress`, kept in
memory and written by the worker in batches) and its checkpoint
(:meth:`JobContext.checkpoint`, written at once, guarded by ownership).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .errors import NotHeldError
from .job import Job, decode_json, encode_value
from .progress import checked_amount, checked_info, encode_info
from .store import ProgressWrite

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

    __slots__ = ("job", "driver", "_cancel_asked", "_report", "_report_waiting", "_checkpoint", "_checkpoint_read")

    def __init__(self, job: Job, driver: Any):
        self.job = job
        self.driver = driver
        self._cancel_asked = False  # set by the worker's loop thread, read by the job's (a plain flag: cheap)
        # _report (done, total, details, monotonic time) is set by the job's thread and taken by the loop's;
        # _report_waiting says it has not been written yet (see take_report).  _report and _checkpoint are
        # only read once set: two attribute writes fewer per job, on the worker's hot path.
        self._report_waiting = False
        self._checkpoint_read = False

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

    # -- progress and checkpoints --------------------------------------------------

    def progress(self, done: float, total: float | None = None, **info: Any) -> None:
        """Report how far the job is: ``done`` units of ``total`` (rows, files, bytes...), with details.

        Cheap enough to call for every row: the report is only kept in memory,
        and the worker writes the latest one at most once per
        ``progress_interval`` (1 s) and with each heartbeat.  It shows in
        ``driver.jobs()``, ``batch.progress()`` (units done within running
        chunks), ``batch.wait()``'s bar, ``batch.eta()``, the monitor and ``kronix
        stats``.  ``total=None`` keeps the total stored (a DataFrame chunk has its
        rows from the start); details are JSON scalars (``file="2026-11.csv"``),
        and replace the stored ones when given.

        Raises
        ------
        InvalidInputError
            ``done`` or ``total`` is not a finite number >= 0, or a detail is not a JSON scalar.
        """
        # The common call (plain numbers, no details) takes no function call before the assignment.
        if (done.__class__ is not int and done.__class__ is not float) or not 0 <= done < _INFINITY:
            done = checked_amount(done, "done")
        if total is not None and ((total.__class__ is not int and total.__class__ is not float)
                                  or not 0 <= total < _INFINITY):
            total = checked_amount(total, "total")
        self._report = (done, total, checked_info(info) if info else None, time.monotonic())
        self._report_waiting = True

    def take_report(self, now: float) -> ProgressWrite | None:
        """The report not written yet, to write now (the worker's loop calls this), or None.

        The flag is cleared before the report is read, so a report made meanwhile is never lost: at worst
        it is written twice.
        """
        if not self._report_waiting:
            return None
        self._report_waiting = False
        done, total, info, at = self._report
        return ProgressWrite(self.job, float(done), None if total is None else float(total),
                             encode_info(info, self.job.name), max(now - at, 0.0))

    def keep_report(self) -> None:
        """The report taken could not be written (the database is away): write it next time."""
        self._report_waiting = True

    def checkpoint(self, state: Any) -> None:
        """Save ``state`` (any JSON value: a row number, a cursor, partial totals) on the job's row now.

        A later attempt of this job (after a crash, a lost lease or a retry)
        finds it in :attr:`checkpoint_state` and can resume there instead of
        starting over.  One short transaction of its own, which changes the row
        only while this worker still holds this very attempt.

        Raises
        ------
        NotHeldError
            This attempt is no longer held (its lease expired and another attempt runs, it timed out, or it
            finished): the checkpoint was not saved, and the job should stop.
        InvalidInputError
            ``state`` is not JSON.
        """
        text = encode_value(state, f"checkpoint of job {self.job.name!r}")
        if not self.driver.store.save_checkpoint(self.driver.worker_id, self.job, text):
            raise NotHeldError(f"job {self.job.id} (attempt {self.job.attempts}) is no longer held by worker "
                               f"{self.driver.worker_id}: its checkpoint was not saved")
        self._checkpoint = decode_json(text)  # a copy: later changes to state are not the saved state
        self._checkpoint_read = True

    @property
    def checkpoint_state(self) -> Any:
        """The last state saved by :meth:`checkpoint`, by this attempt or an earlier one (None: none).

        Read from the database the first time it is asked for (a job that never
        asks costs nothing), then kept.
        """
        if not self._checkpoint_read:
            self._checkpoint = decode_json(self.driver.store.read_checkpoint(self.job.id))
            self._checkpoint_read = True
        return self._checkpoint


_INFINITY = float("inf")


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
