import re
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests

from etl.simulator import STATUS_TEXTS, SimServer, Simulator

pytestmark = pytest.mark.timeout(30)

TOKEN = "sim-token"
MAX_PAGES = 500
CLASSIC_KEYS = {
    "uuid",
    "name",
    "create_datetime",
    "alter_datetime",
    "maximumcall",
    "dial_time_id",
    "status",
    "status_str",
    "destination_extension",
    "caller_line_id",
    "bridge_group_id",
    "group",
    "enable",
    "remark",
    "user_id",
    "sort",
    "_origination_caller_id_number",
    "call_notify_url",
}
QUIET = {"status_change_rate": 0.0, "creation_rate": 0.0, "removal_rate": 0.0}


@pytest.fixture
def sim() -> Simulator:
    return Simulator(seed=3)


@pytest.fixture
def server(sim: Simulator) -> Iterator[SimServer]:
    with sim.serve() as server:
        yield server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        yield session


def get(
    http: requests.Session, server: SimServer, path: str, **params: Any
) -> requests.Response:
    return http.get(f"{server.url}{path}", params=params, timeout=5)


def tasks_path(user_id: str) -> str:
    return f"/agent-api/user/{user_id}/task"


def walk(
    http: requests.Session, server: SimServer, user_id: str, **params: Any
) -> list[dict[str, Any]]:
    """Every item of a listing, page by page until the last page."""
    items: list[dict[str, Any]] = []
    for page in range(1, MAX_PAGES):
        body = get(http, server, tasks_path(user_id), page=page, **params).json()
        assert body["code"] == 200, body
        items.extend(body["data"])
        if page >= body["meta"]["last_page"]:
            return items
    raise AssertionError(f"no last page after {MAX_PAGES} pages")


def main_id(sim: Simulator, index: int = 0) -> str:
    return sim.main_user_ids()[index]


def subs_of(sim: Simulator, user_id: str) -> list[str]:
    return [
        a.sub_user_id for a in sim.accounts() if a.user_id == user_id and a.sub_user_id
    ]


def test_task_page_has_the_documented_envelope(
    sim: Simulator, server: SimServer, http: requests.Session
) -> None:
    response = get(http, server, tasks_path(main_id(sim)), page=1, per_page=5)

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["code", "status", "message", "meta", "data"]
    assert body["code"] == 200
    assert (body["status"], body["message"]) == ("success", "获取成功")
    assert body["meta"] == {
        "has_pages": True,
        "total": 20,
        "last_page": 4,
        "current_page": 1,
        "per_page": "5",
    }
    assert len(body["data"]) == 5


@pytest.mark.parametrize(
    ("params", "meta", "items"),
    [
        ({}, {"per_page": 15, "last_page": 2, "has_pages": True}, 15),
        ({"per_page": 20}, {"per_page": "20", "last_page": 1, "has_pages": False}, 20),
        ({"per_page": 7, "page": 3}, {"per_page": "7", "current_page": 3}, 6),
        ({"per_page": 10, "page": 9}, {"current_page": 9, "last_page": 2}, 0),
        ({"per_page": "lots"}, {"per_page": "15", "total": 20}, 15),
        ({"page": "0"}, {"current_page": 1}, 15),
    ],
    ids=[
        "default-per-page-is-an-int",
        "passed-per-page-is-a-string",
        "short-last-page",
        "beyond-last-page-is-empty",
        "bad-per-page-falls-back",
        "page-zero-is-page-one",
    ],
)
def test_meta_describes_the_pages(
    sim: Simulator,
    server: SimServer,
    http: requests.Session,
    params: dict[str, Any],
    meta: dict[str, Any],
    items: int,
) -> None:
    body = get(http, server, tasks_path(main_id(sim)), **params).json()

    assert {key: body["meta"][key] for key in meta} == meta
    assert len(body["data"]) == items


@pytest.mark.parametrize("per_page", [1, 7, 20, 100], ids=lambda n: f"per-page-{n}")
def test_page_walk_reads_every_live_task_once_newest_first(
    sim: Simulator, server: SimServer, http: requests.Session, per_page: int
) -> None:
    user_id = main_id(sim)

    listed = [item["uuid"] for item in walk(http, server, user_id, per_page=per_page)]

    assert listed == [task.uuid for task in sim.live_tasks(user_id)]


def test_pages_shift_when_a_task_is_created_during_a_walk(
    sim: Simulator, server: SimServer, http: requests.Session
) -> None:
    path = tasks_path(main_id(sim))
    first = get(http, server, path, page=1, per_page=5).json()["data"]

    sim.add_task(main_id(sim), name="插队任务")
    second = get(http, server, path, page=2, per_page=5).json()["data"]

    assert second[0] == first[-1]


def test_items_have_the_classic_shape_without_quirks(http: requests.Session) -> None:
    sim = Simulator(seed=3, quirks=False, tasks_per_account=50)
    zone = ZoneInfo("Asia/Shanghai")
    with sim.serve() as server:
        items = walk(http, server, main_id(sim), per_page=100)
    truth = {task.uuid: task for task in sim.live_tasks(main_id(sim))}

    for item in items:
        task = truth[item["uuid"]]
        assert CLASSIC_KEYS <= set(item)
        assert str(uuid.UUID(item["uuid"])) == item["uuid"]
        assert item["status"] == task.status
        assert item["status_str"] == STATUS_TEXTS[task.status]
        created = datetime.strptime(item["create_datetime"], "%Y-%m-%d %H:%M:%S")
        assert created.replace(tzinfo=zone) == task.created_at.replace(microsecond=0)
        assert isinstance(item["maximumcall"], int)
        assert item["destination_extension"] == item["group"]["id"]
        assert item["group"]["name"] == f"话术组{item['group']['id']}"
        assert item["user_id"] == main_id(sim)
        assert re.fullmatch(
            r"http://10\.0\.\d\.5/cb\?key=[0-9a-f]{16}", item["call_notify_url"]
        )


def test_alter_datetime_is_the_local_time_of_the_last_status_change(
    http: requests.Session,
) -> None:
    sim = Simulator(seed=3, **QUIET)
    task = sim.add_task(main_id(sim), status=1)
    with sim.serve() as server:
        path = tasks_path(main_id(sim))
        before = get(http, server, path, per_page=1).json()["data"][0]
        sim.advance(90)
        sim.set_task_status(task.uuid, 2)
        after = get(http, server, path, per_page=1).json()["data"][0]

    assert (before["uuid"], before["alter_datetime"]) == (task.uuid, None)
    assert before["create_datetime"] == "2026-01-05 09:00:00"
    assert (after["status"], after["status_str"]) == (2, "执行中")
    assert after["alter_datetime"] == "2026-01-05 09:01:30"


def test_quirks_appear_on_some_items_and_leave_the_world_alone(
    http: requests.Session,
) -> None:
    odd = Simulator(seed=3, main_accounts=1, sub_accounts=0, tasks_per_account=200)
    clean = Simulator(
        seed=3, main_accounts=1, sub_accounts=0, tasks_per_account=200, quirks=False
    )
    with odd.serve() as server:
        items = walk(http, server, main_id(odd), per_page=100)

    assert any(not is_uuid(item["uuid"]) for item in items)
    assert any(isinstance(item["maximumcall"], str) for item in items)
    assert any(isinstance(item["destination_extension"], str) for item in items)
    assert any(item["group"] in (None, {}) for item in items)
    assert any(item["remark"] == "" for item in items)
    assert [t.created_at for t in odd.tasks()] == [t.created_at for t in clean.tasks()]
    assert [t.history for t in odd.tasks()] == [t.history for t in clean.tasks()]


def is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
    ids=["missing", "wrong-token", "wrong-scheme", "no-scheme", "longer-token"],
)
def test_a_bad_token_gets_401_without_echo(
    sim: Simulator, server: SimServer, headers: dict[str, str]
) -> None:
    url = f"{server.url}{tasks_path(main_id(sim))}"

    response = requests.get(url, headers=headers, timeout=5)

    assert response.status_code == 401
    assert response.json()["code"] == 401
    assert response.json()["status"] == "error"
    assert TOKEN not in response.text
    assert "wrong" not in response.text


def test_a_main_account_token_replaces_the_shared_one() -> None:
    # Main ids depend on the seed alone, so a tiny world tells them.
    first, second = Simulator(seed=4, tasks_per_account=0).main_user_ids()
    sim = Simulator(seed=4, tokens={first: "token-of-first"})
    cases = [
        (first, "token-of-first", 200),
        (first, TOKEN, 401),
        (second, TOKEN, 200),
        (second, "token-of-first", 401),
    ]

    with sim.serve() as server:
        for user_id, token, expected in cases:
            response = requests.get(
                f"{server.url}{tasks_path(user_id)}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=5,
            )
            assert response.status_code == expected, (user_id, token)


def test_tokens_for_unknown_main_accounts_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown main accounts"):
        Simulator(seed=4, tokens={"nobody": "x"})


def test_same_seed_and_calls_serve_the_same_json(http: requests.Session) -> None:
    bodies = []
    for seed in (5, 5, 6):
        sim = Simulator(seed=seed)
        sim.advance(3 * 3600)
        with sim.serve() as server:
            bodies.append(
                [
                    get(http, server, tasks_path(user_id), per_page=50).content
                    for user_id in sim.main_user_ids()
                ]
            )

    assert bodies[0] == bodies[1]
    assert bodies[0] != bodies[2]


def test_advance_creates_changes_and_removes_tasks_inside_the_step() -> None:
    sim = Simulator(seed=8, main_accounts=1, sub_accounts=1, tasks_per_account=100)
    before = sim.now

    sim.advance(10 * 3600)

    after = sim.now
    assert after - before == timedelta(hours=10)
    created = [t.created_at for t in sim.tasks() if t.created_at > before]
    removed = [t.removed_at for t in sim.tasks() if t.removed_at is not None]
    changes = [m for t in sim.tasks() for m, _ in t.history[1:] if m > before]
    assert created and removed and changes
    assert all(before < moment < after for moment in created + removed + changes)
    for task in sim.tasks():
        moments = [moment for moment, _ in task.history]
        assert moments == sorted(moments)
        assert moments[0] == task.created_at


def test_listing_after_advance_agrees_with_the_truth(http: requests.Session) -> None:
    sim = Simulator(seed=8, main_accounts=1, sub_accounts=1, tasks_per_account=100)
    sim.advance(10 * 3600)

    with sim.serve() as server:
        listed: dict[str, int] = {}
        for account in sim.accounts():
            params = {"sub_user_id": account.sub_user_id} if account.sub_user_id else {}
            for item in walk(http, server, account.user_id, per_page=100, **params):
                listed[item["uuid"]] = item["status"]

    live = {t.uuid: t.status_at(sim.now) for t in sim.tasks() if t.removed_at is None}
    assert listed == live
    assert all(t.status_at(sim.now) is None for t in sim.tasks() if t.removed_at)


@pytest.mark.parametrize(
    ("offset", "expected"),
    [(-1, None), (0, 3), (59.999, 3), (60, 1), (119, 1), (120, None), (500, None)],
    ids=[
        "before-creation",
        "at-creation",
        "just-before-change",
        "at-change",
        "after-change",
        "at-removal",
        "after-removal",
    ],
)
def test_status_at_follows_the_history(offset: float, expected: int | None) -> None:
    sim = Simulator(main_accounts=1, sub_accounts=0, tasks_per_account=0, **QUIET)
    start = sim.now
    task = sim.add_task(main_id(sim), status=3)
    sim.advance(60)
    sim.set_task_status(task.uuid, 1)
    sim.advance(60)
    sim.remove_task(task.uuid)

    assert task.status_at(start + timedelta(seconds=offset)) == expected
    assert sim.live_tasks(main_id(sim)) == []


def test_a_restored_task_is_listed_again_in_its_place(
    http: requests.Session,
) -> None:
    sim = Simulator(seed=3, **QUIET)
    user_id = main_id(sim)
    before = [t.uuid for t in sim.live_tasks(user_id)]
    task = sim.live_tasks(user_id)[5]
    sim.remove_task(task.uuid)
    removed_at = sim.now
    sim.advance(60)

    sim.restore_task(task.uuid)

    with sim.serve() as server:
        assert [item["uuid"] for item in walk(http, server, user_id)] == before
    assert task.removed_at is None
    assert task.status_at(removed_at) is None
    assert task.status_at(sim.now) == task.status
    with pytest.raises(ValueError, match="not removed"):
        sim.restore_task(task.uuid)


@pytest.mark.parametrize(
    ("params", "statuses"),
    [
        ({"status": 2}, {2}),
        ({"status[]": [1, 3]}, {1, 3}),
        ({"status": [1, 2]}, {1, 2}),
        ({"status[]": [1, 5]}, None),
        ({"status": [2, 0]}, None),
        ({"status[]": ["x"]}, None),
        ({"status": ""}, None),
        ({"status": 4}, {4}),
    ],
    ids=[
        "single",
        "array",
        "repeated",
        "array-with-out-of-range-lists-all",
        "repeated-with-zero-lists-all",
        "array-with-text-lists-all",
        "empty-lists-all",
        "single-unknown-matches-nothing",
    ],
)
def test_status_filter_and_its_out_of_range_quirk(
    http: requests.Session, params: dict[str, Any], statuses: set[int] | None
) -> None:
    sim = Simulator(seed=3, main_accounts=1, sub_accounts=0, tasks_per_account=60)
    live = sim.live_tasks(main_id(sim))
    assert {task.status for task in live} == {1, 2, 3}

    with sim.serve() as server:
        items = walk(http, server, main_id(sim), per_page=25, **params)

    expected = [t.uuid for t in live if statuses is None or t.status in statuses]
    assert [item["uuid"] for item in items] == expected


def test_name_filter_matches_a_substring(
    sim: Simulator, server: SimServer, http: requests.Session
) -> None:
    live = sim.live_tasks(main_id(sim))
    needle = live[0].name.split("-")[0]

    items = walk(http, server, main_id(sim), name=needle)

    assert [item["uuid"] for item in items] == [
        t.uuid for t in live if needle in t.name
    ]
    assert 0 < len(items) < len(live)


def test_sub_account_tasks_are_listed_with_sub_user_id(
    sim: Simulator, server: SimServer, http: requests.Session
) -> None:
    user_id = main_id(sim)

    for sub_user_id in subs_of(sim, user_id):
        items = walk(http, server, user_id, sub_user_id=sub_user_id)
        truth = sim.live_tasks(user_id, sub_user_id)
        assert [item["uuid"] for item in items] == [task.uuid for task in truth]
        assert {item["user_id"] for item in items} == {sub_user_id}

    own = walk(http, server, user_id)
    assert {task["uuid"] for task in own} == {t.uuid for t in sim.live_tasks(user_id)}


def test_sub_accounts_are_listed_with_the_envelope(
    sim: Simulator, server: SimServer, http: requests.Session
) -> None:
    user_id = main_id(sim)

    body = get(http, server, f"/agent-api/user/{user_id}/subset_users", page=1).json()

    assert body["meta"]["total"] == 2
    assert [item["id"] for item in body["data"]] == subs_of(sim, user_id)
    for item in body["data"]:
        assert set(item) == {"id", "name", "phone", "email", "created_at", "updated_at"}


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/agent-api/user/nobody/task", {}),
        ("/agent-api/user/{main}/task", {"sub_user_id": "{other_sub}"}),
        ("/agent-api/user/{main}/task", {"sub_user_id": "nobody"}),
        ("/agent-api/user/nobody/subset_users", {}),
    ],
    ids=["unknown-main", "sub-of-another-main", "unknown-sub", "subs-of-unknown-main"],
)
def test_an_unknown_account_is_a_404_code_in_a_200(
    sim: Simulator,
    server: SimServer,
    http: requests.Session,
    path: str,
    params: dict[str, str],
) -> None:
    names = {"main": main_id(sim), "other_sub": subs_of(sim, main_id(sim, 1))[0]}
    params = {key: value.format(**names) for key, value in params.items()}

    response = get(http, server, path.format(**names), **params)

    assert response.status_code == 200
    assert response.json()["code"] == 404
    assert response.json()["status"] == "error"


@pytest.mark.parametrize(
    ("params", "per_page", "items"),
    [({"per_page": 50}, "10", 10), ({}, 10, 10), ({"per_page": 4}, "4", 4)],
    ids=["capped", "default-capped", "under-the-cap"],
)
def test_max_per_page_caps_the_page(
    http: requests.Session, params: dict[str, Any], per_page: Any, items: int
) -> None:
    sim = Simulator(seed=3, max_per_page=10)
    with sim.serve() as server:
        body = get(http, server, tasks_path(main_id(sim)), **params).json()

    assert body["meta"]["per_page"] == per_page
    assert body["meta"]["last_page"] == -(-20 // items)
    assert len(body["data"]) == items


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "HEAD"])
def test_other_methods_are_refused(
    sim: Simulator, server: SimServer, http: requests.Session, method: str
) -> None:
    response = http.request(
        method, f"{server.url}{tasks_path(main_id(sim))}", timeout=5
    )

    assert response.status_code == 405
    assert response.headers["Allow"] == "GET"


def test_an_unknown_path_is_a_404(
    sim: Simulator, server: SimServer, http: requests.Session
) -> None:
    path = f"/agent-api/user/{main_id(sim)}/task_stop/1"

    assert get(http, server, path).status_code == 404


def test_odd_statuses_appear_only_when_asked(http: requests.Session) -> None:
    options = {"main_accounts": 1, "sub_accounts": 0, "tasks_per_account": 300}
    plain = Simulator(seed=3, **options)
    odd = Simulator(seed=3, odd_statuses=True, **options)
    plain.advance(24 * 3600)
    odd.advance(24 * 3600)

    with odd.serve() as server:
        items = walk(http, server, main_id(odd), per_page=100)

    assert {s for t in plain.tasks() for _, s in t.history} == {1, 2, 3}
    assert any(item["status"] == 4 and item["status_str"] for item in items)


def test_serving_while_the_clock_moves_stays_consistent(
    http: requests.Session,
) -> None:
    sim = Simulator(seed=9, main_accounts=1, sub_accounts=0, tasks_per_account=300)
    stop = threading.Event()

    def move_clock() -> None:
        for _ in range(200):
            if stop.is_set():
                return
            sim.advance(600)

    mover = threading.Thread(target=move_clock, daemon=True)
    with sim.serve() as server:
        mover.start()
        for _ in range(20):
            body = get(http, server, tasks_path(main_id(sim)), per_page=100).json()
            assert body["code"] == 200
            assert len(body["data"]) == min(100, body["meta"]["total"])
        stop.set()
        mover.join(timeout=10)

    assert not mover.is_alive()


def test_close_counts_requests_and_ends_kept_alive_connections(
    sim: Simulator, http: requests.Session
) -> None:
    server = sim.serve()
    for _ in range(3):
        get(http, server, tasks_path(main_id(sim)))
    assert server.requests == 3

    server.close()

    with pytest.raises(requests.ConnectionError):
        get(http, server, tasks_path(main_id(sim)))


def test_run_serves_and_moves_the_clock_until_interrupted() -> None:
    code = (
        "from etl.simulator import run; "
        "run(2, 0, tick=0.05, step=3600, main_accounts=1, sub_accounts=0, "
        "tasks_per_account=10)"
    )
    # faulthandler: a child that does not stop prints where each of its
    # threads is when it is aborted below.
    child = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-c", code],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url, user_id = read_announcement(child)
        seen = [list_statuses(url, user_id)]
        for _ in range(50):
            time.sleep(0.1)
            seen.append(list_statuses(url, user_id))
            if seen[-1] != seen[0]:
                break

        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=10) == 0
        assert seen[-1] != seen[0]
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGABRT)
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=10)


def read_announcement(child: subprocess.Popen[str]) -> tuple[str, str]:
    """The URL and the main account id that `run` prints when it starts."""
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], 10)
    assert ready, "the simulator printed nothing in 10 s"
    text = child.stdout.readline() + child.stdout.readline()
    url = re.search(r"http://127\.0\.0\.1:\d+", text)
    user_id = re.search(r"user_id (\S+)", text)
    assert url and user_id, text
    return url.group(0), user_id.group(1)


def list_statuses(url: str, user_id: str) -> dict[str, int]:
    response = requests.get(
        f"{url}{tasks_path(user_id)}",
        params={"per_page": 100},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )
    return {item["uuid"]: item["status"] for item in response.json()["data"]}
