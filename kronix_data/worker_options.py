"""How a worker runs, as one validated value: the worker never meets a nonsensical setting.

``completion_batch=0`` once meant finished jobs were never written back, and
``concurrency="4"`` failed deep in a thread pool; here each option is checked
when the worker is built, and the error names it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import InvalidInputError
from .job import validate_queue
from .resources import checked_resources, parse_resources


@dataclass(frozen=True)
class WorkerOptions:
    """The settings of one :class:`~kronix_data.Worker` (see its docstring for what each does).

    Counts are ints >= 1, durations finite seconds (``lease_timeout``, ``poll_interval``,
    ``cancel_check_interval`` and ``progress_interval`` > 0, the others >= 0), switches bools, and ``queues``
    a non-empty sequence of queue names (a single name is taken as one queue); ``pool`` is ``"thread"`` or
    ``"process"``; ``resources`` a dict of resource names to amounts or ``"gpu=1,mem=64G"``, kept as a dict.
    """

    queues: tuple[str, ...] = ("default",)
    concurrency: int = 4
    burst: bool = False
    lease_timeout: float = 60.0
    grace_period: float = 30.0
    poll_interval: float = 1.0
    completion_batch: int = 100
    completion_delay: float = 0.02
    listen: bool = True
    batch_size: int = 100
    prefetch_seconds: float = 0.05
    cancel_check_interval: float = 1.0
    progress_interval: float = 1.0
    scheduler: bool = True
    # -- pools and isolation (issue 16) --
    pool: str = "thread"
    kill_grace: float = 5.0
    resources: Mapping[str, Any] | str | None = None  # {"gpu": 1, "mem": "64G"} or "gpu=1,mem=64G"; kept as a dict

    def __post_init__(self):
        queues = (self.queues,) if isinstance(self.queues, str) else self.queues
        try:
            queues = tuple(queues)
        except TypeError:
            raise InvalidInputError(f"queues must be a queue name or a sequence of them, got {self.queues!r}") from None
        if not queues:
            raise InvalidInputError("queues must name at least one queue")
        for queue in queues:
            validate_queue(queue)
        object.__setattr__(self, "queues", queues)
        for name in ("concurrency", "completion_batch", "batch_size"):
            _check_count(name, getattr(self, name))
        for name in ("lease_timeout", "poll_interval", "cancel_check_interval", "progress_interval"):
            _check_seconds(name, getattr(self, name), positive=True)
        for name in ("grace_period", "completion_delay", "prefetch_seconds", "kill_grace"):
            _check_seconds(name, getattr(self, name), positive=False)
        resources = parse_resources(self.resources) if isinstance(self.resources, str) else self.resources
        object.__setattr__(self, "resources", checked_resources(resources, "resources") or {})
        if self.pool not in ("thread", "process"):
            raise InvalidInputError(f"pool must be 'thread' or 'process', got {self.pool!r}")
        for name in ("burst", "listen", "scheduler"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in fields(cls))

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.names()}


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be an int >= 1, got {value!r}")


def _check_seconds(name: str, value: Any, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            value <= 0 if positive else value < 0):
        raise InvalidInputError(f"{name} must be a number of seconds {'> 0' if positive else '>= 0'}, got {value!r}")
