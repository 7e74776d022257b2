"""`crawler history plot`: the follower curves of a few handles as a PNG (matplotlib, an optional extra)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crawler.errors import UsageError
from crawler.history.queries import GrowthRow, HistoryQueries, RenameRow

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Series = tuple[str, list[dt.date], list[float]]  # label, days, followers (NaN: a gap)


def with_gaps(rows: Sequence[GrowthRow]) -> tuple[list[dt.date], list[float]]:
    """Days and followers, with a NaN on each missing day so a line breaks there instead of bridging it."""
    days: list[dt.date] = []
    values: list[float] = []
    for r in rows:
        day = dt.date.fromisoformat(r.day)
        if days and (day - days[-1]).days > 1:
            days.append(days[-1] + dt.timedelta(days=1))
            values.append(float("nan"))
        days.append(day)
        values.append(float("nan") if r.followers is None else float(r.followers))
    return days, values


def plot_growth(store: HistoryQueries, handles: Sequence[str], path: Path, *, since: dt.date | None = None,
                until: dt.date | None = None, style: str = "small") -> list[str]:
    """Draw the handles' follower curves into a PNG; return the series labels in drawing order.

    ``small``: one panel per handle on its own scale (growth shows whatever the account's size);
    ``indexed``: one panel, each curve as 100 x followers / its first value. Missing days are gaps.
    """
    if style not in ("small", "indexed"):
        raise UsageError(f"--style {style}: use small or indexed")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plot needs matplotlib: pip install 'crawler[plot]'") from None
    series: list[Series] = []
    user_ids: list[str] = []
    for handle in handles:
        user_id, current = store.resolve(handle)
        user_ids.append(user_id)
        label = f"@{current}" if current == handle.strip().lstrip("@").lower() else f"@{current} (was @{handle})"
        series.append((label, *with_gaps(store.growth(handle, since, until))))
    fig, axes = _figure(plt, len(series), style)
    labels: list[str] = []
    try:
        for n, (label, days, values) in enumerate(series):
            _panel(axes[n], n, (label, days, values), store.renames(user_ids[n]), style)
            labels.append(label)
        if style == "indexed":
            axes[0].set_title("Followers, indexed (100 = first day shown)")
            axes[0].set_ylabel("index")
            axes[0].legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves
            fig.autofmt_xdate()
        else:
            fig.suptitle("Followers per day (each panel on its own scale)")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return labels


def _figure(plt: Any, count: int, style: str) -> tuple[Any, list[Axes]]:
    """The figure and one axes per series (``indexed``: the same one for all)."""
    if style == "indexed":
        fig, ax0 = plt.subplots(figsize=(10, 5.5), dpi=110)
        return fig, [ax0] * count
    cols = 2 if count == 4 else min(3, count)
    nrows = -(-count // cols)
    fig, grid = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), dpi=110, squeeze=False)
    axes = [a for row in grid for a in row]
    for extra in axes[count:]:
        extra.set_visible(False)
    return fig, axes


def _panel(ax: Axes, n: int, series: Series, renames: Sequence[RenameRow], style: str) -> None:
    """Draw the ``n``-th series on ``ax``, with a dotted line on each day its handle changed."""
    import matplotlib.dates as mdates
    from matplotlib.ticker import FuncFormatter

    label, days, values = series
    if style == "indexed":
        base = next((v for v in values if v == v and v), None)
        values = [v * 100 / base for v in values] if base else values
    ax.plot(days, values, marker="o", markersize=3, linewidth=2,  # type: ignore[arg-type]
            color=f"C{n % 10}", label=label)
    by_day = {d: v for d, v in zip(days, values, strict=True) if v == v}
    for rename in renames:  # mark the day the handle changed
        when = dt.date.fromisoformat(rename.day)
        if when in by_day:  # a dotted line on that day, the names written up along it
            ax.axvline(when, linestyle=":", linewidth=1, color="0.45")  # type: ignore[arg-type]
            ax.annotate(f"@{rename.old} → @{rename.new}", xy=(when, 0),
                        xycoords=("data", "axes fraction"), xytext=(3, 4), textcoords="offset points",
                        rotation=90, va="bottom", fontsize=7, color="0.35")
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%b %d"))  # type: ignore[no-untyped-call]
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if style == "small":
        ax.set_title(label, fontsize=10)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.tick_params(labelsize=8)
        ax.tick_params(axis="x", labelrotation=30)  # every panel keeps its dates
