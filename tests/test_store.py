import functools
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, func, select, text, update
from synced import history
from writers import TasksLock

from etl import runs, store
from etl.accounts import Account
from etl.config import DatabaseConfig
from etl.errors import RunInterrupted, StoreError
from etl.models import groups, sync_rejects, sync_runs, task_status_changes, tasks
from etl.parse import clean, identify_task, parse_task
from etl.store import PageBatch, Reject

ACCOUNT = Account("main-1", "sub-1")
T0 = datetime(2026, 1, 5, 1, 0, tzinfo=UTC)


def item(uuid: str, status: int = 2, **extra: Any) -> dict[str, Any]:
    return {
        "uuid": uuid,
        "name": f"task {uuid}",
        "status": status,
        "status_str": {1: "暂停中", 2: "执行中", 3: "等待执行"}.get(status, "?"),
        "create_datetime": "2026-01-05 09:00:00",
        "group": {"id": 1, "name": "话术组1"},
        **extra,
    }


def batch(items: list[dict[str, Any]], at: datetime = T0, number: int = 1) -> PageBatch:
    zone = ZoneInfo("Asia/Shanghai")
    return PageBatch(
        account=ACCOUNT,
        endpoint="/agent-api/user/{user_id}/task",
        number=number,
        fetched_at=at,
        records=[parse_task(i, ACCOUNT, zone) for i in items],
    )


def write(engine: Engine, items: list[dict[str, Any]], at: datetime = T0) -> Any:
    run_id = runs.start_run(engine, "sync")
    return store.write_page(engine, run_id, batch(items, at), None)


def only_event(engine: Engine, event: str) -> Any:
    """The one history row of this event."""
    query = select(task_status_changes).where(task_status_changes.c.event == event)
    with engine.connect() as connection:
        return connection.execute(query).one()


def task_row(engine: Engine, uuid: str) -> Any:
    with engine.connect() as connection:
        return connection.execute(select(tasks).where(tasks.c.uuid == uuid)).one()


def test_first_sighting_writes_the_task_and_one_history_row(engine: Engine) -> None:
    counts = write(engine, [item("a"), item("b", 1)])

    assert (counts.new, counts.changed, counts.status_changes) == (2, 0, 2)
    assert history(engine, "a") == [("first_seen", None, 2)]
    row = task_row(engine, "a")
    assert row.first_seen_at == T0
    assert row.created_at == datetime(2026, 1, 5, 1, 0, tzinfo=UTC)
    assert row.group_id == "1"


@pytest.mark.parametrize(
    "text",
    ["tab\there", "two\nlines\r\n", "back\\slash \\N", "\\.", "回访 😀", "", "  "],
)
def test_history_rows_keep_any_text_as_it_was(engine: Engine, text: str) -> None:
    # PostgreSQL takes them by COPY, whose text form escapes tabs, newlines
    # and backslashes, and reads \N as NULL and \. as the end of the data.
    write(engine, [item("a", 2, status_str=text)])
    write(engine, [item("a", 1, status_str=f"{text}!")], T0 + timedelta(hours=1))

    with engine.connect() as connection:
        rows = connection.execute(
            select(
                task_status_changes.c.old_status_str,
                task_status_changes.c.new_status_str,
            ).order_by(task_status_changes.c.id)
        ).all()
    stored = text.strip() or None  # ids and names are stripped; empty is none
    assert [tuple(row) for row in rows] == [
        (None, stored),
        (stored, f"{text}!".strip()),
    ]


def test_unchanged_page_writes_nothing(engine: Engine) -> None:
    write(engine, [item("a"), item("b")])

    counts = write(engine, [item("a"), item("b")], T0 + timedelta(hours=1))

    assert (counts.new, counts.changed, counts.status_changes) == (0, 0, 0)
    assert task_row(engine, "a").last_changed_at == T0


def test_status_change_records_old_and_new_and_when_old_was_seen(
    engine: Engine,
) -> None:
    write(engine, [item("a", 2)])
    later = T0 + timedelta(hours=2)

    counts = write(engine, [item("a", 1)], later)

    assert (counts.changed, counts.status_changes) == (1, 1)
    assert history(engine, "a") == [("first_seen", None, 2), ("changed", 2, 1)]
    change = only_event(engine, "changed")
    assert (change.old_seen_at, change.observed_at) == (T0, later)
    assert task_row(engine, "a").status_seen_at == later


def test_content_change_without_status_change_writes_no_history(
    engine: Engine,
) -> None:
    write(engine, [item("a")])

    counts = write(engine, [item("a", name="renamed")], T0 + timedelta(hours=1))

    assert (counts.changed, counts.status_changes) == (1, 0)
    assert task_row(engine, "a").name == "renamed"
    assert task_row(engine, "a").status_seen_at == T0


def test_duplicates_in_a_page_collapse_to_the_last(engine: Engine) -> None:
    counts = write(engine, [item("a", 2), item("a", 3), item("b")])

    assert counts.new == 2
    assert task_row(engine, "a").status == 3
    assert history(engine, "a") == [("first_seen", None, 3)]


def test_removal_and_restore_both_show_in_history(engine: Engine) -> None:
    write(engine, [item("a"), item("b")])
    run_id = runs.start_run(engine, "sync")
    missed_at, gone_at = T0 + timedelta(hours=1), T0 + timedelta(hours=2)

    flagged = store.mark_removals(
        engine, run_id, ACCOUNT, store.SeenIds(["a"]), missed_at, T0
    )
    removed = store.mark_removals(
        engine, run_id, ACCOUNT, store.SeenIds(["a"]), gone_at, missed_at
    )
    counts = write(engine, [item("a"), item("b")], T0 + timedelta(hours=3))

    assert (flagged, removed) == (0, 1)
    assert counts.restored == 1
    assert history(engine, "b") == [
        ("first_seen", None, 2),
        ("removed", 2, None),
        ("restored", None, 2),
    ]
    assert task_row(engine, "b").removed_at is None
    assert task_row(engine, "a").removed_at is None
    removal = only_event(engine, "removed")
    assert (removal.old_seen_at, removal.observed_at) == (T0, gone_at)
    restored = only_event(engine, "restored")
    assert restored.old_seen_at == gone_at


def test_a_restore_is_never_observed_before_the_removal_it_follows(
    engine: Engine,
) -> None:
    # The walk of the account a task moved from settles its removal after
    # another account's page listing it was fetched, and before that page
    # is written.
    write(engine, [item("a"), item("b")])
    run_id = runs.start_run(engine, "sync")
    missed_at, gone_at = T0 + timedelta(hours=1), T0 + timedelta(hours=2)
    for settled_at, previous in ((missed_at, T0), (gone_at, missed_at)):
        store.mark_removals(
            engine, run_id, ACCOUNT, store.SeenIds(["a"]), settled_at, previous
        )
    fetched_before = gone_at - timedelta(minutes=5)

    counts = write(engine, [item("b")], fetched_before)

    assert counts.restored == 1
    restored = only_event(engine, "restored")
    assert (restored.old_seen_at, restored.observed_at) == (gone_at, gone_at)
    row = task_row(engine, "b")
    assert (row.removed_at, row.status_seen_at) == (None, gone_at)


def test_an_older_listing_written_after_a_newer_one_changes_nothing(
    engine: Engine,
) -> None:
    # Two accounts list the task: the page of one, fetched later, is
    # written before the other's, fetched earlier.
    write(engine, [item("a", 2)])
    other = Account("main-1", "sub-2")
    zone = ZoneInfo("Asia/Shanghai")
    newer = parse_task(item("a", 1, name="newer"), other, zone)
    later, between = T0 + timedelta(hours=2), T0 + timedelta(hours=1)
    run_id = runs.start_run(engine, "sync")
    page = PageBatch(other, "/agent-api/user/{user_id}/task", 1, later, [newer])
    store.write_page(engine, run_id, page, None)

    counts = write(engine, [item("a", 2, name="older")], between)

    assert (counts.changed, counts.status_changes) == (0, 0)
    assert history(engine, "a") == [("first_seen", None, 2), ("changed", 2, 1)]
    row = task_row(engine, "a")
    assert (row.status, row.name, row.sub_user_id) == (1, "newer", "sub-2")
    assert row.status_seen_at == later


def flag_b(engine: Engine) -> datetime:
    """Store tasks a and b, then have a complete walk miss b; when b was
    last observed listed, by the walk before, an hour after its status was
    first seen."""
    write(engine, [item("a", 2), item("b", 2)])
    run_id = runs.start_run(engine, "sync")
    listed_at = T0 + timedelta(hours=1)
    missed_at = T0 + timedelta(hours=2)
    seen = store.SeenIds(["a"])
    store.mark_removals(engine, run_id, ACCOUNT, seen, missed_at, listed_at)
    assert task_row(engine, "b").unlisted_after == listed_at
    return listed_at


def test_a_flagged_task_is_not_undone_by_an_older_listing(engine: Engine) -> None:
    listed_at = flag_b(engine)

    counts = write(engine, [item("b", 1)], listed_at - timedelta(minutes=5))

    assert (counts.changed, counts.status_changes) == (0, 0)
    row = task_row(engine, "b")
    assert (row.status, row.unlisted_after) == (2, listed_at)


def test_an_older_listing_of_a_flagged_task_keeps_its_later_sighting(
    engine: Engine,
) -> None:
    listed_at = flag_b(engine)

    write(engine, [item("b")], listed_at - timedelta(minutes=5))

    assert task_row(engine, "b").unlisted_after == listed_at


def test_a_task_one_complete_walk_missed_is_only_flagged(engine: Engine) -> None:
    write(engine, [item("a"), item("b")])
    run_id = runs.start_run(engine, "sync")
    walk_began = T0 + timedelta(minutes=30)

    removed = store.mark_removals(
        engine,
        run_id,
        ACCOUNT,
        store.SeenIds(["a"]),
        T0 + timedelta(hours=1),
        walk_began,
    )

    assert removed == 0
    row = task_row(engine, "b")
    assert (row.removed_at, row.unlisted_after) == (None, walk_began)
    assert task_row(engine, "a").unlisted_after is None
    assert history(engine, "b") == [("first_seen", None, 2)]


def test_a_walk_that_lists_a_flagged_task_clears_the_flag(engine: Engine) -> None:
    write(engine, [item("a"), item("b")])
    run_id = runs.start_run(engine, "sync")
    walks = [T0 + timedelta(hours=hour) for hour in range(1, 4)]

    counts = [
        store.mark_removals(engine, run_id, ACCOUNT, seen, at, T0)
        for seen, at in zip(
            [store.SeenIds(["a"]), store.SeenIds(["a", "b"]), store.SeenIds(["a"])],
            walks,
            strict=True,
        )
    ]

    # Missed, listed, missed: never two complete walks in a row.
    assert counts == [0, 0, 0]
    assert task_row(engine, "b").removed_at is None
    assert task_row(engine, "b").unlisted_after == T0
    assert history(engine, "b") == [("first_seen", None, 2)]


def test_a_removal_dates_its_task_from_its_last_observation(engine: Engine) -> None:
    write(engine, [item("a")])
    listed_at = T0 + timedelta(hours=2)
    # Listed first by a walk that did not complete, after the last one that did.
    write(engine, [item("b")], listed_at)
    run_id = runs.start_run(engine, "sync")
    missed_at, gone_at = T0 + timedelta(hours=3), T0 + timedelta(hours=4)

    store.mark_removals(engine, run_id, ACCOUNT, store.SeenIds(["a"]), missed_at, T0)
    assert task_row(engine, "b").unlisted_after == listed_at
    store.mark_removals(
        engine, run_id, ACCOUNT, store.SeenIds(["a"]), gone_at, missed_at
    )

    removal = only_event(engine, "removed")
    assert (removal.old_seen_at, removal.observed_at) == (listed_at, gone_at)
    row = task_row(engine, "b")
    assert (row.removed_at, row.last_changed_at, row.unlisted_after) == (
        gone_at,
        gone_at,
        None,
    )


def test_a_flagged_task_listed_again_dates_its_change_from_its_flag(
    engine: Engine,
) -> None:
    write(engine, [item("a"), item("b", 2)])
    run_id = runs.start_run(engine, "sync")
    missed_at = T0 + timedelta(hours=1)
    store.mark_removals(engine, run_id, ACCOUNT, store.SeenIds(["a"]), missed_at, T0)
    # Listed again, changed, by a walk that does not complete.
    listed_at = T0 + timedelta(hours=2)

    store.write_page(engine, run_id, batch([item("b", 1)], listed_at), missed_at)

    # The walk that flagged it did not observe it: the change happened
    # after the flag's last observation, not after that walk.
    change = only_event(engine, "changed")
    assert (change.old_seen_at, change.observed_at) == (T0, listed_at)
    assert task_row(engine, "b").unlisted_after == listed_at
    gone_at = T0 + timedelta(hours=3)
    store.mark_removals(
        engine, run_id, ACCOUNT, store.SeenIds(["a"]), gone_at, missed_at
    )
    removal = only_event(engine, "removed")
    assert (removal.old_status, removal.old_seen_at) == (1, listed_at)


def test_a_flagged_task_listed_again_unchanged_was_observed_then(
    engine: Engine,
) -> None:
    write(engine, [item("a"), item("b")])
    run_id = runs.start_run(engine, "sync")
    missed_at = T0 + timedelta(hours=1)
    store.mark_removals(engine, run_id, ACCOUNT, store.SeenIds(["a"]), missed_at, T0)
    listed_at = T0 + timedelta(hours=2)

    counts = write(engine, [item("b")], listed_at)

    assert (counts.changed, counts.status_changes) == (0, 0)
    assert task_row(engine, "b").unlisted_after == listed_at
    gone_at = T0 + timedelta(hours=3)
    store.mark_removals(
        engine, run_id, ACCOUNT, store.SeenIds(["a"]), gone_at, missed_at
    )
    assert only_event(engine, "removed").old_seen_at == listed_at


def test_a_flagged_task_that_moved_to_another_account_loses_its_flag(
    engine: Engine,
) -> None:
    write(engine, [item("a"), item("b")])
    run_id = runs.start_run(engine, "sync")
    store.mark_removals(
        engine, run_id, ACCOUNT, store.SeenIds(["a"]), T0 + timedelta(hours=1), T0
    )
    other = Account("main-1", "sub-2")
    zone = ZoneInfo("Asia/Shanghai")
    moved = parse_task(item("b", name="moved"), other, zone)
    page = PageBatch(other, "/agent-api/user/{user_id}/task", 1, T0, [moved])

    store.write_page(engine, run_id, page, None)

    row = task_row(engine, "b")
    # Its old account's walk missed it; the new one's has not yet.
    assert (row.sub_user_id, row.unlisted_after) == ("sub-2", None)


def test_a_writer_adds_its_pages_to_its_run_at_most_every_second(
    engine: Engine,
) -> None:
    run_id = runs.start_run(engine, "sync")
    pages = [batch([item(f"p{n}-{k}") for k in range(3)], number=n) for n in (1, 2, 3)]

    saved = []
    with (
        mock.patch("etl.store.monotonic", side_effect=[0.0, 0.0, 0.5, 1.2, 1.2]),
        store.PageWriter(engine) as writer,
    ):
        for page in pages:
            writer.write(run_id, page, None)
            with engine.connect() as connection:
                run = connection.execute(
                    select(sync_runs).where(sync_runs.c.id == run_id)
                ).one()
            saved.append((run.pages, run.tasks_seen, run.tasks_new))

    # The first page at once; the second waits; the third brings both.
    assert saved == [(1, 3, 3), (1, 3, 3), (3, 9, 9)]


def test_pages_written_together_store_what_each_would_alone(engine: Engine) -> None:
    write(engine, [item("a"), item("b")])
    run_id = runs.start_run(engine, "sync")
    later = T0 + timedelta(hours=1)
    pages = [
        batch([item("a"), item("b", 1)], later, number=1),
        batch([item("c", group={"id": 2, "name": "新组"})], later, number=2),
        batch([item("d", 3)], later + timedelta(seconds=1), number=3),
    ]

    with store.PageWriter(engine) as writer:
        counts = writer.write_together(run_id, [(page, T0) for page in pages])

    summary = [(c.seen, c.new, c.changed, c.status_changes) for c in counts]
    assert summary == [(2, 0, 1, 1), (1, 1, 0, 1), (1, 1, 0, 1)]
    assert history(engine, "b") == [("first_seen", None, 2), ("changed", 2, 1)]
    assert task_row(engine, "b").status_seen_at == later
    assert task_row(engine, "d").first_seen_at == later + timedelta(seconds=1)
    with engine.connect() as connection:
        names = dict(connection.execute(select(groups.c.id, groups.c.name)).all())
        run = connection.execute(
            select(sync_runs).where(sync_runs.c.id == run_id)
        ).one()
    assert names == {"1": "话术组1", "2": "新组"}
    assert (run.pages, run.tasks_seen, run.tasks_new, run.tasks_changed) == (3, 4, 2, 1)


# Refuses to store task "bad", as a full disk or a constraint would.
REFUSE_BAD = {
    "sqlite": [
        "CREATE TRIGGER refuse_bad BEFORE INSERT ON tasks WHEN NEW.uuid = 'bad' "
        "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'disk full'; END $$",
        "CREATE TRIGGER refuse_bad BEFORE INSERT ON tasks FOR EACH ROW "
        "WHEN (NEW.uuid = 'bad') EXECUTE FUNCTION refuse_bad()",
    ],
}


def test_pages_written_together_are_all_written_or_none(engine: Engine) -> None:
    with engine.begin() as connection:
        for statement in REFUSE_BAD[engine.dialect.name]:
            connection.execute(text(statement))
    run_id = runs.start_run(engine, "sync")
    good = batch([item("a")], number=1)
    refused = batch([item("b"), item("bad")], number=2)

    with store.PageWriter(engine) as writer:
        with pytest.raises(store.StoreError) as failed:
            writer.write_together(run_id, [(good, None), (refused, None)])
        stored_after_failure = stored_uuids(engine)
        writer.write(run_id, good, None)

    assert str(failed.value).startswith("2 pages written together were not written: ")
    assert "disk full" in str(failed.value) and "\n" not in str(failed.value)
    assert stored_after_failure == set()
    # The writer goes on with the next page, on a connection of its own.
    assert stored_uuids(engine) == {"a"}


def test_pages_that_share_a_task_are_refused_together(engine: Engine) -> None:
    run_id = runs.start_run(engine, "sync")
    first = batch([item("a")], number=1)
    again = batch([item("a", 1), item("b")], number=2)

    with store.PageWriter(engine) as writer:
        with pytest.raises(store.StoreError, match="must not share a task"):
            writer.write_together(run_id, [(first, None), (again, None)])

    assert stored_uuids(engine) == set()


def stored_uuids(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.execute(select(tasks.c.uuid)).scalars())


def test_a_removal_read_before_another_writer_moved_the_task_removes_nothing(
    engine: Engine,
) -> None:
    write(engine, [item("a"), item("b")])
    run_id = runs.start_run(engine, "sync")
    store.mark_removals(
        engine, run_id, ACCOUNT, store.SeenIds(["a"]), T0 + timedelta(hours=1), T0
    )
    with engine.connect() as connection:
        read = connection.execute(select(tasks).where(tasks.c.uuid == "b")).one()
    # Another process, walking another account, moves it before the update.
    other = Account("main-1", "sub-2")
    moved = parse_task(item("b", name="moved"), other, ZoneInfo("Asia/Shanghai"))
    store.write_page(engine, run_id, PageBatch(other, "/t", 1, T0, [moved]), None)
    owned = (tasks.c.user_id == "main-1") & (tasks.c.sub_user_id == "sub-1")
    still = owned & tasks.c.removed_at.is_(None) & tasks.c.unlisted_after.is_not(None)

    with engine.begin() as connection:
        gone = store._remove(connection, run_id, [read], still, T0)

    assert gone == []
    assert task_row(engine, "b").removed_at is None
    assert history(engine, "b") == [("first_seen", None, 2)]


def test_two_writers_of_a_task_at_once_record_its_first_sighting_once(
    engine: Engine, db_url: str
) -> None:
    # Two runs writing pages that list the same tasks (two accounts that
    # share them) both read them as not stored, and on PostgreSQL both wrote
    # their first sighting. The lock held meanwhile makes both read first.
    uuids = [f"t{n}" for n in range(10)]
    zone = ZoneInfo("Asia/Shanghai")
    run_id = runs.start_run(engine, "sync")
    pages = [
        PageBatch(owner, "/t", 1, T0, [parse_task(item(u), owner, zone) for u in uuids])
        for owner in (ACCOUNT, Account("main-1", "sub-2"))
    ]
    lock = TasksLock(db_url)
    lock.take()

    with ThreadPoolExecutor(2) as pool:
        write = functools.partial(store.write_page, engine, run_id)
        writing = [pool.submit(write, page, None) for page in pages]
        time.sleep(1.0)  # both now wait for the lock
        lock.let_go()
        counts = [future.result(timeout=30) for future in writing]
    lock.close()

    assert sorted(c.new for c in counts) == [0, 10]
    assert {u: history(engine, u) for u in uuids} == {
        u: [("first_seen", None, 2)] for u in uuids
    }
    assert {task_row(engine, u).sub_user_id for u in uuids} in ({"sub-1"}, {"sub-2"})


def test_a_lock_held_past_the_busy_timeout_fails_the_page_and_names_it(
    db_url: str,
) -> None:
    # On PostgreSQL the page used to wait for as long as the lock was held.
    engine = store.connect(DatabaseConfig(url=db_url, busy_timeout=0.5))
    store.migrate(engine)
    run_id = runs.start_run(engine, "sync")
    lock = TasksLock(db_url)
    lock.take()

    began = time.monotonic()
    with pytest.raises(StoreError) as caught:
        store.write_page(engine, run_id, batch([item("a")]), None)
    took = time.monotonic() - began
    lock.let_go()

    assert str(caught.value).startswith(
        "account main-1:sub-1, endpoint /agent-api/user/{user_id}/task, page 1: "
        "the page was not written: "
    )
    assert "database is locked" in str(caught.value) or "lock timeout" in str(
        caught.value
    )
    assert took < 5.0
    assert stored_uuids(engine) == set()
    lock.take()
    with pytest.raises(StoreError, match="^account main-1:sub-1: removals were not"):
        store.mark_removals(engine, run_id, ACCOUNT, store.SeenIds(), T0, None)
    lock.let_go()
    lock.close()
    store.write_page(engine, run_id, batch([item("a")]), None)
    assert stored_uuids(engine) == {"a"}
    engine.dispose()


def test_a_stop_ends_a_page_s_wait_for_a_lock_and_writes_nothing(
    engine: Engine, db_url: str
) -> None:
    run_id = runs.start_run(engine, "sync")
    lock = TasksLock(db_url)
    lock.take()
    halt = threading.Event()
    threading.Timer(0.3, halt.set).start()

    began = time.monotonic()
    with pytest.raises(RunInterrupted), store.lock_waits_end_on(halt):
        store.write_page(engine, run_id, batch([item("a")]), None)
    took = time.monotonic() - began
    lock.let_go()
    lock.close()

    assert took < 2.0
    assert stored_uuids(engine) == set()


def test_ids_that_differ_only_by_a_separator_at_an_end_are_two_tasks(
    engine: Engine,
) -> None:
    # Python's strip() counts the information separators, NEL and the
    # Unicode line separators as spaces: these five tasks were stored as one.
    odd = ["\x1c", "\x1f", "\x85", "\u2028", "\u2029"]
    write(engine, [item("t")] + [item(f"t{char}") for char in odd])

    assert stored_uuids(engine) == {"t"} | {f"t{char}" for char in odd}
    # The spaces a person or a line end leaves are still trimmed.
    write(engine, [item(" \tt\u3000\xa0\r\n")], T0 + timedelta(hours=1))
    assert len(stored_uuids(engine)) == 6


def test_a_page_whose_transaction_begins_after_a_stop_writes_nothing(
    engine: Engine,
) -> None:
    # A page that waited for another writer across a stop, in turns of
    # 0.1 s, was written when the lock came free within the turn the stop
    # came in.
    halt = threading.Event()
    halt.set()
    run_id = runs.start_run(engine, "sync")

    with store.lock_waits_end_on(halt), pytest.raises(RunInterrupted):
        store.write_page(engine, run_id, batch([item("a")]), None)

    assert stored_uuids(engine) == set()


def test_stored_times_come_back_to_the_microsecond(engine: Engine) -> None:
    first = T0 + timedelta(microseconds=123456)
    write(engine, [item("a", 2)], first)

    write(engine, [item("a", 2, name="renamed")], first + timedelta(hours=1))
    write(engine, [item("a", 1)], first + timedelta(hours=2))

    assert task_row(engine, "a").status_seen_at == first + timedelta(hours=2)
    change = only_event(engine, "changed")
    assert change.old_seen_at == first


def test_removal_touches_only_the_account_walked(engine: Engine) -> None:
    write(engine, [item("a")])
    run_id = runs.start_run(engine, "sync")

    removed = [
        store.mark_removals(
            engine, run_id, Account("main-1", "other"), store.SeenIds(), at, None
        )
        for at in (T0, T0 + timedelta(hours=1))
    ]

    assert removed == [0, 0]
    row = task_row(engine, "a")
    assert (row.removed_at, row.unlisted_after) == (None, None)


def test_text_is_stored_whole_and_without_nul(engine: Engine) -> None:
    name, remark = "名" * 300, "r" * 70_000

    write(engine, [item("a", name=name + "\x00", remark=remark)])

    row = task_row(engine, "a")
    assert (row.name, row.remark) == (name, remark)
    assert row.raw["remark"] == remark


def test_large_page_is_chunked_under_the_variable_limit(engine: Engine) -> None:
    items = [item(f"t{n:05}", 1 + n % 3) for n in range(3_000)]

    counts = write(engine, items)

    assert counts.new == 3_000
    # Each row's values in their own columns, whichever statement held them.
    with engine.connect() as connection:
        stored = dict(connection.execute(select(tasks.c.uuid, tasks.c.status)).all())
        first_seen = connection.execute(
            select(task_status_changes.c.task_uuid, task_status_changes.c.new_status)
        ).all()
    assert stored == {f"t{n:05}": 1 + n % 3 for n in range(3_000)}
    assert dict(first_seen) == stored and len(first_seen) == 3_000


def test_pages_of_any_size_need_only_a_few_sqlite_statement_texts() -> None:
    # SQLite's driver keeps every statement text prepared while the
    # connection lasts: one per row count of a page grew without bound.
    largest = store.SQLITE_MAX_VARIABLES // len(tasks.c)
    texts: set[int] = set()
    for total in range(3_000):
        counts = store._statement_rows(total, largest)
        texts.update(counts)
        assert sum(counts) == total
        assert len(counts) == (total > 0) or total > store.EXACT_ROWS
    powers = {count for count in texts if count > store.EXACT_ROWS}
    assert all(count & (count - 1) == 0 for count in powers)
    assert max(texts) <= largest
    assert len(texts) <= store.EXACT_ROWS + largest.bit_length()


def test_the_stored_state_a_page_is_planned_from_is_read_exactly(
    engine: Engine,
) -> None:
    # On SQLite the rows come back as one JSON text: every value must come
    # back as the plain query reads it, whatever the text holds.
    awkward = 'say "hi" \\ \x01\t\u2028 😀 null \ud7ff'
    stored_items = [item("a", status_str=awkward), item("b", 2**31 - 1), item("c")]
    write(engine, [*stored_items, item("e", 1), item("f", 1)])
    with engine.begin() as connection:
        connection.execute(
            update(tasks)
            .where(tasks.c.uuid == "b")
            .values(removed_at=T0 + timedelta(hours=1), unlisted_after=T0)
        )
        connection.execute(
            update(tasks).where(tasks.c.uuid == "f").values(unlisted_after=T0)
        )
    zone = ZoneInfo("Asia/Shanghai")
    listed = [parse_task(item(uuid, 1), ACCOUNT, zone) for uuid in "abdef"]
    columns = [tasks.c[name] for name in store._Stored._fields]

    with engine.connect() as connection:
        driver = store._DriverValues(connection.dialect.name)
        stored, unchanged, flagged = store._read_stored(connection, driver, listed)
        expected = connection.execute(
            select(*columns).where(tasks.c.uuid.in_(["a", "b"]))
        ).all()

    assert {uuid: tuple(row) for uuid, row in stored.items()} == {
        row.uuid: tuple(row) for row in expected
    }
    assert stored["a"].status_str == awkward
    assert (unchanged, flagged) == ({"e", "f"}, {"f"})


def test_a_stored_time_written_with_an_offset_is_read_as_that_moment(
    engine: Engine,
) -> None:
    # SQLAlchemy writes naive UTC text on SQLite; another tool may not.
    write(engine, [item("a", 1), item("b", 1)])
    written = {
        "a": ("2026-01-05 09:30:00+08:00", "2026-01-05 01:00:00Z"),
        "b": ("2026-01-05T01:30:00+00:00", "2026-01-04 20:00:00-05:00"),
    }
    with engine.begin() as connection:
        for uuid, (seen_at, unlisted) in written.items():
            connection.execute(
                update(tasks)
                .where(tasks.c.uuid == uuid)
                .values(status_seen_at=text(f"'{seen_at}'"))
                .values(unlisted_after=text(f"'{unlisted}'"))
            )
    zone = ZoneInfo("Asia/Shanghai")
    listed = [parse_task(item(uuid, 2), ACCOUNT, zone) for uuid in "ab"]

    with engine.connect() as connection:
        driver = store._DriverValues(connection.dialect.name)
        stored, _, _ = store._read_stored(connection, driver, listed)

    for uuid in "ab":
        assert stored[uuid].status_seen_at == datetime(2026, 1, 5, 1, 30, tzinfo=UTC)
        assert stored[uuid].unlisted_after == T0


def test_a_task_stored_unchanged_is_not_read_back(engine: Engine) -> None:
    # In a re-sync nearly every task is unchanged: the database compares
    # the hashes, and only the tasks to plan or to flag come back.
    write(engine, [item("same", 1), item("changed", 1), item("flagged", 1)])
    with engine.begin() as connection:
        connection.execute(
            update(tasks).where(tasks.c.uuid == "flagged").values(unlisted_after=T0)
        )
    zone = ZoneInfo("Asia/Shanghai")
    statuses = {"same": 1, "changed": 2, "flagged": 1, "new": 1}
    listed = {
        uuid: parse_task(item(uuid, status), ACCOUNT, zone).content_hash
        for uuid, status in statuses.items()
    }

    with engine.connect() as connection:
        rows = store._rows_to_plan(connection, listed)

    new = [row for row in rows if isinstance(row, str)]
    stored = sorted(row[0] for row in rows if not isinstance(row, str))
    assert (new, stored) == (["new"], ["changed", "flagged"])


def test_a_prepared_page_keeps_each_payload_once() -> None:
    # A first sync's pages wait in the queue prepared; the items they were
    # made from were a third of their memory.
    zone = ZoneInfo("Asia/Shanghai")
    own = parse_task(item("b"), ACCOUNT, zone)
    page = replace(batch([]), records=[identify_task(item("a"), ACCOUNT, zone), own])

    from_listed, from_record = page.prepared("sqlite").records

    assert from_listed.parsed().raw == {}
    assert json.loads(from_listed.values["raw"]) == clean(item("a"))
    assert json.loads(from_record.values["raw"]) == own.raw == clean(item("b"))


def test_sqlite_pages_are_written_with_temporary_storage_in_memory(
    sqlite_url: str,
) -> None:
    # A multi-row statement's journal spilled to a temporary file: about a
    # megabyte of writes for each page of a first sync.
    engine = store.connect(DatabaseConfig(url=sqlite_url))
    store.migrate(engine)
    run_id = runs.start_run(engine, "sync")
    with store.PageWriter(engine) as writer:
        writer.write(run_id, batch([item(f"t{n:03}") for n in range(200)]), None)
        assert writer._connection is not None
        during = temp_store(writer._connection)
    # The pool hands the connection on to queries that may sort a lot.
    pooled = [engine.connect() for _ in range(engine.pool.checkedin())]
    after = [temp_store(connection) for connection in pooled]
    for connection in pooled:
        connection.close()
    engine.dispose()

    assert during == 2  # MEMORY
    assert after and all(setting == 0 for setting in after)  # the default


def temp_store(connection: Any) -> int:
    # Read by the driver: through SQLAlchemy it would begin a transaction.
    cursor = connection.connection.driver_connection.execute("PRAGMA temp_store")
    setting: int = cursor.fetchone()[0]
    return setting


def test_group_name_follows_the_platform(engine: Engine) -> None:
    write(engine, [item("a")])
    write(engine, [item("a", group={"id": 1, "name": "新名字"})], T0 + timedelta(1))

    with engine.connect() as connection:
        rows = connection.execute(select(groups.c.id, groups.c.name)).all()
    assert [tuple(r) for r in rows] == [("1", "新名字")]


def test_one_writer_follows_a_group_renamed_between_its_pages(
    engine: Engine,
) -> None:
    run_id = runs.start_run(engine, "sync")
    names = ["话术组1", "新名字", "话术组1"]
    stored = []
    with store.PageWriter(engine) as writer:
        for number, name in enumerate(names, start=1):
            group = {"id": 1, "name": name}
            page = [item(f"{number}-{i}", group=group) for i in range(2)]
            writer.write(run_id, batch(page, number=number), None)
            with engine.connect() as connection:
                stored.append(connection.execute(select(groups.c.name)).scalar())

    assert stored == names


def test_rejects_are_stored_with_the_page(engine: Engine) -> None:
    run_id = runs.start_run(engine, "sync")
    page = PageBatch(
        account=ACCOUNT,
        endpoint="/agent-api/user/{user_id}/task",
        number=3,
        fetched_at=T0,
        records=[],
        rejects=[Reject("uuid is missing", {"name": "x"})],
    )

    counts = store.write_page(engine, run_id, page, None)

    assert counts.rejected == 1
    with engine.connect() as connection:
        row = connection.execute(select(sync_rejects)).one()
    assert (row.page, row.reason, row.item) == (3, "uuid is missing", {"name": "x"})


def test_sync_refuses_a_database_not_at_the_current_schema(db_url: str) -> None:
    engine = store.connect(DatabaseConfig(url=db_url))

    with pytest.raises(store.StoreError, match="run `task-etl migrate` first"):
        store.check_schema(engine)
    engine.dispose()


def test_seen_ids_hold_every_listed_id_and_no_other() -> None:
    seen = store.SeenIds()
    listed = [f"task-{number}" for number in range(5000)]
    seen.update(listed[:2500])
    seen.update(["task-0", *listed[2500:]])

    assert all(uuid in seen for uuid in listed)
    assert not any(f"gone-{number}" in seen for number in range(5000))
    assert "任务\ud83d" not in seen
    assert len(seen) == 5001


@pytest.mark.parametrize("set_lookup_most", [100_000, 10], ids=["set", "bisection"])
def test_seen_ids_name_the_unlisted_ones_in_their_order(
    monkeypatch: pytest.MonkeyPatch, set_lookup_most: int
) -> None:
    monkeypatch.setattr(store, "SET_LOOKUP_MOST", set_lookup_most)
    seen = store.SeenIds(f"task-{number}" for number in range(0, 3000, 2))
    stored = [f"task-{number}" for number in range(2999, -1, -1)]

    unlisted = seen.unlisted(iter(stored))

    assert unlisted == [
        f"task-{number}" for number in range(3000, -1, -1) if number % 2
    ]
    assert seen.unlisted(["task-0", "任务\ud83d", "task-2998"]) == ["任务\ud83d"]
    # SQLite may hold an id another tool stored as bytes: never listed.
    assert seen.unlisted([b"task-0", "task-0"]) == [b"task-0"]
    # Both ways read a subclass of str as the text it is.
    assert seen.unlisted([_Text("task-0"), _Text("task-1")]) == ["task-1"]


class _Text(str):
    """Text of a type of its own, as a driver or a column type could give."""


def test_times_are_stored_in_the_form_sqlalchemy_gives_them(engine: Engine) -> None:
    # Rows go to the driver with their values already converted; SQLite
    # compares times as text, so every writer must use SQLAlchemy's form.
    write(engine, [item("t1", alter_datetime="2026-01-05 10:30:00")], T0)
    checked = [
        tasks.c.created_at,
        tasks.c.altered_at,
        tasks.c.first_seen_at,
        tasks.c.status_seen_at,
        task_status_changes.c.observed_at,
    ]
    query = select(*checked).join_from(
        tasks, task_status_changes, task_status_changes.c.task_uuid == tasks.c.uuid
    )
    dialect = engine.dialect
    with engine.connect() as connection:
        typed = connection.execute(query).one()
        stored = connection.exec_driver_sql(str(query.compile(dialect=dialect))).one()

    assert typed.first_seen_at == T0
    assert typed.created_at == datetime(2026, 1, 5, 1, 0, tzinfo=UTC)
    for column, moment, value in zip(checked, typed, stored, strict=True):
        process = column.type.dialect_impl(dialect).bind_processor(dialect)
        assert value == (process(moment) if process else moment), column.name


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_times_go_to_the_driver_and_back_as_sqlalchemy_converts_them(
    dialect: str,
) -> None:
    # The driver's values are made by arithmetic on the epoch, not by
    # SQLAlchemy: any moment, in any zone, must come out as its types give.
    from sqlalchemy.dialects import postgresql, sqlite

    engine_dialect = {"sqlite": sqlite, "postgresql": postgresql}[dialect].dialect()
    column_type = tasks.c.created_at.type.dialect_impl(engine_dialect)
    process = column_type.bind_processor(engine_dialect)
    driver = store._DriverValues(dialect)
    moments = [
        datetime(2026, 1, 5, 1, 0, tzinfo=UTC),
        datetime(2026, 1, 5, 9, 0, 0, 7, tzinfo=ZoneInfo("Asia/Shanghai")),
        datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=ZoneInfo("America/New_York")),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ]

    for moment in moments:
        value = driver.time(moment)
        expected = process(moment.astimezone(UTC)) if process else moment
        assert value == expected, moment
        # In UTC: a time in a fold never equals one of another zone.
        assert driver.read_time(value) == moment.astimezone(UTC)
        assert driver.read_time(value).tzinfo is UTC


def test_the_payload_is_the_cleaned_item_and_its_hash_is_kept(engine: Engine) -> None:
    items = [
        item("plain"),
        item("url", call_notify_url="http://10.0.0.8/hook"),
        item("nested", tags=[{"call_notify_url": "http://10.0.0.9/hook"}]),
        item("nul", remark="a\x00b"),
    ]
    write(engine, items, T0)

    with engine.connect() as connection:
        rows = dict(connection.execute(select(tasks.c.uuid, tasks.c.raw)).all())
        text = " ".join(str(raw) for raw in rows.values())
    assert rows == {i["uuid"]: clean(i) for i in items}
    assert "10.0.0" not in text
    # Written again unchanged, nothing is rewritten.
    assert write(engine, items, T0 + timedelta(hours=1)).changed == 0


def test_the_read_of_stored_tasks_is_never_a_prepared_statement(pg_url: str) -> None:
    # A plan PostgreSQL kept from when the table was nearly empty scanned the
    # whole table for every later page of a first sync.
    engine = store.connect(DatabaseConfig(url=pg_url))
    store.migrate(engine)
    run_id = runs.start_run(engine, "sync")
    with store.PageWriter(engine) as writer:
        for number in range(1, 9):
            page = batch([item(f"{number}-{i}") for i in range(3)], number=number)
            writer.write(run_id, page, None)
        assert writer._connection is not None
        prepared = writer._connection.exec_driver_sql(
            "SELECT statement FROM pg_prepared_statements"
        ).scalars()
        statements = " ".join(prepared)
    engine.dispose()

    assert "INSERT INTO tasks" in statements  # psycopg did prepare the writes
    assert "json_each_text" not in statements


def as_superuser(url: str, *statements: str) -> None:
    admin = store.connect(DatabaseConfig(url=url))
    with admin.begin() as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)
    admin.dispose()


@contextmanager
def as_writer_role(url: str, *statements: str) -> Iterator[Engine]:
    """An engine of a new role that is not a superuser, with every right on
    the migrated tables, after the superuser ran `statements`."""
    owner = store.connect(DatabaseConfig(url=url))
    store.migrate(owner)
    owner.dispose()
    role = f"writer_{url.rsplit('/', 1)[1]}"
    as_superuser(
        url,
        f"CREATE ROLE {role} LOGIN",
        f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}",
        f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}",
        *statements,
    )
    engine = store.connect(DatabaseConfig(url=url.replace("//postgres@", f"//{role}@")))
    try:
        yield engine
    finally:
        engine.dispose()
        as_superuser(url, f"DROP OWNED BY {role}", f"DROP ROLE {role}")


def history_by_copy(engine: Engine, caplog: pytest.LogCaptureFixture) -> int:
    """Write three pages with a status change; how many went by COPY."""
    with caplog.at_level(logging.DEBUG, logger="etl.store"):
        write(engine, [item("a", 2), item("b", 2)])
        write(engine, [item("a", 1)], T0 + timedelta(hours=1))
        write(engine, [item("c", 3)], T0 + timedelta(hours=2))
    return sum("COPY task_status_changes" in r.getMessage() for r in caplog.records)


def test_history_rows_go_by_copy_on_postgresql(
    db_url: str, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    copied = history_by_copy(engine, caplog)

    assert copied == (3 if db_url.startswith("postgresql") else 0)
    assert history(engine, "a") == [("first_seen", None, 2), ("changed", 2, 1)]


def test_history_rows_reach_a_table_under_row_level_security(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # COPY refuses such a table: every page failed where INSERT had worked.
    with as_writer_role(
        pg_url,
        "ALTER TABLE task_status_changes ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY everyone ON task_status_changes USING (true) WITH CHECK (true)",
    ) as engine:
        copied = history_by_copy(engine, caplog)
        rows = history(engine, "a")

    assert copied == 0
    assert rows == [("first_seen", None, 2), ("changed", 2, 1)]


def test_history_rows_pass_through_the_rules_on_their_table(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # COPY skips rules: a rule copying each history row elsewhere got none.
    engine = store.connect(DatabaseConfig(url=pg_url))
    store.migrate(engine)
    as_superuser(
        pg_url,
        "CREATE TABLE audit (task_uuid text)",
        "CREATE RULE audit_history AS ON INSERT TO task_status_changes"
        " DO ALSO INSERT INTO audit VALUES (NEW.task_uuid)",
    )

    copied = history_by_copy(engine, caplog)
    with engine.connect() as connection:
        audited = (
            connection.exec_driver_sql("SELECT task_uuid FROM audit ORDER BY task_uuid")
            .scalars()
            .all()
        )
    engine.dispose()

    assert copied == 0
    assert audited == ["a", "a", "b", "c"]


ODD_TEXTS = ["tab\there", "two\nlines\r\n", "back\\slash \\N", "\\.", "回访 😀", "  "]


def many_items(status: int = 2, **extra: Any) -> list[dict[str, Any]]:
    """Enough tasks for one page to be staged on PostgreSQL, with odd text."""
    return [
        item(
            f"t{i:02}",
            status,
            **{
                "name": ODD_TEXTS[i % len(ODD_TEXTS)] + str(i),
                "remark": ODD_TEXTS[-1 - i % len(ODD_TEXTS)],
                "maximumcall": i * 1000,
                "enable": i % 2 == 0,
                **extra,
            },
        )
        for i in range(store.STAGED_LEAST + 2)
    ]


def staged(caplog: pytest.LogCaptureFixture) -> int:
    copy = f"COPY pg_temp.{store.STAGED_TASKS}"
    return sum(copy in r.getMessage() for r in caplog.records)


def test_tasks_staged_by_copy_keep_their_values(
    db_url: str, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # PostgreSQL upserts a page of this many tasks from a temporary table
    # filled by COPY: its text form escapes tabs, newlines and backslashes.
    first, later = many_items(2), many_items(1, remark="changed")
    unchanged = first[:2]
    with caplog.at_level(logging.DEBUG, logger="etl.store"):
        write(engine, first)
        counts = write(engine, unchanged + later[2:], T0 + timedelta(hours=1))

    assert staged(caplog) == (2 if db_url.startswith("postgresql") else 0)
    assert (counts.new, counts.changed) == (0, len(first) - 2)
    with engine.connect() as connection:
        rows = {row.uuid: row for row in connection.execute(select(tasks))}
    for given in unchanged + later[2:]:
        row = rows[given["uuid"]]
        assert row.raw == given
        assert (row.name, row.remark) == (
            given["name"].strip(),
            given["remark"].strip() or None,
        )
        assert (row.status, row.maximumcall, row.enable) == (
            given["status"],
            given["maximumcall"],
            given["enable"],
        )
        assert row.created_at == datetime(2026, 1, 5, 1, 0, tzinfo=UTC)
        assert row.first_seen_at == T0
        changed = given in later
        assert row.last_changed_at == (T0 + timedelta(hours=1) if changed else T0)
        assert row.status_seen_at == row.last_changed_at
    assert history(engine, "t02") == [("first_seen", None, 2), ("changed", 2, 1)]
    assert history(engine, "t00") == [("first_seen", None, 2)]


def test_tasks_go_one_by_one_without_the_right_to_temporary_tables(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Creating temporary tables is a right that a database's owner can take
    # away; the upsert then goes by executemany.
    database = pg_url.rsplit("/", 1)[1]
    revoked = f"REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC"
    with (
        as_writer_role(pg_url, revoked) as engine,
        caplog.at_level(logging.DEBUG, logger="etl.store"),
    ):
        counts = write(engine, many_items())
        stored = task_row(engine, "t00")

    assert (staged(caplog), counts.new) == (0, store.STAGED_LEAST + 2)
    assert stored.name == "tab\there0"


def test_a_column_the_owner_added_keeps_its_default_when_staged(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = store.connect(DatabaseConfig(url=pg_url))
    store.migrate(engine)
    added = "ALTER TABLE tasks ADD COLUMN team text NOT NULL DEFAULT 'ops'"
    as_superuser(pg_url, added)

    with caplog.at_level(logging.DEBUG, logger="etl.store"):
        write(engine, many_items())
    with engine.connect() as connection:
        teams = connection.exec_driver_sql("SELECT DISTINCT team FROM tasks").all()
    engine.dispose()

    assert staged(caplog) == 1
    assert teams == [("ops",)]


def test_a_column_widened_between_pages_takes_what_it_now_holds(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A staging table kept for the session kept the types of its day, and
    # a writer's connection outlives many pages: the widened column went
    # on refusing the longer values, until the pool gave another one.
    engine = store.connect(DatabaseConfig(url=pg_url))
    store.migrate(engine)
    as_superuser(pg_url, "ALTER TABLE tasks ALTER caller_line_id TYPE varchar(40)")
    run_id = runs.start_run(engine, "sync")
    longer = "x" * 60
    with (
        caplog.at_level(logging.DEBUG, logger="etl.store"),
        store.PageWriter(engine) as writer,
    ):
        writer.write(run_id, batch(many_items()), None)
        as_superuser(pg_url, "ALTER TABLE tasks ALTER caller_line_id TYPE text")
        page = batch(many_items(caller_line_id=longer), T0 + timedelta(hours=1))
        counts = writer.write(run_id, page, None)
    stored = task_row(engine, "t00").caller_line_id
    engine.dispose()

    assert staged(caplog) == 2
    assert (counts.changed, stored) == (store.STAGED_LEAST + 2, longer)


def test_a_table_named_as_the_staging_one_elsewhere_on_the_path_is_not_read(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # With the session's own schema last on the search path, the unqualified
    # name found this table: its rows, which any user allowed to write it
    # could put there, went into `tasks` with the writer's rights.
    engine = store.connect(DatabaseConfig(url=pg_url))
    store.migrate(engine)
    write(engine, [item("planted")])  # moved into the other table below
    database = pg_url.rsplit("/", 1)[1]
    as_superuser(
        pg_url,
        f"ALTER DATABASE {database} SET search_path = public, pg_temp",
        f"CREATE TABLE public.{store.STAGED_TASKS} AS TABLE tasks",
        "DELETE FROM task_status_changes",
        "DELETE FROM tasks",
    )
    engine.dispose()
    engine = store.connect(DatabaseConfig(url=pg_url))  # sessions on that path

    with caplog.at_level(logging.DEBUG, logger="etl.store"):
        write(engine, many_items())
        write(engine, many_items(1), T0 + timedelta(hours=1))
    with engine.connect() as connection:
        stored = set(connection.execute(select(tasks.c.uuid)).scalars())
        planted_rows = connection.exec_driver_sql(
            f"SELECT count(*) FROM public.{store.STAGED_TASKS}"
        ).scalar()
    engine.dispose()

    assert staged(caplog) == 2
    assert stored == {f"t{i:02}" for i in range(store.STAGED_LEAST + 2)}
    assert planted_rows == 1


@pytest.mark.parametrize("refused", ["t00", f"t{store.STAGED_LEAST + 1:02}"])
def test_a_staged_page_refused_by_the_database_is_not_written_at_all(
    db_url: str, engine: Engine, refused: str
) -> None:
    with engine.begin() as connection:
        if db_url.startswith("postgresql"):
            connection.exec_driver_sql(
                f"ALTER TABLE tasks ADD CONSTRAINT no_{refused}"
                f" CHECK (uuid <> '{refused}')"
            )
        else:  # SQLite adds no constraint to a table: a trigger refuses it
            connection.exec_driver_sql(
                f"CREATE TRIGGER no_{refused} BEFORE INSERT ON tasks"
                f" WHEN NEW.uuid = '{refused}' BEGIN SELECT RAISE(ABORT, 'no'); END"
            )

    with pytest.raises(StoreError) as raised:
        write(engine, many_items())

    message = str(raised.value)
    assert message.startswith(
        "account main-1:sub-1, endpoint /agent-api/user/{user_id}/task, page 1:"
        " the page was not written:"
    )
    assert "\n" not in message
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(tasks)) == 0
        counted = select(func.count()).select_from(task_status_changes)
        assert connection.scalar(counted) == 0


def test_a_writer_whose_connection_ends_fails_the_page_and_goes_on(
    pg_url: str,
) -> None:
    # The read of stored tasks, run by psycopg itself, raised psycopg's own
    # error, which failed the run, not the page, and without a word.
    engine = store.connect(DatabaseConfig(url=pg_url))
    store.migrate(engine)
    run_id = runs.start_run(engine, "sync")
    with store.PageWriter(engine) as writer:
        writer.write(run_id, batch([item("a")]), None)
        assert writer._connection is not None
        pid = writer._connection.connection.driver_connection.info.backend_pid
        with engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

        with pytest.raises(StoreError) as caught:
            writer.write(run_id, batch([item("b")], number=2), None)
        writer.write(run_id, batch([item("c")], number=3), None)
    engine.dispose()

    assert str(caught.value).startswith(
        "account main-1:sub-1, endpoint /agent-api/user/{user_id}/task, page 2: "
        "the page was not written: "
    )
    assert "\n" not in str(caught.value)
    assert stored_uuids(store.connect(DatabaseConfig(url=pg_url))) == {"a", "c"}


@pytest.mark.parametrize(
    "asked", ["PGCLIENTENCODING=SQL_ASCII", "?client_encoding=latin1"]
)
def test_the_client_encoding_is_utf8_whatever_is_asked(
    pg_url: str, asked: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under SQL_ASCII psycopg read the server's version as bytes, and the
    # first connection failed with a TypeError; a LATIN1 connection refused
    # the platform's Chinese text in the middle of a run.
    if asked.startswith("?"):
        pg_url += asked
    else:
        monkeypatch.setenv(*asked.split("="))
    engine = store.connect(DatabaseConfig(url=pg_url))
    store.migrate(engine)

    write(engine, [item("a", name="外呼任务 ✓")])

    assert task_row(engine, "a").name == "外呼任务 ✓"
    engine.dispose()


SYNC_A_PAGE_INTO_SQLITE = """
import sys
from datetime import UTC, datetime
from zoneinfo import ZoneInfo
from etl import cli, runs, store
from etl.accounts import Account
from etl.config import DatabaseConfig
from etl.parse import parse_task

engine = store.connect(DatabaseConfig(url=sys.argv[1]))
store.migrate(engine)
account = Account("u")
task = parse_task({"uuid": "a", "status": 2}, account, ZoneInfo("UTC"))
page = store.PageBatch(account, "/t", 1, datetime.now(UTC), [task])
store.write_page(engine, runs.start_run(engine, "sync"), page, None)
store.mark_removals(engine, 1, account, store.SeenIds(["a"]), datetime.now(UTC), None)
print(sorted(name for name in sys.modules if name.startswith("psycopg")))
"""


def test_a_process_on_sqlite_never_loads_psycopg(sqlite_url: str) -> None:
    # Imported by the store for PostgreSQL's turns, it cost every process
    # on SQLite 3.5 MB and 0.1 s.
    done = subprocess.run(
        [sys.executable, "-c", SYNC_A_PAGE_INTO_SQLITE, sqlite_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert done.stdout == "[]\n"
    assert count_tasks(sqlite_url) == 1


def count_tasks(url: str) -> int:
    engine = store.connect(DatabaseConfig(url=url))
    try:
        return len(stored_uuids(engine))
    finally:
        engine.dispose()


def test_a_postgresql_url_without_a_driver_uses_psycopg(pg_url: str) -> None:
    # Before SQLAlchemy 2.1 such a URL meant psycopg2, which is not installed.
    bare = pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
    assert bare != pg_url

    engine = store.connect(DatabaseConfig(url=bare))
    with engine.connect() as connection:
        answer = connection.exec_driver_sql("SELECT 1").scalar()
    engine.dispose()

    assert (engine.dialect.driver, answer) == ("psycopg", 1)
