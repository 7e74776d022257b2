"""The one retry seam, over tenacity: every wait between tries in the program is drawn, capped and cut short here.

Callers: the client's HTTP retries and its outage probe (api), the 429 cooldown and the ledger (rate), media transfers
(runs/transfer), the PostgreSQL job store, its queue consumer and the history store (`stores/postgres.Outage`).

tenacity directly, not stamina over it: stamina's test mode and retry hooks are global to the process, ours are per
client (``retry.base_delay = 0`` turns one client's waits off, and tests run clients of both kinds in one process);
and stamina hides the two tenacity parts we need: its ``sleep`` (a wait a stop cuts short) and its stop rule (a stall
limit on an injected clock, for an outage that may have begun in an earlier call). One jitter shape: `jitter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import tenacity

T = TypeVar("T")
Clock = Callable[[], float]


def jitter(delay: float) -> float:
    """Equal jitter, the program's one shape: half of ``delay`` fixed, half random (a pause is never near zero, and
    processes that failed together do not come back together)."""
    return delay / 2 + random.uniform(0, delay / 2)


def backoff(tries: int, *, base: float, cap: float) -> float:
    """The wait after the ``tries``-th failure of a streak: ``base`` doubling up to ``cap``, jittered. ``base <= 0``
    turns the waits off (the tests' ``retry.base_delay = 0``)."""
    if base <= 0:
        return 0.0
    return jitter(min(cap, base * 2.0 ** min(tries - 1, 60)))


class Stall:
    """How long a service has gone without answering, against its limit (``retry.stall_limit``): the one place the
    limit is read. A streak begins at its first failure and ends at any answer."""

    def __init__(self, limit: float, *, clock: Clock = time.monotonic, since: float | None = None) -> None:
        self.limit = limit
        self.clock = clock
        self.since = since  # the first failure of the current streak (None: no streak)
        self.tries = 0  # failures in the current streak

    def failed(self) -> float:
        """Count one failure; the seconds since the streak began."""
        now = self.clock()
        if self.since is None:
            self.since = now
        self.tries += 1
        return now - self.since

    def answered(self) -> None:
        """The service answered: the streak is over."""
        self.since, self.tries = None, 0

    def elapsed(self) -> float:
        """Seconds since the streak began (0 without one)."""
        return 0.0 if self.since is None else self.clock() - self.since

    @property
    def expired(self) -> bool:
        """The streak has lasted the limit: give up."""
        return self.since is not None and self.elapsed() >= self.limit

    def left(self) -> float:
        """Seconds until the limit (a wait never sleeps past it)."""
        return self.limit if self.since is None else max(0.0, self.since + self.limit - self.clock())


class Halt:
    """A stop that cuts every retry's wait short; from `set` on, a failure raises its error instead of another try."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._event = asyncio.Event()

    def set(self, error: BaseException) -> None:
        """Stop retrying with ``error`` (idempotent: the first error stays)."""
        self.error = self.error or error
        self._event.set()

    async def wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the halt comes first: then raise its error (no try follows a halt)."""
        await pause(seconds, self._event)
        if self.error is not None:
            raise self.error


async def pause(seconds: float, stop: asyncio.Event | None = None) -> bool:
    """Wait ``seconds``, cut short when ``stop`` is set; True if it was."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    if not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(seconds, 0.0))
    return stop.is_set()


def _report(on_retry: Callable[[BaseException, int, float], None] | None,
            tries: Callable[[tenacity.RetryCallState], int]) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        if on_retry is not None and exc is not None:
            on_retry(exc, tries(state), state.upcoming_sleep)

    return before_sleep


async def retry_async(
    call: Callable[[], Awaitable[T]],
    *,
    retry_on: type[Exception],
    attempts: int | None,
    base_delay: float,
    max_delay: float,
    max_time: float | None = None,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
    halt: Halt | None = None,
    clock: Clock = time.monotonic,
) -> T:
    """Await ``call()`` up to ``attempts`` times (None: no count) and ``max_time`` seconds while it raises ``retry_on``.

    Waits follow `backoff` from ``base_delay`` (capped at ``max_delay``; 0 turns them off) and never run past
    ``max_time``. The last error propagates; after ``halt`` is set, the halt's error (a wait under way ends at once).
    """
    began = clock()
    try:  # the common case pays for no retry machinery
        return await call()
    except retry_on as exc:
        first: list[BaseException] = [exc]

    async def once() -> T:
        # tenacity, like backoff, calls a target synchronously unless it is a coroutine *function*: a lambda returning
        # a coroutine would never be awaited. The first failure, already met, is its first try.
        if first:
            raise first.pop()
        return await call()

    def left() -> float:
        return max_time - (clock() - began) if max_time is not None else float("inf")

    def stop(state: tenacity.RetryCallState) -> bool:
        return ((attempts is not None and state.attempt_number >= attempts) or left() <= 0
                or (halt is not None and halt.error is not None))

    def wait(state: tenacity.RetryCallState) -> float:
        return max(0.0, min(backoff(state.attempt_number, base=base_delay, cap=max_delay), left()))

    retrying = tenacity.AsyncRetrying(
        sleep=halt.wait if halt is not None else asyncio.sleep, stop=stop, wait=wait, reraise=True,
        retry=tenacity.retry_if_exception_type(retry_on), before_sleep=_report(on_retry, lambda s: s.attempt_number))
    try:
        result: T = await retrying(once)
    except retry_on:
        if halt is not None and halt.error is not None:
            raise halt.error from None
        raise
    return result


async def retry_until_stall(
    call: Callable[[], Awaitable[T]],
    *,
    retriable: Callable[[BaseException], bool],
    stall: Stall,
    lost: Callable[[], BaseException],
    halt: Halt | None = None,
    base_delay: float = 0.1,
    max_delay: float = 2.0,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
) -> T:
    """Await ``call()`` (a new try each time) until it answers: an error ``retriable`` accepts is waited out with
    `backoff` until ``stall`` has lasted its limit (then ``lost()`` is raised). After ``halt`` is set, its error is
    raised at the next failure, or at once by a wait under way. ``stall`` may outlive the call (an outage of a
    store spans its calls); the streak ends when ``call()`` answers.
    """

    def retry(exc: BaseException) -> bool:
        return isinstance(exc, Exception) and retriable(exc)  # never a cancellation

    def stop(state: tenacity.RetryCallState) -> bool:
        return stall.expired or (halt is not None and halt.error is not None)

    def wait(state: tenacity.RetryCallState) -> float:
        return min(backoff(stall.tries, base=base_delay, cap=max_delay), stall.left())

    async def once() -> T:
        try:
            result = await call()
        except Exception as exc:
            if retriable(exc):
                stall.failed()
            raise
        stall.answered()
        return result

    retrying = tenacity.AsyncRetrying(
        sleep=halt.wait if halt is not None else asyncio.sleep, stop=stop, wait=wait, reraise=True,
        retry=tenacity.retry_if_exception(retry), before_sleep=_report(on_retry, lambda s: stall.tries))
    try:
        result: T = await retrying(once)
    except Exception as exc:
        if not retry(exc):
            raise
        if halt is not None and halt.error is not None:
            raise halt.error from None
        raise lost() from None
    return result


def retry_after_words(seconds: float) -> str:
    """A server's Retry-After in words for a message: "90 s (Retry-After)", never "inf s"."""
    return f"{seconds:g} s (Retry-After)" if math.isfinite(seconds) else "without end (Retry-After: inf)"
