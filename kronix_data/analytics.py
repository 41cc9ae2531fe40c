"""The DataFrame views of the queue: stats per queue and the dead letters.

Every frame has a fixed set of columns and dtypes, also when it is empty, so
notebook code such as ``df.groupby("queue")`` never needs a special case.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

STATS_COLUMNS = {
    "queue": "object",
    "pending": "int64",
    "processing": "int64",
    "completed": "int64",
    "failed": "int64",
    "oldest_pending_age_s": "float64",
    "avg_wait_s": "float64",
    "avg_run_s": "float64",
}

DEAD_LETTER_COLUMNS = {
    "id": "object",
    "name": "object",
    "queue": "object",
    "attempts": "int64",
    "max_retries": "int64",
    "last_error": "object",
    "payload": "object",
    "created_at": "datetime64[ns, UTC]",
    "finished_at": "datetime64[ns, UTC]",
    "reserved_by": "object",
}

_STATUSES = ("pending", "processing", "completed", "failed")


def typed_frame(records: Sequence[Mapping[str, Any]], columns: Mapping[str, str]) -> pd.DataFrame:
    """A DataFrame with exactly ``columns``, cast to their dtypes (empty or not)."""
    frame = pd.DataFrame.from_records(list(records), columns=list(columns))
    for name, dtype in columns.items():
        if dtype.startswith("datetime64"):
            frame[name] = pd.to_datetime(frame[name], utc=True).astype(dtype)
        else:
            frame[name] = frame[name].astype(dtype)
    return frame


def stats_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Fold ``(queue, status)`` aggregate rows into one row per queue.

    ``avg_wait_s`` is claim time minus due time over every job claimed at
    least once; ``avg_run_s`` is finish minus claim over completed jobs;
    ``oldest_pending_age_s`` is how long the longest-waiting due job has been
    due (0 when every pending job is scheduled for later, NaN with none).
    """
    queues: dict[str, dict[str, Any]] = {}
    for row in rows:
        queue = queues.setdefault(row["queue"], {"queue": row["queue"], **dict.fromkeys(_STATUSES, 0),
                                                 "oldest_pending_age_s": float("nan"),
                                                 "wait": [0.0, 0], "run": [0.0, 0]})
        if row["status"] in _STATUSES:
            queue[row["status"]] += row["jobs"]
        if row["status"] == "pending" and row["earliest_due"] is not None:
            age = (row["db_now"] - row["earliest_due"]).total_seconds()
            queue["oldest_pending_age_s"] = max(age, 0.0)
        for key in ("wait", "run"):
            if row[f"{key}_count"]:
                queue[key][0] += float(row[f"{key}_sum"])
                queue[key][1] += row[f"{key}_count"]
    records = []
    for queue in sorted(queues.values(), key=lambda q: q["queue"]):
        for key in ("wait", "run"):
            total, count = queue.pop(key)
            queue[f"avg_{key}_s"] = total / count if count else float("nan")
        records.append(queue)
    return typed_frame(records, STATS_COLUMNS)


def dead_letter_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per dead letter, payload decoded (kept as text if it is not JSON)."""
    records = [{**row, "payload": _decode_or_keep(row["payload"])} for row in rows]
    return typed_frame(records, DEAD_LETTER_COLUMNS)


def _decode_or_keep(text: str | None) -> Any:
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return text
