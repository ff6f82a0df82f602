"""Faults the simulator injects on purpose, each at a rate, replayable by seed.

The platform documents no error model (no error bodies, no rate limits, no
HTTP statuses for a bad token), so a client must survive whatever a real
server and the network between can do: throttling, 5xx pages from a proxy,
connections cut mid-body, truncated or refused envelopes, a refused token,
reads that stall. Each of those is a fault kind here.

The fault of a request is drawn from a generator seeded by the fault seed,
the request's path and query, and how many times the same request came
before. The draw depends neither on thread timing nor on other accounts'
requests, so the same seed and the same sequence of syncs meet the same
faults, and a failing case replays.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

KINDS = (
    "throttle",
    "server_error",
    "reset",
    "truncated",
    "bad_code",
    "unauthorized",
    "stall",
)

SUCCESS_HEAD = b'{"code":200,"status":"success"'
HTML_ERROR = (
    b"<html>\r\n<head><title>%d Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>%d Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
# Business codes seen or plausible inside an HTTP 200: some transient, some not.
BAD_CODES = (500, 503, 401, 10001)


@dataclass(frozen=True)
class Faults:
    """How often each fault kind happens, as a share of requests (0 to 1).

    `refused_user_id` names the main account whose token the `unauthorized`
    fault refuses; empty means any account. `retry_after` is what a 429
    asks for, in whole seconds (RFC 9110 delay-seconds); `stall_seconds` is
    how long a stalled response holds before it goes on.
    """

    throttle: float = 0.0
    server_error: float = 0.0
    reset: float = 0.0
    truncated: float = 0.0
    bad_code: float = 0.0
    unauthorized: float = 0.0
    stall: float = 0.0
    seed: int = 0
    retry_after: int = 1
    stall_seconds: float = 2.0
    refused_user_id: str = ""

    def __post_init__(self) -> None:
        for kind in KINDS:
            rate = getattr(self, kind)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate {kind}={rate} is not between 0 and 1")
        if sum(self.rates().values()) > 1.0 + 1e-9:
            raise ValueError("fault rates add up to more than 1")
        if self.retry_after < 0:
            raise ValueError("retry_after must not be negative")
        if self.stall_seconds <= 0:
            raise ValueError("stall_seconds must be greater than 0")

    @classmethod
    def parse(cls, pairs: Iterable[str], **settings: object) -> Faults:
        """Faults from `KIND=RATE` texts, as given on the command line."""
        rates: dict[str, float] = {}
        for pair in pairs:
            kind, sep, rate = pair.partition("=")
            kind = kind.strip().replace("-", "_")
            if not sep or kind not in KINDS:
                raise ValueError(
                    f"not KIND=RATE with KIND one of {', '.join(KINDS)}: {pair!r}"
                )
            try:
                rates[kind] = float(rate)
            except ValueError:
                raise ValueError(f"fault rate is not a number: {pair!r}") from None
        return cls(**rates, **settings)  # type: ignore[arg-type]

    def rates(self) -> dict[str, float]:
        return {kind: getattr(self, kind) for kind in KINDS}

    @property
    def is_active(self) -> bool:
        return any(self.rates().values())

    def describe(self) -> str:
        active = [f"{kind}={rate:g}" for kind, rate in self.rates().items() if rate]
        return ", ".join(active) + f" (seed {self.seed})" if active else "none"


@dataclass(frozen=True)
class Fault:
    """What to do to one response instead of answering it plainly.

    `status` and `body` replace the real answer when `body` is given; `cut`
    is the share of the body sent before a reset, a truncation or a stall;
    `stall` is seconds to hold, before the head when `cut` is 0.
    """

    kind: str
    status: int = 200
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    cut: float = 0.0
    stall: float = 0.0
    code: int = 200

    def apply(self, body: bytes) -> bytes:
        """The body this fault sends in place of the real `body`."""
        if self.body is not None:
            return self.body
        if self.kind == "bad_code" and body.startswith(SUCCESS_HEAD):
            # The page's data stays in the body: a client must still refuse it.
            head = b'{"code":%d,"status":"error"' % self.code
            return head + body[len(SUCCESS_HEAD) :]
        return body

    def cut_at(self, body: bytes) -> int:
        """Bytes sent before the cut: at least one, never the whole body."""
        if len(body) < 2:
            return 0
        return min(len(body) - 1, max(1, int(len(body) * self.cut)))


@dataclass(frozen=True)
class Served:
    """One request as the simulator answered it, for checks against a sync."""

    user_id: str
    sub_user_id: str
    endpoint: str
    page: int | None
    status: int
    fault: str | None
    is_success: bool

    @property
    def is_ok(self) -> bool:
        """The client received a usable page."""
        return self.fault is None and self.is_success


class FaultInjector:
    """Draws the fault of each request; counts what it injected."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.counts: Counter[str] = Counter()
        self._asked: Counter[str] = Counter()
        self._lock = threading.Lock()

    def draw(
        self, path: str, query: Mapping[str, list[str]], user_id: str
    ) -> Fault | None:
        faults = self.faults
        if not faults.is_active:
            return None
        request = f"{faults.seed}|{path}|{sorted(query.items())}"
        with self._lock:
            self._asked[request] += 1
            rng = random.Random(f"{request}|{self._asked[request]}")
        fault = self._choose(rng, user_id)
        if fault is not None:
            with self._lock:
                self.counts[fault.kind] += 1
        return fault

    def _choose(self, rng: random.Random, user_id: str) -> Fault | None:
        roll = rng.random()
        for kind, rate in self.faults.rates().items():
            if roll < rate:
                return self._make(kind, rng, user_id)
            roll -= rate
        return None

    def _make(self, kind: str, rng: random.Random, user_id: str) -> Fault | None:
        faults = self.faults
        if kind == "throttle":
            return Fault(
                kind,
                429,
                _error(429, "Too Many Attempts."),
                (("Retry-After", str(faults.retry_after)),),
            )
        if kind == "server_error":
            return _server_error(rng)
        if kind == "unauthorized":
            if faults.refused_user_id and user_id != faults.refused_user_id:
                return None
            return Fault(kind, 401, _error(401, "Unauthenticated."))
        if kind == "bad_code":
            code = BAD_CODES[int(rng.random() * len(BAD_CODES))]
            return Fault(kind, code=code)
        cut = 0.1 + 0.8 * rng.random()
        if kind == "stall":
            # Half stall before the head, half in the middle of the body.
            before_head = rng.random() < 0.5
            return Fault(
                kind, cut=0.0 if before_head else cut, stall=faults.stall_seconds
            )
        return Fault(kind, cut=cut)


def _server_error(rng: random.Random) -> Fault:
    status = (500, 502, 503)[int(rng.random() * 3)]
    if status == 500:
        return Fault("server_error", status, _error(500, "Server Error"))
    # What a reverse proxy in front of the platform answers: HTML, not JSON.
    body = HTML_ERROR % (status, status)
    return Fault("server_error", status, body, (("Content-Type", "text/html"),))


def _error(code: int, message: str) -> bytes:
    return b'{"code":%d,"status":"error","message":"%s"}' % (code, message.encode())
