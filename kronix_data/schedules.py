"""Schedules from the caller's side: a task's cron made into a stored schedule, and the table of them.

A schedule lives in ``<table>_schedules`` (not in a process), so
``driver.schedule(...)`` from a notebook reaches the workers of every machine,
and ``@task(cron=...)`` schedules are stored by each worker that imports their
module, when it starts.  Firing is the store's (``JobStore.fire_due_schedules``)
and the slot arithmetic :mod:`kronix_data.cron`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from .analytics import typed_frame
from .cron import DEFAULT_TIMEZONE, validate_cron, validate_schedule_name
from .errors import InvalidInputError
from .job import decode_json, encode_value, validate_priority, validate_queue
from .tasks import Task, find_task

if TYPE_CHECKING:
    from .store import JobStore

#: The columns of ``driver.schedules()``.
SCHEDULE_COLUMNS = {
    "name": "object",
    "task": "object",
    "cron": "object",
    "timezone": "object",
    "queue": "object",
    "payload": "object",
    "next_run_at": "datetime64[ns, UTC]",
    "next_in_s": "float64",
    "last_run_at": "datetime64[ns, UTC]",
    "last_job_id": "object",
    "last_fired_at": "datetime64[ns, UTC]",
    "created_at": "datetime64[ns, UTC]",
}


def schedule_values(task: Task | str, cron: str | None = None, *, payload: Any = None, name: str | None = None,
                    timezone: str | None = None, queue: str | None = None) -> dict[str, Any]:
    """The row of a schedule of ``task`` (a Task, or a task name the workers know), validated and encoded.

    A Task's own ``cron``, ``timezone``, ``queue``, ``priority`` and ``max_retries`` are the defaults.
    """
    if isinstance(task, str):
        found = find_task(task)
        task_name, known = task, found
    elif isinstance(task, Task):
        task_name, known = task.name, task
    else:
        raise InvalidInputError(f"schedule takes a task or a task name, got {type(task).__name__}")
    cron = cron if cron is not None else (known.cron if known else None)
    if cron is None:
        raise InvalidInputError(f"schedule of {task_name!r} needs a cron expression (cron='*/5 * * * *')")
    zone = validate_cron(cron, timezone or (known.timezone if known else DEFAULT_TIMEZONE))
    name = task_name if name is None else name
    validate_schedule_name(name)
    queue = (known.queue if known else "default") if queue is None else queue
    validate_queue(queue)
    priority = known.priority if known else 0
    validate_priority(priority)
    return {"name": name, "task": task_name, "cron": cron, "timezone": zone, "queue": queue,
            "payload": encode_value(payload, f"payload of schedule {name!r}"), "priority": priority,
            "max_retries": known.max_retries if known else 3}


def register_task_schedules(store: JobStore, tasks: list[Task]) -> int:
    """Store the schedules of ``@task(cron=...)`` tasks (a worker does, when it starts); returns how many."""
    for registered in tasks:
        store.save_schedule(schedule_values(registered))
    return len(tasks)


def schedules_frame(store: JobStore) -> pd.DataFrame:
    """One row per schedule, by name: its cron, next slot (and seconds until it) and the slot last fired."""
    now, rows = store.read_schedules()
    records = [{**row, "payload": decode_json(row["payload"]),
                "next_in_s": None if row["next_run_at"] is None else (row["next_run_at"] - now).total_seconds()}
               for row in rows]
    return typed_frame(records, SCHEDULE_COLUMNS)
