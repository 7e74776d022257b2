"""The edges of pacing and billing: cut bodies, absurd Retry-After values, non-finite settings, stall resets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from crawler.api.client import Client
from crawler.config import KEYS, load_settings
from crawler.errors import NotFound, RateLimitStalled, UsageError
from crawler.rate.ledger import MemoryLedger
from crawler.rate.pacing import Pace, RateGate
from tests.conftest import KEY, SimFactory, fast_settings


async def test_a_200_cut_after_its_headers_counts_as_billed(simulator: SimFactory) -> None:
    """A 200 whose body is cut mid-transfer was billed by the API: credits_billed equals the server's count."""
    async with simulator(faults=frozenset({"cut"}), fault_rate=0.4) as sim:
        handles = sim.world.sample_handles(40)
        async with Client(fast_settings(sim.url, retry_attempts=8), api_key=KEY) as client:
            for handle in handles:
                await client.user_info(handle)
    assert sim.stats.faults["cut"] > 5
    assert client.counters.credits_billed == sim.stats.billed[KEY] == len(handles) + sim.stats.faults["cut"]


@pytest.mark.parametrize("value", ["86400", "1e400", "nan"])
async def test_a_retry_after_beyond_the_stall_limit_ends_the_run_at_once(simulator: SimFactory, value: str) -> None:
    """Retry-After 86400, 1e400 or nan with a 20 s stall limit: a stall error naming the value, without waiting."""
    async with simulator(always_429=True, retry_after=value) as sim:
        client = Client(fast_settings(sim.url, retry_stall_limit=20.0), api_key=KEY)
        async with client:
            with pytest.raises(RateLimitStalled, match=r"Retry-After.*retry\.stall_limit = 20") as info:
                await asyncio.wait_for(client.get("/region-list/"), 10)  # far below the 20 s stall limit
    assert ("86400" if value == "86400" else "inf") in str(info.value)
    assert "inf s" not in str(info.value)  # "wait without end", not "wait inf s"
    assert sim.stats.served_429 == 1


def _numeric_keys() -> list[str]:
    """Every setting that takes a number (it accepts "1")."""
    out = []
    for key, (_, parse) in KEYS.items():
        try:
            ok = parse("1") is not None and not isinstance(parse("1"), (bool, str))
        except (ValueError, TypeError):
            continue
        if ok:
            out.append(key)
    return out


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_usage_errors_for_every_numeric_key(tmp_path: Any, value: str) -> None:
    """nan and inf, as a flag or as a TOML literal, are exit-2 errors naming the key, for every numeric setting."""
    keys = _numeric_keys()
    assert {"rate.limit", "rate.window", "retry.stall_limit", "http.read_timeout"} <= set(keys)
    for key in keys:
        with pytest.raises(UsageError, match=rf"'{key}'"):
            load_settings(flags={key: value}, environ={})
        section, name = key.split(".")
        path = tmp_path / f"{key}.toml"
        path.write_text(f"[{section}]\n{name} = {value}\n")
        with pytest.raises(UsageError, match=rf"'{key}'"):
            load_settings(config_file=str(path), environ={})


class JumpClock:
    """Monotonic time plus an offset the test moves (a stall limit passes without waiting for it)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


async def test_the_stall_timer_restarts_after_any_answer_that_is_not_a_429(simulator: SimFactory) -> None:
    """A 429, then more than the stall limit of not-found answers, then a 429: the run goes on."""
    clock = JumpClock()
    async with simulator(rate_limit=1, rate_window=0.3) as sim:
        gate = RateGate(Pace(enabled=False), cooldown_base=0.02, cooldown_max=0.1, stall_limit=20.0, clock=clock)
        async with Client(fast_settings(sim.url), api_key=KEY, gate=gate) as client:
            for n in range(2):  # the second call meets 429s (one start per 0.3 s) before its not-found answer
                with pytest.raises(NotFound):
                    await client.user_info(f"nosuchuser{n}x")
            assert sim.stats.served_429 > 0
            clock.offset += 30.0  # 30 s of not-found answers: longer than the stall limit
            before = sim.stats.served_429
            for n in range(2, 4):
                with pytest.raises(NotFound):
                    await client.user_info(f"nosuchuser{n}x")
            assert sim.stats.served_429 > before  # a new 429 after the long quiet, and the run went on


class RecordingLedger(MemoryLedger):
    """An in-process ledger that records what the gate asks of it on each 429."""

    def __init__(self) -> None:
        super().__init__("recording", private=True)
        self.cooldowns: list[tuple[float, bool, bool]] = []  # (seconds, exact, new event)

    async def report_429(self, started: float, seconds: float, exact: bool) -> bool:
        new = await super().report_429(started, seconds, exact)
        self.cooldowns.append((seconds, exact, new))
        return new


async def test_retry_after_is_passed_on_exactly(simulator: SimFactory) -> None:
    """Every 429 with Retry-After 0.4 starts a cooldown of exactly 0.4 s for the key (no jitter, no scaling)."""
    async with simulator(rate_limit=5, rate_window=1.0, retry_after=0.4) as sim:
        ledger = RecordingLedger()
        gate = RateGate(Pace(enabled=False), ledger=ledger, stall_limit=5.0)
        async with Client(fast_settings(sim.url), api_key=KEY, gate=gate) as client:
            await asyncio.gather(*(client.get("/region-list/") for _ in range(12)))
    assert len(ledger.cooldowns) == sim.stats.served_429 > 0
    assert all(seconds == 0.4 and exact for seconds, exact, _ in ledger.cooldowns)


async def test_backoff_without_retry_after_doubles_within_a_streak(simulator: SimFactory) -> None:
    """Without Retry-After each cooldown event of a 429 streak doubles (equal jitter), up to the cap."""
    async with simulator(rate_limit=3, rate_window=0.5) as sim:
        ledger = RecordingLedger()
        base, cap = 0.05, 0.8
        gate = RateGate(Pace(enabled=False), ledger=ledger, cooldown_base=base, cooldown_max=cap, stall_limit=10.0)
        async with Client(fast_settings(sim.url), api_key=KEY, gate=gate) as client:
            await asyncio.gather(*(client.get("/region-list/") for _ in range(40)))
    events = [seconds for seconds, _, new in ledger.cooldowns if new]
    assert len(events) >= 3
    assert all(base / 2 <= seconds <= cap for seconds in events)
    assert max(events) > 2 * base  # a streak escalated past its second step: not a constant cooldown
