"""The truth test: syncs under random faults, checked against the ground truth.

Many syncs run while the simulator injects faults and its clock moves between
them (statuses change, tasks are created, removed and restored); two last
syncs run without faults and with the clock still, the second to confirm the
removals the first found (a task is marked removed only when two complete
walks in a row miss it); then the database is held against the simulator's
record of what really happened.

Time: `observed_at` and `old_seen_at` are wall-clock UTC, the simulator has
its own clock. The simulated clock only moves between syncs, so each sync saw
exactly one simulated moment. The test records the wall interval of each sync
and maps every timestamp in the database to the sync whose interval holds it,
hence to the simulated moment that sync saw. A timestamp outside every sync
is itself a failure.

The seed comes from TASK_ETL_TRUTH_SEED, else it is drawn; a failure says the
seed so that it replays (world, fault draws and the test's own choices all
derive from it). `--long` runs many more syncs; TASK_ETL_TRUTH_SYNCS sets the
count in either mode.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, select

from etl.accounts import Account
from etl.client import Client, RateLimiter
from etl.config import ApiConfig, Config, DatabaseConfig, MainAccount
from etl.faults import Faults, Served
from etl.models import sync_runs, task_status_changes, tasks
from etl.simulator import SimTask, Simulator
from etl.sync import run_sync

SEED_ENV = "TASK_ETL_TRUTH_SEED"
SYNCS_ENV = "TASK_ETL_TRUTH_SYNCS"
SHORT_SYNCS = 14
LONG_SYNCS = 400
REMOVED = "removed"

pytestmark = pytest.mark.timeout(3600)


@dataclass(frozen=True)
class Observation:
    """One sync: the wall interval it ran in and the simulated moment it saw."""

    run_id: int
    began: datetime
    ended: datetime
    moment: datetime
    served: tuple[Served, ...]

    def failed_walks(self) -> set[tuple[str, str, str]]:
        """Lists whose last request got no usable page: the client gave up."""
        last: dict[tuple[str, str, str], Served] = {}
        for served in self.served:
            last[(served.endpoint, served.user_id, served.sub_user_id)] = served
        return {key for key, served in last.items() if not served.is_ok}


@dataclass
class Timeline:
    """Maps a wall-clock timestamp to the sync that wrote it."""

    observations: list[Observation] = field(default_factory=list)

    def index(self, moment: datetime | None, what: str) -> int:
        assert moment is not None, f"{what}: no timestamp"
        for number, seen in enumerate(self.observations):
            if seen.began <= moment <= seen.ended:
                return number
        raise AssertionError(f"{what}: {moment} lies outside every sync")


@pytest.fixture
def seed() -> int:
    given = os.environ.get(SEED_ENV)
    return int(given) if given else random.SystemRandom().randrange(10**6)


def test_database_matches_the_truth_after_syncs_under_faults(
    engine: Engine, seed: int, long_run: bool
) -> None:
    default = LONG_SYNCS if long_run else SHORT_SYNCS
    syncs = int(os.environ.get(SYNCS_ENV) or default)
    started = time.monotonic()
    try:
        simulator, timeline = run_syncs_under_faults(engine, seed, syncs, long_run)
        check_runs(engine, timeline)
        check_final_state(engine, simulator)
        check_history(engine, simulator, timeline)
        check_nothing_lost(engine, simulator, timeline)
    except BaseException as exc:
        mode = " and --long" if long_run else ""
        exc.add_note(f"replay with {SEED_ENV}={seed} {SYNCS_ENV}={syncs}{mode}")
        raise
    injected = sum(simulator.fault_counts().values())
    print(
        f"\ntruth seed {seed}: {syncs + 2} syncs, {injected} faults injected "
        f"{dict(sorted(simulator.fault_counts().items()))}, "
        f"{len(simulator.tasks())} tasks, {time.monotonic() - started:.1f} s: "
        "no discrepancy"
    )


# -- running -----------------------------------------------------------------


def run_syncs_under_faults(
    engine: Engine, seed: int, syncs: int, long_run: bool = False
) -> tuple[Simulator, Timeline]:
    rng = random.Random(seed)
    # A short run keeps the world small, so that CI spends seconds on it.
    tasks = rng.randrange(5, 30) if long_run else rng.randrange(3, 10)
    simulator = Simulator(
        seed=seed,
        main_accounts=2,
        sub_accounts=2,
        tasks_per_account=tasks,
        odd_statuses=True,
        status_change_rate=0.5,
        creation_rate=0.05,
        removal_rate=0.05,
        record_requests=True,
        # Sometimes the server caps per_page below what the client asks.
        max_per_page=rng.choice((None, None, 4)),
    )
    faults = draw_faults(rng, seed, simulator.main_user_ids()[0])
    timeline = Timeline()
    with simulator.serve() as server:
        config = make_config(server.url, simulator, page_size=rng.randrange(3, 9))
        for number in range(syncs + 2):
            is_last = number >= syncs
            # Some syncs run clean in the middle too: recovery is a path.
            clean = is_last or rng.random() < 0.15
            simulator.set_faults(Faults() if clean else faults)
            timeline.observations.append(observe_sync(engine, config, simulator))
            if not is_last:
                move_world(simulator, rng)
    return simulator, timeline


def draw_faults(rng: random.Random, seed: int, refused: str) -> Faults:
    return Faults(
        throttle=rng.uniform(0.0, 0.06),
        server_error=rng.uniform(0.0, 0.08),
        reset=rng.uniform(0.0, 0.05),
        truncated=rng.uniform(0.0, 0.05),
        bad_code=rng.uniform(0.0, 0.03),
        unauthorized=rng.uniform(0.0, 0.02),
        stall=rng.uniform(0.0, 0.02),
        seed=seed,
        retry_after=rng.choice((0, 1, 2)),
        stall_seconds=1.2,
        refused_user_id=refused,
    )


def make_config(url: str, simulator: Simulator, page_size: int) -> Config:
    mains = tuple(
        MainAccount(user_id=user_id, discover_sub_accounts=True)
        for user_id in simulator.main_user_ids()
    )
    api = ApiConfig(
        base_url=url,
        token=simulator.token,
        page_size=page_size,
        connect_timeout=2.0,
        # Well above a loaded machine's hiccups, so that only the simulator's
        # stalls time out: a timeout it did not inject would read as a lie.
        read_timeout=0.5,
        max_retries=2,
        backoff_initial=0.01,
        backoff_max=0.05,
        requests_per_second=10_000.0,
        parallelism=3,
    )
    return Config(database=DatabaseConfig(url="unused://"), api=api, accounts=mains)


def observe_sync(engine: Engine, config: Config, simulator: Simulator) -> Observation:
    client = short_sleeping_client(config)
    began = datetime.now(UTC)
    try:
        summary = run_sync(config, engine=engine, client=client)
    finally:
        client.close()
    ended = datetime.now(UTC)
    served = tuple(simulator.take_served())
    return Observation(summary.run_id, began, ended, simulator.now, served)


def short_sleeping_client(config: Config) -> Client:
    """The client of a run, with waits cut short: Retry-After says seconds."""

    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, 0.002))

    return Client(config.api, sleep=sleep, limiter=RateLimiter(10_000))


def move_world(simulator: Simulator, rng: random.Random) -> None:
    simulator.advance(rng.uniform(0, 2 * 3600))
    removed = [t for t in simulator.tasks() if t.removed_at is not None]
    if removed and rng.random() < 0.3:
        simulator.restore_task(rng.choice(removed).uuid)


# -- checking ----------------------------------------------------------------


def check_runs(engine: Engine, timeline: Timeline) -> None:
    with engine.connect() as connection:
        rows = {row.id: row for row in connection.execute(select(sync_runs))}
        changes = connection.execute(select(task_status_changes)).all()
    assert len(rows) == len(timeline.observations)
    assert not [row.id for row in rows.values() if row.outcome == "running"]

    events = Counter((row.run_id, row.event) for row in changes)
    for number, seen in enumerate(timeline.observations):
        run = rows[seen.run_id]
        what = f"sync {number} (run {run.id})"
        assert run.finished_at is not None, what
        failed = seen.failed_walks()
        if failed:
            assert run.outcome in ("partial", "failed"), f"{what}: {failed}"
        else:
            assert run.outcome == "succeeded", f"{what}: {run.error}"
        walks = {key for key in failed if key[0] == "task"}
        assert run.accounts_failed == len(walks), what
        assert run.tasks_new == events[(run.id, "first_seen")], what
        assert run.tasks_removed == events[(run.id, "removed")], what
        assert run.tasks_restored == events[(run.id, "restored")], what
        recorded = sum(n for (run_id, _), n in events.items() if run_id == run.id)
        assert run.status_changes == recorded, what


def check_final_state(engine: Engine, simulator: Simulator) -> None:
    with engine.connect() as connection:
        rows = connection.execute(select(tasks)).all()
    stored = {row.uuid: row for row in rows}
    truth = {task.uuid: task for task in simulator.tasks()}

    live = {u: r.status for u, r in stored.items() if r.removed_at is None}
    expected = {t.uuid: t.status for t in truth.values() if t.removed_at is None}
    assert live == expected
    removed = {u for u, r in stored.items() if r.removed_at is not None}
    assert removed == {u for u in stored if truth[u].removed_at is not None}
    for uuid, row in stored.items():
        owner = (truth[uuid].user_id, truth[uuid].sub_user_id)
        assert (row.user_id, row.sub_user_id) == owner, uuid


def check_history(engine: Engine, simulator: Simulator, timeline: Timeline) -> None:
    truth = {task.uuid: task for task in simulator.tasks()}
    with engine.connect() as connection:
        current = {row.uuid: row for row in connection.execute(select(tasks))}
    for uuid, chain in read_chains(engine).items():
        check_chain(truth[uuid], chain, timeline)
        last = chain[-1]
        row = current[uuid]
        if last.event == "removed":
            assert row.removed_at is not None, uuid
        else:
            assert (row.removed_at, row.status) == (None, last.new_status), uuid


def read_chains(engine: Engine) -> dict[str, list[Any]]:
    query = select(task_status_changes).order_by(task_status_changes.c.id)
    chains: dict[str, list[Any]] = defaultdict(list)
    with engine.connect() as connection:
        for row in connection.execute(query):
            chains[row.task_uuid].append(row)
    return chains


def check_chain(task: SimTask, chain: list[Any], timeline: Timeline) -> None:
    """One task's history: a chain of real changes, one row per run at most."""
    assert chain[0].event == "first_seen", task.uuid
    runs = [row.run_id for row in chain]
    assert len(runs) == len(set(runs)), f"{task.uuid}: two rows in one run"
    previous = None
    for row in chain:
        what = f"task {task.uuid}, history row {row.id} ({row.event})"
        check_link(row, previous, what)
        check_against_truth(task, row, timeline, what)
        previous = row


# What may follow what, and the shape each event has.
_FOLLOWS = {
    "first_seen": (None,),
    "changed": ("first_seen", "changed", "restored"),
    "removed": ("first_seen", "changed", "restored"),
    "restored": ("removed",),
}


def check_link(row: Any, previous: Any, what: str) -> None:
    before = previous.event if previous is not None else None
    assert before in _FOLLOWS[row.event], f"{what} follows {before}"
    old = previous.new_status if previous is not None else None
    assert row.old_status == old, f"{what}: old {row.old_status}, before {old}"
    if row.event == "removed":
        assert row.new_status is None, what
    if row.event == "changed":
        assert row.old_status != row.new_status, what


def check_against_truth(task: SimTask, row: Any, timeline: Timeline, what: str) -> None:
    """The change happened in the simulator between the two observations."""
    seen = timeline.index(row.observed_at, f"{what}: observed_at")
    status_then = task.status_at(timeline.observations[seen].moment)
    expected_new = None if row.event == "removed" else row.new_status
    assert status_then == expected_new, f"{what}: the task had {status_then}"
    if row.event == "first_seen":
        assert row.old_seen_at is None, what
        return

    before = timeline.index(row.old_seen_at, f"{what}: old_seen_at")
    assert before < seen, f"{what}: old seen in sync {before}, change in {seen}"
    status_before = task.status_at(timeline.observations[before].moment)
    expected_old = None if row.event == "restored" else row.old_status
    assert status_before == expected_old, f"{what}: the task had {status_before}"


def check_nothing_lost(
    engine: Engine, simulator: Simulator, timeline: Timeline
) -> None:
    """After each sync, every account it walked whole reads as the truth did,
    but for tasks gone since that account's walk before, which are only
    flagged until the next whole walk misses them too."""
    chains = read_chains(engine)
    index_of = timeline.index
    states = {
        uuid: [(index_of(r.observed_at, uuid), state_after(r)) for r in chain]
        for uuid, chain in chains.items()
    }
    by_account: dict[tuple[str, str], list[SimTask]] = defaultdict(list)
    for task in simulator.tasks():
        by_account[(task.user_id, task.sub_user_id)].append(task)

    whole_before: dict[tuple[str, str], int] = {}
    for number, seen in enumerate(timeline.observations):
        for key in walked_whole(seen):
            before = whole_before.get(key)
            moments = [o.moment for o in timeline.observations[before:number]]
            for task in by_account[key]:
                truth = task.status_at(seen.moment)
                recorded = state_at(states.get(task.uuid, []), number)
                expected: Any = truth
                if truth is None and recorded is not None:
                    # Removed if the whole walk before missed it too; else
                    # only flagged, keeping a status it had since that walk.
                    missed_before = before is not None and (
                        task.status_at(moments[0]) is None
                        and state_at(states.get(task.uuid, []), before) is not None
                    )
                    expected = (
                        {REMOVED}
                        if missed_before
                        else {task.status_at(moment) for moment in moments} - {None}
                    )
                    assert recorded in expected, (
                        f"sync {number}: task {task.uuid} of {Account(*key).label} "
                        f"recorded {recorded}, expected one of {expected}"
                    )
                    continue
                assert recorded == expected, (
                    f"sync {number}: task {task.uuid} of {Account(*key).label} "
                    f"recorded {recorded}, truth {truth}"
                )
            whole_before[key] = number


def walked_whole(seen: Observation) -> set[tuple[str, str]]:
    failed = seen.failed_walks()
    return {
        (s.user_id, s.sub_user_id)
        for s in seen.served
        if s.endpoint == "task" and ("task", s.user_id, s.sub_user_id) not in failed
    }


def state_after(row: Any) -> Any:
    return REMOVED if row.event == "removed" else row.new_status


def state_at(states: list[tuple[int, Any]], number: int) -> Any:
    """What the history says after sync `number`: None before any row."""
    passed = [state for index, state in states if index <= number]
    return passed[-1] if passed else None
