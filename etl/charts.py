"""Charts as inline SVG, drawn in Python: no script, font or style to fetch.

Each series is one element carrying `class="series"` and `data-series`, so
that a reader of the page (or a test) can find it by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

COLORS = {
    "paused": "#d97706",
    "running": "#16a34a",
    "waiting": "#2563eb",
    "unknown": "#6b7280",
}
WIDTH, HEIGHT = 880, 320
LEFT, RIGHT, TOP, BOTTOM = 60, 130, 20, 40
FONT = 'font-family="sans-serif" font-size="12"'


@dataclass(frozen=True)
class Series:
    name: str
    values: tuple[float, ...]


def color_of(name: str) -> str:
    return COLORS.get(name, COLORS["unknown"])


def line_chart(title: str, labels: Sequence[str], series: Sequence[Series]) -> str:
    """One line per series over the labels (days), with a legend."""
    top = _nice_top(max((max(s.values, default=0) for s in series), default=0))
    parts = [_open(title), *_grid(top), *_x_labels(labels)]
    for number, one in enumerate(series):
        points = [
            (_x(index, len(labels)), _y(value, top))
            for index, value in enumerate(one.values)
        ]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(
            f'<g class="series" data-series="{escape(one.name)}">'
            f'<polyline points="{path}" fill="none" stroke="{color_of(one.name)}" '
            'stroke-width="2.5"/>'
            + "".join(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" '
                f'fill="{color_of(one.name)}"/>'
                for x, y in points
            )
            + "</g>"
        )
        parts.append(_legend(number, one.name))
    parts.append("</svg>")
    return "\n".join(parts)


def bar_chart(title: str, bars: Sequence[tuple[str, float]], unit: str) -> str:
    """Horizontal bars, one per name, labelled with their value."""
    height = TOP + BOTTOM + 44 * max(len(bars), 1)
    top = _nice_top(max((value for _, value in bars), default=0))
    span = WIDTH - LEFT - RIGHT
    parts = [_open(title, height)]
    for number, (name, value) in enumerate(bars):
        y = TOP + 44 * number
        length = span * value / top if top else 0
        parts.append(
            f'<g class="series" data-series="{escape(name)}">'
            f'<text x="{LEFT - 8}" y="{y + 22}" text-anchor="end" {FONT}>'
            f"{escape(name)}</text>"
            f'<rect x="{LEFT}" y="{y + 6}" width="{length:.1f}" height="26" '
            f'fill="{color_of(name)}"/>'
            f'<text x="{LEFT + length + 6:.1f}" y="{y + 24}" {FONT}>'
            f"{value:,.1f} {escape(unit)}</text></g>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _open(title: str, height: int = HEIGHT) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" '
        f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}">'
        f"<title>{escape(title)}</title>"
    )


def _x(index: int, count: int) -> float:
    span = WIDTH - LEFT - RIGHT
    return LEFT + (span * index / (count - 1) if count > 1 else span / 2)


def _y(value: float, top: float) -> float:
    span = HEIGHT - TOP - BOTTOM
    return HEIGHT - BOTTOM - (span * value / top if top else 0)


def _nice_top(value: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten at or above `value`."""
    if value <= 0:
        return 1.0
    step = 1.0
    while step * 10 <= value:
        step *= 10
    for factor in (1, 2, 5, 10):
        if step * factor >= value:
            return step * factor
    return step * 10


def _grid(top: float) -> list[str]:
    lines = []
    for fraction in (0, 0.25, 0.5, 0.75, 1):
        y = _y(top * fraction, top)
        lines.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" '
            'stroke="#e5e7eb"/>'
            f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end" {FONT}>'
            f"{top * fraction:g}</text>"
        )
    return lines


def _x_labels(labels: Sequence[str]) -> list[str]:
    # At most about ten labels fit under the axis; the others are skipped.
    every = max(1, -(-len(labels) // 10))
    return [
        f'<text x="{_x(index, len(labels)):.1f}" y="{HEIGHT - BOTTOM + 20}" '
        f'text-anchor="middle" {FONT}>{escape(label)}</text>'
        for index, label in enumerate(labels)
        if index % every == 0 or index == len(labels) - 1
    ]


def _legend(number: int, name: str) -> str:
    x, y = WIDTH - RIGHT + 20, TOP + 10 + 22 * number
    return (
        f'<rect x="{x}" y="{y - 9}" width="14" height="14" fill="{color_of(name)}"/>'
        f'<text x="{x + 20}" y="{y + 3}" {FONT}>{escape(name)}</text>'
    )
