"""Which processes use a key's ledger now: each open ledger registers its process and limits, and the limits check
(`rules.mismatch`) looks only at the ones alive (a dead process's limits never block)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

STALE = 60.0  # seconds without a heartbeat after which a process on another host counts as gone
BEAT = 5.0  # seconds between heartbeats of a process holding a ledger open


def _stat(pid: int) -> tuple[str, str]:
    """The process's state letter and start time in clock ticks since boot (Linux); '' where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return "", ""


def _started(pid: int) -> str:
    return _stat(pid)[1]


def registration() -> str:
    """A new registration of this process: ``host|pid|start time|instance`` (one per open ledger)."""
    return f"{socket.gethostname()}|{os.getpid()}|{_started(os.getpid())}|{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class Registered:
    """One open ledger of some process: its registration, limits and last heartbeat (the ledger's clock)."""

    ident: str
    limits: dict[str, float]
    seen: float


def alive(entry: Registered, now: float) -> bool:
    """Whether the process that registered ``entry`` still runs: on this host by its pid and start time (a process
    killed with SIGKILL is gone at once, a reused pid is another process), elsewhere by its heartbeat."""
    host, pid, started, _ = (entry.ident.split("|") + ["", "", "", ""])[:4]
    if host != socket.gethostname() or not pid.isdigit():
        return entry.seen > now - STALE
    if int(pid) == os.getpid():
        return True  # this process: unregistered when its ledger closes
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    state, now_started = _stat(int(pid))
    return state not in ("Z", "X") and (not started or now_started == started)


def encode(limits: dict[str, float]) -> str:
    return ",".join(f"{k}={v!r}" for k, v in limits.items())


def decode(text: str) -> dict[str, float]:
    return {k: float(v) for k, _, v in (part.partition("=") for part in text.split(",") if part)}


async def beating(beat: Callable[[], Awaitable[object]]) -> None:
    """An open ledger's heartbeat (for processes on other hosts, see `alive`): ``beat()`` every BEAT seconds until
    cancelled by the ledger's close, whatever the run waits on meanwhile (a full window, a 429 cooldown, an
    outage's backoff: longer than STALE); a failed beat is made up by the next one."""
    while True:
        await asyncio.sleep(BEAT)
        with contextlib.suppress(Exception):
            await beat()


async def stop(task: asyncio.Task[None] | None) -> None:
    """Stop a `beating` task (None: none runs)."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
