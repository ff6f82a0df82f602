import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.base import BaseTrigger

from etl.config import ScheduleConfig
from etl.schedule import (
    ScheduleTrigger,
    check_cron,
    cron_fields,
    describe,
    make_trigger,
)


def fires(schedule: ScheduleConfig, start: datetime, end: datetime) -> list[datetime]:
    """Fire times as the scheduler asks for them: each from the one before."""
    trigger = make_trigger(schedule, rng=random.Random(7), start=start)
    found: list[datetime] = []
    previous, now = None, start
    for _ in range(20_000):
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None or fire >= end:
            return found
        found.append(fire)
        previous, now = fire, fire
    raise AssertionError("the trigger did not reach the end of the span")


def year_of(zone: str) -> tuple[datetime, datetime]:
    tz = ZoneInfo(zone)
    return datetime(2026, 1, 1, tzinfo=tz), datetime(2027, 1, 1, tzinfo=tz)


@pytest.mark.parametrize(
    ("zone", "cron"),
    [
        ("Europe/Berlin", "30 2 * * *"),
        ("America/New_York", "30 2 * * *"),
        ("America/New_York", "30 1 * * *"),
        ("Europe/Berlin", "0 3 * * *"),
    ],
    ids=[
        "berlin-skipped-and-repeated-hour",
        "new-york-skipped-hour",
        "new-york-repeated-hour",
        "berlin-hour-after-the-change",
    ],
)
def test_daily_cron_runs_exactly_once_every_day_across_clock_changes(
    zone: str, cron: str
) -> None:
    start, end = year_of(zone)

    found = fires(ScheduleConfig(interval=None, cron=cron, timezone=zone), start, end)

    per_day = Counter(fire.astimezone(ZoneInfo(zone)).date() for fire in found)
    assert len(per_day) == 365
    assert set(per_day.values()) == {1}


def test_a_skipped_cron_time_runs_an_hour_on_that_day() -> None:
    start = datetime(2026, 3, 28, tzinfo=ZoneInfo("Europe/Berlin"))
    schedule = ScheduleConfig(
        interval=None, cron="30 2 * * *", timezone="Europe/Berlin"
    )

    found = fires(schedule, start, start + timedelta(days=3))

    local = [fire.astimezone(ZoneInfo("Europe/Berlin")) for fire in found]
    assert [moment.strftime("%d %H:%M %Z") for moment in local] == [
        "28 02:30 CET",
        "29 03:30 CEST",
        "30 02:30 CEST",
    ]


def test_an_hourly_cron_follows_real_time_through_the_repeated_hour() -> None:
    start, end = year_of("Europe/Berlin")
    schedule = ScheduleConfig(interval=None, cron="0 * * * *", timezone="Europe/Berlin")

    found = fires(schedule, start, end)

    assert len(found) == 365 * 24
    assert all(b - a == timedelta(hours=1) for a, b in pairwise(found))


@pytest.mark.parametrize(
    ("weekday", "expected"),
    [
        ("*", "*"),
        ("1-5", "mon,tue,wed,thu,fri"),
        ("0", "sun"),
        ("7", "sun"),
        ("5-7", "sun,fri,sat"),
        ("fri-sun", "sun,fri,sat"),
        ("mon,wed", "mon,wed"),
        ("*/2", "sun,tue,thu,sat"),
        ("1-5/2", "mon,wed,fri"),
        ("SAT", "sat"),
    ],
    ids=[
        "any",
        "weekdays",
        "sunday-0",
        "sunday-7",
        "range-to-7",
        "names-to-sunday",
        "list",
        "step",
        "range-step",
        "upper-case",
    ],
)
def test_crontab_weekday_numbers_count_from_sunday(weekday: str, expected: str) -> None:
    assert cron_fields(f"0 9 * * {weekday}")["day_of_week"] == expected


def test_a_weekday_cron_fires_monday_to_friday_only() -> None:
    start = datetime(2026, 6, 1, tzinfo=UTC)
    schedule = ScheduleConfig(interval=None, cron="0 9 * * 1-5")

    found = fires(schedule, start, start + timedelta(days=14))

    assert [fire.weekday() for fire in found] == [0, 1, 2, 3, 4] * 2


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("30 2 * *", "expected 5 fields"),
        ("0 0 1 * 1", "not both"),
        ("0 0 * * 8", "cannot read the day of week"),
        ("0 0 * * 5-1", "runs backwards"),
        ("0 0 * * caturday", "cannot read the day of week"),
        ("0 25 * * *", "hour"),
        ("61 * * * *", "minute"),
    ],
    ids=[
        "four-fields",
        "day-and-weekday",
        "weekday-8",
        "backwards",
        "unknown-name",
        "hour-25",
        "minute-61",
    ],
)
def test_bad_cron_expressions_are_refused_with_the_reason(
    cron: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_cron(cron)


def test_interval_fires_count_real_seconds_from_the_start() -> None:
    start = datetime(2026, 10, 24, 23, 0, tzinfo=UTC)
    schedule = ScheduleConfig(interval=1800.0, timezone="Europe/Berlin")

    found = fires(schedule, start, start + timedelta(hours=4))

    assert all(b - a == timedelta(minutes=30) for a, b in pairwise(found))
    assert len(found) == 8


def test_jitter_delays_each_run_without_accumulating() -> None:
    start = datetime(2026, 6, 1, tzinfo=UTC)
    schedule = ScheduleConfig(interval=60.0, jitter=10.0)

    found = fires(schedule, start, start + timedelta(hours=2))

    first = found[0]
    nominal = [first - timedelta(seconds=(first - start).total_seconds() % 60)]
    for _ in found[1:]:
        nominal.append(nominal[-1] + timedelta(seconds=60))
    delays = [
        (fire - base).total_seconds() for fire, base in zip(found, nominal, strict=True)
    ]
    assert all(0 <= delay <= 10 for delay in delays)
    assert len({round(delay, 3) for delay in delays}) > 1


def test_the_same_fire_time_asked_twice_gets_the_same_jitter() -> None:
    now = datetime(2026, 6, 1, tzinfo=UTC)
    trigger = make_trigger(ScheduleConfig(interval=60.0, jitter=30.0), start=now)
    first = trigger.get_next_fire_time(None, now)

    again = [trigger.get_next_fire_time(first, now) for _ in range(3)]

    assert len(set(again)) == 1


def test_fire_times_merged_by_coalescing_are_reported_once() -> None:
    now = datetime(2026, 6, 1, tzinfo=UTC)
    trigger = make_trigger(ScheduleConfig(interval=60.0), start=now)
    # A suspended daemon wakes up: the scheduler walks the missed fire times
    # and runs only the last, as coalescing does.
    handed_out = [trigger.get_next_fire_time(None, now)]
    for _ in range(4):
        handed_out.append(trigger.get_next_fire_time(handed_out[-1], now))

    merged = trigger.take_passed(handed_out[-1])

    assert merged == handed_out[:-1]
    assert trigger.take_passed(handed_out[-1]) == []


def test_an_interval_restarts_from_a_late_catch_up_run() -> None:
    start = datetime(2026, 6, 1, tzinfo=UTC)
    trigger = make_trigger(ScheduleConfig(interval=60.0), start=start)
    first = trigger.get_next_fire_time(None, start)
    # The daemon wakes 150 s after the first fire time, as the scheduler
    # does after a suspension: it walks the missed times, then asks again.
    woke = first + timedelta(seconds=150)
    missed = [first]
    while (fire := trigger.get_next_fire_time(missed[-1], woke)) <= woke:
        missed.append(fire)

    assert missed == [first + timedelta(seconds=s) for s in (0, 60, 120)]
    assert fire == woke + timedelta(seconds=60)
    assert trigger.get_next_fire_time(missed[-1], woke) == fire
    assert trigger.take_passed(missed[-1]) == missed[:-1]


def test_an_interval_fire_on_time_keeps_its_rhythm() -> None:
    start = datetime(2026, 6, 1, tzinfo=UTC)
    trigger = make_trigger(ScheduleConfig(interval=60.0), start=start)
    first = trigger.get_next_fire_time(None, start)

    woke = first + timedelta(seconds=0.5)

    assert trigger.get_next_fire_time(first, woke) == first + timedelta(seconds=60)


@pytest.mark.parametrize(
    ("schedule", "text"),
    [
        (ScheduleConfig(), "every 300 s"),
        (
            ScheduleConfig(interval=None, cron="30 2 * * *", timezone="Europe/Berlin"),
            "cron '30 2 * * *' in Europe/Berlin",
        ),
        (ScheduleConfig(interval=60.0, jitter=5.0), "every 60 s, up to 5 s later"),
    ],
    ids=["interval", "cron", "jitter"],
)
def test_the_schedule_is_described_in_one_phrase(
    schedule: ScheduleConfig, text: str
) -> None:
    assert describe(schedule).startswith(text)


class StuckTrigger(BaseTrigger):  # type: ignore[misc]
    """Answers the time it was given, as APScheduler 3 can around a fold."""

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime:
        if previous_fire_time is not None:
            return previous_fire_time
        return now.replace(second=0, microsecond=0) + timedelta(minutes=1)


def test_a_trigger_that_does_not_move_on_cannot_loop_the_scheduler() -> None:
    trigger = ScheduleTrigger(
        StuckTrigger(), UTC, 0.0, random.Random(1), skip_repeats=False
    )
    now = datetime(2026, 6, 1, 12, 0, 30, tzinfo=UTC)
    first = trigger.get_next_fire_time(None, now)
    assert first is not None

    second = trigger.get_next_fire_time(first, first)

    assert second is not None
    assert second > first
