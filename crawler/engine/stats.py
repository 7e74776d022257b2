"""What a run reports: the live progress line and the end-of-run summary; log records and messages printed mid-run
go above the live line (`LIVE`, `LogHandler`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import shutil
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from crawler import testing


@dataclass(frozen=True, slots=True)
class Summary:
    """The end-of-run account of a job (this run, plus the job's totals across resumes)."""

    command: str
    status: str  # completed, stopped, already complete
    items_total: int
    items_done: int
    items_failed: int  # the failures file's rows: failed items and failed reply walks (VIDEO_ID,COMMENT_ID)
    items_pending: int
    rows_written: int  # this run
    rows_total: int  # the job, across runs
    requests_sent: int  # the job, across runs
    credits_billed: int  # the job, across runs
    run_requests: int
    rate_limited: int
    retries: int
    elapsed: float
    parallelism: int
    rate_used: float | None  # the pace: at most this many requests per `rate_window_seconds` (None: no limit)
    rate_wait_seconds: float = 0.0  # this run: time its starts waited for the key's budget
    failures: dict[str, int] = field(default_factory=dict)
    output: str = ""
    failures_file: str = ""
    reason: str = ""
    notes: tuple[str, ...] = ()  # what else the user should know (an edited input, capped walks)
    run_credits_billed: int = 0  # this run
    responses: dict[str, int] = field(default_factory=dict)  # this run's requests by what they met
    rate_window_seconds: float | None = None  # the window of `rate_used`

    @property
    def pace(self) -> str:
        """The pace in words: "198.3 per 60 s", or "no limit"."""
        if self.rate_used is None:
            return "no limit"
        return f"{self.rate_used:.1f} per {self.rate_window_seconds or 0:g} s"

    def render(self) -> str:
        """A small aligned table for the terminal."""
        # A rate over a fraction of a second says nothing (3 requests in 0.04 s is not 75 requests/s).
        rate = f", {self.run_requests / self.elapsed:,.2f} requests/s" if self.elapsed >= 1.0 else ""
        lines = [
            ("job", f"{self.command}: {self.status}" + (f" ({self.reason})" if self.reason else "")),
            ("items", f"{self.items_done:,} done, {self.items_failed:,} failed, {self.items_pending:,} pending"
                      f" of {self.items_total:,}"),
            ("rows", f"{self.rows_written:,} this run, {self.rows_total:,} in the job"),
            ("requests_sent", f"{self.requests_sent:,} (this run {self.run_requests:,})"),
            ("credits_billed", f"{self.credits_billed:,} (this run {self.run_credits_billed:,})"),
            ("429s / retries", f"{self.rate_limited:,} / {self.retries:,}"),
            ("elapsed", f"{self.elapsed:,.1f} s{rate} (paced at most {self.pace})"),
            ("rate_wait_seconds", f"{self.rate_wait_seconds:,.1f} (waiting for the key's rate budget)"),
            ("parallelism", str(self.parallelism)),
        ]
        if self.failures:
            lines.append(("failures", ", ".join(f"{k}: {v:,}" for k, v in sorted(self.failures.items()))))
        if self.output:
            lines.append(("output", self.output))
        if self.failures_file:
            lines.append(("failures file", self.failures_file))
        lines.extend(("note", note) for note in self.notes)
        width = max(len(k) for k, _ in lines)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in lines)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the progress line shows."""

    done: int
    total: int
    rows: int
    requests: int
    credits: int
    failed: int = 0  # items failed so far (part of `done`)
    note: str = ""  # a pause the run is in (an outage), shown at the end of the line
    unit: str = "rows"  # what `rows` counts (a download: files)
    requests_left: int | None = None  # requests the run still needs (estimated); None: the ETA counts items


class ProgressReporter:
    """A live line on a terminal, a plain log line every `interval` s otherwise, nothing when quiet.

    On a terminal the line is redrawn in place (carriage return, the text cut to the terminal's width as it is at
    each tick, clear to the end of the line), so a narrow or resized window never wraps it into stale lines. A
    stream that went away (a closed pipe, a hung-up terminal) silences the reporter and the stream (`silence`).
    """

    def __init__(
        self,
        label: str,
        snapshot: Callable[[], Snapshot],
        *,
        stream: TextIO | None = None,
        quiet: bool = False,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self._snapshot = snapshot
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._quiet = quiet
        self._interval = interval or testing.PROGRESS_INTERVAL or (0.5 if self._tty else 30.0)
        self._clock = clock
        self._start = clock()
        self._first: Snapshot | None = None
        self._drawn = False  # a live line is on the screen (the end moves below it)

    def line(self) -> str:
        """The current progress text."""
        snap = self._snapshot()
        if self._first is None:
            self._first = snap
        elapsed = max(self._clock() - self._start, 1e-9)
        rate = (snap.requests - self._first.requests) / elapsed
        eta = ""
        remaining = _eta(self._first, snap, elapsed)
        if remaining is not None:
            eta = f" · ETA {_clock(remaining)}"
        total = f"/{snap.total:,}" if snap.total else ""
        failed = f" ({snap.failed:,} failed)" if snap.failed else ""
        note = f" · {snap.note}" if snap.note else ""
        return (f"[{self.label}] {snap.done:,}{total} items{failed} · {snap.rows:,} {snap.unit}"
                f" · {rate * 60:,.0f} req/min · {snap.requests:,} requests sent, {snap.credits:,} billed{eta}{note}")

    async def run(self) -> None:
        """Report until cancelled."""
        if self._quiet:
            return
        self._first = self._snapshot()  # rates and the ETA count from here
        try:
            while not self._quiet:  # (quiet once the stream is gone)
                await asyncio.sleep(self._interval)
                self._emit()
        finally:
            if self._drawn:
                with contextlib.suppress(Exception):  # the final counts on the line left on the screen
                    self._emit()
                self._end_line()

    def _emit(self) -> None:
        text = self.line()
        if not self._tty:
            self._write(time.strftime("%H:%M:%S ") + text + "\n")
            return
        drawn = "\r" + fit(text, terminal_columns(self._stream) - 1) + CLEAR_TO_END
        with LIVE.lock:
            self._drawn = self._write(drawn)
            LIVE.shown(self._stream, drawn if self._drawn else "")

    def _end_line(self) -> None:
        """Move below the live line, which is no longer live."""
        with LIVE.lock:
            self._write("\n")
            LIVE.shown(self._stream, "")

    def _write(self, text: str) -> bool:
        """Write and flush; False (and quiet from now on) once the stream is gone."""
        if self._quiet:
            return False
        try:
            self._stream.write(text)
            self._stream.flush()
        except OSError as exc:
            if exc.errno not in GONE:
                raise
            self._quiet = True
            silence(self._stream)
            return False
        return True


CLEAR_TO_END = "\x1b[K"
GONE = (errno.EPIPE, errno.EIO)  # the reader closed its end of the pipe; the terminal hung up


class LiveLine:
    """The live progress line on a terminal, if one is shown, and the lock its stream's writers take: text written
    mid-run goes `above` it (the line cleared first, redrawn after), never appended to it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # log records may come from worker threads
        self._stream: TextIO | None = None
        self._drawn = ""

    def shown(self, stream: TextIO, drawn: str) -> None:
        """`drawn` (carriage return, text, clear to end) is now the live line on `stream`; '' when none is."""
        with self.lock:
            self._stream, self._drawn = (stream, drawn) if drawn else (None, "")

    @contextlib.contextmanager
    def above(self, stream: TextIO) -> Iterator[None]:
        """Write to `stream` inside this block above the live line; on a stream without one, nothing changes."""
        with self.lock:
            live = self._drawn if self._stream is stream else ""
            if live:
                self._put(stream, "\r" + CLEAR_TO_END)
            try:
                yield
            finally:
                if live:
                    self._put(stream, live)

    @staticmethod
    def _put(stream: TextIO, text: str) -> None:
        # A stream gone away is the reporter's to notice (at its next tick): the message is not worth an error.
        with contextlib.suppress(OSError, ValueError):
            stream.write(text)
            stream.flush()


LIVE = LiveLine()


class LogHandler(logging.StreamHandler[TextIO]):
    """The command line's log handler: each record on lines of its own, above the live progress line if one is
    shown on the same stream."""

    def emit(self, record: logging.LogRecord) -> None:
        with LIVE.above(self.stream):
            super().emit(record)


def terminal_columns(stream: TextIO) -> int:
    """The width of the terminal `stream` is on, read now (a resized window counts from its next line)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        columns = 0
    return columns if columns > 0 else shutil.get_terminal_size().columns


def fit(text: str, columns: int) -> str:
    """`text` cut to at most `columns` cells on a terminal: control characters dropped (so no escape sequence is
    ever cut in half or let through), wide characters counted as two cells, an ellipsis where it was cut."""
    cells = [(c, _cells(c)) for c in text if unicodedata.category(c)[0] != "C"]
    if sum(w for _, w in cells) <= columns:
        return "".join(c for c, _ in cells)
    out, used = [], 0
    for c, w in cells:
        if used + w > columns - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + ("…" if columns > 0 else "")


def _cells(c: str) -> int:
    if unicodedata.combining(c):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


def silence(stream: TextIO) -> None:
    """Point `stream`'s descriptor at /dev/null: a reader that went away gets nothing more from this process (the
    summary, a warning), and nothing raises or prints a traceback for it."""
    with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)


def _eta(first: Snapshot, snap: Snapshot, elapsed: float) -> float | None:
    """Seconds left: the requests left at the pace of the requests sent since `first` (a walk of many pages moves
    its requests while its items stand still), floored at one request per pending item; by items where the run
    gives no request estimate. None: nothing to tell yet."""
    if not snap.total or snap.done >= snap.total:
        return None
    if snap.requests_left is not None:
        sent = snap.requests - first.requests
        left = max(snap.requests_left, snap.total - snap.done)
        return left * elapsed / sent if sent > 0 else None
    done = snap.done - first.done
    return (snap.total - snap.done) * elapsed / done if done > 0 else None


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
