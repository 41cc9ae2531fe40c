"""Throughput over time: jobs started, completed and failed per interval and queue, as a DataFrame.

A table of counts says where a queue stands; a series says whether it is
keeping up.  The database buckets the rows (``QueueDialect.time_bucket``)
over index ranges of the time columns, so only one row per (queue, interval)
crosses the wire, also from a table of millions; intervals with nothing in
them are filled in with zeros here, so a plot shows a stall as a drop to 0.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pandas as pd

from .analytics import typed_frame, with_lag
from .errors import InvalidInputError
from .history import time_bound
from .job import validate_queue

if TYPE_CHECKING:
    from .store import JobStore

TIMELINE_COLUMNS = {
    "interval": "datetime64[ns, UTC]",
    "queue": "object",
    "started": "int64",
    "completed": "int64",
    "failed": "int64",
}
#: What is counted, in the frame's column order.
MEASURES = ("started", "completed", "failed")
#: More rows per queue than this is a frequency too fine for the span (a year in seconds, say).
MAX_INTERVALS = 100_000


def interval_seconds(freq: Any) -> int:
    """``freq`` (a pandas frequency such as ``"1min"``, a timedelta or seconds) as whole seconds >= 1."""
    try:
        span = freq if isinstance(freq, timedelta) else pd.to_timedelta(freq, unit="s") \
            if isinstance(freq, (int, float)) and not isinstance(freq, bool) else pd.to_timedelta(freq)
    except (ValueError, TypeError) as error:
        raise InvalidInputError(f"freq must be a fixed span such as '1min', '30s', '1h', a timedelta or seconds, "
                                f"got {freq!r}") from error
    seconds = span.total_seconds()
    if not seconds >= 1 or seconds != int(seconds):
        raise InvalidInputError(f"freq must be a whole number of seconds, at least 1, got {freq!r}")
    return int(seconds)


def timeline(store: JobStore, freq: Any = "1min", since: datetime | timedelta = timedelta(hours=1),
             queue: str | None = None) -> pd.DataFrame:
    """One row per queue and interval of ``freq`` from ``since`` to now: jobs started (claimed),
    completed and failed (dead-lettered) in it.

    Intervals are aligned on the clock (UTC); ``interval`` is each one's start.
    Every interval is there, zeros included, for every queue with something in
    the span, sorted by interval then queue.  ``frame.pivot(index="interval",
    columns="queue", values="completed")`` gives one column per queue to plot.
    """
    seconds = interval_seconds(freq)
    bound = time_bound(since, "since")
    if queue is not None:
        validate_queue(queue)
    read = store.read_timeline(seconds, bound, queue)
    start = bound if isinstance(bound, datetime) else read.now - timedelta(seconds=bound)
    first, last = _bucket(start, seconds), _bucket(read.now, seconds)
    if last - first + 1 > MAX_INTERVALS:
        raise InvalidInputError(f"freq {freq!r} cuts the span since {start:%Y-%m-%d %H:%M:%S} into "
                                f"{last - first + 1:,} intervals (at most {MAX_INTERVALS:,}): use a longer freq")
    counts: dict[tuple[str, int], dict[str, int]] = {}

    def add(row_queue: str, bucket: int, what: str, jobs: int) -> None:
        counts.setdefault((row_queue, int(bucket)), dict.fromkeys(MEASURES, 0))[what] += int(jobs)

    for row_queue, status, finished, claimed, jobs in read.finished:
        add(row_queue, finished, status, jobs)
        if claimed is not None:
            add(row_queue, claimed, "started", jobs)
    for row_queue, claimed, jobs in read.running:
        add(row_queue, claimed, "started", jobs)
    queues = sorted({row_queue for row_queue, _ in counts})
    last = max([last, *(bucket for _, bucket in counts)])  # a finish stamped after now by another clock
    records = [{"interval": datetime.fromtimestamp(bucket * seconds, timezone.utc), "queue": row_queue,
                **counts.get((row_queue, bucket), dict.fromkeys(MEASURES, 0))}
               for bucket in range(first, last + 1) for row_queue in queues]
    return with_lag(typed_frame(records, TIMELINE_COLUMNS), store)


def _bucket(moment: datetime, seconds: int) -> int:
    return int(moment.timestamp()) // seconds
