"""Snooze: a job that asks to run again later, which is neither a failure nor a retry.

A task waiting for an upstream file raises ``Snooze(300)``: its worker puts it
back as pending, due in five minutes, with its attempts as they were before this
run and no error recorded, so snoozing never uses up ``max_retries``.
"""

from __future__ import annotations

import math
from datetime import timedelta

from .errors import InvalidInputError


class Snooze(Exception):
    """Raise inside a task (or ``Job.handle``) to run it again ``seconds`` from now (a number or a timedelta).

    The attempt does not count, no error is recorded, and the failure hooks do
    not run; a cancel asked meanwhile still wins.
    """

    def __init__(self, seconds: float | timedelta):
        value = seconds.total_seconds() if isinstance(seconds, timedelta) else seconds
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InvalidInputError(f"Snooze needs a delay in seconds >= 0 (a number or a timedelta), "
                                    f"got {seconds!r}")
        self.seconds = float(value)
        super().__init__(f"snoozed for {self.seconds:g}s")
