"""The progress line and the end-of-run summary."""

from __future__ import annotations

import asyncio
import io

from crawler.engine.stats import ProgressReporter, Snapshot, Summary


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_is_a_log_line_off_a_terminal_and_a_live_line_on_one() -> None:
    """Off a TTY each report is a timestamped line with done/total, rows and credits; on a TTY it redraws."""
    state = {"done": 0}

    def snap() -> Snapshot:
        state["done"] += 10
        return Snapshot(done=state["done"], total=100, rows=state["done"] * 3, requests=state["done"],
                        credits=state["done"] - 1)

    plain = io.StringIO()
    reporter = ProgressReporter("posts", snap, stream=plain, interval=0.001)
    task = asyncio.create_task(reporter.run())
    while plain.getvalue().count("\n") < 2:  # wait for two reports (a condition, not a guess)
        await asyncio.sleep(0.001)
    task.cancel()
    lines = plain.getvalue().splitlines()
    assert "[posts]" in lines[0] and "/100 items" in lines[0] and "billed" in lines[0] and "ETA" in lines[0]
    assert "\r" not in plain.getvalue()

    tty = _Tty()
    live = ProgressReporter("posts", snap, stream=tty, interval=0.001)
    task = asyncio.create_task(live.run())
    while tty.getvalue().count("\r") < 2:
        await asyncio.sleep(0.001)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert tty.getvalue().endswith("\n") and "\x1b[2K" in tty.getvalue()

    quiet = io.StringIO()
    await ProgressReporter("posts", snap, stream=quiet, quiet=True, interval=0.001).run()
    assert quiet.getvalue() == ""


def test_summary_names_both_counters_failures_and_parallelism() -> None:
    """The summary table shows both credit counters, failures by reason, the rate and the workers chosen."""
    text = Summary(command="posts", status="completed", items_total=10, items_done=8, items_failed=2,
                   items_pending=0, rows_written=240, rows_total=240, requests_sent=31, credits_billed=30,
                   run_requests=31, rate_limited=0, retries=1, elapsed=9.3, parallelism=4,
                   rate_used=198.3, rate_window_seconds=60.0, failures={"private": 1, "not_found": 1}).render()
    for needle in ("requests_sent", "31", "credits_billed", "30", "not_found: 1", "private: 1", "parallelism",
                   "198.3 per 60 s", "8 done, 2 failed"):
        assert needle in text
