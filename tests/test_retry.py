"""The one retry seam (crawler.retry over tenacity): waits, the stall limit, a stop cutting a wait short."""

from __future__ import annotations

import asyncio

import pytest

from crawler.retry import Halt, Stall, backoff, retry_async, retry_until_stall


class Down(Exception):
    """A service that did not answer."""


class Lost(Exception):
    """The stall limit was reached."""


async def test_a_halt_cuts_an_hour_long_wait_short_and_ends_the_tries() -> None:
    """A halt set while a retry waits (an hour) ends the wait at once and no try follows: its error is raised."""
    halt = Halt()
    tries = 0

    async def call() -> None:
        nonlocal tries
        tries += 1
        raise Down("no answer")

    def on_retry(exc: BaseException, n: int, wait: float) -> None:
        assert wait >= 1800  # equal jitter: at least half of the hour
        asyncio.get_running_loop().call_soon(halt.set, Lost("stopped"))

    # Bounded: a wait that the halt does not cut fails the test (a timeout) instead of hanging it.
    with pytest.raises(Lost, match="stopped"):
        await asyncio.wait_for(retry_async(call, retry_on=Down, attempts=None, base_delay=3600, max_delay=3600,
                                           on_retry=on_retry, halt=halt), 10)
    assert tries == 1


async def test_the_stall_limit_ends_retrying_on_the_injected_clock() -> None:
    """A service that never answers is tried until the streak has lasted the stall limit, then `lost()` is raised."""
    now = [0.0]
    tries = 0

    async def call() -> None:
        nonlocal tries
        tries += 1
        now[0] += 10.0  # each try takes 10 s of the injected clock
        raise Down("no answer")

    stall = Stall(35.0, clock=lambda: now[0])
    with pytest.raises(Lost):
        await retry_until_stall(call, retriable=lambda e: isinstance(e, Down), stall=stall, lost=lambda: Lost("x"),
                                base_delay=0)
    # Failures at 10, 20, 30, 40, 50: the streak begins at the first and has lasted 35 s at the fifth.
    assert tries == 5


async def test_an_answer_ends_the_streak_and_other_errors_pass_through() -> None:
    """An answer resets the stall streak; an error that is not retriable propagates at its first try."""
    stall = Stall(60.0, clock=lambda: 0.0)
    results = iter([Down("a"), Down("b"), "ok"])

    async def flaky() -> str:
        item = next(results)
        if isinstance(item, Exception):
            raise item
        return item

    got = await retry_until_stall(flaky, retriable=lambda e: isinstance(e, Down), stall=stall,
                                  lost=lambda: Lost("x"), base_delay=0)
    assert got == "ok" and stall.since is None and stall.tries == 0

    async def broken() -> None:
        raise ValueError("not retriable")

    with pytest.raises(ValueError):
        await retry_until_stall(broken, retriable=lambda e: isinstance(e, Down), stall=stall,
                                lost=lambda: Lost("x"), base_delay=0)


async def test_a_halted_stall_retry_raises_the_halt_error_at_the_next_failure() -> None:
    """After a halt, a failing call raises the halt's error instead of waiting out the stall limit or its tries."""
    halt = Halt()
    halt.set(Lost("signalled"))
    stall = Stall(3600.0)

    async def call() -> None:
        raise Down("no answer")

    with pytest.raises(Lost, match="signalled"):
        await asyncio.wait_for(retry_until_stall(call, retriable=lambda e: isinstance(e, Down), stall=stall,
                                                 lost=lambda: Lost("stall"), halt=halt, base_delay=3600), 10)
    with pytest.raises(Lost, match="signalled"):
        await asyncio.wait_for(retry_async(call, retry_on=Down, attempts=None, base_delay=3600, max_delay=3600,
                                           halt=halt), 10)


async def test_attempts_count_every_try_and_waits_off_at_base_zero() -> None:
    """`attempts` counts the first try too; base_delay 0 turns every wait off (the tests' settings)."""
    tries = 0
    waits: list[float] = []

    async def call() -> None:
        nonlocal tries
        tries += 1
        raise Down("no answer")

    with pytest.raises(Down):
        await retry_async(call, retry_on=Down, attempts=3, base_delay=0, max_delay=0,
                          on_retry=lambda e, n, w: waits.append(w))
    assert tries == 3 and waits == [0.0, 0.0]


def test_backoff_doubles_with_equal_jitter_up_to_its_cap() -> None:
    """The one jitter shape: the n-th wait lies in [d/2, d] for d = base * 2**(n-1), capped."""
    for n in range(1, 12):
        d = min(8.0, 0.5 * 2 ** (n - 1))
        assert d / 2 <= backoff(n, base=0.5, cap=8.0) <= d
    assert backoff(3, base=0, cap=8.0) == 0.0
