"""The daemon: runs syncs on the configured schedule until a signal stops it.

APScheduler 3's BlockingScheduler runs one job, the sync, in one worker
thread: at most one run at a time, missed runs coalesced into one, and a
misfire grace as long as `schedule.misfire_grace`. Every fire time that does
not become a run (skipped while the previous run goes on, missed past the
grace, or merged by coalescing after the daemon was suspended) is logged as
a WARNING here, in the product's words.

Each run gets `schedule.deadline` and the daemon's stop event: a run past
its deadline ends after the pages being written and is recorded as failed,
so no run can hold the schedule up for long.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, tzinfo
from types import FrameType
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.events import (
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    EVENT_JOB_SUBMITTED,
    EVENT_SCHEDULER_STARTED,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine

from etl import store
from etl.config import Config, ScheduleConfig
from etl.errors import EtlError, RunNotBegun, bare_traceback
from etl.sync import run_sync
from etl.threads import (
    STOP_SIGNALS,
    leave_signals_to_the_main_thread,
    start_leaving_signals,
)

log = logging.getLogger(__name__)

JOB_ID = "sync"
EXIT_FAILED = 1
# Beyond the busy timeout, what a stopping run may take to record itself.
STOP_MARGIN_SECONDS = 30.0
# Fire times remembered for the jitter and the coalescing report.
REMEMBERED_FIRES = 64
# Wall-clock repeats skipped in a row: a repeated hour holds at most 60 cron times.
MAX_REPEATS = 100
# A scheduler that wakes later than this after a fire time was held up
# (suspended, or the machine starved): the interval then restarts.
LATE_SECONDS = 1.0

_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_WEEKDAY_ITEM = re.compile(
    r"(\*|[a-z]{3}|[0-7])(?:-([a-z]{3}|[0-7]))?(?:/([1-9][0-9]*))?"
)


def cron_fields(expression: str) -> dict[str, str]:
    """A crontab expression's five fields, as APScheduler's CronTrigger takes them.

    APScheduler 3 numbers weekdays from 0 = Monday where crontab has 0 (and
    7) = Sunday, so numbers become names, which both read alike. Crontab runs
    when a restricted day of month OR a restricted day of week matches,
    APScheduler only when both do: such an expression is refused rather than
    run on other days than its author meant.
    """
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"expected 5 fields (minute hour day month weekday), got {len(fields)}"
        )
    minute, hour, day, month, weekday = fields
    if day != "*" and weekday != "*":
        raise ValueError(
            "restrict the day of month or the day of week, not both (crontab "
            "would run on either, this scheduler only on both)"
        )
    return {
        "minute": minute,
        "hour": hour,
        "day": day,
        "month": month,
        "day_of_week": _weekdays(weekday),
    }


def _weekdays(field: str) -> str:
    if field == "*":
        return "*"
    days: set[int] = set()
    for item in field.lower().split(","):
        match = _WEEKDAY_ITEM.fullmatch(item)
        if match is None:
            raise ValueError(f"cannot read the day of week {item!r}")
        first, last, step = match.groups()
        if first == "*":
            if last is not None:
                raise ValueError(f"cannot read the day of week {item!r}")
            low, high = 0, 6
        else:
            low = _weekday_number(first)
            high = _weekday_number(last) if last else (6 if step else low)
            # "fri-sun": Sunday closes a range as 7, as crontab allows.
            high = 7 if high == 0 and low > 0 else high
        if high < low:
            raise ValueError(f"the day of week range {item!r} runs backwards")
        days.update(day % 7 for day in range(low, high + 1, int(step or 1)))
    return ",".join(_WEEKDAYS[day] for day in sorted(days))


def _weekday_number(text: str) -> int:
    if text.isdigit():
        return int(text)
    if text not in _WEEKDAYS:
        raise ValueError(f"unknown day of week {text!r}")
    return _WEEKDAYS.index(text)


def check_cron(expression: str) -> None:
    """Raise ValueError, saying why, unless the expression can be scheduled."""
    for name, value in cron_fields(expression).items():
        try:
            CronTrigger(**{name: value}, timezone=UTC)
        except ValueError as exc:
            raise ValueError(f"{name.replace('_', ' ')} {value!r}: {exc}") from None


class ScheduleTrigger(BaseTrigger):  # type: ignore[misc]
    """The configured schedule as APScheduler asks for it, fire after fire.

    It wraps APScheduler's own trigger for three reasons. A cron time of a
    given hour that the clock shows twice when summer time ends (02:30 in
    Europe/Berlin) fires once, not twice, as crontab does; a time the clock
    skips when summer time begins fires once, an hour on (03:30). Times of
    every hour ("*/5 * * * *") keep firing in real time through the repeated
    hour, as crontab's do. An interval restarts from a late catch-up run, so
    that the next run does not follow it at once. Jitter is added to each
    un-jittered fire time, so it never accumulates from run to run. And every
    fire time handed out is remembered, so that the daemon can name the ones
    coalescing merged.
    """

    def __init__(
        self,
        inner: BaseTrigger,
        zone: tzinfo,
        jitter: float,
        rng: random.Random,
        *,
        skip_repeats: bool,
        restart_late: float | None = None,
    ) -> None:
        self._inner = inner
        self._zone = zone
        self._skip_repeats = skip_repeats
        self._restart_late = restart_late
        self._jitter = jitter
        self._rng = rng
        self._guard = threading.Lock()
        # Un-jittered fire time -> the fire time handed out, and back.
        self._jittered: dict[datetime, datetime] = {}
        self._nominal: dict[datetime, datetime] = {}
        self._pending: set[datetime] = set()

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        with self._guard:
            previous = previous_fire_time
            if previous is not None:
                previous = self._nominal.get(previous, previous)
            fire = self._next(previous, now)
            for _ in range(MAX_REPEATS):
                if fire is None or previous is None:
                    break
                if not self._repeats(previous, fire):
                    break
                fire = self._next(fire, fire)
            if self._late(previous_fire_time, fire, now):
                fire = self._next(now, now)
            return None if fire is None else self._hand_out(fire)

    def _late(
        self, previous: datetime | None, fire: datetime | None, now: datetime
    ) -> bool:
        """Whether the run at `previous` starts late and the interval restarts.

        Only once every missed fire time has been handed out (`fire` is in the
        future), so that the daemon still reports the ones it merged.
        """
        if self._restart_late is None or previous is None or fire is None:
            return False
        late = (now - previous).total_seconds()
        return fire > now and late > self._restart_late

    def _next(self, previous: datetime | None, now: datetime) -> datetime | None:
        # APScheduler reads the fold of a local time to tell 02:30 CEST from
        # 02:30 CET; astimezone() sets it right.
        local = None if previous is None else previous.astimezone(self._zone)
        fire: datetime | None = self._inner.get_next_fire_time(
            local, now.astimezone(self._zone)
        )
        if fire is not None and previous is not None and fire <= previous:
            # Never hand out a time that does not move on: the scheduler
            # would loop on it. Search again from a second later.
            later = (previous + timedelta(seconds=1)).astimezone(self._zone)
            fire = self._inner.get_next_fire_time(None, later)
        # Handed out in UTC: arithmetic on a local time forgets which of two
        # equal wall-clock times it was, and a time the clock skipped (02:30
        # that never was in Berlin) reads as the instant it really is.
        return None if fire is None else fire.astimezone(UTC)

    def _repeats(self, previous: datetime, fire: datetime) -> bool:
        """Whether `fire` shows a wall-clock time `previous` already showed."""
        if not self._skip_repeats:
            return False
        return _wall(fire, self._zone) <= _wall(previous, self._zone)

    def _hand_out(self, fire: datetime) -> datetime:
        jittered = self._jittered.get(fire)
        if jittered is None:
            extra = self._rng.uniform(0, self._jitter) if self._jitter else 0.0
            jittered = fire + timedelta(seconds=extra)
            self._jittered[fire], self._nominal[jittered] = jittered, fire
            self._pending.add(jittered)
            self._forget_old()
        return jittered

    def _forget_old(self) -> None:
        while len(self._jittered) > REMEMBERED_FIRES:
            oldest = next(iter(self._jittered))
            self._nominal.pop(self._jittered.pop(oldest), None)

    def take_passed(self, fire: datetime) -> list[datetime]:
        """Fire times handed out before `fire` and not yet accounted for.

        Each fire time is accounted for once: by the run it became, or here,
        as one that coalescing merged into a later run.
        """
        with self._guard:
            passed = sorted(time for time in self._pending if time < fire)
            self._pending -= {*passed, fire}
            return passed

    def __str__(self) -> str:
        return str(self._inner)


def make_trigger(
    schedule: ScheduleConfig,
    *,
    rng: random.Random | None = None,
    start: datetime | None = None,
) -> ScheduleTrigger:
    """The trigger of the configured interval or cron expression.

    An interval counts from `start`, by default one interval from now.
    """
    rng = rng or random.Random()
    if schedule.cron is None:
        seconds = schedule.interval
        assert seconds is not None, "the configuration gives an interval or a cron"
        # An interval counts real seconds: no time zone may bend it.
        interval = IntervalTrigger(seconds=seconds, timezone=UTC, start_date=start)
        late = min(LATE_SECONDS, seconds / 10)
        return ScheduleTrigger(
            interval, UTC, schedule.jitter, rng, skip_repeats=False, restart_late=late
        )
    zone = ZoneInfo(schedule.timezone)
    fields = cron_fields(schedule.cron)
    cron = CronTrigger(**fields, timezone=zone)
    hourly = fields["hour"].startswith("*")
    return ScheduleTrigger(cron, zone, schedule.jitter, rng, skip_repeats=not hourly)


def run_daemon(
    config: Config,
    *,
    stop: threading.Event | None = None,
    engine: Engine | None = None,
) -> int:
    """Sync on the schedule until `stop` is set, or else until a stop signal.

    Returns the exit code: 0 once the run in progress stopped cleanly.
    """
    engine = engine or store.connect(config.database)
    store.check_schema(engine)
    if stop is not None:
        return Daemon(config, engine, stop).serve()
    stop = threading.Event()
    with stop_on_signals(stop):
        return Daemon(config, engine, stop).serve()


class Daemon:
    """One scheduler, one job: the sync."""

    def __init__(self, config: Config, engine: Engine, stop: threading.Event) -> None:
        self.config = config
        self.engine = engine
        self.stop = stop
        self.schedule = config.schedule
        self.trigger = make_trigger(config.schedule)
        self._idle = threading.Event()
        self._idle.set()
        self._scheduler = BlockingScheduler(
            timezone=ZoneInfo(self.schedule.timezone),
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": max(1, round(self.schedule.misfire_grace)),
            },
        )

    def serve(self) -> int:
        first: dict[str, Any] = {}
        if self.schedule.run_at_start:
            first["next_run_time"] = datetime.now(UTC)
        self._scheduler.add_job(
            self._run_once, self.trigger, id=JOB_ID, name="sync", **first
        )
        self._scheduler.add_listener(
            self._on_event,
            EVENT_JOB_SUBMITTED
            | EVENT_JOB_MAX_INSTANCES
            | EVENT_JOB_MISSED
            | EVENT_SCHEDULER_STARTED,
        )
        start_leaving_signals(
            threading.Thread(target=self._stop_when_asked, name="stop", daemon=True)
        )
        log.info(
            "daemon started (pid %s): %s; each run has %s s at most%s",
            os.getpid(),
            describe(self.schedule),
            f"{self.schedule.deadline:g}",
            ", first run now" if self.schedule.run_at_start else "",
        )
        self._scheduler.start()
        return self._wait_for_run()

    def _run_once(self) -> None:
        # In the scheduler's worker thread, which starts the run's threads.
        leave_signals_to_the_main_thread()
        self._idle.clear()
        try:
            if self.stop.is_set():
                return
            run_sync(
                self.config,
                engine=self.engine,
                stop=self.stop,
                deadline=self.schedule.deadline,
            )
        except EtlError as exc:
            if not self.stop.is_set():
                log.error("the run failed: %s; the daemon goes on", exc)
            elif isinstance(exc, RunNotBegun):
                log.info("%s", exc)  # the daemon is stopping, not going on
            else:
                log.error("%s", exc)
        except Exception as exc:
            log.error("the run crashed; the daemon goes on\n%s", bare_traceback(exc))
        finally:
            store.shrink_wal(self.engine)
            self._idle.set()
        self._log_next_run()

    def _log_next_run(self) -> None:
        job = self._scheduler.get_job(JOB_ID)
        if job is not None and job.next_run_time is not None and not self.stop.is_set():
            log.info("next run at %s", _when(job.next_run_time, self.schedule))

    def _on_event(self, event: Any) -> None:
        if event.code == EVENT_SCHEDULER_STARTED:
            # A stop asked for before the scheduler ran could not shut it down.
            if self.stop.is_set():
                self._shutdown()
            return
        times = getattr(event, "scheduled_run_times", None) or [
            event.scheduled_run_time
        ]
        fire = times[-1]
        merged = self.trigger.take_passed(fire)
        if merged:
            log.warning(
                "%d scheduled run(s) from %s to %s did not start: the daemon was "
                "suspended or busy; one run makes up for them",
                len(merged),
                _when(merged[0], self.schedule),
                _when(merged[-1], self.schedule),
            )
        if event.code == EVENT_JOB_MAX_INSTANCES:
            log.warning(
                "the run scheduled at %s was skipped: the previous run is still "
                "going (it ends by schedule.deadline, %s s)",
                _when(fire, self.schedule),
                f"{self.schedule.deadline:g}",
            )
        elif event.code == EVENT_JOB_MISSED:
            late = (datetime.now(UTC) - fire).total_seconds()
            log.warning(
                "the run scheduled at %s was missed: %.0f s late, more than "
                "schedule.misfire_grace (%s s); waiting for the next one",
                _when(fire, self.schedule),
                late,
                f"{self.schedule.misfire_grace:g}",
            )

    def _stop_when_asked(self) -> None:
        self.stop.wait()
        self._shutdown()

    def _shutdown(self) -> None:
        try:
            self._scheduler.shutdown(wait=False)
        except SchedulerNotRunningError:
            pass

    def _wait_for_run(self) -> int:
        limit = self.config.database.busy_timeout + STOP_MARGIN_SECONDS
        if not self._idle.wait(limit):
            log.error(
                "the run in progress did not stop within %.0f s; exiting without it "
                "(the next run marks it abandoned)",
                limit,
            )
            # Its thread cannot be interrupted and would keep the process
            # alive; every page it wrote is one committed transaction.
            logging.shutdown()
            os._exit(EXIT_FAILED)
        log.info("daemon stopped")
        return 0


def describe(schedule: ScheduleConfig) -> str:
    """The schedule in one phrase, for logs."""
    if schedule.cron is not None:
        what = f"cron {schedule.cron!r} in {schedule.timezone}"
    else:
        what = f"every {schedule.interval:g} s"
    if schedule.jitter:
        what += f", up to {schedule.jitter:g} s later at random"
    return what


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Turn the first SIGTERM, SIGINT or SIGHUP into `stop`; a second exits
    at once. A signal the process was started ignoring (by `nohup`, or as a
    shell's background job) stays ignored.

    Exiting at once cannot corrupt the database: every page is written in one
    transaction, so `os._exit` loses at most the page in flight, which the
    next run fetches again, and that run marks this one abandoned.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if received:
            os.write(2, f"second {name}: exiting at once\n".encode())
            os._exit(128 + signum)
        received.append(signum)
        # The handler runs in the main thread between two bytecodes, maybe
        # inside an Event's own lock: setting one from here could deadlock.
        start_leaving_signals(
            threading.Thread(target=_ask_to_stop, args=(stop, name), name="stop")
        )

    signals = [n for n in STOP_SIGNALS if signal.getsignal(n) != signal.SIG_IGN]
    previous = {number: signal.signal(number, handle) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _ask_to_stop(stop: threading.Event, name: str) -> None:
    log.info(
        "%s received: stopping after the pages being written (a second one exits "
        "at once)",
        name,
    )
    stop.set()


def _wall(moment: datetime, zone: tzinfo) -> datetime:
    return moment.astimezone(zone).replace(tzinfo=None, fold=0)


def _when(moment: datetime, schedule: ScheduleConfig) -> str:
    return moment.astimezone(ZoneInfo(schedule.timezone)).strftime(
        "%Y-%m-%d %H:%M:%S %Z"
    )
