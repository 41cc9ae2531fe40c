"""DatabaseQueueDriver: the seed's queue API over one SQL table.

The driver is who holds jobs (its ``worker_id``), how stored rows become jobs
again (the factories), and the checks on what callers pass in.  Every
statement it runs is a named method of its :class:`~kronix_data.store.JobStore`;
this module builds no SQL and holds no dialect difference.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import pandas as pd

from . import analytics, history, timeline
from .batches import (Batch, attach_chunk_data, attach_result_frame, batches_frame, enqueue_chunks, find_batch,
                      push_jobs, queues_frame)
from .columnar import encode_job_result
from .errors import InvalidInputError, NotFoundError
from .job import Job, possible_job_id, validate_queue
from .limits import Limits
from .store import JobStore, ProgressWrite, WorkerBeat
from .workers import unrunnable_jobs, workers_frame
from .schedules import register_task_schedules, schedule_values, schedules_frame
from .tasks import Task, task_factories

log = logging.getLogger(__name__)

JobFactory = Callable[[Any], Job]


def default_worker_id() -> str:
    """Host, process id and a random part: unique across machines and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


def _seconds(value: timedelta | float, what: str) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise InvalidInputError(f"{what} must be a timedelta or a number of seconds, got {value!r}")
    return float(seconds)


class DatabaseQueueDriver:
    """A job queue in one SQL table, shared by any number of workers.

    Parameters
    ----------
    db
        A SQLAlchemy ``Engine`` or a database URL (``sqlite:///jobs.db``,
        ``postgresql+psycopg://user@host/db``, ``mysql+pymysql://root@host/db``;
        ``postgresql://`` and ``mysql://`` get those drivers).
    table
        The table name, optionally ``schema.table``; validated as an identifier.
    worker_id
        Who holds the jobs this driver pops; unique per process by default.
    read_db
        A hot standby of ``db`` (URL or Engine): ``fetch_stats``, ``jobs``, ``dead_letter_jobs``,
        ``batches``, ``queues``, ``Batch.progress/results/failures`` and the monitor read there, so
        watching a queue puts no load on the primary; their DataFrames carry
        ``attrs["replica_lag_s"]``.  Everything that changes state goes to ``db``, and
        ``Batch.wait()`` confirms the end there.
    """

    def __init__(self, db: Any, table: str = "kronix_jobs", worker_id: str | None = None, *,
                 read_db: Any = None):
        #: Every statement the driver runs, under a name (kronix_data.store).
        self.store = JobStore(db, table, read_db=read_db)
        self.worker_id = worker_id or default_worker_id()
        self._factories: dict[str, JobFactory] = {}

    @property
    def engine(self):
        """The SQLAlchemy engine of the database (for your own queries next to the queue's)."""
        return self.store.engine

    @property
    def table(self):
        """The jobs table as a SQLAlchemy ``Table`` (for your own read-only queries)."""
        return self.store.table

    @property
    def table_name(self) -> str:
        return self.store.table_name

    def __repr__(self) -> str:
        standby = "" if self.store.read_engine is None else \
            f", read_db={self.store.read_engine.url.render_as_string(hide_password=True)!r}"
        return (f"DatabaseQueueDriver({self.store.url_shown!r}, table={self.table_name!r}, "
                f"worker_id={self.worker_id!r}{standby})")

    def close(self) -> None:
        """Close the pooled connections of an engine this driver made."""
        self.store.close()

    def __enter__(self) -> DatabaseQueueDriver:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # -- schema -----------------------------------------------------------

    def create_table(self) -> None:
        """Create the jobs table and its indexes, or upgrade an existing one in place.

        Safe to call from many workers at once.
        """
        self.store.create_or_upgrade_table()

    def drop_table(self) -> None:
        """Drop the jobs table and everything in it (for demos and tests)."""
        self.store.drop_table()

    def register_job_factory(self, name: str, factory: JobFactory) -> None:
        """Rebuild jobs named ``name`` on ``pop`` with ``factory(payload) -> Job``.

        Factories registered here come first; then functions registered with
        :func:`kronix_data.task` in this process; otherwise ``pop`` returns a plain Job.
        """
        if not callable(factory):
            raise InvalidInputError(f"factory for {name!r} must be callable, got {type(factory).__name__}")
        self._factories[name] = factory

    # -- producing --------------------------------------------------------

    def push(self, job: Job, queue: str | None = None) -> str:
        """Store one job and return its id; ``queue`` overrides ``job.queue``."""
        return self.push_many([job], queue)[0]

    def push_many(self, jobs: Iterable[Job], queue: str | None = None) -> list[str]:
        """Store many jobs in one transaction and return their ids, in order.

        Every job is validated and serialised before anything is written, so a
        bad one leaves the table untouched.  A job whose ``key`` is already in
        the table is not stored again: its id is the existing job's, so pushing
        the same keyed jobs twice is a no-op that returns the same ids.  A job
        with ``depends_on`` waits until every job (or batch) it names has
        completed; an unknown one, or a cycle among the pushed jobs, fails the
        whole push.
        """
        return [row["id"] for row in push_jobs(self.store, list(jobs), queue)]

    # -- consuming --------------------------------------------------------

    def pop(self, queue: str = "default") -> Job | None:
        """Claim the oldest due job of ``queue``, or return None if there is none."""
        validate_queue(queue)
        while True:
            rows = self.store.claim(self.worker_id, 1, queue)
            jobs = self._jobs_from_claimed(rows)
            if jobs or not rows:  # a claimed row that could not be rebuilt is dead-lettered: try the next
                return jobs[0] if jobs else None

    def pop_many(self, n: int, queue: str = "default") -> list[Job]:
        """Claim up to ``n`` due jobs of ``queue`` in one transaction, oldest first."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInputError(f"pop_many needs n >= 1, got {n!r}")
        validate_queue(queue)
        return self._jobs_from_claimed(self.store.claim(self.worker_id, n, queue))

    def complete_and_pop(self, completed: Iterable[Job], n: int, queues: Sequence[str] = ("default",), *,
                         results: Sequence[str | None] | None = None,
                         resources: dict[str, float] | None = None) -> tuple[int, list[Job]]:
        """Complete finished jobs and claim up to ``n`` more, in one transaction.

        A busy worker's step: one commit (a durable flush, the dominant cost of
        a queue) where completing and claiming apart would take two.  Queues are
        claimed in order.  ``results`` are the jobs' results already encoded as
        JSON (see :meth:`complete_many`).  ``resources``: what the worker has
        free; jobs needing more (or other) resources are not claimed.  Returns
        how many completions were held, and the jobs.
        """
        for queue in queues:
            validate_queue(queue)
        held, rows = self.store.complete_and_claim(self.worker_id, self._completions(completed, results), n, queues,
                                                   resources)
        return held, self._jobs_from_claimed(rows)

    def _jobs_from_claimed(self, rows: list[dict[str, Any]]) -> list[Job]:
        """Rebuild claimed rows as jobs.

        A row whose payload is not JSON or whose factory raises is moved to the
        dead letters with the reason, never left held (the seed stranded it).
        """
        jobs = []
        factories = self._factories_for({row["name"] for row in rows}) if rows else {}
        for row in rows:
            try:
                jobs.append(self.store.job_from_row(row, factories.get(row["name"])))
            except Exception as error:  # noqa: BLE001 - any factory error is the job's fault
                reason = f"could not rebuild job {row['name']!r}: {type(error).__name__}: {error}"
                log.error("dead-lettering job %s: %s", row["id"], reason)
                self.fail(Job(row["name"], id=row["id"], attempts=row["attempts"], last_error=reason))
        attach_chunk_data(self.store, jobs)  # DataFrame chunks' Parquet bytes: one read for the claimed set
        return jobs

    def _factories_for(self, names: set[str]) -> dict[str, JobFactory]:
        """This driver's factories first, then ``@task`` functions (a local worker asks its kernel, once per
        claim, for the names it has neither for: kronix_data.kernel_tasks)."""
        own = {name: self._factories[name] for name in names if name in self._factories}
        return {**task_factories(names - own.keys()), **own}

    # -- finishing --------------------------------------------------------

    def complete(self, job: Job) -> bool:
        """Mark a held job completed, storing ``job.result``; False if not held."""
        return self.complete_many([job]) == 1

    def complete_many(self, jobs: Iterable[Job], *, results: Sequence[str | None] | None = None) -> int:
        """Complete many held jobs in one transaction; returns how many were held.

        Each ``job.result`` is stored as JSON; a result that is not JSON is an
        ``InvalidInputError`` before anything is written.  A caller that has
        encoded the results already (the worker does, on the job's own thread)
        passes them as ``results``, one per job, so they are not encoded twice.
        """
        return self.store.complete(self.worker_id, self._completions(jobs, results))

    def _completions(self, jobs: Iterable[Job], results: Sequence[str | None] | None) -> list[tuple[Job, str | None]]:
        jobs = list(jobs)
        if results is None:
            return [(job, encode_job_result(job, self.store.check_data_size)) for job in jobs]
        if len(results) != len(jobs):
            raise InvalidInputError(f"results has {len(results)} entries for {len(jobs)} jobs")
        return list(zip(jobs, results))

    def unclaim(self, jobs: Iterable[Job]) -> int:
        """Give back held jobs that were never started: pending again, the attempt not counted.

        A worker that stops calls this for what it claimed but did not run.
        """
        return self.store.unclaim(self.worker_id, jobs)

    def heartbeat(self, jobs: Iterable[Job], *, progress: Sequence[ProgressWrite] = (),
                  worker: WorkerBeat | None = None) -> int:
        """Renew the lease of held jobs so stale recovery leaves them alone; returns how many.

        A worker passes its jobs' unwritten ``progress`` reports and its own
        ``worker`` row (the registry) too: all in one transaction.
        """
        return self.store.heartbeat(self.worker_id, list(jobs), list(progress), worker)

    def write_progress(self, reports: Sequence[ProgressWrite]) -> int:
        """Write the progress held jobs reported (the worker's throttled write); returns how many were held."""
        return self.store.write_progress(self.worker_id, reports)

    def cancels_asked(self, jobs: Iterable[Job]) -> set[str]:
        """The ids of held jobs someone has asked to cancel (a worker passes it on to them)."""
        ids = [job.id for job in jobs if job.id is not None]
        return set(self.store.cancels_asked(self.worker_id, ids)) if ids else set()

    def finish_cancelled(self, jobs: Iterable[Job]) -> int:
        """Record held jobs whose cancel was asked as cancelled (not failed, not retried); returns how many."""
        return self.store.finish_cancelled(self.worker_id, jobs)

    def release(self, job: Job, *, delay: timedelta | float | None = None) -> bool:
        """Put a held job back as pending, with ``job.last_error``, for a later retry.

        It becomes due at ``job.available_at`` or, if ``delay`` is given, that
        long after now by the database's clock.
        """
        delay_s = None if delay is None else _seconds(delay, "delay")
        return self.store.release(self.worker_id, job, delay_s)

    def fail(self, job: Job) -> bool:
        """Move a held job to the dead letters with ``job.last_error``."""
        return self.store.dead_letter(self.worker_id, job)

    # -- maintenance ------------------------------------------------------

    def recover_stale_jobs(self, timeout: timedelta | float = timedelta(minutes=5)) -> int:
        """Return jobs held past ``timeout`` without a heartbeat to pending.

        A job whose attempts are used up goes to the dead letters instead, so a
        job that kills its worker cannot crash-loop forever.  Returns how many
        jobs were changed.
        """
        seconds = _seconds(timeout, "timeout")
        if seconds < 0:
            raise InvalidInputError(f"timeout must not be negative, got {timeout!r}")
        return self.store.recover_expired_leases(seconds)

    def size(self, queue: str = "default") -> int:
        """How many jobs of ``queue`` are pending (due now or later)."""
        validate_queue(queue)
        return self.store.count_pending(queue)

    def clear(self, queue: str = "default") -> int:
        """Delete the pending jobs of ``queue``; jobs being run are never touched."""
        validate_queue(queue)
        return self.store.delete_pending(queue)

    def clear_dead_letters(self, queue: str | None = None) -> int:
        """Delete the dead letters (of one queue, or all); returns how many."""
        return self.store.delete_dead_letters(queue)

    def cancel(self, job_id: str) -> bool:
        """Cancel a job: a pending or waiting one at once, with every job waiting for it; a running
        one is asked to stop (``current_job().cancel_requested()`` turns true within a second, and its
        worker records it as cancelled when it returns or raises).

        Returns False if the job had already finished.  Raises NotFoundError for an unknown id.
        """
        if not possible_job_id(job_id):
            raise InvalidInputError(f"job id {job_id!r} cannot be in a table (empty, too long or control characters)")
        return self.store.cancel_job(job_id)

    def pause(self, queue: str) -> None:
        """Stop every worker everywhere from claiming jobs of ``queue`` (running ones finish)."""
        validate_queue(queue)
        self.store.set_paused(queue, True)

    def resume(self, queue: str) -> None:
        """Let workers claim from ``queue`` again (listening workers are woken at once)."""
        validate_queue(queue)
        self.store.set_paused(queue, False)

    def set_limits(self, queue: str, concurrency: int | None = None, rate: int | str | None = None,
                   per: timedelta | float | None = None, *, create: bool = False) -> None:
        """Limit ``queue`` for every worker everywhere (see :mod:`kronix_data.limits`).

        Parameters
        ----------
        concurrency
            At most this many of its jobs ``processing`` at once.
        rate, per
            At most ``rate`` jobs started in any window of ``per`` (default one second; a timedelta or
            seconds), or ``rate="100/min"``.
        create
            Allow a queue that has no jobs and no settings yet (without it that is a NotFoundError,
            so a mistyped name is caught).

        The limits given replace the queue's limits (a limit not given is cleared);
        ``set_limits(queue)`` with none clears them all.
        """
        validate_queue(queue)
        limits = Limits.checked(concurrency, rate, per)
        if not create and not self.store.queue_is_known(queue):
            raise NotFoundError(f"queue {queue!r} has no jobs and no settings in table {self.table_name!r}: "
                                "check the name, or pass create=True to limit it before its first job")
        self.store.set_limits(queue, limits)

    def clear_limits(self, queue: str) -> None:
        """Remove every limit of ``queue`` (its jobs are claimed as fast as workers take them)."""
        self.set_limits(queue)

    def queues(self) -> pd.DataFrame:
        """One row per queue (with jobs or settings): ``queue``, ``paused``, its limits (``concurrency``,
        ``rate``, ``per_s``; NaN: none), its jobs running (``processing``: the slots in use) and its
        jobs' counts by status."""
        return queues_frame(self.store)

    def retry_dead_letter(self, job_id: str) -> bool:
        """Give a dead-lettered job a fresh start (pending, attempts 0); False if no such job."""
        if not possible_job_id(job_id):
            return False
        return self.store.retry_dead_letters(job_id=job_id) == 1

    def retry_dead_letters(self, queue: str | None = None, name: str | None = None, batch: str | None = None) -> int:
        """Retry every dead letter (of one queue, job name and/or batch); returns how many."""
        return self.store.retry_dead_letters(queue=queue, name=name, batch=batch)

    # -- reading ----------------------------------------------------------

    def get_job(self, job_id: str) -> Job | None:
        """The job with this id as stored (a plain Job, result decoded), or None."""
        if not possible_job_id(job_id):
            return None
        row = self.store.read_job(job_id)
        if row is None:
            return None
        job = self.store.job_from_row(row)
        attach_result_frame(self.store, job)  # a DataFrame result: the frame, not its marker
        return job

    def dead_letter_jobs(self, queue: str | None = None, batch: str | None = None) -> pd.DataFrame:
        """The dead letters (of a queue and/or batch), newest first, payload decoded.

        Columns: see :data:`kronix_data.analytics.DEAD_LETTER_COLUMNS`; ``error_type``
        and ``error_message`` come from ``last_error``'s first line, so
        ``df.groupby("error_type")`` works.
        """
        return analytics.dead_letter_jobs(self.store, queue, batch)

    def fetch_stats(self, window: timedelta | float = timedelta(hours=1)) -> pd.DataFrame:
        """Per queue: counts by status, oldest pending age, wait/run means and percentiles and
        throughput over the jobs finished in the last ``window`` (see :func:`kronix_data.analytics.fetch_stats`)."""
        return analytics.fetch_stats(self.store, window, unrunnable=unrunnable_jobs(self.store))

    def timeline(self, freq: Any = "1min", since: datetime | timedelta = timedelta(hours=1),
                 queue: str | None = None) -> pd.DataFrame:
        """Jobs started, completed and failed per ``freq`` interval (``"1min"``, ``"10s"``, ``"1h"``) and
        queue, since ``since`` (a timedelta before now, or an aware datetime); zero-filled, sorted by interval
        (see :func:`kronix_data.timeline.timeline`)."""
        return timeline.timeline(self.store, freq, since, queue)

    def jobs(self, queue: str | None = None, name: str | None = None, status: str | Iterable[str] | None = None,
             batch: str | None = None, since: datetime | timedelta | None = None,
             until: datetime | timedelta | None = None, limit: int | None = 1000) -> pd.DataFrame:
        """The jobs' history, newest first; ``since``/``until`` bound ``created_at``
        (see :func:`kronix_data.history.jobs`)."""
        return history.jobs(self.store, queue, name, status, batch, since, until, limit)

    def prune(self, older_than: timedelta | float, *, dead_letters: bool = False,
              chunk_size: int = history.PRUNE_CHUNK) -> int:
        """Delete completed jobs (and dead letters if ``dead_letters``) finished more than
        ``older_than`` ago, ``chunk_size`` rows per transaction; returns how many."""
        return history.prune(self.store, older_than, dead_letters=dead_letters, chunk_size=chunk_size)

    def workers(self) -> pd.DataFrame:
        """The workers of this table, live ones first, then those stopped or gone within the last hour.

        Columns: see :data:`kronix_data.workers.WORKER_COLUMNS`; ``state`` is ``live``
        (a heartbeat within its ``lease_timeout``), ``stopped`` (it left by itself)
        or ``gone`` (it fell silent: killed, or its machine lost).  Every worker's
        heartbeat keeps its row; rows an hour old age out.
        """
        return workers_frame(self.store)

    # -- schedules and snooze -----------------------------------------------

    def schedule(self, task: Task | str, cron: str | None = None, *, payload: Any = None, name: str | None = None,
                 timezone: str | None = None, queue: str | None = None) -> str:
        """Run ``task`` (a Task or a task name) on a cron schedule, stored in the database; returns its name.

        ``cron`` defaults to the task's own (``@task(cron=...)``), ``timezone`` (an IANA name, UTC by default)
        is where the cron is read, ``name`` (the task's name by default) names the schedule: saving the same
        name again replaces it, keeping its next slot if the cron and time zone are unchanged.  Every worker
        may fire it; each slot becomes one job, keyed ``schedule:<name>:<slot in UTC>``.  An invalid cron or
        an unknown time zone is an ``InvalidInputError``, with nothing written.
        """
        values = schedule_values(task, cron, payload=payload, name=name, timezone=timezone, queue=queue)
        self.store.save_schedule(values)
        return values["name"]

    def unschedule(self, name: str | Task) -> bool:
        """Remove a schedule (the jobs it fired stay); False if there is none of that name.

        A ``@task(cron=...)`` schedule is stored again by the next worker that imports its module.
        """
        name = name.name if isinstance(name, Task) else name
        if not isinstance(name, str):
            raise InvalidInputError(f"unschedule takes a schedule name or a task, got {type(name).__name__}")
        return self.store.delete_schedule(name)

    def schedules(self) -> pd.DataFrame:
        """One row per schedule: name, task, cron, timezone, queue, payload, ``next_run_at`` (and ``next_in_s``),
        ``last_run_at`` (the slot last fired), ``last_job_id``, ``last_fired_at``, ``created_at``."""
        return schedules_frame(self.store)

    def register_task_schedules(self, tasks: Iterable[Task] | None = None) -> int:
        """Store the schedules of the ``@task(cron=...)`` tasks registered in this process (a worker does
        this when it starts); returns how many."""
        from .tasks import scheduled_tasks

        return register_task_schedules(self.store, list(scheduled_tasks() if tasks is None else tasks))

    def run_scheduler(self) -> float | None:
        """Fire the schedules' due slots (one read when none is due); returns the seconds until the next
        slot of any schedule (None: there are no schedules).  Every worker calls it."""
        due_in = self.store.schedules_due_in()
        if due_in is not None and due_in <= 0:
            self.store.fire_due_schedules()
            due_in = self.store.schedules_due_in()
        return due_in

    def snooze(self, job: Job, delay: timedelta | float) -> bool:
        """Put a held job back as pending, due ``delay`` from now, its attempt not counted and no error
        recorded (what a worker does when a task raises ``kronix_data.Snooze``); False if not held."""
        seconds = _seconds(delay, "delay")
        if seconds < 0 or seconds != seconds:
            raise InvalidInputError(f"delay must not be negative, got {delay!r}")
        return self.store.snooze(self.worker_id, [(job, seconds)]) == 1

    # -- batches ----------------------------------------------------------

    def map(self, name: str | Task, data: Any, chunk_size: int = 10_000, *, queue: str | None = None,
            batch: str | None = None, max_retries: int | None = None, priority: int | None = None,
            after: Any = None, chunk_format: str = "parquet") -> Batch:
        """Enqueue ``data`` in chunks as jobs ``name``; idempotent; with ``after`` (batches, jobs or ids)
        every chunk waits until those completed; a DataFrame's chunks as Parquet bytes beside the rows
        (``chunk_format="json"``: in the payload), see :func:`kronix_data.enqueue_chunks`."""
        return enqueue_chunks(self, name, data, chunk_size, queue=queue, batch=batch, max_retries=max_retries,
                              priority=priority, after=after, chunk_format=chunk_format)

    def batch(self, batch_id: str) -> Batch:
        """The Batch with this id (after a kernel restart, say); NotFoundError (a LookupError) if no job has it."""
        return find_batch(self, batch_id)

    def batches(self, since: datetime | timedelta | None = None) -> pd.DataFrame:
        """One row per batch, newest first: counts by status, created_at, latest finished_at;
        ``since`` keeps those with a job created since then (see :func:`kronix_data.batches.batches_frame`)."""
        return batches_frame(self.store, since)

    def _repr_html_(self) -> str:
        title = f"kronix queue: table {self.table_name} on {self.store.url_shown}"
        try:
            return analytics.stats_html(self.fetch_stats(), title)
        except self.store.database_errors as error:  # a notebook repr must not raise
            return analytics.stats_html_error(title, error)
