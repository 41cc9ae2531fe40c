"""Progress: what a running job reports about itself, and what a batch's reports say about its end.

Inside a job, ``current_job().progress(done, total, **info)`` only keeps the
report in memory (well under a microsecond: a job may call it for every row);
the job's worker writes the latest report of each of its jobs at most once per
``progress_interval`` and with every heartbeat, one statement batch for all of
them (:mod:`kronix_data.worker`).  So a million calls cost a handful of writes.

For a batch, :class:`BatchView` folds what the store reads of its chunks
(``JobStore.read_batch_progress``) into the counts, the units done within
running chunks, the expected time to finish (:func:`estimate_eta`) and the
chunks that run far longer than the others (:func:`stragglers_frame`).  Pure
apart from the store calls: nothing here writes.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pandas as pd

from .analytics import typed_frame
from .errors import InvalidInputError
from .job import JobStatus, encode_value
from .workers import live_slots

if TYPE_CHECKING:
    from .store import BatchProgressRows, JobStore

_STATUSES = tuple(status.value for status in JobStatus)
#: Statuses a job leaves only by finishing.
_UNFINISHED = ("pending", "waiting", "processing")
#: Longest text value of a progress detail (``progress(..., file="...")``).
MAX_INFO_TEXT = 1_000

#: The columns of ``batch.stragglers()``.
STRAGGLER_COLUMNS = {
    "id": "object",
    "chunk": "int64",
    "reserved_by": "object",
    "reserved_at": "datetime64[ns, UTC]",
    "elapsed_s": "float64",
    "p95_run_s": "float64",
    "progress_done": "float64",
    "progress_total": "float64",
    "progress_info": "object",
    "progress_at": "datetime64[ns, UTC]",
}


# -- what a job reports -------------------------------------------------------------

def checked_amount(value: Any, what: str) -> float | int:
    """A progress amount: a finite number >= 0 (numpy numbers too, not bools), else InvalidInputError.

    The slow path of ``JobContext.progress``, which takes plain ints and floats without calling it.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInputError(f"progress {what} must be a number, got {type(value).__name__}")
    number = int(value) if isinstance(value, numbers.Integral) else float(value)
    if not 0 <= number < math.inf:
        raise InvalidInputError(f"progress {what} must be a finite number >= 0, got {value!r}")
    return number


def checked_info(info: dict[str, Any]) -> dict[str, Any]:
    """Progress details: JSON scalars (str of at most :data:`MAX_INFO_TEXT` characters, int, finite
    float, bool, None), checked where the job calls, so a bad one fails there and not in its worker."""
    for key, value in info.items():
        if value is None or isinstance(value, (bool, int)):
            continue
        if isinstance(value, float) and math.isfinite(value):
            continue
        if isinstance(value, str) and len(value) <= MAX_INFO_TEXT:
            continue
        raise InvalidInputError(f"progress detail {key}={value!r:.60} must be a str (at most {MAX_INFO_TEXT} "
                                "characters), an int, a finite float, a bool or None")
    return info


def encode_info(info: dict[str, Any] | None, job_name: str) -> str | None:
    """The details of a report as the JSON text stored in ``progress_info`` (None: keep the stored ones)."""
    return encode_value(info, f"progress details of job {job_name!r}") if info else None


def decode_info(text: str | None) -> dict[str, Any] | None:
    return None if text is None else json.loads(text)


# -- what a batch's reports say ---------------------------------------------------------

def _number(value: Any) -> float | int | None:
    """A summed amount as the user gave it: an int when it is whole."""
    if value is None:
        return None
    value = float(value)
    return int(value) if value.is_integer() else value


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    return None if later is None or earlier is None else (later - earlier).total_seconds()


@dataclass
class BatchView:
    """One batch as its chunks last reported: counts by status, units and timings.

    Units are whatever the tasks report (``progress(done, total)``); a chunk of a
    DataFrame has its rows as its total from the start, so a DataFrame batch is
    counted in rows even before any task reports.
    """

    rows: BatchProgressRows

    @property
    def counts(self) -> dict[str, int]:
        """``{"total", "pending", "processing", "completed", "failed", "waiting", "cancelled"}``."""
        by_status = self.rows.by_status
        counts = {"total": sum(int(row["jobs"]) for row in by_status.values())}
        counts.update({status: int(by_status.get(status, {}).get("jobs", 0)) for status in _STATUSES})
        return counts

    def _sum(self, statuses: tuple[str, ...], column: str) -> float:
        return sum(float(self.rows.by_status[status][column] or 0) for status in statuses
                   if status in self.rows.by_status)

    @property
    def units_total(self) -> float | int | None:
        """The units of the whole batch: the chunks' totals summed, if every chunk has one (else None)."""
        by_status = self.rows.by_status
        if not by_status or any(row["with_total"] < row["jobs"] for row in by_status.values()):
            return None
        return _number(self._sum(tuple(by_status), "total"))

    @property
    def units_running(self) -> float | int:
        """The units the running chunks reported done."""
        return _number(self._sum(("processing",), "done")) or 0

    @property
    def units_done(self) -> float | int:
        """Completed chunks' units (their total, or their last report) plus the running chunks' units done."""
        return _number(self._sum(("completed",), "units") + self._sum(("processing",), "done")) or 0

    @property
    def units_finished(self) -> float:
        """Units no longer to be worked: done, plus the units of dead-lettered and cancelled chunks."""
        return float(self.units_done) + self._sum(("failed", "cancelled"), "units")

    @property
    def chunks_finished(self) -> float:
        """Finished chunks, plus the running chunks' reported fractions (``done / total``): a smooth count."""
        counts = self.counts
        fractions = sum(min(float(row["progress_done"]) / float(row["progress_total"]), 1.0)
                        for row in self.rows.running
                        if row["progress_done"] is not None and row["progress_total"])
        return counts["completed"] + counts["failed"] + counts["cancelled"] + fractions

    @property
    def done(self) -> bool:
        counts = self.counts
        return not any(counts[status] for status in _UNFINISHED)

    @property
    def held(self) -> dict[str | None, int]:
        """The running chunks by the worker that holds them (``reserved_by`` -> chunks)."""
        held: dict[str | None, int] = {}
        for row in self.rows.running:
            held[row["reserved_by"]] = held.get(row["reserved_by"], 0) + 1
        return held

    @property
    def queue(self) -> str | None:
        queues = [row["queue"] for row in self.rows.by_status.values() if row["queue"] is not None]
        return min(queues) if queues else None

    def progress(self) -> dict[str, Any]:
        """What ``Batch.progress()`` returns: the counts, then ``units_done`` and ``units_total``."""
        return {**self.counts, "units_done": self.units_done, "units_total": self.units_total}

    # -- timings ------------------------------------------------------------------

    def seconds_per_chunk(self) -> float | None:
        """The completed chunks' mean run time (claim to finish)."""
        completed = self.rows.by_status.get("completed")
        if not completed or not completed["jobs"] or completed["run_s"] is None:
            return None
        return float(completed["run_s"]) / int(completed["jobs"])

    def seconds_per_unit(self) -> float | None:
        """Run time per unit over the completed chunks (every one with units); else the median pace the
        running chunks report of themselves in this attempt."""
        completed = self.rows.by_status.get("completed")
        if completed and completed["jobs"] and completed["with_units"] == completed["jobs"] \
                and completed["units"] and completed["run_s"] is not None:
            return float(completed["run_s"]) / float(completed["units"])
        paces = sorted(pace for pace in map(self._pace, self.rows.running) if pace is not None)
        return paces[len(paces) // 2] if paces else None

    @staticmethod
    def _pace(row: dict[str, Any]) -> float | None:
        """Seconds per unit a running chunk reported of itself in this attempt (None: no report yet)."""
        ran = _seconds(row["progress_at"], row["reserved_at"])
        if not row["progress_done"] or ran is None or ran < 0:
            return None
        return ran / float(row["progress_done"])

    def remaining_of_running(self, per_unit: float | None, per_chunk: float | None) -> list[float | None]:
        """For each running chunk, the seconds it has left: by its own reported pace if it reported in this
        attempt, else by the batch's (per unit of its total, or per chunk) minus what it has run."""
        remaining = []
        for row in self.rows.running:
            elapsed = _seconds(self.rows.now, row["reserved_at"]) or 0.0
            pace, total, done = self._pace(row), row["progress_total"], row["progress_done"]
            if pace is not None and total:
                left = (float(total) - float(done)) * pace - (_seconds(self.rows.now, row["progress_at"]) or 0.0)
            elif per_unit is not None and total:
                left = float(total) * per_unit - elapsed
            elif per_chunk is not None:
                left = per_chunk - elapsed
            else:
                remaining.append(None)
                continue
            remaining.append(max(left, 0.0))
        return remaining


def estimate_eta(view: BatchView, slots: int | None) -> float | None:
    """Seconds until the batch is done, or None while nothing tells (no chunk completed or reported).

    The work left (each pending or waiting chunk at the batch's run time per unit
    of its total, or per chunk; what each running chunk has left by its own pace)
    shared among the chunks running at once (at most ``slots``, the live workers'
    concurrency on the batch's queue), but never less than the longest running
    chunk still needs.  With no live worker and nothing running: None.
    """
    if view.done:
        return 0.0
    per_unit, per_chunk = view.seconds_per_unit(), view.seconds_per_chunk()
    if per_unit is None and per_chunk is None:
        return None
    by_status = view.rows.by_status
    queued = 0.0
    for status in ("pending", "waiting"):
        row = by_status.get(status)
        if not row or not row["jobs"]:
            continue
        if per_unit is not None and row["with_total"] == row["jobs"]:
            queued += float(row["total"]) * per_unit
        elif per_chunk is not None:
            queued += int(row["jobs"]) * per_chunk
        else:  # per unit only, and some chunks without a total: assume the known chunks' mean size
            known = [row_ for row_ in by_status.values() if row_["with_units"]]
            mean_units = sum(float(row_["units"]) for row_ in known) / sum(int(row_["with_units"]) for row_ in known)
            queued += int(row["jobs"]) * mean_units * per_unit
    remaining = view.remaining_of_running(per_unit, per_chunk)
    fallback = per_chunk if per_chunk is not None else max((left for left in remaining if left is not None),
                                                           default=0.0)
    remaining = [fallback if left is None else left for left in remaining]
    running = len(remaining)
    if slots == 0 and running == 0:
        return None
    parallel = max(min(running, slots) if slots else running, 1) if running else (slots or 1)
    return max((queued + sum(remaining)) / parallel, max(remaining, default=0.0))


def batch_view(store: JobStore, batch_id: str, *, on_primary: bool = False) -> BatchView:
    """A batch's counts, units and running chunks, read in one go (on the standby, if any, unless ``on_primary``)."""
    return BatchView(store.read_batch_progress(batch_id, on_primary=on_primary))


_UNREAD = object()


def batch_eta(store: JobStore, view: BatchView, *, slots: int | None | object = _UNREAD) -> timedelta | None:
    """``estimate_eta`` with the live workers' slots on the batch's queue (read, unless given), as a timedelta."""
    if view.done:
        return timedelta(0)
    queue = view.queue
    if slots is _UNREAD:
        slots = live_slots(store, queue) if queue is not None else None
    seconds = estimate_eta(view, slots)
    return None if seconds is None else timedelta(seconds=seconds)


def p95_run_time(store: JobStore, batch_id: str) -> float | None:
    """The 95th percentile of the batch's completed chunks' run times (linear interpolation), or None."""
    p95, rows = store.read_batch_run_times(batch_id)
    if p95 is not None or not rows:
        return p95
    return float(pd.Series(rows, dtype="float64").quantile(0.95))


def stragglers_frame(store: JobStore, batch_id: str, view: BatchView, factor: float) -> pd.DataFrame:
    """The running chunks whose elapsed time is over ``factor`` times the batch's p95 chunk run time.

    Empty while no chunk has completed (there is nothing to compare with).
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
        raise InvalidInputError(f"factor must be a finite number > 0, got {factor!r}")
    p95 = p95_run_time(store, batch_id) if view.rows.running else None
    records = []
    if p95 is not None:
        for row in view.rows.running:
            elapsed = _seconds(view.rows.now, row["reserved_at"])
            if elapsed is not None and elapsed > factor * p95:
                records.append({"id": row["id"], "chunk": chunk_number(batch_id, row["job_key"]),
                                "reserved_by": row["reserved_by"], "reserved_at": row["reserved_at"],
                                "elapsed_s": elapsed, "p95_run_s": p95, "progress_done": row["progress_done"],
                                "progress_total": row["progress_total"],
                                "progress_info": decode_info(row["progress_info"]), "progress_at": row["progress_at"]})
    records.sort(key=lambda record: -record["elapsed_s"])
    return typed_frame(records, STRAGGLER_COLUMNS)


def chunk_number(batch_id: str, key: str | None) -> int:
    """The chunk number of a batch's job from its key ``f"{batch_id}:{n}"`` (-1 for a job pushed by hand)."""
    prefix = f"{batch_id}:"
    suffix = key[len(prefix):] if key and key.startswith(prefix) else ""
    return int(suffix) if suffix.isdigit() else -1


def format_duration(value: timedelta | float | None) -> str:
    """``1h02m``, ``3m05s``, ``12s``; ``?`` for an unknown one."""
    if value is None:
        return "?"
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
