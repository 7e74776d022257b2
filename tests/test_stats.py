"""The progress line and the end-of-run summary."""

from __future__ import annotations

import asyncio
import fcntl
import io
import logging
import os
import pty
import struct
import termios

from crawler.engine.stats import LogHandler, ProgressReporter, Snapshot, Summary, fit


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
    assert tty.getvalue().endswith("\n") and "\x1b[K" in tty.getvalue()

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


def test_fit_cuts_to_the_terminal_width_and_lets_no_control_character_through() -> None:
    """The live line fits its columns (wide characters count two), ends in an ellipsis when cut, and keeps no
    control character, so no escape sequence is ever cut in half."""
    assert fit("[posts] 1/2 items", 80) == "[posts] 1/2 items"
    assert fit("x" * 100, 79) == "x" * 78 + "…"
    assert fit("a\x1b[31mb\rc\n", 80) == "a[31mbc"
    cut = fit("名前" * 50, 79)
    assert cut.endswith("…") and sum(2 if c == "名" or c == "前" else 1 for c in cut) <= 79


class _Gone(io.StringIO):
    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


async def test_a_stream_that_went_away_silences_the_reporter() -> None:
    """A closed pipe under the progress line ends the reporting, not the run: no exception, nothing more tried."""
    calls = {"n": 0}

    def snap() -> Snapshot:
        calls["n"] += 1
        return Snapshot(done=calls["n"], total=100, rows=0, requests=0, credits=0)

    await asyncio.wait_for(ProgressReporter("posts", snap, stream=_Gone(), interval=0.001).run(), timeout=10)
    assert calls["n"] == 2  # the start, then the one report that met the closed pipe: nothing after it


async def test_the_live_line_follows_a_resized_terminal() -> None:
    """The width is read at every tick: a terminal narrowed from 100 to 40 columns gets lines of at most 39 cells
    from then on."""
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w", encoding="utf-8")
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        ticks = {"n": 0}

        def snap() -> Snapshot:
            ticks["n"] += 1
            if ticks["n"] == 3:
                fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
            return Snapshot(done=ticks["n"], total=1000, rows=123_456, requests=99_999, credits=99_998)

        reporter = ProgressReporter("comments", snap, stream=stream, interval=0.001)
        task = asyncio.create_task(reporter.run())
        async with asyncio.timeout(10):  # a reporter that died fails the test, never hangs it
            while ticks["n"] < 6 and not task.done():
                await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        text = os.read(master, 65536).decode()
    finally:
        stream.close()
        os.close(master)
    lines = [line.removesuffix("\x1b[K") for line in text.replace("\r\n", "\r").split("\r") if line]
    assert len(lines[0]) > 60 and all(len(line) <= 39 for line in lines[-3:]), lines


async def _record_mid_run(stream: io.StringIO) -> str:
    """What `stream` holds after a warning logged through the command line's handler while a reporter is on it."""
    ticks = {"n": 0}

    def snap() -> Snapshot:
        ticks["n"] += 1
        return Snapshot(done=ticks["n"], total=100, rows=0, requests=0, credits=0)

    handler = LogHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("crawler.test_stats")
    log.addHandler(handler)
    try:
        task = asyncio.create_task(ProgressReporter("posts", snap, stream=stream, interval=0.001).run())
        async with asyncio.timeout(10):  # a reporter that died fails the test, never hangs it
            while ticks["n"] < 3 and not task.done():  # the start and two reports
                await asyncio.sleep(0.001)
        log.warning("the API went away")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        log.removeHandler(handler)
    return stream.getvalue()


async def test_a_log_record_mid_run_clears_the_live_line_and_redraws_it_below() -> None:
    """On a terminal a record logged while the live line is shown clears it, takes a line of its own, and the line is
    redrawn after it; off a terminal the record is a plain line, without any escape sequence."""
    text = await _record_mid_run(_Tty())
    before, record, after = text.partition("WARNING the API went away\n")
    assert record and before.endswith("\r\x1b[K") and before.rfind("\r[posts] ") < before.rfind("\r\x1b[K")
    redrawn = before[before.rfind("\r[posts] "):before.rfind("\r\x1b[K")]
    assert after.startswith(redrawn) and after.endswith("\n")  # the line the record interrupted, then the next ones

    plain = await _record_mid_run(io.StringIO())
    assert "WARNING the API went away\n" in plain.splitlines(keepends=True)
    assert "\x1b" not in plain and "\r" not in plain
