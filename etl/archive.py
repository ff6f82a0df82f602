"""The raw archive: every task page as the platform sent it, for replay.

Under the configured directory, one folder per walk of one account:

    2026-01-05/                                UTC day the walk started
      20260105T010000123456Z-run7-<account>-<random>/
        page-000001.json.gz    a JSON header line, then the body as received
        page-000002.json.gz
        end.json               written when the walk ended

A page file is gzip holding one line of JSON (account, endpoint, page number,
fetch time, walk start) and then the response body byte for byte. `end.json`
says when the walk ended and whether it was complete: only then did the run
settle the tasks it did not list (flagged, or removed if the complete walk
before missed them too), at exactly `ended_at`.

Pages hold the tasks' callback URLs unredacted, so folders are created
owner-only (0700) and files 0600. Every file is written under a hidden
temporary name, flushed and renamed into place: a crash leaves a whole file
or none, at most a hidden `.*.tmp` that reading ignores.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import secrets
import tempfile
import zlib
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from etl.accounts import Account
from etl.client import Page
from etl.config import ArchiveConfig
from etl.errors import ArchiveError
from etl.parse import read_json

log = logging.getLogger(__name__)

FORMAT = 1
END_NAME = "end.json"
PAGE_NAME = re.compile(r"page-(\d+)\.json\.gz")
DAY_NAME = re.compile(r"\d{4}-\d{2}-\d{2}")
PRIVATE_DIR = 0o700
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_SLUG_LENGTH = 60
_warned_roots: set[Path] = set()


@dataclass(frozen=True)
class WalkEnd:
    """The end-of-walk marker: how the walk ended and when."""

    endpoint: str
    ended_at: datetime
    complete: bool
    outcome: str
    error: str | None
    pages: int


@dataclass(frozen=True)
class ArchivedPage:
    """One archived page: where it is and what its header says."""

    path: Path
    account: Account
    endpoint: str
    number: int
    fetched_at: datetime

    def read(self) -> Page:
        """The page as the client handed it over when it was fetched."""
        _, envelope, body = _load_page(self.path)
        data = envelope.get("data") or []
        return Page(
            account=self.account,
            endpoint=self.endpoint,
            number=self.number,
            items=tuple(item for item in data if isinstance(item, dict)),
            total=None,
            last_page=None,
            per_page=None,
            fetched_at=self.fetched_at,
            body=body,
        )


@dataclass(frozen=True)
class ArchivedWalk:
    """The archived pages of one walk of one account, and its end marker."""

    path: Path
    account: Account
    started_at: datetime
    pages: tuple[ArchivedPage, ...]
    end: WalkEnd | None

    @property
    def missing_pages(self) -> int:
        """Pages the marker counts that are not in the folder."""
        if self.end is None:
            return 0
        present = {page.number for page in self.pages}
        return sum(1 for n in range(1, self.end.pages + 1) if n not in present)

    @property
    def is_finished(self) -> bool:
        """The walk ended and every page it fetched is here."""
        return self.end is not None and self.missing_pages == 0


class WalkRecorder:
    """Archives the pages of one walk as they arrive, then its end marker.

    Without an archive configured it keeps nothing. Pages are added by the
    thread walking the account; `finish` is called once, after the last page.
    """

    def __init__(
        self,
        config: ArchiveConfig | None,
        account: Account,
        *,
        run_id: int,
        kind: str,
        started: datetime,
    ) -> None:
        self._config = config
        self._account = account
        self._run_id = run_id
        self._kind = kind
        self._started = started
        self._folder: Path | None = None
        self._endpoint = ""
        self.pages = 0

    def add(self, page: Page) -> None:
        """Archive one page; raise `ArchiveError` naming it when that fails."""
        if self._config is None:
            return
        header = {
            "format": FORMAT,
            "account": _account_fields(page.account),
            "endpoint": page.endpoint,
            "page": page.number,
            "fetched_at": page.fetched_at.isoformat(),
            "walk_started_at": self._started.isoformat(),
            "run_id": self._run_id,
            "kind": self._kind,
        }
        content = _dump(header) + b"\n" + page.body
        try:
            folder = self._open_folder(self._config)
            data = gzip.compress(content, self._config.compression_level, mtime=0)
            path = folder / f"page-{page.number:06d}.json.gz"
            _write_atomically(path, data, self._config.fsync)
        except OSError as exc:
            raise ArchiveError(
                f"account {page.account.label}, endpoint {page.endpoint}, page "
                f"{page.number}: the page could not be archived: {_reason(exc)}"
            ) from exc
        self._endpoint = page.endpoint
        self.pages += 1

    def finish(
        self, *, ended: datetime, complete: bool, failed: bool, error: str | None
    ) -> None:
        """Write the end marker; a walk that archived no page needs none."""
        if self._config is None or self._folder is None:
            return
        marker = {
            "format": FORMAT,
            "account": _account_fields(self._account),
            "endpoint": self._endpoint,
            "walk_started_at": self._started.isoformat(),
            "ended_at": ended.isoformat(),
            "complete": complete,
            "outcome": "failed" if failed else "succeeded",
            "error": error,
            "pages": self.pages,
            "run_id": self._run_id,
            "kind": self._kind,
        }
        try:
            path = self._folder / END_NAME
            _write_atomically(path, _dump(marker) + b"\n", self._config.fsync)
        except OSError as exc:
            raise ArchiveError(
                f"account {self._account.label}: the end of the walk could not be"
                f" archived: {_reason(exc)}"
            ) from exc

    def _open_folder(self, config: ArchiveConfig) -> Path:
        if self._folder is not None:
            return self._folder
        root = Path(config.dir).expanduser()
        _make_private(root, parents=True)
        _warn_if_shared(root)
        day = root / self._started.strftime("%Y-%m-%d")
        _make_private(day)
        slug = _UNSAFE.sub("_", self._account.label)[:_SLUG_LENGTH]
        stamp = self._started.strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{stamp}-run{self._run_id}-{slug}-{secrets.token_hex(3)}"
        folder = day / name
        folder.mkdir(mode=PRIVATE_DIR)
        self._folder = folder
        return folder


def read_archive(directory: Path) -> list[ArchivedWalk]:
    """Every walk under `directory`, each file read whole and checked.

    Raise `ArchiveError` naming the first file that is not a complete, valid
    archive file, before anything is written anywhere. Hidden temporary
    files (left by a crash) and files of other names are ignored.
    """
    if not directory.is_dir():
        raise ArchiveError(f"archive {directory}: not a directory")
    walks = []
    days = [p for p in _listing(directory) if DAY_NAME.fullmatch(p.name)]
    for day in filter(Path.is_dir, days):
        for folder in filter(Path.is_dir, _listing(day)):
            walk = _read_walk(folder)
            if walk is not None:
                walks.append(walk)
    return walks


def _listing(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise ArchiveError(f"archive folder {folder}: {_reason(exc)}") from exc


def _read_walk(folder: Path) -> ArchivedWalk | None:
    headers = []
    end: WalkEnd | None = None
    for path in _listing(folder):
        if PAGE_NAME.fullmatch(path.name):
            headers.append(_read_page_header(path))
        elif path.name == END_NAME:
            end = _read_end(path)
    if not headers:
        return None

    first = headers[0]
    for header in headers:
        if (header.page.account, header.started_at) != (
            first.page.account,
            first.started_at,
        ):
            raise ArchiveError(
                f"archive file {header.page.path}: belongs to another walk than"
                f" {first.page.path.name} in the same folder"
            )
    pages = sorted((header.page for header in headers), key=lambda p: p.number)
    if len({page.number for page in pages}) != len(pages):
        raise ArchiveError(f"archive folder {folder}: a page number appears twice")
    return ArchivedWalk(folder, first.page.account, first.started_at, tuple(pages), end)


@dataclass(frozen=True)
class _Header:
    """A page and the start of the walk it belongs to."""

    page: ArchivedPage
    started_at: datetime


def _read_page_header(path: Path) -> _Header:
    header, _, _ = _load_page(path)
    fields = _Fields(header, path)
    page = ArchivedPage(
        path=path,
        account=fields.account(),
        endpoint=fields.text("endpoint"),
        number=fields.whole("page"),
        fetched_at=fields.moment("fetched_at"),
    )
    return _Header(page, fields.moment("walk_started_at"))


def _load_page(path: Path) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """Header, decoded envelope and raw body of a page file, all checked."""
    try:
        packed = path.read_bytes()
        # gzip reads zero members from an empty file without complaint.
        if not packed:
            raise EOFError("the file is empty")
        content = gzip.decompress(packed)
    except (OSError, EOFError, zlib.error) as exc:
        raise ArchiveError(
            f"archive file {path}: not a complete gzip file: {_reason(exc)}"
        ) from exc
    line, newline, body = content.partition(b"\n")
    header = _decode(line, path, "the header line")
    if not newline:
        raise ArchiveError(f"archive file {path}: no body after the header line")
    envelope = _decode(body, path, "the body")
    if not isinstance(envelope.get("data"), list | None):
        raise ArchiveError(f"archive file {path}: the body's data is not a list")
    return header, envelope, body


def _read_end(path: Path) -> WalkEnd:
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ArchiveError(f"archive file {path}: {_reason(exc)}") from exc
    fields = _Fields(_decode(content, path, "the marker"), path)
    error = fields.raw("error")
    if error is not None and not isinstance(error, str):
        fields.fail("error", "not text")
    outcome = fields.text("outcome")
    if outcome not in ("succeeded", "failed"):
        fields.fail("outcome", "neither succeeded nor failed")
    return WalkEnd(
        endpoint=fields.text("endpoint"),
        ended_at=fields.moment("ended_at"),
        complete=fields.flag("complete"),
        outcome=outcome,
        error=error,
        pages=fields.whole("pages", minimum=0),
    )


def _decode(content: bytes, path: Path, what: str) -> dict[str, Any]:
    try:
        value = read_json(content)
    except (ValueError, RecursionError) as exc:
        raise ArchiveError(f"archive file {path}: {what} is not JSON") from exc
    if not isinstance(value, dict):
        raise ArchiveError(f"archive file {path}: {what} is not a JSON object")
    return value


class _Fields:
    """Typed reads of one archive header, failing with the file and field."""

    def __init__(self, values: dict[str, Any], path: Path) -> None:
        if values.get("format") != FORMAT:
            raise ArchiveError(
                f"archive file {path}: format {values.get('format')!r} is not"
                f" {FORMAT}, the one this version reads"
            )
        self._values = values
        self._path = path

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ArchiveError(f"archive file {self._path}: {key}: {problem}")

    def raw(self, key: str) -> Any:
        if key not in self._values:
            self.fail(key, "missing")
        return self._values[key]

    def text(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str):
            self.fail(key, "not text")
        return value

    def whole(self, key: str, minimum: int = 1) -> int:
        value = self.raw(key)
        if type(value) is not int or value < minimum:
            self.fail(key, f"not a whole number of at least {minimum}")
        return value

    def flag(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            self.fail(key, "not true or false")
        return value

    def moment(self, key: str) -> datetime:
        try:
            moment = datetime.fromisoformat(self.text(key))
        except ValueError:
            self.fail(key, "not a time")
        if moment.tzinfo is None:
            self.fail(key, "a time without its UTC offset")
        return moment

    def account(self) -> Account:
        account = self.raw("account")
        if not isinstance(account, dict):
            self.fail("account", "not an object")
        values = [account.get(key) for key in _ACCOUNT_KEYS]
        texts = [value for value in values if isinstance(value, str)]
        if len(texts) != len(values) or not texts[0]:
            self.fail("account", f"needs text {', '.join(_ACCOUNT_KEYS)}")
        return Account(*texts)


_ACCOUNT_KEYS = ("user_id", "sub_user_id", "name", "origin")


def _account_fields(account: Account) -> dict[str, str]:
    return {key: getattr(account, key) for key in _ACCOUNT_KEYS}


def _dump(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _write_atomically(path: Path, data: bytes, fsync: bool) -> None:
    """Write under a hidden temporary name (mode 0600), then rename into place."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            if fsync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise


def _make_private(path: Path, parents: bool = False) -> None:
    path.mkdir(mode=PRIVATE_DIR, parents=parents, exist_ok=True)


def _warn_if_shared(root: Path) -> None:
    """Say once if a folder made by someone else lets others read the pages."""
    if root in _warned_roots:
        return
    _warned_roots.add(root)
    mode = root.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning(
            "archive %s is readable by others (mode %03o); it holds callback"
            " URLs: consider chmod 700",
            root,
            mode,
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__
