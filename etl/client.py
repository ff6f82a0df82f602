"""The HTTP session with the platform: one checked call, and walks over pages.

`Client.get_envelope` makes one call to an allow-listed read endpoint, under
the shared rate limit, retrying what is plausibly transient and refusing any
body that is not the documented `code`/`status`/`data` envelope.
`Client.walk_tasks` and `Client.walk_sub_accounts` read a list page by page
and always end, however the platform paginates; the returned `Walk` says
afterwards whether the pages added up to a complete, consistent list.

Nothing here logs or raises a token, a URL with its query, or an item of a
body: those may hold secrets or customers' callback URLs.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import math
import random
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import cache, lru_cache
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from etl.accounts import Account
from etl.config import ApiConfig
from etl.errors import ApiError, FatalApiError, PageLimitError, RetryableApiError
from etl.parse import read_json
from etl.threads import start_leaving_signals

log = logging.getLogger(__name__)

TASK_STATUSES = (1, 2, 3)
_CHUNK = 64 * 1024
# What a body may hold: an item of the list takes about a kilobyte, and a
# body far past a page's worth is a fault of the server or of something
# between. Read whole, an endless body took a run's memory to 445 MB within
# its time bound, and a 300 MB one to 890 MB.
_BODY_FLOOR = 16 * 2**20
_BODY_PER_ITEM = 64 * 1024
MESSAGE_LIMIT = 200
# A URL as it is, or as another URL's parameter (percent-encoded, once or
# twice, or only in part), or as a person wrote it (a full-width colon, the
# scheme in quotes, a space after the slashes).
_URL = re.compile(
    r"[a-z][a-z0-9+.-]*[\"']?(?::|\uff1a|%3a|%253a)(?:/|%2f|%252f){2}\s?\S*",
    re.IGNORECASE,
)
# Forms of a token shorter than this are not hidden: they could be any word.
# The token itself always is.
SHORTEST_HIDDEN_FORM = 8
_DIGITS = re.compile(r"[0-9]+")
# The schemes of proxies that requests knows, named in errors; another word
# before "://" could be a user name typed in the wrong place.
_PROXY_SCHEME = re.compile(r"(https?|socks[45]?[ah]?)://", re.IGNORECASE)
# How http.client reports a proxy refusing to open a tunnel without
# credentials: the one way to tell it from other refusals.
_TUNNEL_NEEDS_CREDENTIALS = re.compile(r"Tunnel connection failed: 407\b")


# How long after leaving the limiter a request may reach the server: a
# thread waiting for Python's lock can be held back, and the server may
# see one request late and the next on time. With 50 ms, a benchmark run
# on a busy 2-core machine once saw 38 requests within one second at a
# limit of 37.5; its spans of 38 requests were 40-50 ms over the second.
SEND_LAG = 0.1


class RateLimiter:
    """A token bucket holding one token, refilled `per_second` times a second,
    that also never lets one second hold more than `per_second` requests.

    A bucket of one allows no burst. Spacing alone is not enough: at 37.5 a
    second, 38 requests spaced 1/37.5 s apart fit in 0.99 s, and a thread
    that wakes late from its slot leaves close to the next one. So a request
    also waits until the one `floor(rate)` requests before it left a second
    ago (and `SEND_LAG` more), counting the moments requests really left.
    Slots are handed out under a lock and slept for outside it, so threads
    queue fairly.
    """

    def __init__(
        self,
        per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be greater than 0")
        self._interval = 1.0 / per_second
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_slot = -math.inf
        self._left: deque[float] = deque(maxlen=max(1, math.floor(per_second)))

    def acquire(self) -> None:
        with self._lock:
            now = self._clock()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self._interval
        if slot > now:
            self._sleep(slot - now)
        while (wait := self._leave()) > 0:
            self._sleep(wait)

    def _leave(self) -> float:
        """Record this request as leaving now, or say how long to wait."""
        with self._lock:
            now = self._clock()
            if len(self._left) == self._left.maxlen:
                wait = self._left[0] + 1.0 + SEND_LAG - now
                if wait > 0:
                    return wait
            self._left.append(now)
            return 0.0


@dataclass(frozen=True)
class Page:
    """One page of a list as received; items and body stay out of its repr."""

    account: Account
    endpoint: str
    number: int
    items: tuple[dict[str, Any], ...] = field(repr=False)
    total: int | None
    last_page: int | None
    per_page: int | None
    fetched_at: datetime
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class _Call:
    """Where a call goes, to name it in errors and logs."""

    account: Account
    endpoint: str
    page: int | None

    def fatal(self, message: str, status: int | None = None) -> FatalApiError:
        return FatalApiError(
            message,
            account=self.account.label,
            endpoint=self.endpoint,
            page=self.page,
            status=status,
        )

    def retryable(
        self, message: str, status: int | None = None, retry_after: float | None = None
    ) -> RetryableApiError:
        return RetryableApiError(
            message,
            retry_after=retry_after,
            account=self.account.label,
            endpoint=self.endpoint,
            page=self.page,
            status=status,
        )


class _BearerAuth(requests.auth.AuthBase):
    """Sets the Bearer header; being an auth object, it also stops requests
    from replacing that header with credentials found in a .netrc file."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(***)"


class Client:
    """Calls the platform for several threads at once; close it when done."""

    def __init__(
        self,
        api: ApiConfig,
        tokens: Mapping[str, str] | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.api = api
        self._tokens = dict(tokens or {})
        secrets = {api.token, *self._tokens.values()} - {""}
        forms = {form for secret in secrets for form in _written_forms(secret)}
        self._secrets = _secrets_pattern(forms)
        self._secrets_longest = max(map(len, forms), default=0)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._limiter = limiter or RateLimiter(api.requests_per_second, sleep=sleep)
        self._session = _open_session(api)
        self._headers = _headers()
        self._proxy_note = _proxy_note(api.base_url, self._session.proxies)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def walk_tasks(
        self,
        account: Account,
        *,
        name: str | None = None,
        statuses: Sequence[int] = (),
    ) -> Walk:
        """The task list of one account, optionally filtered."""
        endpoint = self.api.endpoints.task_list
        unknown = [s for s in statuses if isinstance(s, bool) or s not in TASK_STATUSES]
        if unknown:
            # The platform ignores a status filter holding an unknown code and
            # returns every task: refuse rather than mislead.
            raise _Call(account, endpoint, None).fatal(
                f"unknown task status {unknown}: "
                "use 1 (paused), 2 (running) or 3 (waiting)"
            )

        filters: dict[str, Any] = {}
        if name is not None:
            filters["name"] = name
        if statuses:
            filters["status"] = list(statuses)
        return Walk(self, account, endpoint, filters, key="uuid")

    def walk_sub_accounts(self, user_id: str) -> Walk:
        """The sub-account list of a main account."""
        endpoint = self.api.endpoints.sub_account_list
        return Walk(self, Account(user_id), endpoint, {}, key="id")

    def get_envelope(
        self,
        endpoint: str,
        account: Account,
        params: Mapping[str, Any],
        *,
        page: int | None,
    ) -> tuple[dict[str, Any], bytes]:
        """One checked call: the decoded envelope and the body as received."""
        call = _Call(account, endpoint, page)
        if endpoint not in self.api.endpoints.allowed():
            # Some of the platform's mutating operations are GETs too.
            raise call.fatal("not an allow-listed read endpoint; refusing to call it")
        if account.user_id in ("", ".", ".."):
            # A dot segment would lead the server off the allow-listed path.
            raise call.fatal("not an account id; refusing to call the endpoint")
        user_id = quote(account.user_id, safe="")
        url = self.api.base_url + endpoint.replace("{user_id}", user_id)
        query = {**params, **_paging(account, page)}
        auth = _BearerAuth(self._token_for(call))

        attempt = 0
        while True:
            try:
                return self._request(call, url, query, auth)
            except RetryableApiError as error:
                if attempt >= self.api.max_retries:
                    raise call.retryable(
                        f"{error.reason}; gave up after {_tries(attempt + 1)}",
                        error.status,
                        error.retry_after,
                    ) from None
                self._wait_to_retry(error, attempt)
            attempt += 1

    def _token_for(self, call: _Call) -> str:
        token = self._tokens.get(call.account.user_id) or self.api.token
        if not token:
            raise call.fatal("no token is configured for this account")
        return token

    def _request(
        self, call: _Call, url: str, query: dict[str, Any], auth: _BearerAuth
    ) -> tuple[dict[str, Any], bytes]:
        self._limiter.acquire()
        started = time.monotonic()
        budget = self._answer_budget
        with _ANSWERS.within(budget) as answer:
            try:
                response, body = self._receive(call, url, query, auth, started)
            except ApiError:
                if not answer.cut:
                    raise
        # Cut short, the answer may also end early and look whole: a read
        # of headers or body then sees the end of the stream.
        if answer.cut:
            raise call.retryable(
                f"the answer did not arrive whole in {budget:g} s{self._proxy_note}"
            )
        self._check_status(call, response)
        return self._check_envelope(call, response), body

    @property
    def _answer_budget(self) -> float:
        """How long a whole answer may take, from sending the request."""
        return self.api.connect_timeout + 2 * self.api.read_timeout

    def _receive(
        self,
        call: _Call,
        url: str,
        query: dict[str, Any],
        auth: _BearerAuth,
        started: float,
    ) -> tuple[requests.Response, bytes]:
        """The answer to one request and its whole body."""
        try:
            response = self._send(url, query, auth)
            if 300 <= response.status_code < 400:
                body = _unread(response)
            else:
                body = self._read_body(call, response)
        except requests.RequestException as exc:
            _log_request(call, None, started)
            # requests' own message holds the full URL with its query.
            hint = _bundle_hint(self.api, self._session)
            raise _network_error(call, exc, self._proxy_note, hint) from None
        except OSError as exc:
            # requests reads the CA bundle as it sends, and a bundle gone
            # since the configuration was read raised outside its errors.
            _log_request(call, None, started)
            raise call.fatal(
                f"the request could not be sent ({type(exc).__name__})"
                f"{self._proxy_note}{_bundle_hint(self.api, self._session)}"
            ) from None
        except (ValueError, TypeError) as exc:
            # So do proxy settings requests cannot use ("http://user:pw@",
            # "socks://" with PySocks), with the proxy's address in the text.
            _log_request(call, None, started)
            raise call.fatal(
                f"the request could not be sent ({type(exc).__name__})"
                f"{self._proxy_note}"
            ) from None
        _log_request(call, response.status_code, started)
        return response, body

    def _send(
        self, url: str, query: dict[str, Any], auth: _BearerAuth
    ) -> requests.Response:
        """GET the URL through the session's adapter, the body left unread.

        `Session.get` prepares every request afresh: it merges the session's
        settings, cookies and hooks, parses the URL and encodes the query
        through generic paths. That was a third of a request's time in
        Python (about 0.45 of 1.4 ms on a 2-core machine), and a walk, held
        by Python's lock, waits for all of it. The client needs none of
        that: its settings were merged once when the session opened, it
        keeps no cookies, and it follows no redirect, which could lead off
        the allow-list. The adapter still chooses the proxy, checks the
        certificate and turns urllib3's errors into requests' own.
        """
        request = requests.PreparedRequest()
        request.method = "GET"
        request.url = _request_url(url, query)
        request.headers = CaseInsensitiveDict(self._headers)
        auth(request)
        adapter = self._session.get_adapter(request.url)
        return adapter.send(
            request,
            stream=True,
            timeout=(self.api.connect_timeout, self.api.read_timeout),
            # As the adapter reads it: any false value checks no certificate.
            verify=self._session.verify or False,
            cert=self._session.cert,
            proxies=self._session.proxies,
        )

    def _read_body(self, call: _Call, response: requests.Response) -> bytes:
        """The whole body, refused unread past what a page could hold.

        Its time is bounded with the rest of the answer's, by `_ANSWERS`:
        the read timeout bounds each wait for the next bytes, and a server
        dripping a byte at a time would hold a walk for ever.
        """
        largest = max(_BODY_FLOOR, self.api.page_size * _BODY_PER_ITEM)
        # read1 returns what has arrived; plain read (urllib3 1.x) waits for
        # a whole chunk, so the size is then checked a chunk at a time.
        read = getattr(response.raw, "read1", None) or response.raw.read
        chunks: list[bytes] = []
        size = 0
        with response:
            try:
                while chunk := read(_CHUNK, decode_content=True):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > largest:
                        raise call.fatal(
                            f"the body passed {largest / 2**20:g} MB, far more than"
                            f" a page of {self.api.page_size} items; it was not"
                            " read to its end",
                            response.status_code,
                        )
            except urllib3.exceptions.ReadTimeoutError:
                raise call.retryable(
                    f"no answer in time (ReadTimeoutError){self._proxy_note}"
                ) from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                name = type(exc).__name__
                raise call.retryable(
                    f"the connection failed ({name}){self._proxy_note}"
                ) from None
        # Read here, the body is what `content` gives from now on.
        response._content = b"".join(chunks)
        return response._content

    def _check_status(self, call: _Call, response: requests.Response) -> None:
        status = response.status_code
        if status in (401, 403):
            raise call.fatal(
                "the platform refused the token; check api.token or the account's"
                f" token{self._said(response)}",
                status,
            )
        if status == 407:
            raise call.fatal(f"a proxy asked for credentials{self._proxy_note}", status)
        if status == 429 or status >= 500:
            # A proxy in between answers for a platform it cannot reach.
            reason = "asked us to slow down" if status == 429 else "failed"
            note = self._proxy_note if status >= 500 else ""
            raise call.retryable(
                f"the platform {reason}{note}", status, _retry_after(response)
            )
        if status >= 400:
            raise call.fatal(
                f"the platform rejected the request{self._said(response)}", status
            )
        if status >= 300:
            raise call.fatal(
                "the platform redirected the request; redirects are not followed"
                " so that only allow-listed endpoints are called (check"
                " api.base_url)",
                status,
            )

    def _check_envelope(
        self, call: _Call, response: requests.Response
    ) -> dict[str, Any]:
        status = response.status_code
        try:
            envelope = read_json(response.content)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise call.retryable(
                "the body is not JSON or is cut short", status
            ) from None
        except RecursionError:
            # Whole JSON too: a cut-short body is never deeper than whole.
            raise call.fatal(
                "the body nests deeper than Python can read (about 1,000 levels)",
                status,
            ) from None
        except ValueError:
            # Whole JSON that Python will not read, such as an integer of
            # more than 4,300 digits: asking again brings the same body.
            raise call.fatal(
                "the body holds a value Python cannot read, such as a number of"
                " over 4,300 digits",
                status,
            ) from None
        if not isinstance(envelope, dict):
            raise call.fatal(
                f"the body is a JSON {_kind(envelope)}, not an object", status
            )

        code = _whole_number(envelope.get("code"))
        said = self._message_of(envelope)
        # Only codes shaped like HTTP's transient ones are retried: business
        # codes such as 10001 are answers, and asking again changes nothing.
        if code == 429 or (code is not None and 500 <= code <= 599):
            raise call.retryable(
                f"the envelope says code {code}{said}", status, _retry_after(response)
            )
        if code != 200 or envelope.get("status") != "success":
            refused = "the platform refused the token; " if code in (401, 403) else ""
            raise call.fatal(
                f"{refused}the envelope says code {self._quote(envelope.get('code'))},"
                f" status {self._quote(envelope.get('status'))}{said}",
                status,
            )
        return envelope

    def _said(self, response: requests.Response) -> str:
        """The server's `message` from an error body, when it is JSON."""
        try:
            body = json.loads(response.content)
        except (ValueError, RecursionError):
            return ""
        return self._message_of(body) if isinstance(body, dict) else ""

    def _message_of(self, body: dict[str, Any]) -> str:
        if "message" not in body:
            return ""
        return f": {self._quote(body['message'])}"

    def _quote(self, value: object) -> str:
        """A value from a body, fit for a message: no token, no URL, short."""
        if value is None or isinstance(value, bool | int | float):
            return json.dumps(value)
        if not isinstance(value, str):
            return f"<a JSON {_kind(value)}>"
        # Cut before looking for URLs: the pattern backtracks on a long run of
        # letters, and a message of a million held the process for most of
        # an hour. A URL the cut goes through keeps its scheme and is hidden.
        window = self._without_secrets(value, 2 * MESSAGE_LIMIT)
        text = _URL.sub("<url>", window)
        if len(text) > MESSAGE_LIMIT or 2 * MESSAGE_LIMIT < len(value):
            text = text[:MESSAGE_LIMIT] + "..."
        return repr(text)

    def _without_secrets(self, value: str, limit: int) -> str:
        """The first `limit` characters of `value`, each secret among them
        replaced whole, even one the cut goes through.

        Only that much is looked at: looking through a body of 16 MB for
        every form of every secret took two seconds.
        """
        if self._secrets is None:
            return value[:limit]
        seen = value[: limit + self._secrets_longest]
        parts, at = [], 0
        for match in self._secrets.finditer(seen):
            if match.start() >= limit:
                break
            parts += [seen[at : match.start()], "***"]
            at = match.end()
        parts.append(seen[at:limit])
        return "".join(parts)

    def _wait_to_retry(self, error: RetryableApiError, attempt: int) -> None:
        if error.retry_after is not None:
            delay = min(error.retry_after, self.api.retry_after_max)
        else:
            # Exponential backoff with full jitter, so that threads retrying
            # together spread out; the exponent is bounded to stay a float.
            ceiling = self.api.backoff_initial * 2 ** min(attempt, 60)
            delay = self._rng.uniform(0, min(ceiling, self.api.backoff_max))
        log.warning(
            "%s; retry %d of %d in %.2f s",
            error,
            attempt + 1,
            self.api.max_retries,
            delay,
        )
        self._sleep(delay)


class Walk:
    """The pages of one list, yielded as they arrive; iterate it once.

    After exhaustion, `is_complete` is True only when the walk ended normally
    and the pages agreed with each other and with the advertised total: only
    such a walk may be trusted to show which tasks are gone.
    """

    def __init__(
        self,
        client: Client,
        account: Account,
        endpoint: str,
        filters: Mapping[str, Any],
        *,
        key: str,
    ) -> None:
        self.account = account
        self.endpoint = endpoint
        self.pages = 0
        self.items = 0
        self.is_complete = False
        self.warnings: list[str] = []
        self._client = client
        self._page_size = client.api.page_size
        self._params = {"per_page": self._page_size, **filters}
        self._key = key
        self._is_started = False
        self._is_consistent = True
        self._has_stopped_early = False
        self._has_relied_on_lengths = False
        self._has_read_past = False
        # What the platform advertised, kept across pages that omit meta.
        self._total: int | None = None
        self._last_page: int | None = None
        self._per_page: int | None = None
        self._largest = 0
        self._previous: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[Page]:
        if self._is_started:
            raise RuntimeError("a walk can be iterated only once")
        self._is_started = True
        return self._read()

    def _read(self) -> Iterator[Page]:
        number = 1
        while True:
            try:
                page, length = self._fetch(number)
            except ApiError as exc:
                if not self._has_read_past:
                    raise
                # Some platforms refuse a page past the range they advertised.
                status = f"HTTP {exc.status}: " if exc.status is not None else ""
                self._stop_early(
                    f"page {number}, past the advertised last page, failed"
                    f" ({status}{exc.reason}); the walk ends there"
                )
                break
            self.pages += 1
            self.items += len(page.items)
            is_last = self._is_last(page, length)
            yield page
            if is_last:
                break
            number += 1

        self._check_count()
        self.is_complete = self._is_consistent

    def _fetch(self, number: int) -> tuple[Page, int]:
        """A page and the length of its `data`, objects or not."""
        call = _Call(self.account, self.endpoint, number)
        if number > self._client.api.max_pages:
            raise PageLimitError(
                f"page {number} is past api.max_pages"
                f" ({self._client.api.max_pages}); the walk was stopped",
                account=self.account.label,
                endpoint=self.endpoint,
                page=number,
            )
        envelope, body = self._client.get_envelope(
            self.endpoint, self.account, self._params, page=number
        )
        fetched_at = datetime.now(UTC)

        data = envelope.get("data")
        if data is None:
            data = []
        if not isinstance(data, list):
            raise call.fatal(f"data is a JSON {_kind(data)}, not a list")
        items = tuple(item for item in data if isinstance(item, dict))
        if len(items) < len(data):
            skipped = len(data) - len(items)
            self._warn(f"page {number}: {skipped} item(s) not objects; skipped")
            self._is_consistent = False

        total, last_page, per_page = self._read_meta(envelope.get("meta"), number)
        page = Page(
            account=self.account,
            endpoint=self.endpoint,
            number=number,
            items=items,
            total=total,
            last_page=last_page,
            per_page=per_page,
            fetched_at=fetched_at,
            body=body,
        )
        return page, len(data)

    def _read_meta(
        self, meta: object, number: int
    ) -> tuple[int | None, int | None, int | None]:
        if meta is None:
            return None, None, None
        if not isinstance(meta, dict):
            self._warn(f"page {number}: meta is a JSON {_kind(meta)}; ignored")
            return None, None, None
        return (
            self._meta_number(meta, "total", number),
            self._meta_number(meta, "last_page", number),
            self._meta_number(meta, "per_page", number),
        )

    def _meta_number(self, meta: dict[str, Any], name: str, number: int) -> int | None:
        # Numbers come as ints or as strings, and "" means no value.
        value = meta.get(name)
        if value is None or value == "":
            return None
        coerced = _whole_number(value)
        if coerced is None:
            self._warn(
                f"page {number}: meta.{name} is a JSON {_kind(value)} that is not"
                " a whole number; ignored"
            )
        return coerced

    def _is_last(self, page: Page, length: int) -> bool:
        self._remember_meta(page)
        if self._repeats_previous(page):
            return True
        largest_before = self._largest
        self._largest = max(self._largest, length)

        last_page = self._known_last_page()
        if last_page is None:
            return self._ends_by_length(length, largest_before)
        if page.number >= last_page:
            return not self._reads_past(page.number, length, largest_before)
        if length == 0:
            counts = f"{self.items} items read"
            if self._total is not None:
                counts = f"total {self._total} but {counts}"
            self._stop_early(f"page {page.number} of {last_page} is empty; {counts}")
            return True
        return False

    def _remember_meta(self, page: Page) -> None:
        if page.total is not None:
            if self._total is None:
                self._total = page.total
            elif page.total != self._total:
                self._warn(
                    f"page {page.number} reports total {page.total}, an earlier"
                    f" page reported {self._total}; the list changed during the walk"
                )
                self._is_consistent = False

        if page.last_page is not None:
            if self._last_page is None:
                self._last_page = page.last_page
            elif page.last_page != self._last_page:
                self._warn(
                    f"page {page.number} reports last_page {page.last_page}, an"
                    f" earlier page reported {self._last_page}"
                )
                self._is_consistent = False
                # Read on to the furthest page ever advertised: never stop early.
                self._last_page = max(self._last_page, page.last_page)

        if page.per_page:
            self._per_page = page.per_page

    def _repeats_previous(self, page: Page) -> bool:
        keys = tuple(sorted(self._identity(item) for item in page.items))
        previous, self._previous = self._previous, keys
        if keys and keys == previous:
            self._stop_early(
                f"page {page.number} holds the same {len(keys)} items as page"
                f" {page.number - 1}; the platform seems to ignore `page`"
            )
            return True

        # The sort order is undocumented: an item inserted while we walk
        # pushes the last item of one page onto the next.
        shared = len(set(keys) & set(previous))
        if shared:
            self._warn(
                f"page {page.number} shares {shared} item(s) with page"
                f" {page.number - 1}; the list shifted during the walk"
            )
            self._is_consistent = False
        return False

    def _identity(self, item: dict[str, Any]) -> str:
        value = item.get(self._key)
        if value is None or value == "":
            return json.dumps(item, sort_keys=True, default=str)
        return f"{self._key}={value}"

    def _known_last_page(self) -> int | None:
        if self._last_page is not None:
            return self._last_page
        if self._total is None:
            return None
        # A server may cap per_page below what we asked, so the
        # longest page seen beats the requested size when meta omits it.
        per_page = self._per_page or self._largest or self._page_size
        return math.ceil(self._total / per_page)

    def _reads_past(self, number: int, length: int, largest_before: int) -> bool:
        """Whether to read past the page meta says is the last.

        A platform that caps pages below the `per_page` it reports, or
        miscounts `last_page`, sends fewer items by then than its total. Were
        the walk to stop there, every walk would miss the same tasks. While
        pages come as full as any before them, the rest may follow, up to
        as many pages as the total needs at the length pages really have.
        """
        if self._total is None or self.items >= self._total:
            return False
        is_full = length > 0 and length >= largest_before
        if not is_full or number >= math.ceil(self._total / self._largest):
            return False
        if not self._has_read_past:
            self._has_read_past = True
            # Past its advertised range a platform may serve anything, its
            # first pages again among it, and a count that then adds up
            # proves nothing: such a walk never marks a task removed.
            self._is_consistent = False
            self._warn(
                f"page {number} should be the last, but {self.items} of"
                f" {self._total} items were read and the page was full; reading"
                " on, and marking no removals from this walk"
            )
        return True

    def _ends_by_length(self, length: int, largest_before: int) -> bool:
        if not self._has_relied_on_lengths:
            self._has_relied_on_lengths = True
            self._warn(
                "no last_page or total advertised; the walk relies on page"
                " lengths to find the end"
            )
        # A capped per_page makes every page short of what we asked, so only
        # an empty page or one shorter than an earlier page marks the end.
        return length == 0 or length < largest_before

    def _check_count(self) -> None:
        if self._has_stopped_early or self._total is None:
            return
        if self.items != self._total:
            self._warn(
                f"total {self._total} but {self.items} items read; the list"
                " changed during the walk"
            )
            self._is_consistent = False

    def _stop_early(self, message: str) -> None:
        self._warn(message)
        self._is_consistent = False
        self._has_stopped_early = True

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(
            "account %s, endpoint %s: %s", self.account.label, self.endpoint, message
        )


class _Answer:
    """One request in flight, and the connection it went out on."""

    def __init__(self, ends: float) -> None:
        self.ends = ends
        self.connection: Any = None
        self.cut = False

    def cut_short(self) -> None:
        """End the wait for the answer: a blocked read returns at once."""
        self.cut = True
        sock = getattr(self.connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed already


class _AnswerWatch:
    """Cuts short the answers that outlast their budget.

    The read timeout bounds each wait for the next bytes: a server sending
    its status line or headers a byte at a time held a walk until the run's
    deadline, before any body could be checked. A thread looks at the
    requests in flight a few times a second and shuts the socket of any
    whose time is up, which ends the read blocked on it.
    """

    def __init__(self, every: float = 0.25) -> None:
        self._every = every
        self._lock = threading.Lock()
        self._in_flight: set[_Answer] = set()
        self._local = threading.local()
        self._thread: threading.Thread | None = None

    @contextmanager
    def within(self, seconds: float) -> Iterator[_Answer]:
        """Watch the request this thread sends within: cut it short after
        `seconds`."""
        answer = _Answer(time.monotonic() + seconds)
        self._local.answer = answer
        with self._lock:
            self._in_flight.add(answer)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="answer-watch", daemon=True
                )
                start_leaving_signals(self._thread)
        try:
            yield answer
        finally:
            self._local.answer = None
            with self._lock:
                self._in_flight.discard(answer)

    def using(self, connection: Any) -> None:
        """Called in the thread of a request, with the connection it opens or
        sends on."""
        answer: _Answer | None = getattr(self._local, "answer", None)
        if answer is not None:
            answer.connection = connection

    def _watch(self) -> None:
        # Never ends: one thread serves every client of the process, and it
        # only sleeps while no request is in flight.
        while True:
            time.sleep(self._every)
            now = time.monotonic()
            # Under the lock: an answer done is no longer in flight, and its
            # connection, back in the pool, may carry another's request.
            # Again at every look: a connection still being made has no
            # socket to shut yet.
            with self._lock:
                for answer in self._in_flight:
                    if answer.ends <= now:
                        answer.cut_short()


_ANSWERS = _AnswerWatch()


class _WatchedAdapter(HTTPAdapter):
    """requests' adapter, its connections known to `_ANSWERS` as they send."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _watch_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        _watch_pools(manager)
        return manager


def _watch_pools(manager: Any) -> None:
    """Make the connection pools of a urllib3 manager watched ones; its own
    kinds of pools (plain, TLS, through a SOCKS proxy) stay what they are."""
    manager.pool_classes_by_scheme = {
        scheme: _watched_pool(pool)
        for scheme, pool in manager.pool_classes_by_scheme.items()
    }


@cache
def _watched_pool(pool: type[Any]) -> type[Any]:
    if getattr(pool, "watched", False):
        return pool
    connection = pool.ConnectionCls

    # Known as it opens too: a TLS connection through a proxy reads the
    # proxy's answer to CONNECT before any request is sent on it.
    def connect(self: Any) -> Any:
        _ANSWERS.using(self)
        return connection.connect(self)

    def request(self: Any, *args: Any, **kwargs: Any) -> Any:
        _ANSWERS.using(self)
        return connection.request(self, *args, **kwargs)

    methods = {"connect": connect, "request": request}
    watched = type(connection.__name__, (connection,), methods)
    return type(pool.__name__, (pool,), {"ConnectionCls": watched, "watched": True})


def _open_session(api: ApiConfig) -> requests.Session:
    session = requests.Session()
    # Walks of several accounts share the client: keep a live connection each.
    adapter = _WatchedAdapter(pool_maxsize=max(api.parallelism, 1), max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    # The proxy and CA bundle that the environment names for the platform's
    # host, read once: requests reads them again for every request, which
    # was a quarter of its time per request. Every request goes to this one
    # host, and follows no redirect.
    settings = session.merge_environment_settings(
        api.base_url, {}, None, api.ca_bundle or True, None
    )
    session.trust_env = False
    session.proxies.update(settings["proxies"])
    session.verify = settings["verify"]
    return session


def _unread(response: requests.Response) -> bytes:
    """Close a redirect's answer without reading its body.

    A redirect is refused whatever it holds, and a body that is broken,
    cut short or endless must not pass for a failed connection, which is
    retried and would leave the redirect unnamed.
    """
    response.close()
    response._content = b""
    return b""


def _headers() -> CaseInsensitiveDict[str]:
    """The headers of every request, less its token."""
    headers = requests.utils.default_headers()
    headers.update({"Content-Type": "application/json", "Accept": "application/json"})
    return headers


def _bundle_hint(api: ApiConfig, session: requests.Session) -> str:
    """Where the CA bundle that could not be read was named, if anywhere."""
    if api.ca_bundle:
        return "; check api.ca_bundle"
    if isinstance(session.verify, str):
        return "; check the CA bundle that REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE names"
    return ""


def _request_url(url: str, query: Mapping[str, Any]) -> str:
    """The URL with the query, as requests would send it."""
    normalized = _normalized(url)
    if "?" in normalized or "#" in normalized:
        request = requests.PreparedRequest()
        request.prepare_url(url, query)
        return str(request.url)
    # requests drops a parameter whose value is None and sends a list as a
    # repeated one; its query is then `urlencode`'s, byte for byte.
    given = {name: value for name, value in query.items() if value is not None}
    return f"{normalized}?{urlencode(given, doseq=True)}" if given else normalized


@lru_cache(maxsize=1024)
def _normalized(url: str) -> str:
    """The URL as requests sends it (its host in IDNA, its path quoted): a
    walk asks for the same one page after page, and preparing it took a
    tenth of a request's time."""
    request = requests.PreparedRequest()
    request.prepare_url(url, None)
    return str(request.url)


def _paging(account: Account, page: int | None) -> dict[str, Any]:
    query: dict[str, Any] = {}
    if page is not None:
        query["page"] = page
    if not account.is_main:
        query["sub_user_id"] = account.sub_user_id
    return query


def _proxy_note(url: str, proxies: Mapping[str, str]) -> str:
    """What a failed request's error adds about the proxy it went through.

    Its scheme at most: a proxy's address can hold a password. A setting
    that does not begin with a known scheme ("user:pw@host", "host:port/?
    next=http://") gets none named, as anything taken from it could be part
    of the address.
    """
    proxy = requests.utils.select_proxy(url, dict(proxies))
    if not proxy:
        return ""
    scheme_named = _PROXY_SCHEME.match(proxy)
    scheme = scheme_named.group(1).lower() if scheme_named else ""
    kind = f"{scheme} proxy" if scheme else "proxy"
    note = (
        f", through the {kind} that the environment names (HTTPS_PROXY,"
        " HTTP_PROXY or ALL_PROXY)"
    )
    # requests says only "Missing dependencies for SOCKS support".
    if scheme.startswith("socks") and importlib.util.find_spec("socks") is None:
        note += ", which needs PySocks: pip install 'requests[socks]'"
    return note


def _network_error(
    call: _Call, exc: requests.RequestException, proxy_note: str, bundle_hint: str
) -> ApiError:
    name = type(exc).__name__
    if isinstance(exc, requests.exceptions.SSLError):
        hint = bundle_hint or "; check api.ca_bundle"
        return call.fatal(f"TLS failed ({name}){proxy_note}{hint}")
    if isinstance(exc, requests.exceptions.ProxyError) and (
        _TUNNEL_NEEDS_CREDENTIALS.search(str(exc))
    ):
        # Asking again brings the same refusal.
        return call.fatal(f"a proxy asked for credentials ({name}){proxy_note}")
    if isinstance(exc, requests.Timeout):
        return call.retryable(f"no answer in time ({name}){proxy_note}")
    transient = (
        requests.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.ContentDecodingError,
    )
    if isinstance(exc, transient):
        return call.retryable(f"the connection failed ({name}){proxy_note}")
    return call.fatal(f"the request could not be sent ({name}){proxy_note}")


def _retry_after(response: requests.Response) -> float | None:
    """Seconds to wait from `Retry-After`, RFC 9110 §10.2.3: delay-seconds or
    an HTTP-date; None when absent or unreadable, so backoff applies."""
    value = response.headers.get("Retry-After", "").strip()
    if _DIGITS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    # A date already past means "now".
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _tries(count: int) -> str:
    return "1 try" if count == 1 else f"{count} tries"


def _whole_number(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _secrets_pattern(forms: set[str]) -> re.Pattern[str] | None:
    """What finds the secrets' forms (see `_written_forms`) in a message, in
    any case; longest first, so that no form is left half hidden by a
    shorter one."""
    if not forms:
        return None
    ordered = sorted(forms, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered)), re.IGNORECASE)


def _written_forms(secret: str) -> set[str]:
    """The secret as it is, percent-encoded (whole, leaving slashes, for a
    form, twice), in hex, and in base64 however many bytes came before it,
    as in an Authorization header ("Bearer ..." or "user:...")."""
    forms = {
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        quote(quote(secret, safe=""), safe=""),
        secret.encode().hex(),
    }
    for before in range(3):
        # Each base64 character stands for 6 bits: keep those that stand
        # for the secret's bits alone, whatever comes before or after it.
        data = b"\0" * before + secret.encode()
        first, end = -(-8 * before // 6), 8 * len(data) // 6
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms.add(encode(data).decode()[first:end])
    found = {form for form in forms if len(form) >= SHORTEST_HIDDEN_FORM}
    return found | {secret}


def _kind(value: object) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "number"
    return kinds.get(type(value), type(value).__name__)


def _log_request(call: _Call, status: int | None, started: float) -> None:
    elapsed = (time.monotonic() - started) * 1000
    log.debug(
        "account %s, endpoint %s, page %s: %s in %.0f ms",
        call.account.label,
        call.endpoint,
        call.page,
        f"HTTP {status}" if status is not None else "no response",
        elapsed,
    )
