"""Plain functions as jobs: ``@task`` registers them by name for every worker.

A notebook user writes a function that takes the payload and enqueues
``clean.job(chunk)``; a worker process that imports the same module rebuilds
such rows as :class:`TaskJob` and calls the function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import InvalidInputError
from .cron import DEFAULT_TIMEZONE, validate_cron, zone_for
from .job import Job, RetryPolicy, validate_priority
from .resources import checked_resources, parse_size
from .limits import Limits

Hook = Callable[[Job, BaseException], None]

_registry: dict[str, Task] = {}


@dataclass(frozen=True)
class Task:
    """A registered function and how its jobs are queued, retried and timed out."""

    name: str
    function: Callable[[Any], Any]
    queue: str = "default"
    max_retries: int = 3
    timeout: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    on_failure: Hook | None = None
    on_permanent_failure: Hook | None = None
    priority: int = 0
    #: A cron schedule for this task (``"*/5 * * * *"``), read in ``timezone``; a worker that imports
    #: the task's module stores it in the schedules table (see kronix_data.schedules).
    cron: str | None = None
    timezone: str = DEFAULT_TIMEZONE
    #: None: as the worker's pool; "thread" or "process" whatever the pool (see kronix_data.isolation).
    isolation: str | None = None
    #: Bytes of resident memory past which a job in a child process is killed (implies a process).
    memory_limit: float | None = None
    #: Resources a worker must have to run its jobs (``{"gpu": 1}``); see kronix_data.resources.
    requires: dict[str, float] | None = None
    #: Jobs of this task ``processing`` at once across every worker (None: no limit).
    concurrency: int | None = None
    #: Jobs of this task started per period across every worker, as ``"100/min"`` (None: no limit).
    rate: str | None = None
    #: True: the function takes the DataFrame of its chunk (``as_frame(payload)``), not the payload.
    frame: bool = False

    def __post_init__(self):
        validate_priority(self.priority, f"priority of task {self.name!r}")
        if self.cron is not None:
            object.__setattr__(self, "timezone", validate_cron(self.cron, self.timezone))
        else:
            zone_for(self.timezone)
        if self.isolation not in (None, "thread", "process"):
            raise InvalidInputError(f"isolation of task {self.name!r} must be 'thread' or 'process', "
                                    f"got {self.isolation!r}")
        object.__setattr__(self, "requires", checked_resources(self.requires, f"requires of task {self.name!r}"))
        if self.memory_limit is not None:
            object.__setattr__(self, "memory_limit", parse_size(self.memory_limit, f"memory_limit of task {self.name!r}"))
            if self.isolation == "thread":
                raise InvalidInputError(f"task {self.name!r}: a memory_limit needs isolation='process' "
                                        "(a thread cannot be killed)")
        self.limits  # checked now: a bad limit fails at the decorator, not in a worker

    @property
    def is_async(self) -> bool:
        """Whether the function is ``async def`` (its jobs run on the worker's event loop)."""
        return inspect.iscoroutinefunction(self.function)

    @property
    def limits(self) -> Limits | None:
        """The task's limits as its workers write them to ``<table>_task_limits``, or None."""
        if self.concurrency is None and self.rate is None:
            return None
        if self.rate is not None and not isinstance(self.rate, str):
            raise InvalidInputError(f"rate of task {self.name!r} must be a string such as '100/min', "
                                    f"got {self.rate!r}")
        try:
            return Limits.checked(self.concurrency, self.rate)
        except InvalidInputError as error:
            raise InvalidInputError(f"task {self.name!r}: {error}") from None

    def __call__(self, payload: Any = None) -> Any:
        """Run the function here and now, without the queue (handy in a notebook); a ``frame=True`` task
        takes a DataFrame, or a chunk payload it turns into one."""
        return self.function(self.argument(payload))

    def argument(self, payload: Any) -> Any:
        """What the function is called with: the payload, or for a ``frame=True`` task its chunk's DataFrame."""
        if not self.frame:
            return payload
        from .chunking import as_frame  # pandas and pyarrow only for frame tasks

        return payload if type(payload).__name__ == "DataFrame" else as_frame(payload)

    def job(self, payload: Any = None, **options: Any) -> TaskJob:
        """A job for this task, ready to push; ``options`` override queue, max_retries, priority, id..."""
        options = {"queue": self.queue, "max_retries": self.max_retries, "priority": self.priority,
                   "requires": self.requires, **options}
        job = TaskJob(self.name, payload, **options)
        job.task = self
        return job


class TaskJob(Job):
    """A job whose work is a registered :class:`Task`'s function."""

    task: Task

    def handle(self) -> Any:
        return self.task.function(self.task.argument(self.payload))

    @property
    def timeout(self) -> float | None:  # type: ignore[override]
        return self.task.timeout

    @property
    def retry(self) -> RetryPolicy:  # type: ignore[override]
        return self.task.retry

    def on_failure(self, error: BaseException) -> None:
        if self.task.on_failure:
            self.task.on_failure(self, error)

    def on_permanent_failure(self, error: BaseException) -> None:
        if self.task.on_permanent_failure:
            self.task.on_permanent_failure(self, error)


def task(name: str | None = None, *, queue: str = "default", max_retries: int = 3,
         timeout: float | None = None, retry: RetryPolicy | None = None,
         on_failure: Hook | None = None, on_permanent_failure: Hook | None = None,
         priority: int = 0, cron: str | None = None, timezone: str = DEFAULT_TIMEZONE,
         isolation: str | None = None, memory_limit: float | str | None = None,
         requires: dict[str, float | str] | None = None, concurrency: int | None = None,
         rate: str | None = None, frame: bool = False) -> Callable[[Callable], Task]:
    """Register a function as a task: ``@task(name="etl.clean", max_retries=3)``, or plain ``@task``.

    The function may be ``async def`` (run on the worker's event loop).
    ``isolation="process"`` runs its jobs in a child process that is killed at
    the timeout, and ``memory_limit="2GiB"`` kills one whose memory passes it
    (README, "Pools").  ``requires={"gpu": 1}``: only a worker with those
    resources claims its jobs, and runs no more at once than they allow.
    ``cron`` (with ``timezone``, UTC by default) schedules it: every worker that
    imports the module registers the schedule, named after the task, and any of
    them fires each slot once.
    ``concurrency`` and ``rate`` (``"100/min"``) limit the task's jobs across every worker
    everywhere, in whatever queue (see :mod:`kronix_data.limits`); a worker that imports the task
    writes them to the table when it starts.
    ``frame=True``: the function takes the DataFrame of a ``driver.map`` chunk
    (``as_frame(payload)``, in whatever format it was stored) instead of the payload.

    The name defaults to ``module.function``.  Registering a different
    function under a name already taken is an error (two modules would
    otherwise silently fight over the same jobs).
    """

    def register(function: Callable[[Any], Any]) -> Task:
        registered = Task(name or f"{function.__module__}.{function.__qualname__}", function, queue,
                          max_retries, timeout, retry or RetryPolicy(), on_failure, on_permanent_failure,
                          priority, cron=cron, timezone=timezone, isolation=isolation,
                          memory_limit=memory_limit, requires=requires, concurrency=concurrency, rate=rate,
                          frame=frame)
        existing = _registry.get(registered.name)
        if existing is not None and not _same_function(existing.function, function):
            raise InvalidInputError(f"task name {registered.name!r} is already registered to "
                             f"{existing.function.__module__}.{existing.function.__qualname__}")
        _registry[registered.name] = registered
        return registered

    if callable(name):  # used bare, as @task: the function itself came in the name's place
        function, name = name, None
        return register(function)
    if name is not None and not isinstance(name, str):
        raise InvalidInputError(f"task name must be a str, got {type(name).__name__}")
    return register


def _same_function(a: Callable, b: Callable) -> bool:
    """Same module and name: a module imported twice (or a re-run notebook cell) re-registers."""
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def registered_tasks() -> list[Task]:
    """Every task registered in this process (a worker writes their limits when it starts)."""
    return list(_registry.values())


def find_task(name: str) -> Task | None:
    """The task registered under ``name`` in this process, if any."""
    return _registry.get(name)


def task_factory(name: str) -> Callable[[Any], TaskJob] | None:
    """A job factory for a registered task, for the driver's ``pop``."""
    registered = _registry.get(name)
    return None if registered is None else registered.job


def scheduled_tasks() -> list[Task]:
    """The tasks registered in this process with a ``cron`` (a worker stores their schedules when it starts)."""
    return [registered for registered in _registry.values() if registered.cron is not None]


# -- tasks of the kernel that started this process (kronix_data.kernel_tasks) --------------------------


class KernelTaskSource(Protocol):
    """Where a local worker finds its kernel's ``__main__`` tasks."""

    kernel: str

    def factories(self, names: Iterable[str]) -> dict[str, Callable[[Any], Any]]: ...


_kernel_tasks: KernelTaskSource | None = None


def use_kernel_tasks(source: KernelTaskSource | None) -> None:
    """In a worker started by ``start_local_workers``: ask ``source`` for the names not registered here."""
    global _kernel_tasks
    _kernel_tasks = source


def task_factories(names: Iterable[str]) -> dict[str, Callable[[Any], Any]]:
    """A job factory per name registered here, then per name the kernel has (one question for all)."""
    names = set(names)
    found: dict[str, Callable[[Any], Any]] = {name: _registry[name].job for name in names if name in _registry}
    if _kernel_tasks is not None and len(found) < len(names):
        found.update(_kernel_tasks.factories(names - found.keys()))
    return found


def missing_task_message(name: str, worker_id: str) -> str:
    """Why a worker cannot run jobs named ``name``, and where such a task does run."""
    text = f"no task or job factory is registered for {name!r} on worker {worker_id}"
    if _kernel_tasks is not None:
        return f"{text}, nor in the kernel that started it ({_kernel_tasks.kernel})"
    where = ("it runs only on workers started by start_local_workers from that kernel: "
             "put it in a module and start the worker with -m module")
    if name.startswith("__main__."):  # @task's default name in a notebook cell or a script
        return f"task {name!r} was defined in a notebook or a script's __main__; {where} ({text})"
    return f"{text}; if it was defined in a notebook, {where}"
