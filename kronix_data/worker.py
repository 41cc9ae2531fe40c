"""The worker: claim in batches, run on a bounded pool, hand back in batches.

One loop thread owns every database call; jobs run on a thread pool of
``concurrency`` threads and never more.  Finished jobs are completed in
batches (by size or after a short delay); failures are retried with backoff
or dead-lettered.  A lost connection is logged and retried with backoff, and
nothing the worker holds is dropped: results wait in memory until written.

Timeouts: a job running on a thread cannot be stopped from outside.  A job
past its ``timeout`` is recorded as failed (and retried or dead-lettered) at
once, but its thread runs on and keeps its slot until it returns, so the
concurrency limit holds; its late result is discarded.  An ``async def`` job is
cancelled at its timeout (kronix_data.event_loop), and a job in a child process
is killed (kronix_data.isolation).
"""

from __future__ import annotations

import bisect
import inspect
import json
import logging
import math
import os
import random
import signal
import threading
import time
import traceback
import queue as queue_module
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .columnar import encode_job_result
from .context import JobContext, running as running_job
from .driver import DatabaseQueueDriver
from .errors import InvalidInputError
from .event_loop import EventLoopThread, is_coroutine_job
from .isolation import ProcessSlots, runs_in_process
from .job import Job
from .resources import covers, in_use
from .snooze import Snooze
from .store import ProgressWrite
from .tasks import missing_task_message, registered_tasks
from .worker_options import WorkerOptions
from .workers import forget_gone_workers, worker_beat

log = logging.getLogger(__name__)



#: The run-time histogram's upper bounds in seconds: from a 1 ms job to an hour-long chunk.
RUN_TIME_BOUNDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


@dataclass
class WorkerStats:
    """Counters of what one worker did, for logs, tests and the monitor."""

    claimed: int = 0
    completed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    timed_out: int = 0
    recovered: int = 0
    database_errors: int = 0
    unclaimed: int = 0
    cancelled: int = 0
    snoozed: int = 0
    #: Run times of the attempts this worker ran, as a histogram (``kronix worker --metrics-port``):
    #: how many took at most each bound of RUN_TIME_BOUNDS (not cumulative), their sum and count.
    run_time_counts: list[int] = field(default_factory=lambda: [0] * (len(RUN_TIME_BOUNDS) + 1), repr=False)
    run_time_sum: float = field(default=0.0, repr=False)
    runs: int = field(default=0, repr=False)

    def observe_run_time(self, seconds: float) -> None:
        """Count one attempt's run time in the histogram (the last slot: longer than every bound)."""
        self.run_time_counts[bisect.bisect_left(RUN_TIME_BOUNDS, seconds)] += 1
        self.run_time_sum += seconds
        self.runs += 1


@dataclass
class _Running:
    job: Job
    context: JobContext
    started: float | None = None  # set by the pool thread: a prefetched job's clock starts when it runs
    abandoned: bool = False
    # Seconds past the timeout before the loop gives up on the job's thread: 0 for a thread job; a
    # coroutine is cancelled at its timeout, and this is the backstop for one that blocks its loop;
    # None for a job in a child process, which its slot always kills in time.
    backstop: float | None = 0.0
    isolated: bool = False  # run in the pool thread's child process (kronix_data.isolation)

    def past_deadline(self, now: float) -> bool:
        timeout = self.job.timeout
        return (bool(timeout) and self.started is not None and self.backstop is not None
                and now >= self.started + timeout + self.backstop)


@dataclass
class _Failure:
    job: Job
    permanent: bool
    delay: float = 0.0


@dataclass
class _Outcome:
    job: Job
    result_json: str | None = None  # encoded once, on the job's thread
    error: BaseException | None = None
    formatted: str = ""
    snooze: float | None = None  # seconds: the job raised Snooze
    finished_at: float = field(default_factory=time.monotonic)
    run_time: float = 0.0


class _JobThreads:
    """``size`` threads taking jobs from one queue, so at most ``size`` run at once.

    Lighter than a ThreadPoolExecutor (no Future per job), and claimed jobs
    not yet started can be taken back when the worker stops.
    """

    def __init__(self, size: int, run):
        self._queue: queue_module.SimpleQueue = queue_module.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, args=(run,), name=f"kronix-job-{n}", daemon=True)
                         for n in range(size)]
        for thread in self._threads:
            thread.start()

    def _serve(self, run) -> None:
        while (item := self._queue.get()) is not None:
            run(item)

    def submit(self, item) -> None:
        self._queue.put(item)

    def take_back(self) -> list:
        """The items no thread has started yet."""
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue_module.Empty:
                return [item for item in items if item is not None]

    def shutdown(self, wait: bool) -> None:
        self.take_back()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


class Worker:
    """Runs jobs from ``queues`` with at most ``concurrency`` at a time.

    Parameters
    ----------
    driver
        The queue; its ``worker_id`` is this worker's identity.
    queues
        Claimed in this order: the first queue's due jobs before the second's.
    concurrency
        Jobs running at once (threads).  Claims never exceed the free slots.
    burst
        Stop when no job is due and nothing is running (batch jobs, tests).
    lease_timeout
        A job whose worker sent no heartbeat for this long is taken as
        abandoned by every worker's periodic recovery.  Heartbeats go out every
        ``lease_timeout / 4`` and recovery runs every ``lease_timeout / 2``.
    grace_period
        On the first SIGTERM/SIGINT (or :meth:`stop`), how long running jobs
        may take to finish before the worker stops hard.
    poll_interval
        The longest wait between two looks at an idle queue (without LISTEN).
    completion_batch, completion_delay
        Finished jobs are written back in batches of up to ``completion_batch``,
        at the latest ``completion_delay`` seconds after the first finished.
    batch_size, prefetch_seconds
        Jobs claimed at most at once, and how many seconds of short jobs to hold
        beyond the free slots.
    listen
        Wait for pushes with LISTEN where the database has it (PostgreSQL).
    cancel_check_interval
        How often the worker asks which of its running jobs someone wants
        cancelled, and tells them (``current_job().cancel_requested()``).
    scheduler
        Fire the due slots of the table's schedules (``driver.schedule``, ``@task(cron=...)``): every worker
        may, each slot becomes one job whichever does.  The ``@task(cron=...)`` tasks imported in this
        process are stored as schedules when the worker starts.
    progress_interval
        How often, at most, the worker writes what its running jobs reported
        with ``current_job().progress()`` (one statement batch for all of them,
        and only when some job reported); the heartbeat writes it too.
    pool
        ``"thread"`` (the default): jobs run on ``concurrency`` threads;
        ``"process"``: each of those threads runs its jobs in a long-lived child
        process of its own, killed at a job's timeout or memory limit and replaced
        when it dies (kronix_data.isolation).  A task's ``isolation`` overrides it.
    resources
        What this worker has, as ``{"gpu": 1, "mem": "64G"}`` or ``"gpu=1,mem=64G"``:
        it claims only jobs whose ``requires`` these cover (a job without
        requirements is anyone's), and never holds more at once than they allow.
    kill_grace
        A job in a child process past its timeout gets SIGTERM, then SIGKILL
        this many seconds later; an ``async def`` job that blocks its event
        loop is given up this long after its timeout.

    Every option is checked when the worker is built
    (:class:`~kronix_data.worker_options.WorkerOptions`): a wrong type or value,
    or an unknown option, is an ``InvalidInputError`` naming it.
    """

    def __init__(self, driver: DatabaseQueueDriver, queues: tuple[str, ...] | list[str] | str = ("default",),
                 concurrency: int = 4, **options: Any):
        unknown = sorted(set(options) - set(WorkerOptions.names()))
        if unknown:
            raise InvalidInputError(f"unknown worker option {unknown[0]!r}; the options are "
                                    f"{', '.join(WorkerOptions.names())}")
        self.driver = driver
        #: The validated settings (kronix_data.worker_options.WorkerOptions).
        self.options = WorkerOptions(queues=queues, concurrency=concurrency, **options)
        self._run_time_ewma: float | None = None  # seconds per job, for sizing claims
        self.stats = WorkerStats()
        self._database_errors = driver.store.database_errors  # ridden out by backing off and reconnecting
        self._wake = threading.Event()
        self._stop_requested = threading.Event()
        self._hard_stop = threading.Event()
        # By (job id, attempt): a timed-out attempt's thread may still run when
        # this worker claims the same job's next attempt.
        self._running: dict[tuple[str, int], _Running] = {}
        self._finished: list[_Outcome] = []  # guarded by _lock; filled by pool threads
        self._lock = threading.Lock()
        self._to_complete: list[tuple[Job, str | None]] = []  # finished jobs and their JSON results
        self._first_done_at = 0.0  # when the oldest job in _to_complete finished
        self._retries_due_at = 0.0  # when the last retry this worker scheduled becomes due (burst waits)
        self._to_fail: list[_Failure] = []
        self._to_cancel: list[Job] = []  # ended after a cancel was asked: recorded as cancelled
        self._to_snooze: list[tuple[Job, float]] = []  # raised Snooze: pending again after the delay
        self._schedules_stored = False  # whether this run stored the @task(cron=...) schedules yet
        self._thread: threading.Thread | None = None
        self._signals = 0
        self._registered = False  # whether this run's first heartbeat (which registers the worker) went out
        self._event_loop = EventLoopThread(f"kronix-asyncio-{driver.worker_id}")  # async def jobs (event_loop.py)
        self._process_slots = ProcessSlots(self.options.kill_grace)  # a child process per pool thread (isolation.py)
        self._limit_wait: float | None = None  # seconds until a full rate-limited queue may start a job again
        self._limits_written = False  # whether this run wrote its tasks' limits (before its first claim)

    def __repr__(self) -> str:
        return f"Worker({self.driver.worker_id!r}, queues={self.options.queues}, concurrency={self.options.concurrency})"

    # -- control -----------------------------------------------------------

    def run(self) -> WorkerStats:
        """Work until stopped (or, in burst mode, until nothing is due); returns the stats.

        In the main thread, SIGTERM and SIGINT stop gracefully, and a second
        signal stops hard: the process exits, leaving running jobs to their
        lease.
        """
        handlers = self._install_signal_handlers()
        listener = self._start_listener()
        executor = _JobThreads(self.options.concurrency, self._execute)
        self._process_slots = ProcessSlots(self.options.kill_grace)
        log.info("%r started", self)
        try:
            self._loop(executor)
        finally:
            self._stop_requested.set()
            executor.shutdown(wait=not self._hard_stop.is_set())
            self._event_loop.close()
            self._process_slots.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if listener:
                listener.join(timeout=2)
            self._leave_registry()
            log.info("%r stopped: %s", self, self.stats)
        if self._hard_stop.is_set() and handlers:
            os._exit(1)  # threads of jobs still running must not keep the process alive
        return self.stats

    def start(self) -> Worker:
        """Run in a background thread (from a notebook); stop it with :meth:`stop`."""
        if self._thread and self._thread.is_alive():
            raise RuntimeError(f"{self!r} is already running")
        self._stop_requested.clear()
        self._hard_stop.clear()
        self._thread = threading.Thread(target=self.run, name=f"kronix-worker-{self.driver.worker_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop claiming, let running jobs finish within the grace period, and return."""
        self._stop_requested.set()
        self._wake.set()
        if wait and self._thread:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum: int, _frame) -> None:
        # Only a plain counter here: taking a lock (Event.set, logging) inside a
        # signal handler can deadlock with the same lock held by the loop.  The
        # loop never sleeps longer than poll_interval, and sees it then.
        self._signals += 1

    def _take_signals(self) -> None:
        if self._signals and not self._stop_requested.is_set():
            log.warning("signal received: finishing running jobs (up to %ss), claiming no more", self.options.grace_period)
            self._stop_requested.set()
        if self._signals > 1 and not self._hard_stop.is_set():
            log.warning("second signal: stopping hard")
            self._hard_stop.set()

    def _start_listener(self) -> threading.Thread | None:
        if not self.options.listen:
            return None
        thread = threading.Thread(target=self._listen, name="kronix-listen", daemon=True)
        thread.start()
        return thread

    def _listen(self) -> None:
        """Wake the loop on NOTIFY; where LISTEN fails (pgbouncer, other databases) polling goes on."""
        backoff = 0.1
        while not self._stop_requested.is_set():
            try:
                listener = self.driver.store.listener()
            except Exception as error:  # noqa: BLE001 - any failure means "poll instead"
                log.info("LISTEN unavailable (%s); polling", type(error).__name__)
                listener = None
            if listener is None:
                return
            try:
                backoff = 0.1
                while not self._stop_requested.is_set():
                    # Short waits: stopping (run() joins this thread) takes at most one.
                    if listener.wait(0.1):
                        self._wake.set()
            except Exception as error:  # noqa: BLE001
                log.warning("LISTEN connection lost (%s); reconnecting", type(error).__name__)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                try:
                    listener.close()
                except Exception:  # noqa: BLE001 - a dead connection may fail to close
                    pass

    # -- the loop -----------------------------------------------------------

    def _loop(self, executor: _JobThreads) -> None:
        now = time.monotonic()
        next_heartbeat = now  # the first heartbeat registers the worker (kronix_data.workers)
        next_cancel_check = now + self.options.cancel_check_interval
        next_progress = now + self.options.progress_interval
        next_recovery = now + random.uniform(0, self.options.lease_timeout / 2)
        next_schedule_check = now
        idle_wait, error_wait = 0.01, 0.1
        grace_deadline: float | None = None
        while True:
            self._take_signals()
            now = time.monotonic()
            stopping = self._stop_requested.is_set()
            if stopping and grace_deadline is None:
                grace_deadline = now + self.options.grace_period
                self._unclaim_unstarted(executor)
            if self._hard_stop.is_set() or (grace_deadline is not None and now >= grace_deadline):
                self._hard_stop.set()
                self._try(self._flush_completions, force=True)
                self._try(self._flush_failures)
                self._try(self._flush_cancelled)
                self._try(self._flush_snoozed)
                return
            try:
                if not self._limits_written:
                    self._write_task_limits()
                self._collect_finished()
                self._expire_timeouts(now)
                self._flush_failures()
                self._flush_cancelled()
                self._flush_snoozed()
                if self.options.scheduler and not stopping and now >= next_schedule_check:
                    next_schedule_check = now + self._run_scheduler()
                claimed = self._exchange(executor, stopping)
                if now >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = now + self.options.lease_timeout / 4
                if now >= next_cancel_check:
                    self._pass_on_cancels()
                    next_cancel_check = now + self.options.cancel_check_interval
                if now >= next_progress:
                    self._flush_progress()
                    next_progress = now + self.options.progress_interval
                if now >= next_recovery:
                    self.stats.recovered += self.driver.recover_stale_jobs(self.options.lease_timeout)
                    forget_gone_workers(self.driver.store)
                    self.driver.store.fold_finished()  # finished jobs into the counts' rollup, off the hot path
                    next_recovery = now + self.options.lease_timeout / 2
                error_wait = 0.1
            except self._database_errors as error:
                self.stats.database_errors += 1
                log.warning("database error (%s: %s); retrying in %.1fs",
                            type(error).__name__, str(error).splitlines()[0], error_wait)
                self._hard_stop.wait(error_wait)
                error_wait = min(error_wait * 2, 5.0)
                continue
            busy = self._busy()
            if stopping and not busy:
                return
            if (self.options.burst and not claimed and not busy and now >= self._retries_due_at
                    and self._limit_wait is None):  # a job held back by a limit is still to be run
                return
            if claimed:
                idle_wait = 0.01
                if self._limit_wait is None:
                    continue  # else a limit is reached: wait for a job to end (or the rate's next start)
            # A rate-limited queue said when its next job may start: sleep until then, not a poll sooner.
            timed = self._limit_wait is not None and math.isfinite(self._limit_wait)
            schedule_wait = (next_schedule_check - now) if self.options.scheduler else idle_wait
            self._wait(min(min(self._limit_wait, self.options.poll_interval) if timed else idle_wait,
                           next_heartbeat - now, next_recovery - now, next_cancel_check - now, next_progress - now,
                           schedule_wait))
            if not timed:
                idle_wait = min(idle_wait * 2, self.options.poll_interval)

    def _busy(self) -> bool:
        # Timed-out threads count too: their slots are taken until they really end.
        return bool(self._running or self._to_complete or self._to_fail or self._finished or self._to_cancel
                    or self._to_snooze)

    def _wait(self, timeout: float) -> None:
        if self._to_complete:
            timeout = min(timeout, self.options.completion_delay)
        self._wake.wait(max(timeout, 0.001))
        self._wake.clear()

    def _try(self, step, **kwargs) -> None:
        try:
            step(**kwargs)
        except self._database_errors as error:
            log.error("could not write back before stopping (%s); the jobs' leases will expire", error)

    # -- claiming and running --------------------------------------------------

    def _write_task_limits(self) -> None:
        """Write the limits of the tasks this process registered (``@task(concurrency=, rate=)``), and
        clear those of its tasks that have none now: the code a worker runs says what its tasks' limits are."""
        self.driver.store.write_task_limits({task.name: task.limits for task in registered_tasks()})
        self._limits_written = True

    def _prefetch(self) -> int:
        """How many jobs to hold beyond the free slots: about 50 ms of work.

        Short jobs are claimed ``batch_size`` at a time (one commit per batch,
        not per job); long ones only as slots free up, so one worker never
        hoards work that idle workers elsewhere could run.
        """
        if self._run_time_ewma is None:
            return 0
        return min(self.options.batch_size, int(self.options.concurrency * self.options.prefetch_seconds / max(self._run_time_ewma, 1e-6)))

    def _claim_room(self) -> int:
        """How many jobs to claim now: 0 until a free slot or half a prefetch is missing."""
        prefetch = self._prefetch()
        room = self.options.concurrency + prefetch - len(self._running)
        if room <= 0 or (len(self._running) >= self.options.concurrency and room < prefetch // 2):
            return 0
        return min(room, self.options.batch_size)

    def _exchange(self, executor: _JobThreads, stopping: bool) -> int:
        """Write back finished jobs and claim more, in one transaction (one commit).

        Completions ride along with every claim; on their own they wait for a
        full batch or ``completion_delay``.  Returns how many jobs were claimed.
        """
        room = 0 if stopping else self._claim_room()
        batch = self._to_complete[:self.options.completion_batch] if (room or self._completions_due(stopping)) else []
        self._limit_wait = None
        if not batch and not room:
            return 0
        free = self._free_resources()
        written, jobs = self.driver.complete_and_pop([job for job, _ in batch], room, self.options.queues,
                                                     results=[result for _, result in batch], resources=free)
        self._limit_wait = self.driver.store.claim_wait_s() if room else None
        self._completed(batch, written)
        jobs = self._within_resources(jobs, free)
        for job in jobs:
            self._start(executor, job)
        self.stats.claimed += len(jobs)
        return len(jobs)

    def _free_resources(self) -> dict[str, float] | None:
        """What this worker's resources leave free beside the jobs it holds (None: it has none)."""
        if not self.options.resources:
            return None
        used = in_use(entry.job.requires for entry in self._running.values())
        return {name: amount - used.get(name, 0.0) for name, amount in self.options.resources.items()}

    def _within_resources(self, jobs: list[Job], free: dict[str, float] | None) -> list[Job]:
        """The claimed jobs that fit the free resources together, in claim order; the rest are given back
        at once (each fitted alone, as the claim checked, but not all of them beside each other)."""
        if free is None:
            return jobs
        kept, over = [], []
        for job in jobs:
            if job.requires and not covers(free, job.requires):
                over.append(job)
                continue
            for name, amount in (job.requires or {}).items():
                free[name] -= amount
            kept.append(job)
        if over:
            self._give_back(over)
        return kept

    def _start(self, executor: _JobThreads, job: Job) -> None:
        if not job.runnable:
            reason = LookupError(missing_task_message(job.name, self.driver.worker_id))
            self._record_failure(job, reason, permanent=True)
            return
        running = self._running[job.id, job.attempts] = _Running(job, JobContext(job, self.driver))
        if runs_in_process(job, self.options.pool):
            running.isolated, running.backstop = True, None
        elif is_coroutine_job(job):
            running.backstop = self.options.kill_grace
        executor.submit(running)

    def _execute(self, running: _Running) -> None:
        """Run one job on a pool thread and leave its outcome for the loop (a job whose cancel was
        asked before it started is not run at all)."""
        job = running.job
        outcome = _Outcome(job)
        running.started = time.monotonic()
        if running.isolated:
            self._execute_in_process(running, outcome)
        elif not running.context.cancel_requested():
            try:
                with running_job(running.context):
                    job.result = job.handle()
                if inspect.iscoroutine(job.result):  # an async def job: awaited on the worker's loop
                    job.result = self._event_loop.run(job.result, running.context, job.timeout)
                # A result that cannot be stored is the job's failure; a DataFrame one is Parquet (job.result_data).
                outcome.result_json = encode_job_result(job, self.driver.store.check_data_size)
            except Snooze as snooze:  # not a failure: run again later, the attempt not counted
                outcome.snooze = snooze.seconds
            except Exception as error:  # noqa: BLE001 - a job's failure is data
                outcome.error = error
                outcome.formatted = "".join(traceback.format_exception(error))
        outcome.finished_at = time.monotonic()
        outcome.run_time = outcome.finished_at - running.started
        with self._lock:
            self._finished.append(outcome)
        self._wake.set()

    def _execute_in_process(self, running: _Running, outcome: _Outcome) -> None:
        """Run the job in this pool thread's child process (kronix_data.isolation), killed if it must be."""
        if running.context.cancel_requested():
            return
        job = running.job
        try:
            outcome.result_json, outcome.error, outcome.formatted = self._process_slots.for_this_thread().run(
                job, running.context, job.timeout, job.task.memory_limit)
        except Exception as error:  # noqa: BLE001 - a child that cannot start fails the job, not the worker
            outcome.error, outcome.formatted = error, "".join(traceback.format_exception(error))
        if outcome.error is None and job.result_data is not None:
            try:
                self.driver.store.check_data_size(len(job.result_data), f"the DataFrame result of job {job.name!r}")
            except InvalidInputError as error:
                outcome.result_json, outcome.error = None, error
                outcome.formatted = "".join(traceback.format_exception(error))
        if outcome.error is None and outcome.result_json is not None:
            job.result = json.loads(outcome.result_json)

    def _unclaim_unstarted(self, executor: _JobThreads) -> None:
        unstarted = [running.job for running in executor.take_back()]
        for job in unstarted:
            del self._running[job.id, job.attempts]
        if unstarted:
            self._try(self._give_back, jobs=unstarted)

    def _give_back(self, jobs: list[Job]) -> None:
        self.stats.unclaimed += self.driver.unclaim(jobs)

    # -- finishing ---------------------------------------------------------------

    def _collect_finished(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
        for outcome in finished:
            self.stats.observe_run_time(outcome.run_time)
            ewma = self._run_time_ewma
            self._run_time_ewma = outcome.run_time if ewma is None else 0.9 * ewma + 0.1 * outcome.run_time
            running = self._running.pop((outcome.job.id, outcome.job.attempts))
            if running.abandoned:
                log.info("discarding the late result of job %s (it timed out)", outcome.job.id)
                continue
            if running.context.cancel_requested():
                self._to_cancel.append(outcome.job)
            elif outcome.snooze is not None:
                self._to_snooze.append((outcome.job, outcome.snooze))
            elif outcome.error is None:
                if not self._to_complete:
                    self._first_done_at = outcome.finished_at
                self._to_complete.append((outcome.job, outcome.result_json))
            else:
                self.stats.timed_out += bool(getattr(outcome.error, "kronix_timeout", False))
                self._record_failure(outcome.job, outcome.error, outcome.formatted)

    def _expire_timeouts(self, now: float) -> None:
        for running in self._running.values():
            if not running.abandoned and running.past_deadline(now):
                running.abandoned = True
                if running.context.cancel_requested():
                    self._to_cancel.append(running.job)
                    continue
                self.stats.timed_out += 1
                error = TimeoutError(f"job {running.job.name!r} ran past its timeout of {running.job.timeout}s; "
                                     "its thread could not be stopped and its result will be discarded")
                self._record_failure(running.job, error)

    def _record_failure(self, job: Job, error: BaseException, formatted: str = "", permanent: bool = False) -> None:
        """Run the job's hook now and queue the write (retried until the database takes it).

        ``last_error`` starts with ``Type: message`` on its first line, then the traceback.
        """
        job.last_error = f"{type(error).__name__}: {error}" + (f"\n\n{formatted}" if formatted else "")
        permanent = permanent or job.attempts > job.max_retries
        hook = job.on_permanent_failure if permanent else job.on_failure
        try:
            hook(error)
        except Exception:  # noqa: BLE001 - a broken hook must not stop the worker
            log.exception("the failure hook of job %s raised", job.id)
        delay = 0.0 if permanent else job.retry.delay_after(job.attempts)
        self._to_fail.append(_Failure(job, permanent, delay))

    def _flush_failures(self) -> None:
        while self._to_fail:
            failure = self._to_fail[0]
            if failure.permanent:
                held = self.driver.fail(failure.job)
                self.stats.dead_lettered += held
            else:
                held = self.driver.release(failure.job, delay=failure.delay)
                self.stats.retried += held
                self._retries_due_at = max(self._retries_due_at, time.monotonic() + failure.delay)
            if not held:
                log.warning("job %s was no longer held by this worker (lease lost?)", failure.job.id)
            self._to_fail.pop(0)

    def _completions_due(self, force: bool) -> bool:
        if not self._to_complete:
            return False
        return (force or len(self._to_complete) >= self.options.completion_batch or self._stop_requested.is_set()
                or time.monotonic() - self._first_done_at >= self.options.completion_delay)

    def _flush_completions(self, force: bool = False) -> None:
        if self._completions_due(force):
            batch = self._to_complete[:self.options.completion_batch]
            self._completed(batch, self.driver.complete_many([job for job, _ in batch],
                                                             results=[result for _, result in batch]))

    def _completed(self, batch: list[tuple[Job, str | None]], written: int) -> None:
        if not batch:
            return
        if written < len(batch):
            log.warning("%d finished jobs were no longer held by this worker (lease lost?)", len(batch) - written)
        self.stats.completed += written
        del self._to_complete[:len(batch)]
        self._first_done_at = time.monotonic()

    def _pass_on_cancels(self) -> None:
        """Ask the database which held jobs someone wants cancelled, and tell those jobs."""
        running = [entry for entry in self._running.values() if not entry.context.cancel_requested()]
        if not running:
            return
        asked = self.driver.cancels_asked([entry.job for entry in running])
        for entry in running:
            if entry.job.id in asked:
                log.info("cancel asked for job %s", entry.job.id)
                entry.context.request_cancel()

    def _flush_cancelled(self) -> None:
        if self._to_cancel:
            self.stats.cancelled += self.driver.finish_cancelled(self._to_cancel)
            self._to_cancel = []

    def _flush_snoozed(self) -> None:
        """Put the jobs that raised Snooze back as pending, due after their delays (one transaction)."""
        if self._to_snooze:
            self.stats.snoozed += self.driver.store.snooze(self.driver.worker_id, self._to_snooze)
            longest = max(delay for _, delay in self._to_snooze)
            self._retries_due_at = max(self._retries_due_at, time.monotonic() + longest)  # a burst waits for them
            self._to_snooze = []

    def _run_scheduler(self) -> float:
        """Store this process's ``@task(cron=...)`` schedules (once a run), fire the due slots of every schedule;
        returns how long until the next look: the next slot, but at least every ``poll_interval`` (a schedule
        made from a notebook is seen that soon)."""
        if not self._schedules_stored:
            self.driver.register_task_schedules()
            self._schedules_stored = True
        due_in = self.driver.run_scheduler()
        if due_in is None:
            return self.options.poll_interval
        return min(max(due_in, 0.001), self.options.poll_interval)

    def _heartbeat(self) -> None:
        """Renew the leases, write the progress reported since the last write, and say this worker is alive:
        one transaction."""
        held = [running.job for running in self._running.values()]
        held += [job for job, _ in self._to_complete] + [failure.job for failure in self._to_fail] + self._to_cancel
        held += [job for job, _ in self._to_snooze]
        running = sum(entry.started is not None for entry in self._running.values())
        beat = worker_beat(self.driver.worker_id, self.options, running, starting=not self._registered)
        with self._reports() as reports:
            self.driver.heartbeat(held, progress=reports, worker=beat)
        self._registered = True

    # -- progress and the registry ---------------------------------------------------

    @contextmanager
    def _reports(self) -> Iterator[list[ProgressWrite]]:
        """The running jobs' reports not written yet; given back to their jobs if the write fails."""
        now = time.monotonic()
        taken = [(entry.context, report) for entry in self._running.values() if not entry.abandoned
                 and (report := entry.context.take_report(now)) is not None]
        try:
            yield [report for _, report in taken]
        except BaseException:
            for context, _ in taken:
                context.keep_report()
            raise

    def _flush_progress(self) -> None:
        """Write what running jobs reported since the last write (nothing at all if none reported)."""
        with self._reports() as reports:
            if reports:
                self.driver.write_progress(reports)

    def _leave_registry(self) -> None:
        """Mark this worker stopped in the registry (best effort: a worker that cannot is seen as gone)."""
        if not self._registered:
            return
        try:
            self.driver.store.mark_worker_stopped(self.driver.worker_id)
        except self._database_errors as error:
            log.info("could not mark worker %s stopped (%s); it will show as gone", self.driver.worker_id, error)
        self._registered = False
