"""The live progress line as a user sees it: `crawler profiles` on a real pseudo-terminal of 80 columns, its output
fed to a terminal emulator (pyte); and a reader that closes the pipe mid-run."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import signal
import struct
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pyte
import pytest

from crawler.sim.data import WorldConfig
from crawler.sim.server import Simulator
from tests.conftest import SimFactory
from tests.pg import private_schema, schema_url
from tests.test_cli import environ, public_users, read_csv, setup_dir
from tests.test_outage import OUTAGE_TOML, existing_handles, sim_config

pytestmark = pytest.mark.slow  # every test here starts processes

WORLD = WorldConfig(seed=11, users=1_000)
HANDLES = 60
COLUMNS, ROWS = 80, 24
TALL = 100  # rows: a screen nothing scrolls off


def _drain(fd: int, into: bytearray, until: bytes | None = None) -> None:
    """Read `fd` into `into` until its writers are gone (EOF, or EIO on a pty), or until `until` has been read."""
    while until is None or until not in into:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the pty's other side closed
            return
        if not chunk:
            return
        into += chunk


async def _profiles(tmp_path: Path, env: dict[str, str], stderr: int, *more: str) -> asyncio.subprocess.Process:
    """`crawler profiles` of HANDLES users, two at a time, into a long output path, stderr on `stderr`."""
    deep = tmp_path / "a-rather-long-directory-name-for-the-output" / "and-another-level-below-it"
    deep.mkdir(parents=True)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler", "profiles", "in.txt", "-o", str(deep / "profiles-of-the-watch-list.csv"),
        "--config", "fast.toml", "--data-dir", "d", "--parallelism", "2", "--summary-json", "summary.json", *more,
        cwd=tmp_path, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=stderr)


@pytest.fixture
def schema() -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped when it ends."""
    with private_schema("crawler_p") as name:
        yield name


@pytest.mark.parametrize("jobs", ["local", "postgresql"])
async def test_a_ten_second_run_at_80_columns_leaves_one_progress_line(simulator: SimFactory, tmp_path: Path,
                                                                        jobs: str, request: pytest.FixtureRequest
                                                                        ) -> None:
    """At 80 columns a ~10 s run redraws its progress line in place: the screen shows exactly one progress line,
    cut to the width, above the summary (no wrapped, stale copies); a PostgreSQL job's session shows the same."""
    url = schema_url(request.getfixturevalue('schema')) if jobs == "postgresql" else ""
    more = ["--jobs-url", url] if url else []
    async with simulator(world=WORLD, latency=(0.3, 0.3)) as sim:
        setup_dir(tmp_path, [sim.world.handle(i) for i in public_users(sim.world, HANDLES)])
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        try:
            proc = await _profiles(tmp_path, environ(sim), slave, *more)
            os.close(slave)
            slave = -1
            raw = bytearray()
            reading = asyncio.create_task(asyncio.to_thread(_drain, master, raw))
            code = await asyncio.wait_for(proc.wait(), timeout=120)
            await asyncio.wait_for(reading, timeout=30)
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)
    assert code == 0, raw.decode(errors="replace")
    assert json.loads((tmp_path / "summary.json").read_text())["elapsed"] >= 5  # long enough for many redraws
    assert raw.count(b"\r[profiles]") >= 5, raw.decode(errors="replace")
    screen = pyte.Screen(COLUMNS, ROWS)
    pyte.ByteStream(screen).feed(bytes(raw))
    lines = [line.rstrip() for line in screen.display]
    shown = "\n".join(lines)
    progress = [line for line in lines if "[profiles]" in line or "req/min" in line or "billed ·" in line]
    assert len(progress) == 1, shown
    assert progress[0].startswith(f"[profiles] {HANDLES}/{HANDLES} items") and len(progress[0]) < COLUMNS, shown
    assert "…\x1b[K".encode() in raw  # lines longer than the terminal were cut
    assert "profiles: completed" in shown  # the summary below it



async def test_a_reader_that_closes_the_pipe_mid_run_changes_nothing(simulator: SimFactory, tmp_path: Path) -> None:
    """When whoever reads stderr goes away mid-run (`crawler ... 2>&1 | head -1`), the run goes on silently and
    ends as it would have: every row written, the same exit code, no traceback."""
    async with simulator(world=WORLD, latency=(0.1, 0.1)) as sim:
        setup_dir(tmp_path, [sim.world.handle(i) for i in public_users(sim.world, HANDLES)])
        env = environ(sim) | {"CRAWLER_TEST_PROGRESS_INTERVAL": "0.1"}
        r, w = os.pipe()
        try:
            proc = await _profiles(tmp_path, env, w)
            os.close(w)
            w = -1
            seen = bytearray()
            await asyncio.wait_for(asyncio.to_thread(_drain, r, seen, b"[profiles]"), timeout=60)
        finally:
            os.close(r)  # the reader goes away while the crawler still reports
            if w >= 0:
                os.close(w)
        assert b"[profiles]" in seen, seen.decode(errors="replace")
        code = await asyncio.wait_for(proc.wait(), timeout=120)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code == 0 and summary["exit_code"] == 0 and summary["items_done"] == HANDLES
    out = tmp_path / "a-rather-long-directory-name-for-the-output" / "and-another-level-below-it"
    assert len(read_csv(out / "profiles-of-the-watch-list.csv")) == HANDLES


class _TallTerminal:
    """`crawler profiles` with its stderr on a pseudo-terminal of COLUMNS x TALL; what it drew, on a pyte screen."""

    def __init__(self) -> None:
        self.master, self._slave = pty.openpty()
        fcntl.ioctl(self._slave, termios.TIOCSWINSZ, struct.pack("HHHH", TALL, COLUMNS, 0, 0))
        self.raw = bytearray()
        self._reading: asyncio.Task[None] | None = None

    async def start(self, cwd: Path, env: dict[str, str], config: str) -> asyncio.subprocess.Process:
        """Start the run; return once its progress line is drawn."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "crawler", "profiles", "in.txt", "-o", "out.csv", "--config", config,
            "--data-dir", "d", "--parallelism", "4", cwd=cwd, env=env | {"CRAWLER_TEST_PROGRESS_INTERVAL": "0.1"},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=self._slave)
        os.close(self._slave)
        self._slave = -1
        await asyncio.wait_for(asyncio.to_thread(_drain, self.master, self.raw, b"\r[profiles]"), timeout=60)
        self._reading = asyncio.create_task(asyncio.to_thread(_drain, self.master, self.raw))
        assert proc.returncode is None, self.raw.decode(errors="replace")
        return proc

    async def screen(self, proc: asyncio.subprocess.Process) -> tuple[int, list[str]]:
        """The run's exit code and the lines on the screen once it ended (nothing scrolled off)."""
        code = await asyncio.wait_for(proc.wait(), timeout=120)
        assert self._reading is not None
        await asyncio.wait_for(self._reading, timeout=30)
        screen = pyte.Screen(COLUMNS, TALL)
        pyte.ByteStream(screen).feed(bytes(self.raw))
        lines = [line.rstrip() for line in screen.display]
        assert max(i for i, line in enumerate(lines) if line) < TALL - 1, "\n".join(lines)
        return code, lines

    def close(self) -> None:
        os.close(self.master)
        if self._slave >= 0:
            os.close(self._slave)


def _live_line_below(lines: list[str], above: list[int]) -> None:
    """The screen shows one progress line, whole, below the lines `above` (no progress text on any of them)."""
    shown = "\n".join(lines)
    progress = [i for i, line in enumerate(lines) if "[profiles]" in line or "req/min" in line or "billed ·" in line]
    assert above and len(progress) == 1 and progress[0] > above[-1], shown
    assert lines[progress[0]].startswith("[profiles] ") and "requests sent" in lines[progress[0]], shown
    assert "Traceback" not in shown


async def test_a_warning_mid_run_gets_a_line_of_its_own_above_the_progress_line(tmp_path: Path) -> None:
    """The API going away mid-run on a terminal: each warning (the outage's, and any flapping of it) starts a screen
    line of its own (not appended to the progress text), and the progress line is redrawn whole below them."""
    (tmp_path / "outage.toml").write_text(OUTAGE_TOML)
    terminal = _TallTerminal()
    try:
        async with Simulator(sim_config(latency=(0.002, 0.01))) as sim:
            (tmp_path / "in.txt").write_text("\n".join(existing_handles(sim.world, 3_000)) + "\n")
            proc = await terminal.start(tmp_path, environ(sim), "outage.toml")
        # the simulator is gone mid-run: the run warns, pauses, and stops at the stall limit
        code, lines = await terminal.screen(proc)
    finally:
        terminal.close()
    shown = "\n".join(lines)
    assert code == 1, shown
    warned = [i for i, line in enumerate(lines) if "WARNING" in line]  # (a long record wraps onto more lines)
    assert all(re.match(r"\d{4}-\d\d-\d\d [\d:,]+ WARNING crawler\.api\.client: ", lines[i]) for i in warned), shown
    assert any("WARNING crawler.api.client: no API answer on" in lines[i] for i in warned), shown
    _live_line_below(lines, warned)


async def test_a_first_signal_says_why_it_waits_on_a_line_of_its_own(simulator: SimFactory, tmp_path: Path) -> None:
    """SIGTERM while slow requests are out, on a terminal: "waiting for the N requests already sent" starts a screen
    line of its own, and the progress line is redrawn whole below it."""
    async with simulator(world=WORLD, latency=(5.0, 5.0)) as sim:
        setup_dir(tmp_path, [sim.world.handle(i) for i in public_users(sim.world, 12)])
        terminal = _TallTerminal()
        try:
            proc = await terminal.start(tmp_path, environ(sim), "fast.toml")
            proc.send_signal(signal.SIGTERM)  # the first requests are still out (5 s each)
            code, lines = await terminal.screen(proc)
        finally:
            terminal.close()
    said = [i for i, line in enumerate(lines) if "requests already sent" in line]
    assert code == 143 and len(said) == 1, "\n".join(lines)
    assert re.match(r"crawler: stopped by SIGTERM: waiting for the \d+ requests already sent", lines[said[0]])
    _live_line_below(lines, said)
