"""A local stand-in for the platform API, for the demo, tests and benchmarks.

The simulator holds a world of accounts and tasks, serves it over HTTP in the
shapes of the classic task list, and keeps the ground truth: every status a
task had and when, when it was created and when it was removed. Tests check
what a sync recorded against that truth.

The world is determined by the seed and the calls made on the simulator.
Serving a request draws no random numbers, so polling never changes it, and
a request only slices one account's list and renders one page, so a page
costs the same in a world of a hundred tasks or of a hundred thousand.
"""

from __future__ import annotations

import bisect
import hmac
import json
import math
import random
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit
from zoneinfo import ZoneInfo

from etl.faults import SUCCESS_HEAD, Fault, FaultInjector, Faults, Served

STATUS_TEXTS = {1: "暂停中", 2: "执行中", 3: "等待执行"}
ODD_STATUS = 4
ODD_STATUS_TEXT = "未知"
DEFAULT_PER_PAGE = 15
DEFAULT_START = datetime(2026, 1, 5, 1, 0, tzinfo=UTC)

T = TypeVar("T")

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_STATUS_JSON = {
    code: json.dumps(text, ensure_ascii=False).encode()
    for code, text in STATUS_TEXTS.items()
}
_ODD_STATUS_JSON = json.dumps(ODD_STATUS_TEXT, ensure_ascii=False).encode()
# Tasks of the initial world were created within this span before the start.
_PAST = timedelta(days=30)
# Poisson draws stop here even at absurd rates, so `advance` always ends.
_MAX_EVENTS_PER_DRAW = 100_000
_GROUPS = tuple({"id": n, "name": f"话术组{n}"} for n in range(1, 9))
_TOPICS = ("回访", "催收提醒", "新客邀约", "满意度调查", "续费通知", "活动推广")
_SURNAMES = "王李张刘陈杨黄赵吴周徐孙"
_GIVEN_NAMES = ("伟", "芳", "娜", "敏", "静", "强", "磊", "洋", "艳", "杰", "婷")
_NON_HEX = "ghijklmnopqrstuv"


@dataclass(frozen=True)
class SimAccount:
    user_id: str
    sub_user_id: str
    name: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.user_id, self.sub_user_id)


@dataclass(slots=True)
class SimTask:
    """The ground truth of one task.

    `user_id` is always the main account; `sub_user_id` is empty for the
    main account's own tasks. `removed_at` is the latest removal, None
    while the task is live; `earlier_removals` holds the (removed, restored)
    moments of removals that were undone. `static_json` is the task's item as
    the API renders it, less the fields that change with its status.
    """

    uuid: str
    user_id: str
    sub_user_id: str
    name: str
    created_at: datetime
    removed_at: datetime | None = None
    history: list[tuple[datetime, int]] = field(default_factory=list)
    earlier_removals: list[tuple[datetime, datetime]] = field(
        default_factory=list, kw_only=True
    )
    static_json: bytes = field(kw_only=True, repr=False)

    @property
    def status(self) -> int:
        return self.history[-1][1]

    def status_at(self, moment: datetime) -> int | None:
        """The status the task had at `moment`, or None if it was not live."""
        if moment < self.created_at:
            return None
        if self.removed_at is not None and moment >= self.removed_at:
            return None
        if any(gone <= moment < back for gone, back in self.earlier_removals):
            return None
        index = bisect.bisect_right(self.history, moment, key=lambda change: change[0])
        return self.history[index - 1][1]


class Simulator:
    """A world of accounts and tasks that changes only when told to."""

    def __init__(
        self,
        seed: int = 1,
        main_accounts: int = 2,
        sub_accounts: int = 2,
        tasks_per_account: int = 20,
        token: str = "sim-token",
        timezone: str = "Asia/Shanghai",
        start: datetime = DEFAULT_START,
        max_per_page: int | None = None,
        delay: float = 0.0,
        tokens: dict[str, str] | None = None,
        *,
        quirks: bool = True,
        odd_statuses: bool = False,
        status_change_rate: float = 0.3,
        creation_rate: float = 0.02,
        removal_rate: float = 0.01,
        faults: Faults | None = None,
        record_requests: bool = False,
    ) -> None:
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        if max_per_page is not None and max_per_page < 1:
            raise ValueError("max_per_page must be at least 1")
        self.token = token
        self.zone: tzinfo = ZoneInfo(timezone)
        self.max_per_page = max_per_page
        self.delay = delay
        self.quirks = quirks
        self.odd_statuses = odd_statuses
        # Rates are per hour: status changes and removals per live task,
        # creations per live task of the account.
        self.status_change_rate = status_change_rate
        self.creation_rate = creation_rate
        self.removal_rate = removal_rate
        # Faults draw from their own seed, never from the world's generator.
        self._injector = FaultInjector(faults or Faults())
        self._served: list[Served] | None = [] if record_requests else None

        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._now = start.astimezone(UTC)
        self._accounts: dict[tuple[str, str], SimAccount] = {}
        self._profiles: dict[str, list[dict[str, Any]]] = {}
        # Per account, oldest first: creation only ever appends.
        self._live: dict[tuple[str, str], list[SimTask]] = {}
        self._tasks: dict[str, SimTask] = {}

        self._create_accounts(main_accounts, sub_accounts)
        self._tokens = self._check_tokens(tokens or {})
        for key in self._accounts:
            self._seed_tasks(key, tasks_per_account)

    # -- reading the world -------------------------------------------------

    @property
    def now(self) -> datetime:
        with self._lock:
            return self._now

    def accounts(self) -> list[SimAccount]:
        """Every main account, then the sub-accounts of each main in turn."""
        with self._lock:
            return list(self._accounts.values())

    def main_user_ids(self) -> list[str]:
        with self._lock:
            return [a.user_id for a in self._accounts.values() if not a.sub_user_id]

    def tasks(self) -> list[SimTask]:
        """Every task ever created, removed ones included."""
        with self._lock:
            return list(self._tasks.values())

    def live_tasks(self, user_id: str, sub_user_id: str = "") -> list[SimTask]:
        """The account's live tasks, newest first as the API lists them."""
        with self._lock:
            return self._live[self._account(user_id, sub_user_id).key][::-1]

    # -- changing the world ------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the clock; each event falls at a random moment in the step."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            start = self._now
            end = start + timedelta(seconds=seconds)
            for key in list(self._live):
                self._live[key] = self._step_account(key, start, end)
            self._now = end

    def set_task_status(self, uuid: str, status: int) -> None:
        """Give a live task a new status now; the same status changes nothing."""
        with self._lock:
            task = self._live_task(uuid)
            if task.status != status:
                task.history.append((self._now, status))

    def add_task(
        self,
        user_id: str,
        sub_user_id: str = "",
        *,
        name: str | None = None,
        status: int = 2,
    ) -> SimTask:
        """Create a task now, the newest of its account."""
        with self._lock:
            key = self._account(user_id, sub_user_id).key
            task = self._new_task(key, self._now, name=name, status=status)
            self._live[key].append(task)
            return task

    def remove_task(self, uuid: str) -> None:
        with self._lock:
            task = self._live_task(uuid)
            task.removed_at = self._now
            self._live[(task.user_id, task.sub_user_id)].remove(task)

    def restore_task(self, uuid: str) -> None:
        """List a removed task again, in its place by creation time."""
        with self._lock:
            task = self._tasks[uuid]
            if task.removed_at is None:
                raise ValueError(f"task {uuid!r} is not removed")
            task.earlier_removals.append((task.removed_at, self._now))
            task.removed_at = None
            live = self._live[(task.user_id, task.sub_user_id)]
            place = bisect.bisect_right(live, task.created_at, key=_creation)
            live.insert(place, task)

    def set_token(self, user_id: str, token: str) -> None:
        """Give a main account its own token, as when one is rotated."""
        with self._lock:
            self._account(user_id, "")
            self._tokens[user_id] = token

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> SimServer:
        return SimServer(self, host, port)

    # -- misbehaving on purpose --------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._injector.faults

    def set_faults(self, faults: Faults) -> None:
        """Inject these faults from now on; `Faults()` stops injecting."""
        self._injector.faults = faults

    def fault_counts(self) -> dict[str, int]:
        """How many faults of each kind were injected so far."""
        return dict(self._injector.counts)

    def take_served(self) -> list[Served]:
        """The requests answered since the last call, in order of arrival;
        empty unless the simulator was made with `record_requests=True`."""
        with self._lock:
            served = self._served or []
            if self._served is not None:
                self._served = []
            return served

    def _draw_fault(self, path: str, query: dict[str, list[str]]) -> Fault | None:
        route = _route(path)
        if route is None:
            return None
        return self._injector.draw(path, query, route[1])

    def _record(
        self,
        path: str,
        query: dict[str, list[str]],
        answer: tuple[int, bytes],
        fault: Fault | None,
    ) -> None:
        route = _route(path)
        if self._served is None or route is None:
            return
        endpoint, user_id = route
        status, body = answer
        if fault is not None and fault.body is not None:
            status = fault.status
        served = Served(
            user_id=user_id,
            sub_user_id=_first(query, "sub_user_id") or "",
            endpoint=endpoint,
            page=_to_int(_first(query, "page")),
            status=status,
            fault=fault.kind if fault else None,
            is_success=answer[0] == 200 and answer[1].startswith(SUCCESS_HEAD),
        )
        with self._lock:
            if self._served is not None:
                self._served.append(served)

    # -- building the world ------------------------------------------------

    def _create_accounts(self, mains: int, subs: int) -> None:
        # Main ids are drawn first so that they depend on the seed alone:
        # a caller can learn them from a tiny world to build `tokens`.
        main_ids = [_uuid_text(self._rng) for _ in range(mains)]
        for number, user_id in enumerate(main_ids, start=1):
            self._accounts[(user_id, "")] = SimAccount(user_id, "", f"主账号{number}")

        for user_id in main_ids:
            profiles = [self._draw_profile() for _ in range(subs)]
            self._profiles[user_id] = profiles
            for profile in profiles:
                sub = SimAccount(user_id, profile["id"], profile["name"])
                self._accounts[sub.key] = sub
        self._live = {key: [] for key in self._accounts}

    def _draw_profile(self) -> dict[str, Any]:
        rng = self._rng
        created = self._now - _PAST * (1 + rng.random())
        updated = created + (self._now - created) * rng.random()
        return {
            "id": _uuid_text(rng),
            "name": _pick(rng, _SURNAMES) + _pick(rng, _GIVEN_NAMES),
            "phone": f"1{_pick(rng, '3578')}{_pick(rng, range(10**9)):09d}",
            "email": f"user{_pick(rng, range(10**6)):06d}@example.com",
            "created_at": _local_text(created, self.zone),
            "updated_at": _local_text(updated, self.zone),
        }

    def _check_tokens(self, tokens: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(tokens) - set(self.main_user_ids()))
        if unknown:
            raise ValueError(f"tokens name unknown main accounts: {unknown}")
        return dict(tokens)

    def _seed_tasks(self, key: tuple[str, str], count: int) -> None:
        since = self._now - _PAST
        offsets = sorted(self._rng.random() for _ in range(count))
        for offset in offsets:
            created = since + _PAST * offset
            task = self._new_task(key, created)
            # An earlier change gives some tasks an alter_datetime from the start.
            if self._rng.random() < 0.5:
                moment = created + (self._now - created) * self._rng.random()
                task.history.append((moment, self._next_status(task.status)))
            self._live[key].append(task)

    def _new_task(
        self,
        key: tuple[str, str],
        created: datetime,
        *,
        name: str | None = None,
        status: int | None = None,
    ) -> SimTask:
        user_id, sub_user_id = key
        local = created.astimezone(self.zone)
        item = _draw_item(self._rng, sub_user_id or user_id, local, self.quirks)
        if name is not None:
            item["name"] = name
        first_status = self._first_status() if status is None else status
        task = SimTask(
            uuid=item["uuid"],
            user_id=user_id,
            sub_user_id=sub_user_id,
            name=item["name"],
            created_at=created,
            history=[(created, first_status)],
            static_json=_encode(item),
        )
        self._tasks[task.uuid] = task
        return task

    def _first_status(self) -> int:
        if self.odd_statuses and self._rng.random() < 0.03:
            return ODD_STATUS
        return _pick(self._rng, (1, 1, 2, 2, 2, 3, 3))

    def _next_status(self, current: int) -> int:
        if self.odd_statuses and self._rng.random() < 0.03:
            return ODD_STATUS
        return _pick(self._rng, [s for s in STATUS_TEXTS if s != current])

    # -- moving the clock --------------------------------------------------

    def _step_account(
        self, key: tuple[str, str], start: datetime, end: datetime
    ) -> list[SimTask]:
        live = self._live[key]
        span = (end - start).total_seconds()
        for task in live:
            self._step_task(task, start, span)

        born = []
        births = self._event_offsets(self.creation_rate * max(len(live), 1), span)
        for offset in births:
            created = start + timedelta(seconds=offset)
            task = self._new_task(key, created)
            self._step_task(task, created, span - offset)
            born.append(task)
        return [task for task in live + born if task.removed_at is None]

    def _step_task(self, task: SimTask, since: datetime, span: float) -> None:
        removals = self._event_offsets(self.removal_rate, span, limit=1)
        horizon = removals[0] if removals else span
        for offset in self._event_offsets(self.status_change_rate, horizon):
            moment = since + timedelta(seconds=offset)
            task.history.append((moment, self._next_status(task.status)))
        if removals:
            task.removed_at = since + timedelta(seconds=horizon)

    def _event_offsets(
        self, per_hour: float, span: float, limit: int = _MAX_EVENTS_PER_DRAW
    ) -> list[float]:
        """Seconds into a span at which a Poisson process of `per_hour` fires."""
        if per_hour <= 0 or span <= 0:
            return []
        rate = per_hour / 3600
        offsets: list[float] = []
        offset = 0.0
        for _ in range(limit):
            offset += self._rng.expovariate(rate)
            if offset >= span:
                break
            offsets.append(offset)
        return offsets

    # -- lookups -----------------------------------------------------------

    def _account(self, user_id: str, sub_user_id: str) -> SimAccount:
        account = self._accounts.get((user_id, sub_user_id))
        if account is None:
            raise KeyError(f"no account {user_id!r} / {sub_user_id!r}")
        return account

    def _live_task(self, uuid: str) -> SimTask:
        task = self._tasks.get(uuid)
        if task is None:
            raise KeyError(f"no task {uuid!r}")
        if task.removed_at is not None:
            raise ValueError(f"task {uuid!r} was removed")
        return task

    # -- answering requests ------------------------------------------------

    def _answer(
        self, path: str, query: dict[str, list[str]], authorization: str | None
    ) -> tuple[int, bytes]:
        """The HTTP status and JSON body for one GET."""
        route = _route(path)
        if route is None:
            return 404, _error(404, "接口不存在")
        endpoint, user_id = route

        with self._lock:
            expected = self._tokens.get(user_id, self.token)
            if not _is_bearer(authorization, expected):
                return 401, _error(401, "Unauthenticated.")
            # The platform's answer to an unknown account is not documented;
            # this one mimics its business codes inside an HTTP 200.
            if (user_id, "") not in self._accounts:
                return 200, _error(404, "用户不存在")
            if endpoint == "subset_users":
                return 200, self._sub_account_page(user_id, query)
            return 200, self._task_page(user_id, query)

    def _task_page(self, user_id: str, query: dict[str, list[str]]) -> bytes:
        sub_user_id = _first(query, "sub_user_id") or ""
        tasks = self._live.get((user_id, sub_user_id))
        if tasks is None:
            return _error(404, "子账号不存在")

        name = _first(query, "name")
        statuses = _status_filter(query)
        if name or statuses is not None:
            tasks = [t for t in tasks if _matches(t, name, statuses)]

        page, per_page, shown = self._paging(query)
        chosen = _newest_first(tasks, page, per_page)
        items = [_render(task, self.zone) for task in chosen]
        return _envelope(items, len(tasks), page, per_page, shown)

    def _sub_account_page(self, user_id: str, query: dict[str, list[str]]) -> bytes:
        profiles = self._profiles[user_id]
        page, per_page, shown = self._paging(query)
        first = (page - 1) * per_page
        items = [_encode(p) for p in profiles[first : first + per_page]]
        return _envelope(items, len(profiles), page, per_page, shown)

    def _paging(self, query: dict[str, list[str]]) -> tuple[int, int, int | str]:
        """Page, effective page size, and the page size as meta shows it."""
        page = _to_int(_first(query, "page"))
        asked = _first(query, "per_page")
        per_page = _to_int(asked)
        if per_page is None or per_page < 1:
            per_page = DEFAULT_PER_PAGE
        if self.max_per_page is not None:
            per_page = min(per_page, self.max_per_page)
        # Examples show a string when the caller passed per_page, else an int.
        shown: int | str = per_page if asked is None else str(per_page)
        return (page if page and page > 0 else 1), per_page, shown


class SimServer:
    """The simulator served over HTTP on a background thread."""

    def __init__(self, simulator: Simulator, host: str, port: int) -> None:
        self._httpd = _HttpServer((host, port), simulator)
        self.port: int = self._httpd.server_port
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"simulator-{self.port}",
            daemon=True,
        )
        self._thread.start()
        self._closed = False

    @property
    def requests(self) -> int:
        return self._httpd.request_count()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.drop_connections()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> SimServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], simulator: Simulator) -> None:
        super().__init__(address, _Handler)
        self.simulator = simulator
        self._guard = threading.Lock()
        self._requests = 0
        self._connections: set[socket.socket] = set()

    def count_request(self) -> None:
        with self._guard:
            self._requests += 1

    def request_count(self) -> int:
        with self._guard:
            return self._requests

    def track(self, connection: socket.socket, is_open: bool) -> None:
        with self._guard:
            if is_open:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def drop_connections(self) -> None:
        """End kept-alive connections, whose threads would otherwise serve on."""
        with self._guard:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    # Keep-alive lets a benchmark reuse one connection; without TCP_NODELAY
    # the separate header and body writes would wait on delayed ACKs.
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    # An idle kept-alive connection frees its thread after this many seconds.
    timeout = 30

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def do_GET(self) -> None:
        self.server.count_request()
        simulator = self.server.simulator
        if simulator.delay > 0:
            time.sleep(simulator.delay)

        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        authorization = self.headers.get("Authorization")
        fault = simulator._draw_fault(parts.path, query)
        answer = simulator._answer(parts.path, query, authorization)
        simulator._record(parts.path, query, answer, fault)
        try:
            if fault is None:
                self._send(*answer)
            else:
                self._send_faulty(fault, *answer)
        except OSError:
            # The client gave up waiting, as after a stall: that is its right.
            self.close_connection = True

    def refuse(self) -> None:
        self.server.count_request()
        # A body we did not read would be parsed as the next request.
        self.close_connection = True
        self._send(405, _error(405, "Method Not Allowed"))

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = refuse
    do_OPTIONS = do_TRACE = do_CONNECT = refuse

    def _send(
        self, status: int, data: bytes, fault: Fault | None = None, length: int = -1
    ) -> None:
        headers = dict(fault.headers) if fault else {}
        content_type = headers.pop("Content-Type", "application/json; charset=utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data) if length < 0 else length))
        for name, value in headers.items():
            self.send_header(name, value)
        if status == 405:
            self.send_header("Allow", "GET")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_faulty(self, fault: Fault, status: int, body: bytes) -> None:
        if fault.body is not None:
            status = fault.status
        body = fault.apply(body)
        cut = fault.cut_at(body)
        if fault.stall and not fault.cut:
            time.sleep(fault.stall)
            # The client has given up on this connection by now.
            self.close_connection = True
            self._send(status, body, fault)
        elif fault.kind == "truncated":
            # A well-formed HTTP answer whose JSON is cut short.
            self._send(status, body[:cut], fault)
        elif fault.kind in ("reset", "stall"):
            # The head promises the whole body; only part of it comes.
            self.close_connection = True
            self._send(status, body[:cut], fault, length=len(body))
            if fault.kind == "stall":
                time.sleep(fault.stall)
                self.wfile.write(body[cut:])
            else:
                self._reset()
        else:
            self._send(status, body, fault)

    def _reset(self) -> None:
        """Drop the connection with a TCP reset rather than an orderly close."""
        self.connection.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.connection.close()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay silent: a line per request would drown tests and benchmarks."""


def run(
    seed: int,
    port: int,
    host: str = "127.0.0.1",
    tick: float = 0.0,
    step: float = 300.0,
    **sim_options: Any,
) -> None:
    """Serve a simulator until interrupted, advancing `step` every `tick`."""
    simulator = Simulator(seed=seed, **sim_options)
    with simulator.serve(host, port) as server:
        _announce(simulator, server)
        try:
            while True:
                time.sleep(tick if tick > 0 else 1.0)
                if tick > 0:
                    simulator.advance(step)
        except KeyboardInterrupt:
            pass


def _announce(simulator: Simulator, server: SimServer) -> None:
    print(
        f"Serving the platform simulator at {server.url} (token "
        f"{simulator.token!r}); Ctrl-C stops it. Accounts:",
        flush=True,
    )
    for account in simulator.accounts():
        where = f"user_id {account.user_id}"
        if account.sub_user_id:
            where += f" sub_user_id {account.sub_user_id}"
        print(f"  {account.name}: {where}", flush=True)
    if simulator.faults.is_active:
        print(f"Injecting faults: {simulator.faults.describe()}", flush=True)


# -- rendering ---------------------------------------------------------------


def _draw_item(
    rng: random.Random, owner: str, created: datetime, quirks: bool
) -> dict[str, Any]:
    """The fixed fields of a new task's item; `created` is local time.

    Every roll is drawn whether quirks are on or off, so switching them off
    yields the same world with clean items.
    """

    def odd(share: float) -> bool:
        roll = rng.random()
        return quirks and roll < share

    task_uuid = _uuid_text(rng)
    caller_line_id = _uuid_text(rng)
    group = _pick(rng, _GROUPS)
    group_roll = rng.random()
    maximumcall = _pick(rng, range(1, 6))
    dial_time_id = _pick(rng, range(1500, 1511))
    bridge_group_id = _pick(rng, range(1, 7))
    enabled = rng.random() < 0.9
    remark_roll = rng.random()
    name = f"{_pick(rng, _TOPICS)}-{created:%m%d}-{_pick(rng, range(1, 100)):02d}"
    secret = f"{rng.getrandbits(64):016x}"
    host = f"10.0.{_pick(rng, range(10))}.5"
    caller_number = f"0{_pick(rng, range(10**10)):010d}" if rng.random() < 0.5 else ""
    return {
        "uuid": _malform(task_uuid) if odd(0.05) else task_uuid,
        "name": name,
        "create_datetime": created.strftime(_TIME_FORMAT),
        "maximumcall": str(maximumcall) if odd(0.05) else maximumcall,
        "dial_time_id": str(dial_time_id) if odd(0.03) else dial_time_id,
        # The doc calls this the script group's id; 2.0 examples send a string.
        "destination_extension": str(group["id"]) if odd(0.3) else group["id"],
        "caller_line_id": _malform(caller_line_id) if odd(0.1) else caller_line_id,
        "bridge_group_id": str(bridge_group_id) if odd(0.05) else bridge_group_id,
        "group": _odd_group(group_roll, group) if quirks else group,
        "start": _pick(rng, (0, 1)),
        "enable": int(enabled) if odd(0.03) else enabled,
        "call_per_second": _pick(rng, range(1, 11)),
        "remark": _remark(remark_roll, quirks),
        "sort": _pick(rng, range(4)),
        "user_id": owner,
        "_origination_caller_id_number": caller_number,
        "_originate_timeout": _pick(rng, (30, 45, 60)),
        "call_notify_url": f"http://{host}/cb?key={secret}",
        "destination_dialplan": "XML",
        "destination_context": "default",
        "dial_format": "",
        "auto_recycle_rule_id": _pick(rng, (None, 1, 2, 3)),
        "deleted_at": None,
    }


def _creation(task: SimTask) -> datetime:
    return task.created_at


def _pick(rng: random.Random, options: Sequence[T]) -> T:
    """`rng.choice` at a fraction of its cost, which counts in a large world."""
    return options[int(rng.random() * len(options))]


def _odd_group(roll: float, group: dict[str, Any]) -> dict[str, Any] | None:
    if roll < 0.02:
        return None
    if roll < 0.04:
        return {}
    return group


def _remark(roll: float, quirks: bool) -> str | None:
    if roll >= 0.95:
        return "客户要求晚上不要打"
    if quirks and roll >= 0.85:
        return ""
    return None


def _render(task: SimTask, zone: tzinfo) -> bytes:
    """The task's item: its static JSON with the status fields appended."""
    status = task.status
    altered = b"null"
    if len(task.history) > 1:
        altered = b'"%s"' % _local_text(task.history[-1][0], zone).encode()
    text = _STATUS_JSON.get(status, _ODD_STATUS_JSON)
    return b'%s,"status":%d,"status_str":%s,"alter_datetime":%s}' % (
        task.static_json[:-1],
        status,
        text,
        altered,
    )


def _encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _local_text(moment: datetime, zone: tzinfo) -> str:
    return moment.astimezone(zone).strftime(_TIME_FORMAT)


def _uuid_text(rng: random.Random) -> str:
    digits = f"{rng.getrandbits(128):032x}"
    variant = "89ab"[int(digits[16], 16) & 3]
    return (
        f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-"
        f"{variant}{digits[17:20]}-{digits[20:]}"
    )


def _malform(identifier: str) -> str:
    """Break an id the two ways the platform's own examples do.

    Derived from the id itself rather than drawn, so quirks do not shift the
    random stream.
    """
    groups = identifier.split("-")
    if int(identifier[0], 16) % 2:
        groups[3] = groups[3][1:]
    else:
        groups[2] = _NON_HEX[int(identifier[1], 16)] + groups[2][1:]
    return "-".join(groups)


# -- requests ----------------------------------------------------------------


def _route(path: str) -> tuple[str, str] | None:
    """The endpoint and main user id of a path this simulator serves."""
    parts = path.split("/")
    if len(parts) != 5 or parts[:3] != ["", "agent-api", "user"] or not parts[3]:
        return None
    if parts[4] not in ("task", "subset_users"):
        return None
    return parts[4], unquote(parts[3])


def _is_bearer(authorization: str | None, expected: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


def _first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def _to_int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _status_filter(query: dict[str, list[str]]) -> frozenset[int] | None:
    """The statuses asked for, or None when the server lists every status.

    The doc says an array holding a value outside 1..3 makes the server
    ignore the filter. A single value filters as given, unknown codes
    included; one that is not a number is ignored.
    """
    keys = [k for k in query if k == "status" or k.startswith("status[")]
    texts = [text for key in keys for text in query[key] if text != ""]
    if not texts:
        return None
    codes = [_to_int(text) for text in texts]
    is_array = len(texts) > 1 or keys != ["status"]
    if is_array and any(code not in STATUS_TEXTS for code in codes):
        return None
    return frozenset(code for code in codes if code is not None) or None


def _matches(task: SimTask, name: str | None, statuses: frozenset[int] | None) -> bool:
    if name and name.casefold() not in task.name.casefold():
        return False
    return statuses is None or task.status in statuses


def _newest_first(tasks: list[SimTask], page: int, per_page: int) -> list[SimTask]:
    """One page of an oldest-first list, read from its newest end."""
    stop = len(tasks) - (page - 1) * per_page
    if stop <= 0:
        return []
    return tasks[max(0, stop - per_page) : stop][::-1]


def _envelope(
    items: list[bytes], total: int, page: int, per_page: int, shown: int | str
) -> bytes:
    last_page = max(1, math.ceil(total / per_page))
    head = {
        "code": 200,
        "status": "success",
        "message": "获取成功",
        "meta": {
            "has_pages": last_page > 1,
            "total": total,
            "last_page": last_page,
            "current_page": page,
            "per_page": shown,
        },
    }
    # Items arrive encoded, so the list is spliced in rather than dumped.
    return b'%s,"data":[%s]}' % (_encode(head)[:-1], b",".join(items))


def _error(code: int, message: str) -> bytes:
    return _encode({"code": code, "status": "error", "message": message})
