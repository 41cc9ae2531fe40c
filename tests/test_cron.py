"""Cron slots, computed without a database: which slots fire, the catch-up rule, time zones, bad input."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from kronix_data import InvalidInputError
from kronix_data.cron import (MAX_SLOTS_PER_PASS, MISSED_AFTER_S, next_slot, plan_firing, schedule_key, slot_of,
                              validate_cron)

UTC = timezone.utc
T0 = datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC)


def test_every_slot_that_came_due_within_the_grace_fires_in_order():
    plan = plan_firing("* * * * * *", "UTC", T0, T0 + timedelta(seconds=3.5))
    assert plan.slots == [T0 + timedelta(seconds=n) for n in range(4)]
    assert plan.next_run_at == T0 + timedelta(seconds=4) and not plan.missed


def test_nothing_fires_before_the_next_slot():
    plan = plan_firing("*/5 * * * *", "UTC", T0, T0 - timedelta(microseconds=1))
    assert plan.slots == [] and plan.next_run_at == T0


def test_slots_missed_while_no_scheduler_ran_fire_once_the_latest():
    due = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)  # ten nightly slots ago
    now = datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC)
    plan = plan_firing("0 3 * * *", "UTC", due, now)
    assert plan.slots == [datetime(2026, 12, 1, 3, 0, tzinfo=UTC)]
    assert plan.next_run_at == datetime(2026, 12, 2, 3, 0, tzinfo=UTC)
    assert plan.missed and plan.skipped == 10


def test_a_day_of_missed_seconds_is_still_one_job():
    now = T0 + timedelta(microseconds=250_000)
    plan = plan_firing("* * * * * *", "UTC", T0 - timedelta(days=1), now)
    assert plan.slots == [T0] and plan.next_run_at == T0 + timedelta(seconds=1)
    assert plan.missed and plan.skipped >= MAX_SLOTS_PER_PASS


def test_the_grace_is_the_boundary_between_late_and_missed():
    late = plan_firing("* * * * *", "UTC", T0, T0 + timedelta(seconds=MISSED_AFTER_S))
    assert late.slots[0] == T0 and not late.missed
    missed = plan_firing("* * * * *", "UTC", T0, T0 + timedelta(seconds=MISSED_AFTER_S + 1))
    assert missed.missed and len(missed.slots) == 1


def test_the_cron_is_read_in_the_schedules_time_zone():
    winter = next_slot("0 9 * * *", "Europe/Paris", datetime(2026, 12, 1, 12, tzinfo=UTC))
    summer = next_slot("0 9 * * *", "Europe/Paris", datetime(2026, 7, 1, 12, tzinfo=UTC))
    assert winter == datetime(2026, 12, 2, 8, tzinfo=UTC)  # 09:00 CET
    assert summer == datetime(2026, 7, 2, 7, tzinfo=UTC)  # 09:00 CEST
    # 02:30 does not exist on the night clocks go forward: croniter runs it at 03:00 local.
    spring = next_slot("30 2 * * *", "Europe/Paris", datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert spring == datetime(2026, 3, 29, 1, tzinfo=UTC)


def test_a_slots_key_names_the_schedule_and_the_slot():
    key = schedule_key("etl:nightly", T0)
    assert key == "schedule:etl:nightly:2026-12-01T12:00:05+00:00"
    assert slot_of(key) == T0 and slot_of("not-a-schedule") is None


@pytest.mark.parametrize("cron, words", [("61 * * * *", "'61 * * * *'"), ("every day", "'every day'"),
                                         ("* * *", "'* * *'"), ("", "cron must be"), (None, "cron must be"),
                                         ("0 0 31 2 *", "'0 0 31 2 *'")])
def test_an_invalid_cron_expression_is_refused_naming_it(cron, words):
    with pytest.raises(InvalidInputError, match="cron") as raised:
        validate_cron(cron)
    assert words in str(raised.value)


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "", "../etc/passwd", 5])
def test_an_unknown_time_zone_is_refused_naming_it(zone):
    with pytest.raises(InvalidInputError, match="time zone|timezone") as raised:
        validate_cron("* * * * *", zone)
    assert repr(zone) in str(raised.value)
