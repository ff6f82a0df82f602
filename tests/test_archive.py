import gzip
import json
import os
import resource
import signal
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, func, select
from synced import sync_config

from etl import archive, store
from etl.accounts import Account
from etl.archive import WalkRecorder, read_archive
from etl.client import Page
from etl.config import ArchiveConfig, Config, DatabaseConfig
from etl.errors import ArchiveError
from etl.models import accounts, tasks
from etl.simulator import SimServer, Simulator
from etl.sync import Filters, run_sync

T0 = datetime(2026, 1, 5, 1, 0, tzinfo=UTC)
ENDPOINT = "/agent-api/user/{user_id}/task"


@pytest.fixture
def simulator() -> Simulator:
    return Simulator(seed=3, main_accounts=1, sub_accounts=2, tasks_per_account=9)


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    engine = store.connect(DatabaseConfig(url=sqlite_url))
    store.migrate(engine)
    yield engine
    engine.dispose()


def make_config(server: SimServer, simulator: Simulator, archive_dir: Path) -> Config:
    archive = ArchiveConfig(dir=str(archive_dir))
    return sync_config(server, simulator, archive=archive, page_size=4)


def page_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/page-*.json.gz"))


def unpack(path: Path) -> tuple[dict[str, Any], bytes]:
    line, _, body = gzip.decompress(path.read_bytes()).partition(b"\n")
    return json.loads(line), body


def served(server: SimServer, simulator: Simulator, header: dict[str, Any]) -> bytes:
    """The body the simulator serves for the page the header names."""
    account = header["account"]
    query: dict[str, Any] = {"page": header["page"], "per_page": 4}
    if account["sub_user_id"]:
        query["sub_user_id"] = account["sub_user_id"]
    path = header["endpoint"].replace("{user_id}", account["user_id"])
    response = requests.get(
        server.url + path,
        params=query,
        headers={"Authorization": f"Bearer {simulator.token}"},
        timeout=10,
    )
    return response.content


def a_recorder(directory: Path | None) -> WalkRecorder:
    """The recorder of one sync's walk of `a_page`'s account; None: no archive."""
    config = ArchiveConfig(dir=str(directory)) if directory is not None else None
    return WalkRecorder(config, a_page().account, run_id=1, kind="sync", started=T0)


def a_page(number: int = 1, body: bytes = b'{"data": []}') -> Page:
    return Page(
        account=Account("main-1", "sub-1"),
        endpoint=ENDPOINT,
        number=number,
        items=(),
        total=None,
        last_page=None,
        per_page=None,
        fetched_at=T0,
        body=body,
    )


def test_every_page_is_archived_as_received_and_compressed(
    tmp_path: Path, server: SimServer, simulator: Simulator, engine: Engine
) -> None:
    root = tmp_path / "archive"

    summary = run_sync(make_config(server, simulator, root), engine=engine)

    files = page_files(root)
    assert len(files) == summary.pages == 9
    for path in files:
        header, body = unpack(path)
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        assert path.stat().st_size < len(body)
        assert body == served(server, simulator, header)
        assert path.name == f"page-{header['page']:06d}.json.gz"
        assert header["endpoint"] == ENDPOINT
        assert datetime.fromisoformat(header["fetched_at"]).tzinfo is not None
    labels = {
        (h["account"]["user_id"], h["account"]["sub_user_id"])
        for h, _ in map(unpack, files)
    }
    assert labels == {a.key for a in simulator.accounts()}


def test_each_walk_ends_with_a_marker_saying_it_was_complete(
    tmp_path: Path, server: SimServer, simulator: Simulator, engine: Engine
) -> None:
    root = tmp_path / "archive"
    config = make_config(server, simulator, root)

    run_sync(config, engine=engine)
    run_sync(config, engine=engine, filters=Filters(statuses=(2,)))

    walks = read_archive(root)
    assert len(walks) == 6
    ends = [walk.end for walk in walks]
    assert all(end is not None and end.outcome == "succeeded" for end in ends)
    complete = sorted(end.complete for end in ends if end is not None)
    assert complete == [False] * 3 + [True] * 3
    assert all(walk.is_finished for walk in walks)


def test_archive_is_owner_only_whatever_the_umask(
    tmp_path: Path, server: SimServer, simulator: Simulator, engine: Engine
) -> None:
    root = tmp_path / "archive"
    previous = os.umask(0)
    try:
        run_sync(make_config(server, simulator, root), engine=engine)
    finally:
        os.umask(previous)

    folders = [root, *root.glob("*"), *root.glob("*/*")]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in folders} == {0o700}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}
    assert len(files) == 9 + 3


def test_no_temporary_file_is_left_by_a_sync(
    tmp_path: Path, server: SimServer, simulator: Simulator, engine: Engine
) -> None:
    root = tmp_path / "archive"

    run_sync(make_config(server, simulator, root), engine=engine)

    names = {p.name for p in root.rglob("*") if p.is_file()}
    assert not [name for name in names if name.startswith(".")]


def test_a_failed_write_leaves_neither_a_half_file_nor_a_temporary_one(
    tmp_path: Path,
) -> None:
    recorder = a_recorder(tmp_path)
    recorder.add(a_page(1))
    (folder,) = tmp_path.glob("*/*")
    # A directory where the page file should go makes the rename fail.
    (folder / "page-000002.json.gz" / "in-the-way").mkdir(parents=True)

    with pytest.raises(ArchiveError) as raised:
        recorder.add(a_page(2))

    assert str(raised.value).startswith(
        f"account main-1:sub-1, endpoint {ENDPOINT}, page 2: the page could not be"
        " archived: "
    )
    assert sorted(p.name for p in folder.iterdir()) == [
        "page-000001.json.gz",
        "page-000002.json.gz",
    ]
    assert recorder.pages == 1


def test_a_write_cut_short_leaves_no_file_under_the_final_name(
    tmp_path: Path,
) -> None:
    recorder = a_recorder(tmp_path)
    recorder.add(a_page(1))
    (folder,) = tmp_path.glob("*/*")
    # Random bytes do not compress: the write passes the file size limit and
    # fails half way, as a full disk would make it.
    incompressible = b'{"data": [], "noise": "' + os.urandom(48_000).hex().encode()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, limit[1]))
    try:
        with pytest.raises(ArchiveError, match="page 2: the page could not be"):
            recorder.add(a_page(2, incompressible + b'"}'))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)

    assert [p.name for p in folder.iterdir()] == ["page-000001.json.gz"]


def test_a_temporary_file_left_by_a_crash_is_ignored_when_reading(
    tmp_path: Path,
) -> None:
    recorder = a_recorder(tmp_path)
    recorder.add(a_page(1))
    recorder.finish(ended=T0, complete=True, failed=False, error=None)
    (folder,) = tmp_path.glob("*/*")
    (folder / ".page-000002.json.gz.tmp").write_bytes(b"\x1f\x8b half")

    (walk,) = read_archive(tmp_path)

    assert [page.number for page in walk.pages] == [1]
    assert walk.is_finished


def test_a_write_failure_fails_the_account_loudly_and_stores_nothing(
    tmp_path: Path, server: SimServer, simulator: Simulator, engine: Engine
) -> None:
    in_the_way = tmp_path / "archive"
    in_the_way.write_text("not a directory")

    summary = run_sync(make_config(server, simulator, in_the_way), engine=engine)

    assert (summary.outcome, summary.exit_code) == ("failed", 1)
    assert summary.accounts_failed == 3
    assert all("the page could not be archived" in e for e in summary.errors)
    with engine.connect() as connection:
        stored = connection.execute(select(func.count()).select_from(tasks)).scalar()
        errors = connection.execute(select(accounts.c.last_error)).scalars().all()
    assert stored == 0
    assert len(errors) == 3
    assert all("could not be archived" in (error or "") for error in errors)


def test_a_walk_that_archived_nothing_gets_no_marker(tmp_path: Path) -> None:
    recorder = a_recorder(tmp_path)

    recorder.finish(ended=T0, complete=False, failed=True, error="refused")

    assert list(tmp_path.iterdir()) == []


def test_without_an_archive_configured_nothing_is_written(tmp_path: Path) -> None:
    recorder = a_recorder(None)

    recorder.add(a_page(1))
    recorder.finish(ended=T0, complete=True, failed=False, error=None)

    assert recorder.pages == 0


def write_walk(root: Path, pages: int = 2) -> Path:
    recorder = a_recorder(root)
    for number in range(1, pages + 1):
        recorder.add(a_page(number, b'{"code": 200, "data": [{"uuid": "t1"}]}'))
    recorder.finish(ended=T0, complete=True, failed=False, error=None)
    (folder,) = root.glob("*/*")
    return folder


def rewrite(path: Path, header: dict[str, Any] | None, body: bytes) -> None:
    line = json.dumps(header).encode() if header is not None else b"not json"
    path.write_bytes(gzip.compress(line + b"\n" + body))


def header_of(path: Path) -> dict[str, Any]:
    return unpack(path)[0]


CORRUPTIONS = {
    "truncated": (
        lambda p: p.write_bytes(p.read_bytes()[:-9]),
        "page-000002.json.gz",
        "not a complete gzip file",
    ),
    "not-gzip": (
        lambda p: p.write_bytes(b"{}"),
        "page-000002.json.gz",
        "not a complete gzip file",
    ),
    "empty": (
        lambda p: p.write_bytes(b""),
        "page-000002.json.gz",
        "not a complete gzip file",
    ),
    "header-not-json": (
        lambda p: rewrite(p, None, b"{}"),
        "page-000002.json.gz",
        "the header line is not JSON",
    ),
    "body-not-json": (
        lambda p: rewrite(p, header_of(p), b"<html>"),
        "page-000002.json.gz",
        "the body is not JSON",
    ),
    "data-not-a-list": (
        lambda p: rewrite(p, header_of(p), b'{"data": {}}'),
        "page-000002.json.gz",
        "the body's data is not a list",
    ),
    "other-format": (
        lambda p: rewrite(p, {**header_of(p), "format": 9}, b"{}"),
        "page-000002.json.gz",
        "format 9 is not 1",
    ),
    "naive-time": (
        lambda p: rewrite(p, {**header_of(p), "fetched_at": "2026-01-05 01:00"}, b"{}"),
        "page-000002.json.gz",
        "fetched_at: a time without its UTC offset",
    ),
    "no-account": (
        lambda p: rewrite(
            p, {k: v for k, v in header_of(p).items() if k != "account"}, b"{}"
        ),
        "page-000002.json.gz",
        "account: missing",
    ),
    "marker-not-json": (
        lambda p: p.write_text("{"),
        "end.json",
        "the marker is not JSON",
    ),
    "marker-bad-count": (
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "pages": -1})),
        "end.json",
        "pages: not a whole number of at least 0",
    ),
}


@pytest.mark.parametrize(
    ("corrupt", "name", "message"), CORRUPTIONS.values(), ids=CORRUPTIONS.keys()
)
def test_a_corrupt_file_is_an_error_naming_it(
    tmp_path: Path, corrupt: Any, name: str, message: str
) -> None:
    folder = write_walk(tmp_path)
    corrupt(folder / name)

    with pytest.raises(ArchiveError) as raised:
        read_archive(tmp_path)

    assert str(raised.value).startswith(f"archive file {folder / name}: ")
    assert message in str(raised.value)


def test_a_missing_page_leaves_the_walk_unfinished(tmp_path: Path) -> None:
    folder = write_walk(tmp_path, pages=3)
    (folder / "page-000002.json.gz").unlink()

    (walk,) = read_archive(tmp_path)

    assert walk.missing_pages == 1
    assert not walk.is_finished


def test_an_archived_page_reads_back_as_the_client_gave_it(tmp_path: Path) -> None:
    folder = write_walk(tmp_path, pages=1)

    (walk,) = read_archive(tmp_path)
    page = walk.pages[0].read()

    assert walk.path == folder
    assert walk.started_at == T0
    assert (page.account, page.endpoint, page.number) == (
        Account("main-1", "sub-1"),
        ENDPOINT,
        1,
    )
    assert page.items == ({"uuid": "t1"},)
    assert page.body == b'{"code": 200, "data": [{"uuid": "t1"}]}'
    assert archive.FORMAT == 1
