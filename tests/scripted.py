"""A scripted stand-in of the platform, for cases the simulator cannot produce.

It serves the classic task list and the sub-account list of any main account
from a script: per list, replies given in order (then the last one again), or
a function of the request. A task list is named by its main account's id, a
sub-account list by that id and "/subset_users". It records every request.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

TOKEN = "tok-5ecret-0123456789"
CALLBACK = "http://10.9.8.7:8080/hooks/calls?key=private-hook-key"
TASK_LIST = "/agent-api/user/{user_id}/task"


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    drip: float = 0.0  # seconds between the bytes of the body
    drip_head: float = 0.0  # seconds between the bytes of the status and headers


@dataclass(frozen=True)
class Asked:
    user_id: str
    query: dict[str, list[str]] = field(hash=False)
    authorization: str
    listing: str = "task"

    @property
    def script(self) -> str:
        return (
            self.user_id if self.listing == "task" else f"{self.user_id}/{self.listing}"
        )

    @property
    def page(self) -> int:
        return int(self.query.get("page", ["1"])[0])


class Platform:
    """What the scripted server answers, and what it was asked."""

    def __init__(self, url: str = "") -> None:
        self.url = url
        self.asked: list[Asked] = []
        self._lock = threading.Lock()
        self._scripts: dict[str, Callable[[Asked], Reply]] = {}

    def respond(self, user_id: str, answer: Callable[[Asked], Reply]) -> None:
        self._scripts[user_id] = answer

    def serve_pages(self, user_id: str, *bodies: bytes) -> None:
        """Page n is bodies[n - 1]; pages past them are empty."""

        def answer(asked: Asked) -> Reply:
            if asked.page <= len(bodies):
                return Reply(body=bodies[asked.page - 1])
            return Reply(body=envelope([]))

        self.respond(user_id, answer)

    def script(self, user_id: str, *replies: Reply) -> None:
        """Answer this account's requests with the replies in order; the last
        one repeats."""
        queue = list(replies)

        def answer(asked: Asked) -> Reply:
            return queue.pop(0) if len(queue) > 1 else queue[0]

        self.respond(user_id, answer)

    def pages_asked(self, user_id: str) -> list[int]:
        return [asked.page for asked in self.asked if asked.user_id == user_id]

    def _answer(self, asked: Asked) -> Reply:
        with self._lock:
            self.asked.append(asked)
            answer = self._scripts.get(asked.script)
            if answer is None:
                return Reply(404, b'{"code":404,"status":"error"}')
            return answer(asked)


@contextmanager
def serve(tls: ssl.SSLContext | None = None) -> Iterator[Platform]:
    """Serve a platform on loopback; over HTTPS when given a TLS context."""
    platform = Platform()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(platform))
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    scheme = "https" if tls is not None else "http"
    platform.url = f"{scheme}://127.0.0.1:{server.server_port}"
    try:
        yield platform
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _handler(platform: Platform) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            parts = url.path.split("/")
            if len(parts) != 5 or parts[4] not in ("task", "subset_users"):
                self._send(Reply(404, b'{"code":404,"status":"error"}'))
                return
            asked = Asked(
                unquote(parts[3]),
                parse_qs(url.query),
                self.headers.get("Authorization", ""),
                parts[4],
            )
            reply = platform._answer(asked)
            time.sleep(reply.delay)
            try:
                self._send(reply)
            except OSError:
                pass  # the client stopped waiting: a timeout test

        def _send(self, reply: Reply) -> None:
            if reply.drip_head:
                self._drip_head(reply)
                return
            self.send_response(reply.status)
            headers = dict(reply.headers)
            headers.setdefault("Content-Type", "application/json")
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if not reply.drip:
                self.wfile.write(reply.body)
                return
            for offset in range(len(reply.body)):
                self.wfile.write(reply.body[offset : offset + 1])
                time.sleep(reply.drip)

        def _drip_head(self, reply: Reply) -> None:
            head = (
                f"HTTP/1.1 {reply.status} OK\r\nContent-Type: application/json\r\n"
                f"X-Padding: {'x' * 1000}\r\n"
                f"Content-Length: {len(reply.body)}\r\n\r\n"
            ).encode()
            for offset in range(len(head)):
                self.wfile.write(head[offset : offset + 1])
                time.sleep(reply.drip_head)
            self.wfile.write(reply.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def envelope(data: Any, meta: Any = None, **fields: Any) -> bytes:
    body: dict[str, Any] = {"code": 200, "status": "success", "message": "成功"}
    if meta is not None:
        body["meta"] = meta
    body["data"] = data
    body.update(fields)
    return json.dumps(body, ensure_ascii=False).encode()


def meta(total: Any, last_page: Any, per_page: Any = "15", page: Any = 1) -> Any:
    return {
        "has_pages": last_page not in (None, 1),
        "total": total,
        "last_page": last_page,
        "current_page": page,
        "per_page": per_page,
    }


def task(number: int, **fields: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "uuid": f"task-{number}",
        "name": f"任务{number}",
        "create_datetime": "2026-01-02 09:30:00",
        "maximumcall": 1,
        "status": 2,
        "status_str": "执行中",
        "destination_extension": 3,
        "group": {"id": 3, "name": "话术组3"},
        "call_notify_url": CALLBACK,
    }
    item.update(fields)
    return item


def tasks(first: int, last: int) -> list[dict[str, Any]]:
    return [task(number) for number in range(first, last + 1)]
