"""Plain functions as jobs: ``@task`` registers them by name for every worker.

A notebook user writes a function that takes the payload and enqueues
``clean.job(chunk)``; a worker process that imports the same module rebuilds
such rows as :class:`TaskJob` and calls the function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError
from .job import Job, RetryPolicy, validate_priority
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
    #: Jobs of this task ``processing`` at once across every worker (None: no limit).
    concurrency: int | None = None
    #: Jobs of this task started per period across every worker, as ``"100/min"`` (None: no limit).
    rate: str | None = None

    def __post_init__(self):
        validate_priority(self.priority, f"priority of task {self.name!r}")
        self.limits  # checked now: a bad limit fails at the decorator, not in a worker

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
        """Run the function here and now, without the queue (handy in a notebook)."""
        return self.function(payload)

    def job(self, payload: Any = None, **options: Any) -> TaskJob:
        """A job for this task, ready to push; ``options`` override queue, max_retries, priority, id..."""
        options = {"queue": self.queue, "max_retries": self.max_retries, "priority": self.priority, **options}
        job = TaskJob(self.name, payload, **options)
        job.task = self
        return job


class TaskJob(Job):
    """A job whose work is a registered :class:`Task`'s function."""

    task: Task

    def handle(self) -> Any:
        return self.task.function(self.payload)

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
         priority: int = 0, concurrency: int | None = None, rate: str | None = None) -> Callable[[Callable], Task]:
    """Register a function as a task: ``@task(name="etl.clean", max_retries=3)``, or plain ``@task``.

    ``concurrency`` and ``rate`` (``"100/min"``) limit the task's jobs across every worker
    everywhere, in whatever queue (see :mod:`kronix_data.limits`); a worker that imports the task
    writes them to the table when it starts.

    The name defaults to ``module.function``.  Registering a different
    function under a name already taken is an error (two modules would
    otherwise silently fight over the same jobs).
    """

    def register(function: Callable[[Any], Any]) -> Task:
        registered = Task(name or f"{function.__module__}.{function.__qualname__}", function, queue,
                          max_retries, timeout, retry or RetryPolicy(), on_failure, on_permanent_failure,
                          priority, concurrency, rate)
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
