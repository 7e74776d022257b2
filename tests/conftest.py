"""Shared fixtures: a simulator on loopback and fast client settings (retry waits off)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from crawler.config import Settings
from crawler.sim.data import WorldConfig
from crawler.sim.server import SimConfig, Simulator

KEY = "sim-key"


def fast_settings(url: str, **changes: Any) -> Settings:
    """Settings for tests: the simulator's URL, no pacing, no retry waits, short timeouts."""
    base = Settings(
        base_url=url,
        rate_enabled=False,
        retry_base_delay=0.0,
        retry_max_delay=0.0,
        retry_stall_limit=5.0,
        read_timeout=2.0,
        connect_timeout=2.0,
    )
    return base.replace(**changes)


def answer_at_once(sim: Simulator) -> None:
    """The simulator answers without latency from now on: a test's slow API has done its part (say, a signal caught
    requests in flight) and the resume that follows checks rows, not timing."""
    sim.config = dataclasses.replace(sim.config, latency=(0.0, 0.0))


@pytest.fixture(autouse=True)
def private_state_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test gets its own XDG_STATE_HOME (the local rate ledger lives there): nothing under the real home."""
    home = str(tmp_path_factory.mktemp("state"))
    monkeypatch.setenv("XDG_STATE_HOME", home)
    return home


_STARTED = pytest.StashKey[list[asyncio.subprocess.Process]]()


def _kill(started: list[asyncio.subprocess.Process]) -> None:
    for proc in started:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def reap_processes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every process a test starts with asyncio is SIGKILLed by pid when the test ends, however it ends."""
    started = request.node.stash.setdefault(_STARTED, [])
    real = asyncio.create_subprocess_exec

    async def tracked(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await real(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(asyncio, "create_subprocess_exec", tracked)
    try:
        yield
    finally:
        _kill(started)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """The test's processes are killed before any fixture's teardown: a DROP SCHEMA there never waits forever on
    the locks of a process the test left SIGSTOPped."""
    _kill(item.stash.get(_STARTED, []))


SimFactory = Callable[..., AbstractAsyncContextManager[Simulator]]


@pytest.fixture
def simulator() -> SimFactory:
    """Start a simulator with SimConfig fields as keyword arguments (world=WorldConfig(...) for the world)."""

    @asynccontextmanager
    async def start(**config: Any) -> AsyncIterator[Simulator]:
        config.setdefault("world", WorldConfig(seed=7, users=2_000))
        # Pacing is off in fast_settings, so the server's limits are raised unless a test sets them.
        config.setdefault("rate_limit", 1_000_000)
        config.setdefault("burst_limit", 1_000_000)
        async with Simulator(SimConfig(**config)) as sim:
            yield sim

    return start
