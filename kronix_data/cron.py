"""Cron slots: when a schedule's slots fall, and which of them to fire now.

Pure computation on croniter (no database here): the store locks the due
schedule rows, asks :func:`plan_firing` what to fire, and inserts one job per
slot under the key :func:`schedule_key`, so a slot is one job whichever worker
fires it, and however many try.

The catch-up rule: the slots that came due since a schedule last fired are
fired one by one, in order (a busy or briefly stalled scheduler catches up
without losing a slot); but when the oldest of them is more than
:data:`MISSED_AFTER_S` old, no scheduler was running then (no worker, or the
database out of reach), and only the latest of them is fired, once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone as dt_timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterError

from .errors import InvalidInputError

#: A due slot older than this means nobody ran the scheduler then: the missed slots fire once, not each.
MISSED_AFTER_S = 60.0
#: Slots looked at in one pass of one schedule (an every-second cron 60 s behind has 60).
MAX_SLOTS_PER_PASS = 1000
DEFAULT_TIMEZONE = "UTC"
#: Longest schedule name: its jobs' keys (``schedule:<name>:<slot>``) must fit the key column.
MAX_SCHEDULE_NAME_LENGTH = 200


def zone_for(name: Any) -> ZoneInfo:
    """The IANA time zone ``name`` (``"Europe/Paris"``); an unknown one is an InvalidInputError naming it."""
    if isinstance(name, ZoneInfo):
        return name
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"timezone must be an IANA time zone name such as 'Europe/Paris', got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidInputError(f"unknown time zone {name!r}: use an IANA name such as 'UTC' or "
                                "'Europe/Paris'") from None


def validate_cron(cron: Any, timezone: Any = DEFAULT_TIMEZONE) -> str:
    """Check a cron expression and its time zone; returns the zone's name.

    Five fields (minute hour day month weekday), or six with seconds as the
    sixth (croniter's order: ``"* * * * * */10"`` is every 10 seconds), or
    ``@hourly``/``@daily``...  An expression that never fires (``0 0 31 2 *``)
    is refused too.
    """
    zone = zone_for(timezone)
    if not isinstance(cron, str) or not cron.strip():
        raise InvalidInputError(f"cron must be a cron expression such as '*/5 * * * *', got {cron!r}")
    try:
        croniter(cron, datetime.now(zone)).get_next(datetime)
    except CroniterError as error:
        raise InvalidInputError(f"invalid cron expression {cron!r}: {error}") from None
    return zone.key


def validate_schedule_name(name: Any) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_SCHEDULE_NAME_LENGTH or not name.isprintable():
        raise InvalidInputError(f"schedule name must be printable text of 1 to {MAX_SCHEDULE_NAME_LENGTH} "
                                f"characters, got {name!r}")


def next_slot(cron: str, timezone: str, after: datetime) -> datetime:
    """The first slot strictly after ``after``, in UTC (the cron read in the schedule's time zone)."""
    zone = zone_for(timezone)
    try:
        slot = croniter(cron, after.astimezone(zone)).get_next(datetime)
    except CroniterError as error:
        raise InvalidInputError(f"invalid cron expression {cron!r}: {error}") from None
    return slot.astimezone(dt_timezone.utc)


@dataclass(frozen=True)
class FirePlan:
    """The slots to fire now (one job each), and the next slot of the schedule.

    ``missed``: the slots had come due more than :data:`MISSED_AFTER_S` ago,
    so only the latest was kept; ``skipped`` is how many were not fired.
    """

    slots: list[datetime]
    next_run_at: datetime
    missed: bool = False
    skipped: int = 0


def plan_firing(cron: str, timezone: str, next_run_at: datetime, now: datetime) -> FirePlan:
    """Which slots of a schedule due at ``next_run_at`` to fire at ``now`` (both UTC, by the database's clock)."""
    step: Callable[[datetime], datetime] = lambda slot: next_slot(cron, timezone, slot)  # noqa: E731
    due: list[datetime] = []
    slot = next_run_at
    while slot <= now and len(due) < MAX_SLOTS_PER_PASS:
        due.append(slot)
        slot = step(slot)
    if not due:
        return FirePlan([], next_run_at)
    if (now - due[0]).total_seconds() <= MISSED_AFTER_S:
        return FirePlan(due, slot)
    latest = due[-1]
    if slot <= now:  # more slots than one pass looks at: the latest is the one just before now
        latest = _latest_at_or_before(cron, timezone, now)
    return FirePlan([latest], step(now), missed=True, skipped=len(due) - (slot > now))


def _latest_at_or_before(cron: str, timezone: str, now: datetime) -> datetime:
    zone = zone_for(timezone)
    previous = croniter(cron, now.astimezone(zone)).get_prev(datetime).astimezone(dt_timezone.utc)
    following = next_slot(cron, timezone, previous)
    return following if following <= now else previous


def schedule_key(name: str, slot: datetime) -> str:
    """The idempotency key of a schedule's job for one slot: the same slot is never two jobs."""
    return f"schedule:{name}:{slot.astimezone(dt_timezone.utc).isoformat()}"


def slot_of(key: str) -> datetime | None:
    """The slot a scheduled job's key names (None for a key that is not a schedule's)."""
    if not isinstance(key, str) or not key.startswith("schedule:"):
        return None
    try:  # slots are whole seconds in UTC: the key ends with 'YYYY-MM-DDTHH:MM:SS+00:00'
        return datetime.fromisoformat(key[-25:])
    except ValueError:
        return None


def seconds_until(when: datetime | None, now: datetime) -> float | None:
    """Seconds from ``now`` to ``when`` (negative once due), or None for no schedule at all."""
    return None if when is None else (when - now).total_seconds()
