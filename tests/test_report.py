import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text
from synced import BACKENDS, History, open_history

from etl.charts import COLORS
from etl.cli import main
from etl.parse import status_label

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1100",
)
CHROMIUM_TIMEOUT_S = 120


@pytest.fixture(scope="module", params=BACKENDS)
def history(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[History]:
    yield from open_history(request, tmp_path_factory)


def write_config(tmp_path: Path, history: History) -> str:
    accounts = "".join(
        f'[[accounts]]\nuser_id = "{user_id}"\n'
        for user_id in history.simulator.main_user_ids()
    )
    path = tmp_path / "task-etl.toml"
    path.write_text(
        f'[database]\nurl = "{history.engine.url.render_as_string(False)}"\n'
        '[api]\nbase_url = "http://127.0.0.1:9"\n' + accounts,
        encoding="utf-8",
    )
    return str(path)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"TASK_ETL_TOKEN": "t"})


def test_report_shows_tasks_per_status_of_each_account(
    tmp_path: Path, history: History
) -> None:
    result = invoke("--config", write_config(tmp_path, history), "report")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = lines.index("Tasks now, per account:") + 1
    assert lines[header].split() == [
        "account",
        "paused",
        "running",
        "waiting",
        "unknown",
        "total",
    ]
    per_account: dict[str, Counter[str]] = {}
    for task in history.simulator.tasks():
        if task.removed_at is None:
            sub = f":{task.sub_user_id}" if task.sub_user_id else ""
            counts = per_account.setdefault(task.user_id + sub, Counter())
            counts[status_label(task.status)] += 1
    shown = {}
    for line in lines[header + 1 : header + 1 + len(per_account)]:
        account, *_, paused, running, waiting, unknown, total = line.split()
        shown[account] = [int(paused), int(running), int(waiting), int(unknown)]
    assert shown == {
        account: [counts[label] for label in ("paused", "running", "waiting")] + [0]
        for account, counts in per_account.items()
    }


def test_report_counts_the_changes_of_the_period(
    tmp_path: Path, history: History
) -> None:
    since = datetime.now(UTC) - timedelta(days=1)

    result = invoke(
        "--config", write_config(tmp_path, history), "report", "--days", "1"
    )

    with history.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT event, observed_at FROM task_status_changes")
        ).all()
    events = Counter(
        event for event, observed_at in rows if _aware(observed_at) >= since
    )
    assert result.exit_code == 0, result.output
    assert (
        f"Changes in the period: {events['changed']} status changes, "
        f"{events['first_seen']} tasks first seen, {events['removed']} removed, "
        f"{events['restored']} restored."
    ) in result.stdout.splitlines()
    assert events["changed"] > 0


def _aware(value: datetime | str) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ("--days", "2", "--since", "2026-01-01"),
            "give --days or --since, not both",
            id="both",
        ),
        pytest.param(
            ("--since", "yesterday"),
            "'yesterday' is not YYYY-MM-DD or 'YYYY-MM-DD HH:MM'",
            id="bad-since",
        ),
        pytest.param(
            ("--days", "0"), "0 is not in the range 1<=x<=36500", id="no-days"
        ),
        # Each ended in an OverflowError traceback and exit 1.
        pytest.param(
            ("--days", "800000"),
            "800000 is not in the range 1<=x<=36500",
            id="days-past-year-1",
        ),
        pytest.param(
            ("--since", "0001-01-01"),
            "'0001-01-01' is before 1970-01-01",
            id="since-year-1",
        ),
        pytest.param(
            ("--since", "9999-12-31 23:59"),
            "9999-12-31 23:59 is in the future (Asia/Shanghai)",
            id="since-in-the-future",
        ),
    ],
)
def test_report_refuses_a_bad_period(
    tmp_path: Path, history: History, args: tuple[str, ...], message: str
) -> None:
    result = invoke("--config", write_config(tmp_path, history), "report", *args)

    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_report_takes_the_ends_of_the_period_ranges(
    tmp_path: Path, history: History
) -> None:
    config = write_config(tmp_path, history)

    longest = invoke("--config", config, "report", "--days", "36500")
    earliest = invoke("--config", config, "report", "--since", "1970-01-01")

    assert (longest.exit_code, earliest.exit_code) == (0, 0), longest.output
    assert earliest.stdout.startswith("Report for 1970-01-01 00:00 to ")


def chromium_or_skip() -> str:
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    reason = f"{CHROMIUM} is missing: install Debian's chromium package"
    if os.environ.get("CI", "").lower() in {"true", "1", "yes"}:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def run_chromium(*args: str) -> subprocess.CompletedProcess[str]:
    profile = tempfile.mkdtemp(prefix="task-etl-chromium-")
    try:
        return subprocess.run(
            [chromium_or_skip(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=CHROMIUM_TIMEOUT_S,
            check=True,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_html_report_renders_its_charts_in_chromium(
    tmp_path: Path, history: History
) -> None:
    page = tmp_path / "report.html"
    shot = tmp_path / "report.png"
    config = write_config(tmp_path, history)

    result = invoke("--config", config, "report", "--days", "3", "--html", str(page))
    dom = run_chromium("--dump-dom", page.as_uri()).stdout
    run_chromium(f"--screenshot={shot}", page.as_uri())

    assert result.exit_code == 0, result.output
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"<script|<link|@import|url\(|src=", html)
    assert re.findall(r'https?://[^"]*', html) == ["http://www.w3.org/2000/svg"] * 2
    series = re.findall(r'<g class="series" data-series="(\w+)"', dom)
    assert series == ["paused", "running", "waiting"] * 2
    assert dom.count("<polyline") == 3
    assert "<title>Tasks per status at the end of each day</title>" in dom
    assert "<title>Task-hours per status</title>" in dom
    pixels = count_colors(shot.read_bytes())
    for name in ("paused", "running", "waiting"):
        assert pixels[_rgb(COLORS[name])] > 1000, name


def _rgb(color: str) -> tuple[int, int, int]:
    return (int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16))


def count_colors(png: bytes) -> Counter[tuple[int, int, int]]:
    """How many pixels of each colour an 8-bit RGB or RGBA PNG holds."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = {}, 8
    data = b""
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind = png[offset + 4 : offset + 8]
        body = png[offset + 8 : offset + 8 + length]
        if kind == b"IDAT":
            data += body
        else:
            chunks[kind] = body
        offset += 12 + length
    width, height, depth, color_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and color_type in (2, 6), (depth, color_type)
    channels = 3 if color_type == 2 else 4
    rows = _unfilter(zlib.decompress(data), width * channels, height, channels)
    found: Counter[tuple[int, int, int]] = Counter()
    for row in rows:
        found.update(
            (row[i], row[i + 1], row[i + 2]) for i in range(0, len(row), channels)
        )
    return found


def _unfilter(raw: bytes, stride: int, height: int, step: int) -> list[bytes]:
    """Undo the PNG row filters (none, sub, up, average, Paeth)."""
    rows: list[bytes] = []
    previous = bytearray(stride)
    for number in range(height):
        start = number * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - step] if i >= step else 0
            up = previous[i]
            corner = previous[i - step] if i >= step else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                line[i] = (line[i] + _paeth(left, up, corner)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return rows


def _paeth(left: int, up: int, corner: int) -> int:
    guess = left + up - corner
    distances = (abs(guess - left), abs(guess - up), abs(guess - corner))
    return (left, up, corner)[distances.index(min(distances))]
