"""The worker registry: who is working a table, from where, and who has gone.

Every worker's heartbeat upserts its row in ``<table>_workers`` (id, host, pid,
queues, concurrency, jobs running, started at, last seen) in the transaction
that renews its leases, so the registry costs no round trip of its own.  A
worker is *live* while its last heartbeat is younger than its
``lease_timeout`` (the rule that returns a dead worker's jobs to pending),
*stopped* once it left by itself, and *gone* when it fell silent (kill -9, a
lost machine).  Rows not seen for :data:`WORKERS_KEPT_S` age out: they are no
longer shown, and every worker's recovery pass deletes them.
"""

from __future__ import annotations

import json
import os
import socket
from typing import TYPE_CHECKING, Any

import pandas as pd

from .analytics import typed_frame
from .resources import covers

if TYPE_CHECKING:
    from .store import JobStore, WorkerBeat
    from .worker_options import WorkerOptions

#: How long a worker that stopped or vanished stays in the registry.
WORKERS_KEPT_S = 3600.0

LIVE, STOPPED, GONE = "live", "stopped", "gone"

#: The columns of ``driver.workers()``.
WORKER_COLUMNS = {
    "worker_id": "object",
    "state": "object",
    "host": "object",
    "pid": "int64",
    "queues": "object",
    "concurrency": "int64",
    "running": "int64",
    "started_at": "datetime64[ns, UTC]",
    "last_seen": "datetime64[ns, UTC]",
    "seen_s_ago": "float64",
    "stopped_at": "datetime64[ns, UTC]",
    "resources": "object",
}


def worker_beat(worker_id: str, options: WorkerOptions, running: int, *, starting: bool = False) -> WorkerBeat:
    """What a heartbeat records of this worker (this process, this machine)."""
    from .store import WorkerBeat

    return WorkerBeat(worker_id=worker_id, host=socket.gethostname(), pid=os.getpid(), queues=list(options.queues),
                      concurrency=options.concurrency, running=running, lease_timeout=options.lease_timeout,
                      starting=starting, resources=dict(options.resources) or None)


def state_of(row: dict[str, Any], seen_s_ago: float) -> str:
    """live, stopped, or gone (no heartbeat for its own lease timeout)."""
    if row["stopped_at"] is not None:
        return STOPPED
    return LIVE if seen_s_ago <= float(row["lease_timeout"] or 60.0) else GONE


def worker_records(store: JobStore) -> list[dict[str, Any]]:
    """The registry's rows (those seen within :data:`WORKERS_KEPT_S`), each with its state."""
    now, rows = store.read_workers(WORKERS_KEPT_S)
    records = []
    for row in rows:
        seen_s_ago = max((now - row["last_seen"]).total_seconds(), 0.0) if row["last_seen"] else float("inf")
        records.append({**row, "queues": json.loads(row["queues"]) if row["queues"] else [],
                        "resources": json.loads(row["resources"]) if row.get("resources") else {},
                        "seen_s_ago": seen_s_ago, "state": state_of(row, seen_s_ago)})
    return records


def workers_frame(store: JobStore) -> pd.DataFrame:
    """One row per live or recently stopped or gone worker: live ones first, then by start."""
    order = {LIVE: 0, STOPPED: 1, GONE: 2}
    records = sorted(worker_records(store), key=lambda record: (order[record["state"]], record["started_at"]
                                                                is None, record["started_at"] or 0))
    for record in records:
        record["pid"] = record["pid"] if record["pid"] is not None else -1
        record["concurrency"] = record["concurrency"] or 0
        record["running"] = record["running"] or 0
    return typed_frame(records, WORKER_COLUMNS)


def live_slots(store: JobStore, queue: str) -> int | None:
    """How many jobs the live workers serving ``queue`` run at once (their concurrency summed); None when
    the registry knows no worker at all (workers of an older release, say), 0 when none of them is live."""
    return slots_of(worker_records(store), queue)


def slots_of(records: list[dict[str, Any]], queue: str) -> int | None:
    """:func:`live_slots` from registry records already read (:func:`worker_records`)."""
    if not records:
        return None
    return sum(int(record["concurrency"] or 0) for record in records
               if record["state"] == LIVE and queue in record["queues"])


def unrunnable_jobs(store: JobStore) -> dict[str, int]:
    """Per queue, the pending or waiting jobs with requirements that no live worker serving the queue has the
    resources for: they would wait for ever, so ``fetch_stats()`` and ``kronix stats`` count them."""
    needs = store.count_pending_requirements()
    if not needs:
        return {}
    live = [record for record in worker_records(store) if record["state"] == LIVE]
    unrunnable: dict[str, int] = {}
    for queue, requires, jobs in needs:
        wanted = json.loads(requires)
        if not any(queue in record["queues"] and covers(record["resources"], wanted) for record in live):
            unrunnable[queue] = unrunnable.get(queue, 0) + jobs
    return unrunnable


def running_count(held: dict[str | None, int], records: list[dict[str, Any]]) -> int:
    """How many of the held jobs can be running, from who holds them (``reserved_by`` -> jobs held).

    A worker holds more jobs than it runs: it claims short jobs ahead of its free
    threads, and a finished job stays ``processing`` until its completion is
    written with its next claim.  So a live worker runs at most its concurrency;
    a gone one runs nothing (its jobs wait for their lease to run out); a holder
    the registry does not know (a ``pop()`` by hand, a worker of an older
    release) may run all it holds, and so may a stopped one: a worker hands back
    or finishes what it holds before it says it stopped, so what its id holds
    since was taken by hand (``pop()`` on the driver it ran on).
    """
    known = {record["worker_id"]: record for record in records}
    running = 0
    for holder, count in held.items():
        record = known.get(holder)
        if record is None or record["state"] == STOPPED:
            running += count
        elif record["state"] == LIVE:
            running += min(count, int(record["concurrency"] or count))
    return running


def forget_gone_workers(store: JobStore) -> int:
    """Delete the rows of workers not seen for :data:`WORKERS_KEPT_S` (each worker's recovery pass does)."""
    return store.delete_workers_gone(WORKERS_KEPT_S)
