"""The client against small scripted HTTP servers on loopback.

Each server answers from a script (status, headers, body, delay) and records
what it was asked. Only clocks and sleeps are faked: sleeps are recorded
instead of slept, so retries cost no time.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from etl.accounts import Account
from etl.client import SEND_LAG, Client, RateLimiter
from etl.config import ApiConfig
from etl.errors import ApiError, FatalApiError, PageLimitError, RetryableApiError

pytestmark = pytest.mark.timeout(15)

TOKEN = "tok-5ecret-0123456789"
CALLBACK = "http://10.9.8.7:8080/hooks/calls?key=private-hook-key"
TASKS = "/agent-api/user/{user_id}/task"
MAIN = Account("u1")


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    length: int | None = None  # a Content-Length to claim, to cut the body short


@dataclass
class Seen:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    target: str = ""  # the path and query as the request line gave them

    @property
    def page(self) -> int:
        return int(self.query["page"][0])


class Platform:
    """What the scripted server answers, and what it was asked."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[Seen] = []
        self.lock = threading.Lock()
        self.respond: Callable[[Seen], Reply] = lambda seen: Reply(500)

    def script(self, *replies: Reply) -> None:
        """Answer with these replies in order, then with HTTP 500."""
        queue = list(replies)
        self.respond = lambda seen: queue.pop(0) if queue else Reply(500)

    def serve_pages(self, bodies: Sequence[bytes]) -> None:
        """Answer page n with bodies[n - 1], and pages past them empty."""

        def respond(seen: Seen) -> Reply:
            number = seen.page
            if number <= len(bodies):
                return Reply(body=bodies[number - 1])
            return Reply(body=envelope([]))

        self.respond = respond


def _handler(platform: Platform) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # answer at once, not after a delayed ACK

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            headers = {name.lower(): value for name, value in self.headers.items()}
            seen = Seen(url.path, parse_qs(url.query), headers, self.path)
            with platform.lock:
                platform.requests.append(seen)
                reply = platform.respond(seen)
            time.sleep(reply.delay)
            try:
                self._send(reply)
            except OSError:
                pass  # the client stopped waiting: a timeout test

        def _send(self, reply: Reply) -> None:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            length = len(reply.body) if reply.length is None else reply.length
            self.send_header("Content-Length", str(length))
            if reply.length is not None:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(reply.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Test traffic stays on loopback even where a proxy is configured.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def platform() -> Iterator[Platform]:
    fake = Platform()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_port}"
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def connect(platform: Platform, sleeps: list[float]) -> Iterator[Callable[..., Client]]:
    """Makes clients of the scripted platform; closes them afterwards."""
    clients: list[Client] = []

    def make(tokens: dict[str, str] | None = None, **overrides: Any) -> Client:
        settings: dict[str, Any] = {
            "base_url": platform.url,
            "token": TOKEN,
            "connect_timeout": 2.0,
            "read_timeout": 2.0,
            "max_retries": 2,
            "backoff_initial": 0.5,
            "backoff_max": 4.0,
            "retry_after_max": 60.0,
            "max_pages": 50,
        }
        settings.update(overrides)
        client = Client(
            ApiConfig(**settings),
            tokens,
            sleep=sleeps.append,
            rng=random.Random(7),
            limiter=RateLimiter(10_000),
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def envelope(data: Any, meta: Any = None, **fields: Any) -> bytes:
    body: dict[str, Any] = {"code": 200, "status": "success", "message": "成功"}
    body["data"] = data
    if meta is not None:
        body["meta"] = meta
    body.update(fields)
    return json.dumps(body, ensure_ascii=False).encode()


def task(number: int) -> dict[str, Any]:
    return {
        "uuid": f"task-{number}",
        "name": f"任务{number}",
        "status": 2,
        "call_notify_url": CALLBACK,
    }


def page(numbers: range | None, meta: dict[str, Any] | None = None) -> bytes:
    data = None if numbers is None else [task(n) for n in numbers]
    return envelope(data, meta)


def meta(total: Any, last_page: Any = None, per_page: Any = "15") -> dict[str, Any]:
    return {
        "has_pages": True,
        "total": total,
        "last_page": last_page,
        "current_page": 1,
        "per_page": per_page,
    }


def get(client: Client, account: Account = MAIN) -> dict[str, Any]:
    envelope, _ = client.get_envelope(TASKS, account, {"per_page": 5}, page=1)
    return envelope


def closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Requests


def test_sends_bearer_token_and_json_content_type(platform, connect):
    platform.script(Reply(body=envelope([task(1)])))

    assert get(connect())["data"] == [task(1)]

    [seen] = platform.requests
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.path == "/agent-api/user/u1/task"
    assert seen.query == {"per_page": ["5"], "page": ["1"]}


def test_uses_the_token_of_the_main_account_when_one_is_given(platform, connect):
    platform.script(Reply(body=envelope([])), Reply(body=envelope([])))
    client = connect(tokens={"u2": "tok-of-u2"})

    get(client, Account("u2", "s9"))
    get(client, MAIN)

    assert [seen.headers["authorization"] for seen in platform.requests] == [
        "Bearer tok-of-u2",
        f"Bearer {TOKEN}",
    ]


def test_goes_through_the_proxy_the_environment_names(platform, connect, monkeypatch):
    # The platform's address refuses connections: only the proxy answers.
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTP_PROXY", platform.url)
    platform.script(Reply(body=envelope([])), Reply(body=envelope([])))
    target = f"http://127.0.0.1:{closed_port()}"
    client = connect(base_url=target)

    get(client)
    # Read when the client started, as requests did before every request;
    # a change of the environment after that is not seen.
    monkeypatch.delenv("HTTP_PROXY")
    get(client)

    assert [seen.headers["host"] for seen in platform.requests] == [
        target.removeprefix("http://")
    ] * 2
    assert platform.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_a_host_the_environment_exempts_is_not_proxied(platform, connect, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    platform.script(Reply(body=envelope([])))

    get(connect())

    assert len(platform.requests) == 1


PROXY_NOTE = (
    "through the {} proxy that the environment names (HTTPS_PROXY, HTTP_PROXY"
    " or ALL_PROXY)"
)


def test_a_proxy_that_refuses_is_named_without_its_password(connect, monkeypatch):
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTP_PROXY", f"http://ops:s3cret@127.0.0.1:{closed_port()}")

    with pytest.raises(RetryableApiError) as raised:
        get(connect())

    message = str(raised.value)
    assert "the connection failed (ProxyError), " + PROXY_NOTE.format("http") in (
        message
    )
    assert "s3cret" not in message and "ops" not in message


def test_a_socks_proxy_without_pysocks_says_what_it_needs(connect, monkeypatch):
    # requests alone said "Missing dependencies for SOCKS support".
    assert importlib.util.find_spec("socks") is None, "the tests install no PySocks"
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("ALL_PROXY", f"socks5h://ops:s3cret@127.0.0.1:{closed_port()}")

    with pytest.raises(FatalApiError) as raised:
        get(connect())

    message = str(raised.value)
    assert message.endswith(
        "the request could not be sent (InvalidSchema), "
        + PROXY_NOTE.format("socks5h")
        + ", which needs PySocks: pip install 'requests[socks]'"
    )
    assert "s3cret" not in message


@pytest.mark.parametrize(
    ("reply", "said"),
    [
        (Reply(body=b'{"code":', length=100), "the connection failed (ProtocolError)"),
        (Reply(407), "HTTP 407: a proxy asked for credentials"),
        (Reply(502), "HTTP 502: the platform failed"),
    ],
)
def test_what_goes_wrong_behind_a_proxy_names_it(
    platform, connect, monkeypatch, reply, said
):
    monkeypatch.delenv("NO_PROXY")
    proxy = platform.url.replace("http://", "http://ops:s3cret@")
    monkeypatch.setenv("HTTP_PROXY", proxy)
    platform.respond = lambda seen: reply
    client = connect(base_url=f"http://127.0.0.1:{closed_port()}", max_retries=0)

    with pytest.raises(ApiError) as raised:
        get(client)

    message = str(raised.value)
    assert f"{said}, {PROXY_NOTE.format('http')}" in message
    assert "s3cret" not in message
    if reply.status != 407:  # the others are worth asking again
        assert message.endswith("; gave up after 1 try")


@pytest.mark.parametrize(
    ("setting", "kind"),
    [
        # Neither begins with a scheme: nothing of them is named.
        ("ops:pa://s3cret@127.0.0.1:{port}", "proxy"),
        ("127.0.0.1:{port}/?next=http://x", "proxy"),
        (" HTTP://ops:s3cret@127.0.0.1:{port}", "proxy"),
        # A word before "://" that no proxy scheme is could be a user name.
        ("s3cret://ops@127.0.0.1:{port}", "proxy"),
        # requests fails on it with a TypeError, not one of its errors.
        ("http://ops:s3cret@", "http proxy"),
    ],
)
def test_an_odd_proxy_setting_fails_in_one_line_without_its_address(
    connect, monkeypatch, setting, kind
):
    monkeypatch.delenv("NO_PROXY")
    port = str(closed_port())
    monkeypatch.setenv("HTTP_PROXY", setting.format(port=port))

    with pytest.raises(ApiError) as raised:
        get(connect(max_retries=0))

    message = str(raised.value)
    assert f", through the {kind} that the environment names (" in message
    assert "\n" not in message
    for secret in ("s3cret", "ops", port, "next"):
        assert secret not in message


def test_a_proxy_that_wants_credentials_for_a_tunnel_is_not_asked_again(
    connect, monkeypatch
):
    # The platform is reached over TLS, through a tunnel the proxy opens.
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        monkeypatch.delenv("NO_PROXY")
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        refusing = threading.Thread(target=refuse_tunnels, args=(proxy, 1))
        refusing.start()
        client = connect(base_url="https://platform.invalid", max_retries=3)

        with pytest.raises(FatalApiError) as raised:
            get(client)
        refusing.join(timeout=10)

    assert str(raised.value).endswith(
        "a proxy asked for credentials (ProxyError), " + PROXY_NOTE.format("http")
    )


def test_a_proxy_dripping_its_answer_to_connect_is_cut_short(connect, monkeypatch):
    # Before any request is sent on it, a TLS connection through a proxy
    # reads the proxy's answer to CONNECT, each byte within the read
    # timeout: the walk waited for it until the run's deadline.
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        monkeypatch.delenv("NO_PROXY")
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        dripping = threading.Thread(target=drip_tunnels, args=(proxy, 2))
        dripping.start()
        client = connect(
            base_url="https://platform.invalid",
            connect_timeout=0.5,
            read_timeout=0.3,
            max_retries=1,
        )
        began = time.monotonic()

        with pytest.raises(RetryableApiError) as raised:
            get(client)
        took = time.monotonic() - began
        dripping.join(timeout=30)

    assert "the answer did not arrive whole in 1.1 s" in str(raised.value)
    # Each answer to CONNECT would take 20 s.
    assert took < 6, f"took {took:.1f} s"


def drip_tunnels(proxy: socket.socket, count: int) -> None:
    """Answer `count` CONNECT requests a byte every 10 ms, 20 s each."""
    answer = b"HTTP/1.1 200 Connection established\r\nX-Padding: " + b"x" * 2000
    proxy.settimeout(10)
    for _ in range(count):
        connection, _ = proxy.accept()
        with connection:
            connection.recv(65536)
            try:
                for offset in range(len(answer)):
                    connection.sendall(answer[offset : offset + 1])
                    time.sleep(0.01)
            except OSError:
                pass  # the client gave up: the test's point


def refuse_tunnels(proxy: socket.socket, count: int) -> None:
    """Answer `count` CONNECT requests with 407, as a proxy wanting a login."""
    proxy.settimeout(10)
    for _ in range(count):
        connection, _ = proxy.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b"Proxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n"
            )


def test_adds_sub_user_id_and_quotes_user_id(platform, connect):
    platform.script(Reply(body=envelope([])))

    get(connect(), Account("a b/c", "sub-7"))

    [seen] = platform.requests
    assert seen.path == "/agent-api/user/a%20b%2Fc/task"
    assert seen.query["sub_user_id"] == ["sub-7"]


def test_asks_for_the_very_url_requests_would_send(platform, connect):
    # The client prepares its requests without requests' session; the
    # path and every parameter must still be encoded as requests does.
    platform.script(Reply(body=envelope([])))
    account = Account("a b/ü", "sub 7&x=1#")
    name = "回访 ~!*'()+%/?"

    client = connect()
    walk = client.walk_tasks(account, name=name, statuses=[1, 3])
    assert [page.items for page in walk] == [()]

    [seen] = platform.requests
    params = {
        "per_page": client.api.page_size,
        "name": name,
        "status": [1, 3],
        "page": 1,
        "sub_user_id": "sub 7&x=1#",
    }
    url = f"{platform.url}/agent-api/user/a%20b%2F%C3%BC/task"
    expected = requests.Request("GET", url, params=params).prepare().path_url
    path, _, query = seen.target.partition("?")
    expected_path, _, expected_query = expected.partition("?")
    assert path == expected_path
    assert sorted(query.split("&")) == sorted(expected_query.split("&"))


@pytest.mark.parametrize(
    "endpoint",
    [
        "/agent-api/user/{user_id}/task_stop/42",
        "/agent-api/new/user/{user_id}/copy/task/42",
        "/agent-api/user/{user_id}/task/../task_stop/42",
    ],
    ids=["pause-task", "copy-task", "dot-dot"],
)
def test_refuses_an_endpoint_off_the_allow_list_without_calling(
    platform, connect, endpoint
):
    with pytest.raises(FatalApiError, match="allow-listed"):
        connect().get_envelope(endpoint, MAIN, {}, page=None)

    assert platform.requests == []


@pytest.mark.parametrize("user_id", ["", ".", ".."])
def test_refuses_an_account_id_that_would_change_the_path(platform, connect, user_id):
    with pytest.raises(FatalApiError, match="not an account id"):
        list(connect().walk_tasks(Account(user_id, "")))

    assert platform.requests == []


def test_refuses_an_unknown_status_filter_without_calling(platform, connect):
    with pytest.raises(FatalApiError, match=r"unknown task status \[4\]"):
        connect().walk_tasks(MAIN, statuses=[1, 4])

    assert platform.requests == []


def test_sends_filters_and_page_size(platform, connect):
    platform.serve_pages([page(range(3))])

    walk = connect(page_size=20).walk_tasks(MAIN, name="spring", statuses=[1, 3])
    list(walk)

    assert platform.requests[0].query == {
        "per_page": ["20"],
        "name": ["spring"],
        "status": ["1", "3"],
        "page": ["1"],
    }


def test_does_not_follow_a_redirect(platform, connect):
    platform.script(Reply(302, headers={"Location": "/agent-api/user/u1/task_stop/1"}))

    with pytest.raises(FatalApiError, match="redirect"):
        get(connect())

    assert len(platform.requests) == 1


@pytest.mark.parametrize(
    "reply",
    [
        Reply(302, b"not gzip", {"Location": "/x", "Content-Encoding": "gzip"}),
        Reply(307, b"short", {"Location": "/x"}, length=100),
        Reply(301, b"x" * (17 * 2**20), {"Location": "/x"}),
    ],
    ids=["broken-gzip", "cut-short", "larger-than-any-page"],
)
def test_a_redirect_is_refused_whatever_its_body(platform, connect, reply):
    # Its body is never read: a broken one must not pass for a failed
    # connection, retried, with the redirect unnamed.
    platform.script(reply)

    with pytest.raises(FatalApiError, match="redirected the request") as raised:
        get(connect())

    assert raised.value.status == reply.status
    assert len(platform.requests) == 1


def test_serves_several_threads_at_once(platform, connect):
    platform.respond = lambda seen: Reply(body=envelope([task(1)]), delay=0.05)
    client = connect(parallelism=4)
    results: list[Any] = []

    def call() -> None:
        results.append(get(client)["data"])

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)

    assert results == [[task(1)]] * 8


# Retries


def test_waits_as_retry_after_says_then_succeeds(platform, connect, sleeps):
    limited = Reply(429, b"slow down", {"Retry-After": "2"})
    platform.script(limited, limited, Reply(body=envelope([task(1)])))

    assert get(connect())["data"] == [task(1)]

    assert sleeps == [2, 2]
    assert len(platform.requests) == 3


@pytest.mark.parametrize(
    ("retry_after", "low", "high"),
    [
        ("7", 7, 7),
        (30.0, 28, 30),
        ("3600", 60, 60),
        (86_400.0, 60, 60),
        (-60.0, 0, 0),
        ("soon", 0, 0.5),
    ],
    ids=["seconds", "http-date", "over-cap", "date-over-cap", "past-date", "garbage"],
)
def test_honours_retry_after_within_the_cap(
    platform, connect, sleeps, retry_after, low, high
):
    if isinstance(retry_after, float):  # an HTTP-date this many seconds away
        when = datetime.now(UTC) + timedelta(seconds=retry_after)
        retry_after = format_datetime(when, usegmt=True)
    platform.script(
        Reply(503, b"busy", {"Retry-After": retry_after}), Reply(body=envelope([]))
    )

    get(connect(retry_after_max=60.0))

    [slept] = sleeps
    assert low <= slept <= high


def test_backs_off_exponentially_with_jitter(platform, connect, sleeps):
    platform.script(*[Reply(500, b"oops")] * 5, Reply(body=envelope([])))

    get(connect(max_retries=5, backoff_initial=0.5, backoff_max=4.0))

    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0]
    assert len(sleeps) == 5
    assert all(0 <= s <= c for s, c in zip(sleeps, ceilings, strict=True))


def test_gives_up_on_a_502_html_page_naming_where(platform, connect, sleeps):
    html = Reply(
        502, b"<html><body>Bad Gateway</body></html>", {"Content-Type": "text/html"}
    )
    platform.script(html, html, html)

    with pytest.raises(RetryableApiError) as caught:
        get(connect(max_retries=2))

    message = str(caught.value)
    for part in ("account u1", f"endpoint {TASKS}", "page 1", "HTTP 502", "3 tries"):
        assert part in message
    assert caught.value.status == 502
    assert len(platform.requests) == 3
    assert len(sleeps) == 2


@pytest.mark.parametrize(
    "reply",
    [
        Reply(body=b"<html>maintenance</html>"),
        Reply(body=b'{"code": 200, "status": "succ'),
        Reply(body=b'{"code": 200, "status": "success", "data": []}', length=500),
        Reply(body=b""),
        Reply(body=envelope(None, code=503, status="error")),
        Reply(body=envelope(None, code="429", status="error")),
    ],
    ids=[
        "not-json",
        "truncated-json",
        "body-cut-short",
        "empty-body",
        "envelope-code-503",
        "envelope-code-429",
    ],
)
def test_retries_a_bad_200_then_gives_up(platform, connect, sleeps, reply):
    platform.script(reply, reply)

    with pytest.raises(RetryableApiError, match="gave up after 2 tries"):
        get(connect(max_retries=1))

    assert len(platform.requests) == 2
    assert len(sleeps) == 1


def test_retries_a_stalled_read_then_gives_up(platform, connect, sleeps):
    stalled = Reply(body=envelope([]), delay=1.0)
    platform.script(stalled, stalled)
    started = time.monotonic()

    with pytest.raises(RetryableApiError, match="ReadTimeout"):
        get(connect(read_timeout=0.3, max_retries=1))

    assert time.monotonic() - started < 3
    assert len(platform.requests) == 2
    assert len(sleeps) == 1


def test_retries_a_refused_connection_then_gives_up(sleeps):
    api = ApiConfig(
        base_url=f"http://127.0.0.1:{closed_port()}", token=TOKEN, max_retries=2
    )

    with Client(api, sleep=sleeps.append, limiter=RateLimiter(10_000)) as client:
        with pytest.raises(RetryableApiError, match="ConnectionError"):
            get(client)

    assert len(sleeps) == 2


# Fatal answers


@pytest.mark.parametrize("status", [401, 403], ids=["401", "403"])
def test_http_token_refusal_is_fatal_and_hides_the_token(platform, connect, status):
    body = json.dumps({"message": f"token {TOKEN} is not valid"}).encode()
    platform.script(Reply(status, body))

    with pytest.raises(FatalApiError, match="refused the token") as caught:
        get(connect())

    assert TOKEN not in str(caught.value)
    assert f"HTTP {status}" in str(caught.value)
    assert len(platform.requests) == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            envelope(None, code=401, status="error", message="token expired"),
            "refused the token; the envelope says code 401",
        ),
        (envelope(None, status="error", message="参数错误"), "status 'error'"),
        (envelope(None, code=None), "code null"),
        (b"[1, 2]", "JSON array, not an object"),
    ],
    ids=["code-401", "status-error", "code-missing", "not-an-object"],
)
def test_a_refused_envelope_is_fatal_at_once(platform, connect, body, expected):
    platform.script(Reply(body=body))

    with pytest.raises(FatalApiError, match=expected):
        get(connect())

    assert len(platform.requests) == 1


def test_other_4xx_is_fatal_at_once_and_quotes_a_short_message(platform, connect):
    message = f"no such user; token {TOKEN}, hook {CALLBACK} " + "x" * 500
    platform.script(Reply(404, json.dumps({"message": message}).encode()))

    with pytest.raises(FatalApiError) as caught:
        get(connect())

    text = str(caught.value)
    assert "HTTP 404" in text and "no such user" in text
    assert TOKEN not in text and CALLBACK not in text and "private-hook" not in text
    assert len(text) < 400
    assert len(platform.requests) == 1


# Hiding URLs once took time growing with the square of a message's length:
# a message of 200,000 letters held the process for two minutes.
@pytest.mark.timeout(30)
@pytest.mark.parametrize("filler", ["A", "a.", "x1-"])
def test_a_huge_message_is_quoted_short_at_once(platform, connect, filler):
    message = f"hook {CALLBACK} said " + filler * (200_000 // len(filler))
    platform.script(Reply(400, json.dumps({"message": message}).encode()))

    with pytest.raises(FatalApiError) as caught:
        get(connect())

    text = str(caught.value)
    assert "HTTP 400" in text and "'hook <url> said " + filler in text
    assert text.endswith("...'") and len(text) < 400
    assert CALLBACK not in text and "private-hook" not in text


def test_accepts_code_as_a_string(platform, connect):
    platform.script(Reply(body=envelope([task(1)], code="200")))

    assert get(connect())["data"] == [task(1)]


@pytest.mark.parametrize(
    "data", [{"uuid": "x"}, "tasks", 3], ids=["object", "string", "number"]
)
def test_a_list_whose_data_is_not_a_list_is_fatal(platform, connect, data):
    platform.script(Reply(body=envelope(data)))

    with pytest.raises(FatalApiError, match="not a list"):
        list(connect().walk_tasks(MAIN))


# Page walking

# Each case: the pages served, then (items read, requests made, is_complete,
# a warning expected or None).
WALKS = [
    pytest.param(
        [page(range(15), meta(30, 2, 15)), page(range(15, 30), meta(30, 2, 15))],
        (30, 2, True, None),
        id="meta-on-every-page",
    ),
    pytest.param(
        [page(range(15), meta(40, 3, 15)), page(range(15, 30)), page(range(30, 40))],
        (40, 3, True, None),
        id="meta-only-on-page-1",
    ),
    pytest.param(
        [page(range(15), meta("30", "2", "15")), page(range(15, 30), meta("30"))],
        (30, 2, True, None),
        id="meta-numbers-as-strings",
    ),
    pytest.param(
        [page(range(15), meta(None, None)), page(range(15, 18), meta(None, None))],
        (18, 2, True, "relies on page lengths"),
        id="null-totals-15-plus-3",
    ),
    pytest.param(
        [page(range(n, n + 15)) for n in (0, 15, 30)] + [page(range(45, 47))],
        (47, 4, True, "relies on page lengths"),
        id="capped-per-page-no-meta",
    ),
    pytest.param(
        [page(range(n, n + 15)) for n in (0, 15, 30)],
        (45, 4, True, "relies on page lengths"),
        id="capped-per-page-ends-empty",
    ),
    pytest.param(
        [page(range(15), {"total": 45}), page(range(15, 30)), page(range(30, 45))],
        (45, 3, True, None),
        id="capped-per-page-total-only",
    ),
    # Read past the advertised range, where a platform may serve anything:
    # every item is stored, but no such walk may mark a task removed.
    pytest.param(
        [page(range(n, n + 15), meta(45, None, 100)) for n in (0, 15, 30)],
        (45, 3, False, "page 1 should be the last, but 15 of 45 items were read"),
        id="capped-per-page-but-requested-one-reported",
    ),
    pytest.param(
        [page(range(n, n + 15), meta(45, 1, 100)) for n in (0, 15, 30)],
        (45, 3, False, "marking no removals from this walk"),
        id="capped-per-page-and-last-page-1-reported",
    ),
    pytest.param(
        [page(range(n, n + 50), meta(150, 2, 100)) for n in (0, 50, 0)],
        (150, 3, False, "page 2 should be the last, but 100 of 150 items were read"),
        id="past-the-last-page-the-first-page-again",
    ),
    pytest.param(
        [page(range(n, n + 15), meta(45, None, 100)) for n in (0, 15)]
        + [page(range(30, 40), meta(40, None, 100))],
        (40, 3, False, "reports total 40, an earlier page reported 45"),
        id="capped-per-page-list-shrank",
    ),
    pytest.param(
        [page(range(n, n + 15), meta(45, None, 100)) for n in (0, 15)],
        (30, 3, False, "total 45 but 30 items read"),
        id="capped-per-page-ends-empty-short-of-total",
    ),
    pytest.param(
        [page(range(2), meta(3, 2, 2)), page(None, meta(3, 2, 2))],
        (2, 2, False, "total 3 but 2 items read"),
        id="last-page-data-null",
    ),
    pytest.param(
        [page(None, meta(0, 1, 15))],
        (0, 1, True, None),
        id="empty-account",
    ),
    pytest.param(
        [page(range(n, n + 15), meta(50, 4, 15)) for n in (0, 15)]
        + [page(range(0), meta(50, 4, 15)), page(range(45, 50), meta(50, 4, 15))],
        (30, 3, False, "page 3 of 4 is empty; total 50 but 30 items read"),
        id="empty-page-before-last",
    ),
    pytest.param(
        [page(range(15))] * 5,
        (30, 2, False, "ignore `page`"),
        id="server-ignores-page",
    ),
    pytest.param(
        [page(range(15), meta(50, 4, 15))] * 5,
        (30, 2, False, "ignore `page`"),
        id="server-ignores-page-with-meta",
    ),
    pytest.param(
        [page(range(15), meta(30, 2, 15)), page(range(15, 30), meta(31, 3, 15))]
        + [page(range(30, 31), meta(31, 3, 15))],
        (31, 3, False, "reports total 31, an earlier page reported 30"),
        id="total-changes",
    ),
    pytest.param(
        [page(range(15), meta(30, 2, 15)), page(range(14, 29), meta(30, 2, 15))],
        (30, 2, False, "shares 1 item(s) with page 1"),
        id="list-shifted",
    ),
    pytest.param(
        [page(range(15), meta("many", 2, 15.0)), page(range(15, 20))],
        (20, 2, True, "meta.total is a JSON string that is not a whole number"),
        id="uncoercible-meta",
    ),
    pytest.param(
        [envelope([task(0), None, "x", task(1)])],
        (2, 2, False, "2 item(s) not objects"),
        id="non-object-items",
    ),
    pytest.param(
        [envelope([task(0)], meta=[])],
        (1, 2, True, "meta is a JSON array; ignored"),
        id="meta-an-empty-array",
    ),
]


@pytest.mark.parametrize(("bodies", "expected"), WALKS)
def test_walk_ends_and_judges_completeness(platform, connect, bodies, expected):
    items, requests, is_complete, warning = expected
    platform.serve_pages(bodies)

    walk = connect(page_size=100).walk_tasks(MAIN)
    pages = list(walk)

    assert sum(len(p.items) for p in pages) == walk.items == items
    assert [p.number for p in pages] == list(range(1, requests + 1))
    assert [seen.page for seen in platform.requests] == list(range(1, requests + 1))
    assert walk.pages == requests
    assert walk.is_complete is is_complete
    if warning is None:
        assert walk.warnings == []
    else:
        assert any(warning in w for w in walk.warnings), walk.warnings


def test_pages_carry_coerced_meta_and_the_raw_body(platform, connect):
    bodies = [page(range(15), meta("30", "2", "15")), page(range(15, 30))]
    platform.serve_pages(bodies)

    pages = iter(connect().walk_tasks(MAIN))
    first = next(pages)
    assert len(platform.requests) == 1  # yielded before the next is fetched
    second = next(pages)

    assert (first.total, first.last_page, first.per_page) == (30, 2, 15)
    assert (second.total, second.last_page, second.per_page) == (None, None, None)
    assert first.body == bodies[0]
    assert first.endpoint == TASKS and first.account == MAIN
    assert first.fetched_at.tzinfo is not None
    assert CALLBACK not in repr(first)


def test_a_walk_that_never_ends_hits_the_page_cap(platform, connect):
    def endless(seen: Seen) -> Reply:
        start = (seen.page - 1) * 15
        return Reply(body=page(range(start, start + 15)))

    platform.respond = endless
    walk = connect(max_pages=5).walk_tasks(MAIN)

    with pytest.raises(PageLimitError) as caught:
        for _ in walk:
            pass

    message = str(caught.value)
    assert "account u1" in message and f"endpoint {TASKS}" in message
    assert "page 6" in message and "max_pages" in message
    assert len(platform.requests) == walk.pages == 5
    assert walk.is_complete is False


@pytest.mark.parametrize(
    "refusal",
    [
        Reply(404, b'{"code": 404, "status": "error", "message": "no such page"}'),
        Reply(body=envelope([], code=422, status="error", message="out of range")),
    ],
    ids=["http-404", "error-envelope"],
)
def test_a_page_past_the_advertised_range_refused_ends_the_walk(
    platform, connect, refusal
):
    # Over-counted totals and a full last page made the walk ask for a page
    # the platform refuses; that failed the whole account on every sync.
    bodies = [page(range(n, n + 15), meta(40, 2, 15)) for n in (0, 15)]

    def respond(seen: Seen) -> Reply:
        return Reply(body=bodies[seen.page - 1]) if seen.page <= 2 else refusal

    platform.respond = respond
    walk = connect(page_size=15).walk_tasks(MAIN)
    pages = list(walk)

    assert [p.number for p in pages] == [1, 2] and walk.items == 30
    assert [seen.page for seen in platform.requests] == [1, 2, 3]
    assert walk.is_complete is False
    assert any(
        "page 3, past the advertised last page, failed" in w for w in walk.warnings
    )


def test_walks_sub_accounts_keyed_by_id(platform, connect):
    people = [{"id": n, "name": f"sub {n}"} for n in range(15)]
    platform.serve_pages([envelope(people), envelope(people[:3])])

    walk = connect().walk_sub_accounts("u1")
    pages = list(walk)

    assert platform.requests[0].path == "/agent-api/user/u1/subset_users"
    assert walk.items == 18 and len(pages) == 2
    assert not any("ignore" in w for w in walk.warnings)


def test_a_walk_is_iterated_once(platform, connect):
    platform.serve_pages([page(range(3))])
    walk = connect().walk_tasks(MAIN)
    list(walk)

    with pytest.raises(RuntimeError, match="once"):
        iter(walk)


# Rate limit


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(
    ("rate", "pauses"),
    [
        (5.0, [0.0] * 40),
        (3.0, [0.0, 2.5, 0.0, 0.1] * 10),
        (0.5, [0.0, 1.0] * 5),
        (37.5, [0.0] * 200),
        (2.5, [0.0, 0.0, 0.3] * 20),
    ],
    ids=["back-to-back", "bursty", "slow", "not-whole", "not-whole-bursty"],
)
def test_rate_limiter_never_exceeds_its_rate(rate, pauses):
    fake = FakeTime()
    limiter = RateLimiter(rate, clock=fake.clock, sleep=fake.sleep)
    stamps = []

    for pause in pauses:
        fake.sleep(pause)
        limiter.acquire()
        stamps.append(fake.now)

    # Any one-second window (less a rounding error of the float clock).
    window = 1.0 - 1e-9
    for start in stamps:
        inside = [s for s in stamps if start <= s < start + window]
        assert len(inside) <= max(1, rate)


def test_rate_limiter_counts_a_thread_that_woke_late_when_it_left():
    # A thread held after its slot (here 90 ms) must not let the requests
    # after it crowd into the second that follows its real departure.
    fake = FakeTime()
    sleeps = 0

    def late_sleep(seconds: float) -> None:
        nonlocal sleeps
        sleeps += 1
        fake.sleep(seconds + (0.09 if sleeps == 3 else 0.0))

    limiter = RateLimiter(5.0, clock=fake.clock, sleep=late_sleep)
    stamps = []
    for _ in range(20):
        limiter.acquire()
        stamps.append(fake.now)

    for start in stamps:
        assert len([s for s in stamps if start <= s < start + 1.0]) <= 5


def test_rate_limiter_holds_threads_to_the_rate():
    limiter = RateLimiter(100.0)
    started = time.monotonic()

    def acquire_five() -> None:
        for _ in range(5):
            limiter.acquire()

    threads = [threading.Thread(target=acquire_five) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)

    assert time.monotonic() - started >= 19 / 100


def test_every_request_goes_through_the_limiter(platform):
    fake = FakeTime()
    api = ApiConfig(base_url=platform.url, token=TOKEN, requests_per_second=2.0)
    platform.script(Reply(500), Reply(body=envelope([])), Reply(body=envelope([])))
    limiter = RateLimiter(2.0, clock=fake.clock, sleep=fake.sleep)

    with Client(api, sleep=lambda s: None, limiter=limiter) as client:
        get(client)
        get(client)

    # Three requests at 2 a second: the third waits for the first to be a
    # second (and the send lag) old.
    assert fake.now == pytest.approx(100.0 + 1.0 + SEND_LAG)


# Logs


def test_logs_never_hold_the_token_or_a_callback_url(platform, connect, caplog):
    caplog.set_level(logging.DEBUG)
    items = [task(n) for n in range(3)]
    platform.script(
        Reply(502, f"<html>{CALLBACK}</html>".encode()),
        Reply(body=envelope(None, code=500, message=f"hook {CALLBACK} down")),
        Reply(body=envelope(items)),
        Reply(401, json.dumps({"message": f"bad token {TOKEN}"}).encode()),
        Reply(body=envelope(None, code=400, status="error", message=CALLBACK)),
        Reply(body=envelope(items, meta(9, "x", 3))),
        Reply(body=envelope(items)),
    )
    client = connect(max_retries=2)
    errors = []

    get(client)
    for _ in range(2):
        with pytest.raises(FatalApiError) as caught:
            get(client)
        errors.append(str(caught.value))
    walk = client.walk_tasks(MAIN)
    list(walk)

    records = [r for r in caplog.records if r.name.startswith("etl")]
    text = caplog.text + "\n".join(errors + walk.warnings)
    for secret in (TOKEN, CALLBACK, "10.9.8.7", "private-hook-key"):
        assert secret not in text
    assert not any("?" in r.getMessage() for r in records)
    debug = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    assert len(debug) == len(platform.requests) == 7
    assert f"account u1, endpoint {TASKS}, page 1: HTTP 200 in" in debug[2]
    assert debug[2].endswith(" ms")
    retries = [r for r in records if "retry" in r.getMessage()]
    assert [r.levelno for r in retries] == [logging.WARNING] * 2
