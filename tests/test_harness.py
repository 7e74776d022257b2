"""The test harness itself: what tests/conftest.py promises every test."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _alive(pid: int) -> bool:
    """Running or stopped (a killed child not yet reaped is a zombie: not alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def left_behind() -> Iterator[list[int]]:
    """Pids the test leaves running; its teardown finds them dead already (as a DROP SCHEMA would need)."""
    pids: list[int] = []
    yield pids
    deadline = time.monotonic() + 5  # a SIGKILL is delivered, not instant: a moment on a busy machine
    while [pid for pid in pids if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if _alive(pid)], "a test's process outlived the test into fixture teardown"


async def test_a_stopped_process_is_killed_before_the_fixtures_are_torn_down(left_behind: list[int]) -> None:
    """A process the test started and left SIGSTOPped is dead before any fixture's teardown runs."""
    proc = await asyncio.create_subprocess_exec("sleep", "60")
    proc.send_signal(signal.SIGSTOP)
    left_behind.append(proc.pid)
