"""Flow control: a queue's concurrency and rate limits, and the fair-share turn of batches.

Limits hold across every worker on every machine because the claim itself
enforces them, in the claim's transaction (:meth:`kronix_data.store.JobStore._claim`):
the queue's settings row in ``<table>_queues`` is locked, then

- **concurrency**: at most ``concurrency`` jobs of the queue are ``processing``
  (claimed, running, or finished but not yet written back).  A killed worker's
  jobs stay ``processing`` until lease recovery returns them: then the slots free.
- **rate**: a *sliding window log*.  The row keeps the starts (claims) of the last
  ``per`` seconds as ``[[time, jobs], ...]`` by the database's clock, read after
  the lock, so claims are ordered in time as they are in commit order.  A claim
  at ``t`` takes at most ``rate`` minus the jobs started after ``t - per``.  So
  in *every* window ``[a, a + per)`` at most ``rate`` jobs start, exactly (no
  token-bucket burst of twice the rate), and a queue with work uses the whole
  rate: when the window is full the claim says when its oldest start leaves it
  (:meth:`RateWindow.next_free_in`) and the worker sleeps until then.

Fair share: every job carries a turn, ``fair_rank``, and claims take the lowest
turn first (after priority, before age).  A batch's chunk ``n`` gets turn
``V + n``, where ``V`` is the turn of the queue's next job when the batch is
pushed (its "virtual time"); a job pushed with ``push``/``push_many`` gets ``V``
(whatever its ``batch_id``), so pushes stay first in, first out.  So the batches
pending at once are served one chunk each in turn (round robin), a small batch
pushed after a huge one starts at once and finishes in about
``(batches pending) x (its chunks)`` jobs' time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .errors import InvalidInputError

#: ``"100/min"``, ``"10/s"``, ``"5 / 2h"``: a count, then per an optional number of units.
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(s|sec|second|m|min|minute|h|hour|d|day)s?\s*", re.I)
_UNIT_S = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600,
           "d": 86400, "day": 86400}


def parse_rate(text: Any) -> tuple[int, float]:
    """``"100/min"`` as ``(100, 60.0)``: jobs, per seconds."""
    if not isinstance(text, str):
        raise InvalidInputError(f"a rate must be a string such as '100/min' or '10/s', got {text!r}")
    match = _RATE.fullmatch(text)
    if match is None:
        raise InvalidInputError(f"invalid rate {text!r}: write jobs/period, such as '100/min', '10/s' or '5/2h' "
                                "(units s, min, h, day)")
    count, number, unit = int(match[1]), float(match[2] or 1), match[3].lower()
    return check_rate(count, number * _UNIT_S[unit], f"rate {text!r}")


def check_rate(rate: Any, per_s: Any, what: str = "rate") -> tuple[int, float]:
    """A rate of ``rate`` jobs per ``per_s`` seconds, both checked: a whole count >= 1, a period > 0."""
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
        raise InvalidInputError(f"{what}: the number of jobs must be a whole number >= 1, got {rate!r}")
    if isinstance(per_s, timedelta):
        per_s = per_s.total_seconds()
    if isinstance(per_s, bool) or not isinstance(per_s, (int, float)) or not math.isfinite(per_s) or per_s <= 0:
        raise InvalidInputError(f"{what}: per must be a timedelta or seconds > 0, got {per_s!r}")
    return rate, float(per_s)


def check_concurrency(concurrency: Any, what: str = "concurrency") -> int:
    """A concurrency limit: a whole number >= 1 (0 would stop the queue: that is ``pause``)."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise InvalidInputError(f"{what} must be a whole number >= 1 (use pause() to stop a queue), "
                                f"got {concurrency!r}")
    return concurrency


@dataclass(frozen=True)
class Limits:
    """What :meth:`~kronix_data.DatabaseQueueDriver.set_limits` writes for a queue; None: no such limit."""

    concurrency: int | None = None
    rate: int | None = None
    per_s: float | None = None

    @classmethod
    def checked(cls, concurrency: Any = None, rate: Any = None, per: Any = None) -> Limits:
        """Validated limits: ``rate`` as a number with ``per`` (default one second), or as ``"100/min"``."""
        if concurrency is not None:
            check_concurrency(concurrency)
        if rate is None:
            if per is not None:
                raise InvalidInputError("per goes with rate: give rate=N (jobs per period) too")
            return cls(concurrency)
        if isinstance(rate, str):
            if per is not None:
                raise InvalidInputError(f"rate {rate!r} names its period already: drop per, or give rate as a number")
            count, per_s = parse_rate(rate)
        else:
            count, per_s = check_rate(rate, timedelta(seconds=1) if per is None else per)
        return cls(concurrency, count, per_s)


class RateWindow:
    """The starts of the last ``per_s`` seconds of one queue: ``[[time, jobs], ...]``, oldest first.

    Times are the database's clock in epoch seconds, read after the queue's
    row is locked, so each claim's time is at least the one before it.
    """

    def __init__(self, rate: int, per_s: float, stored: str | None):
        self.rate, self.per_s = rate, per_s
        self.starts: list[list[float]] = [list(entry) for entry in json.loads(stored)] if stored else []

    def room(self, now: float) -> int:
        """How many jobs may start at ``now``: the rate less those started after ``now - per``."""
        self.starts = [entry for entry in self.starts if entry[0] > now - self.per_s]
        return max(self.rate - int(sum(jobs for _, jobs in self.starts)), 0)

    def add(self, now: float, jobs: int) -> None:
        if jobs:
            self.starts.append([now, jobs])

    def next_free_in(self, now: float) -> float | None:
        """Seconds until a job may start again, if none may now (its oldest start leaves the window)."""
        if self.room(now) > 0 or not self.starts:
            return None
        return max(self.starts[0][0] + self.per_s - now, 0.0)

    def stored(self) -> str:
        return json.dumps(self.starts)


def limits_text(queue: dict[str, Any]) -> str:
    """A ``driver.queues()`` row's limits and their use, for people: ``"2/3 running · 14/20 per 1s"``."""
    parts = []
    if _given(queue.get("concurrency")):
        parts.append(f"{queue.get('processing', 0)}/{queue['concurrency']} running")
    if _given(queue.get("rate")):
        parts.append(f"{queue.get('started_in_window') or 0}/{queue['rate']} per {queue['per_s']:g}s")
    return " · ".join(parts)


def _given(value: Any) -> bool:
    """Not None, NaN or pandas' NA (a frame's missing limit; NA cannot even say it equals itself)."""
    if value is None:
        return False
    try:
        return bool(value == value)
    except TypeError:
        return False
