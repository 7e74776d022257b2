"""Charts of the history page, drawn by the server as inline SVG (no script, no CDN, works offline).

Every point carries ``data-day`` and ``data-value`` so a test reads values, never pixels. A day without a
snapshot breaks the line (a gap); nothing is interpolated. A chart has a ``viewBox`` and no fixed size: the
style sheet makes it as wide as the page allows, and every label is placed inside the ``viewBox``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

# Every colour at least 3:1 against the white page (WCAG 1.4.11, non-text contrast): a line is data, not decoration.
PALETTE = ("#1f77b4", "#d95f02", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#b8008a", "#6b6b6b", "#7a7a00",
           "#0e7c86")
FONT = 11  # px in the chart's own units (the chart scales with the window, its text with it)
Point = tuple[str, "float | int | None"]  # (YYYY-MM-DD, value or None for a snapshot without this count)


@dataclass(frozen=True, slots=True)
class Series:
    """One line: a label, its colour and its points in day order."""

    label: str
    points: Sequence[Point]
    colour: str = PALETTE[0]


@dataclass(frozen=True, slots=True)
class Marker:
    """A labelled vertical line on the time axis (a rename)."""

    day: str
    text: str


@dataclass(slots=True)
class _Frame:
    """Scales from (day, value) to pixels."""

    width: int
    height: int
    day0: int
    day1: int
    lo: float
    hi: float
    left: int = 64
    right: int = 16
    top: int = 12
    bottom: int = 28
    ticks: list[float] = field(default_factory=list)

    def x(self, day: str) -> float:
        span = max(1, self.day1 - self.day0)
        return self.left + (_ordinal(day) - self.day0) / span * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        span = (self.hi - self.lo) or 1.0
        return self.top + (self.hi - value) / span * (self.height - self.top - self.bottom)


def _ordinal(day: str) -> int:
    return dt.date.fromisoformat(day).toordinal()


def compact(value: float | None) -> str:
    """12,345 -> 12.3k; None -> an empty string."""
    if value is None:
        return ""
    v = abs(value)
    sign = "-" if value < 0 else ""
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if v >= limit:
            return f"{sign}{v / limit:.3g}{suffix}"
    return f"{sign}{v:.4g}" if isinstance(value, float) and not float(value).is_integer() else f"{value:,.0f}"


def tick_label(value: float, step: float) -> str:
    """An axis label precise enough that neighbouring ticks differ (11.35k, 11.40k; 2.5; 1.2M)."""
    unit, suffix = next(((u, x) for u, x in ((1e9, "B"), (1e6, "M"), (1e3, "k")) if abs(value) >= u
                         or step >= u), (1.0, ""))
    scaled = step / unit
    decimals = next((d for d in range(7) if abs(round(scaled * 10 ** d) - scaled * 10 ** d) < 1e-6), 6)
    return f"{value / unit:,.{decimals}f}{suffix}"


def _nice_ticks(lo: float, hi: float, n: int = 4, *, whole: bool = False) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = max((hi - lo) / n, 1.0 if whole else 0.0)  # counts: no tick between two whole numbers
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(n + 2) if first + i * step <= hi + step * 0.999]


def _frame(days: Sequence[str], values: Sequence[float], width: int, height: int, *, zero: bool = False,
           left: int = 64) -> _Frame:
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if lo == hi:
        lo, hi = lo - 1, hi + 1
    ticks = _nice_ticks(lo, hi, whole=all(float(v).is_integer() for v in values))
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    ords = [_ordinal(d) for d in days] or [dt.date.today().toordinal()]
    return _Frame(width, height, min(ords), max(ords), lo, hi, left=left, ticks=ticks)


def _axes(f: _Frame, days: Sequence[str]) -> list[str]:
    out = [f'<g class="axes" font-size="{FONT}" fill="#555">']
    step = f.ticks[1] - f.ticks[0] if len(f.ticks) > 1 else 1.0
    for t in f.ticks:
        y = f.y(t)
        out.append(f'<line x1="{f.left}" x2="{f.width - f.right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{f.left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(tick_label(t, step))}</text>')
    if days:
        first, last = min(days), max(days)
        labels = {first, last}
        span = f.day1 - f.day0
        for k in (1, 2, 3):
            if span >= 8:
                labels.add(dt.date.fromordinal(f.day0 + span * k // 4).isoformat())
        for d in sorted(labels):
            anchor = "start" if d == first else "end" if d == last and span else "middle"
            out.append(f'<text x="{f.x(d):.1f}" y="{f.height - 8}" text-anchor="{anchor}">{escape(d[5:])}</text>')
    out.append("</g>")
    return out


def _runs(points: Sequence[Point]) -> list[list[tuple[str, float]]]:
    """Consecutive-day stretches with a value: a missing day or a missing value starts a new stretch."""
    runs: list[list[tuple[str, float]]] = []
    previous: int | None = None
    for day, value in points:
        if value is None:
            previous = None
            continue
        o = _ordinal(day)
        if previous is None or o != previous + 1:
            runs.append([])
        runs[-1].append((day, float(value)))
        previous = o
    return runs


def _label_at(x: float, text: str, width: int) -> tuple[float, str]:
    """(x, text-anchor) of a marker's label: right of its line, or left of it where it would run past the right
    edge, and never past either edge (a generous width estimate: 0.62 em per character)."""
    wide = len(text) * FONT * 0.62
    if x + 3 + wide <= width - 2:
        return x + 3, "start"
    return max(x - 3, wide + 2), "end"


def line_chart(series: Sequence[Series], *, width: int = 720, height: int = 220, title: str = "",
               markers: Sequence[Marker] = (), kind: str = "line") -> str:
    """Lines (one per series) with a dot per snapshot; gaps stay gaps; markers as labelled verticals."""
    days = sorted({d for s in series for d, _ in s.points} | {m.day for m in markers})
    values = [float(v) for s in series for _, v in s.points if v is not None]
    f = _frame(days, values, width, height)
    out = [f'<svg class="chart {escape(kind)}" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}"'
           ' xmlns="http://www.w3.org/2000/svg">', f"<title>{escape(title)}</title>"]
    out += _axes(f, days)
    for m in markers:
        x = f.x(m.day)
        tx, anchor = _label_at(x, m.text, width)
        out.append(f'<g class="rename" data-day="{escape(m.day)}"><line x1="{x:.1f}" x2="{x:.1f}" y1="{f.top}"'
                   f' y2="{height - f.bottom}" stroke="#b00" stroke-dasharray="4 3"/><text x="{tx:.1f}"'
                   f' y="{height - f.bottom - 5}" font-size="{FONT}" fill="#b00" text-anchor="{anchor}">'
                   f"{escape(m.text)}</text></g>")
    for s in series:
        label = escape(s.label)
        out.append(f'<g class="series" data-series="{label}" fill="none" stroke="{s.colour}">')
        for run in _runs(s.points):
            if len(run) > 1:
                path = " ".join(f"{'M' if i == 0 else 'L'}{f.x(d):.1f},{f.y(v):.1f}" for i, (d, v) in enumerate(run))
                out.append(f'<path d="{path}" stroke-width="2"/>')
        for day, value in s.points:
            if value is None:
                continue
            out.append(f'<circle class="pt" cx="{f.x(day):.1f}" cy="{f.y(float(value)):.1f}" r="2.6"'
                       f' fill="{s.colour}" data-day="{escape(day)}" data-value="{_num(value)}">'
                       f"<title>{label} {escape(day)}: {escape(_num(value))}</title></circle>")
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


def bar_chart(points: Sequence[Point], *, width: int = 720, height: int = 160, title: str = "",
              domain: tuple[str, str] | None = None) -> str:
    """A bar per day with a value (gains: negative bars hang below zero); days without a value stay empty.

    ``domain`` (first, last day) lines the time axis up with the line charts above it.
    """
    days = [d for d, _ in points] + (list(domain) if domain else [])
    values = [float(v) for _, v in points if v is not None]
    f = _frame(days, values, width, height, zero=True)
    span = max(1, f.day1 - f.day0)
    slot = (width - f.left - f.right) / (span + 1)
    f.left, f.right = int(f.left + slot / 2), int(f.right + slot / 2)  # whole bars inside the plot area
    bar = max(1.0, slot * 0.8)
    out = [f'<svg class="chart bars" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}"'
           ' xmlns="http://www.w3.org/2000/svg">', f"<title>{escape(title)}</title>"]
    out += _axes(f, days)
    zero = f.y(0.0)
    for day, value in points:
        if value is None:
            continue
        y = f.y(float(value))
        top, h = min(y, zero), max(abs(zero - y), 0.5)
        colour = "#2ca02c" if value >= 0 else "#d62728"
        out.append(f'<rect class="bar" x="{f.x(day) - bar / 2:.1f}" y="{top:.1f}" width="{bar:.1f}" height="{h:.1f}"'
                   f' fill="{colour}" data-day="{escape(day)}" data-value="{_num(value)}">'
                   f"<title>{escape(day)}: {escape(_num(value))}</title></rect>")
    out.append("</svg>")
    return "".join(out)


def sparkline(points: Sequence[Point], *, width: int = 140, height: int = 30) -> str:
    """A small followers line for a table cell (gaps stay gaps), named by its first and last value."""
    days = [d for d, _ in points]
    values = [float(v) for _, v in points if v is not None]
    f = _frame(days, values, width, height, left=2)
    f.right, f.top, f.bottom = 2, 3, 3
    known = [(d, v) for d, v in points if v is not None]
    name = (f"followers {_num(known[0][1])} on {known[0][0]}, {_num(known[-1][1])} on {known[-1][0]}" if known
            else "no snapshot")
    out = [f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}"'
           f' xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(name)}"><g fill="none"'
           ' stroke="#1f77b4">']
    for run in _runs(points):
        if len(run) > 1:
            path = " ".join(f"{'M' if i == 0 else 'L'}{f.x(d):.1f},{f.y(v):.1f}" for i, (d, v) in enumerate(run))
            out.append(f'<path d="{path}" stroke-width="1.5"/>')
    for day, value in points:
        if value is not None:
            out.append(f'<circle class="pt" cx="{f.x(day):.1f}" cy="{f.y(float(value)):.1f}" r="1.3"'
                       f' fill="#1f77b4" data-day="{escape(day)}" data-value="{_num(value)}"/>')
    out.append("</g></svg>")
    return "".join(out)


def _num(value: float | int) -> str:
    """A value as data: integers exactly, indexed values to 2 decimals."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}"
