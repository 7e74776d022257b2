"""Request pacing for the client: when may the next request start, and the shared 429 cooldown.

The rules (even pacing, the rolling window, the per-second cap, the cooldown) are the key's, kept in
its ledger (`crawler.rate.ledger`) so that every process using the key draws from one budget. The gate is
this process's door to the ledger: one reservation at a time (so processes take turns), waits outside
the ledger, escalating backoff after 429s, and the stall limits.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import TypeVar

from crawler.errors import LedgerLost, RateLimitStalled
from crawler.options import RateOptions
from crawler.rate.ledger import MemoryLedger, owner_id
from crawler.rate.rules import Ledger, LedgerUnavailable, Rules
from crawler.retry import Stall, backoff, retry_after_words, retry_async

log = logging.getLogger("crawler.rate.pacing")
T = TypeVar("T")

# With pacing off (benchmarks), only the cooldown matters: rules no request count ever reaches.
_UNLIMITED = Rules(limit=1 << 40, window=1.0, max_per_second=1 << 40, burst=1, margin=0.0)


@dataclass(frozen=True, slots=True)
class Pace:
    """Pacing settings, in requests and seconds."""

    limit: int = 200
    window: float = 60.0
    burst: int = 1
    max_per_second: int = 40
    margin: float | None = None  # None: max(0.05 s, 0.5% of the window)
    enabled: bool = True

    @classmethod
    def of(cls, rate: RateOptions) -> Pace:
        """The pace the rate.* options describe."""
        return cls(limit=rate.limit, window=rate.window, burst=rate.burst, max_per_second=rate.max_per_second,
                   margin=rate.margin, enabled=rate.enabled)

    @property
    def safety(self) -> float:
        """Seconds added to each window so arrival jitter cannot push the server's count over."""
        return self.margin if self.margin is not None else max(0.05, 0.005 * self.window)

    @property
    def rules(self) -> Rules:
        """The pace as the ledger applies it."""
        if not self.enabled:
            return _UNLIMITED
        return Rules(limit=self.limit, window=self.window, max_per_second=self.max_per_second, burst=self.burst,
                     margin=self.safety)

    @property
    def interval(self) -> float:
        """Seconds between evenly paced starts."""
        return self.rules.interval

    @property
    def effective_rate(self) -> float:
        """Requests per window actually used (what the summary reports)."""
        return self.window / self.interval if self.enabled else float("inf")


MAX_AUTO_WORKERS = 64  # parallelism = "auto" never starts more workers than this


def auto_workers(pace: Pace, latency: float, current: int) -> int:
    """parallelism = "auto": workers enough to keep the key's rate busy at the latency seen so far.

    Never fewer than `current` (a pool only grows); `latency` is the moving average of a request's seconds (0:
    nothing measured yet). Every kind of run sizes its pool by this one rule.
    """
    if latency <= 0:
        return current
    rate = 1.0 / pace.interval if pace.enabled else math.inf
    want = MAX_AUTO_WORKERS if math.isinf(rate) else math.ceil(rate * latency * 1.5) + 1
    return max(current, min(MAX_AUTO_WORKERS, want))


class RateGate:
    """Admits request starts from the key's ledger and runs the shared 429 cooldown.

    ``ledger`` defaults to a private in-process one; ``clock`` times the stall limits (monotonic seconds).
    Open it (``async with``) before the first `acquire`.
    """

    def __init__(
        self,
        pace: Pace,
        *,
        ledger: Ledger | None = None,
        cooldown_base: float = 1.0,
        cooldown_max: float = 30.0,
        stall_limit: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pace = pace
        self._rules = pace.rules
        self._clock = clock
        self.ledger: Ledger = ledger if ledger is not None else MemoryLedger("", clock=clock, private=True)
        self._owner = owner_id()
        self._lock = asyncio.Lock()
        self._cooldown_base = cooldown_base
        self._cooldown_max = cooldown_max
        self._stall_limit = stall_limit
        self._strikes = 0
        self._stall = Stall(stall_limit, clock=clock)  # the 429 streak
        self.cooldowns = 0  # distinct 429 events (bursts count once)
        self.wait_seconds = 0.0  # time this process's starts spent waiting for the key's budget
        self.last_wait = 0.0  # the latest `acquire()`'s share of it (read right after it returns: no await between)
        self._last_seq = 0  # the ledger's reservation counter as last seen (it only grows unless state is lost)

    def now(self) -> float:
        """The gate's clock (monotonic seconds)."""
        return self._clock()

    async def __aenter__(self) -> RateGate:
        await self.ledger.open(self._rules if self.pace.enabled else None)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.ledger.aclose()

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        """One ledger step; an unreachable ledger pauses this process's starts, then ends the run."""

        try:  # the common case needs no retry machinery (building a backoff decorator costs ~17 µs)
            return await op()
        except LedgerUnavailable as exc:
            log.warning("the rate ledger did not answer (%s); all workers pause and retry", exc)

        def on_retry(exc: BaseException, tries: int, wait: float) -> None:
            log.warning("the rate ledger did not answer (%s); all workers pause, retrying in %.1f s", exc, wait)

        try:
            return await retry_async(op, retry_on=LedgerUnavailable, attempts=None, max_time=self._stall_limit,
                                     clock=self._clock, base_delay=max(0.1, self._cooldown_base / 4),
                                     max_delay=max(0.5, min(self._cooldown_max, 5.0)), on_retry=on_retry)
        except LedgerUnavailable as exc:
            raise LedgerLost(
                f"the key's rate ledger has not answered for {self._stall_limit:g} s ({exc}): check it"
                " (Redis up? state directory writable?); what was committed is kept and the same command resumes"
            ) from None

    async def acquire(self) -> float:
        """Wait until one request may start; return its start on the ledger's clock (pass it to report_429)."""
        async with self._lock:  # one reservation at a time: processes sharing the key take turns
            began = self._clock()
            try:
                while True:
                    slot = await self._call(lambda: self.ledger.reserve(self._rules, self._owner))
                    if slot.seq < self._last_seq:
                        await self._forgotten()
                        continue
                    self._last_seq = slot.seq
                    if slot.wait <= 0:
                        return slot.start
                    reserved = self._clock()
                    await asyncio.sleep(slot.wait)
                    pause = await self._call(partial(self.ledger.confirm, slot, self._rules))
                    if pause < 0:
                        await self._forgotten()
                    elif pause == 0:  # the start on the ledger's clock, counting any late wake-up
                        return slot.start + max(0.0, self._clock() - reserved - slot.wait)
                    else:
                        await asyncio.sleep(pause)  # a cooldown began while we waited: the slot was given back
            finally:
                self.last_wait = self._clock() - began
                self.wait_seconds += self.last_wait

    async def _forgotten(self) -> None:
        """The ledger lost its state (Redis restarted empty): the last window's starts are unknown, so this
        process starts nothing for one window; then no window can hold both forgotten and new starts."""
        log.warning("the key's rate ledger (%s) lost its state; pausing one window (%.1f s) so the API's"
                    " limit holds", self.ledger.where, self._rules.span)
        self._last_seq = 0
        await asyncio.sleep(self._rules.span)

    async def report_429(self, started: float, retry_after: float | None) -> None:
        """Start (or extend) the key's cooldown after a 429 for a request started at ``started``.

        Raises RateLimitStalled when 429s have continued for longer than the stall limit, or when the
        server asks for a wait longer than it (or not finite).
        """
        if self._stall.expired:
            raise RateLimitStalled(
                f"the API has answered 429 (rate limit) for {self._stall.elapsed():.0f} s without a break; "
                "another client may be using the same key: check it, lower --rate, or raise retry.stall_limit"
            )
        self._stall.failed()
        if retry_after is not None:
            if not math.isfinite(retry_after) or retry_after > self._stall_limit:
                raise RateLimitStalled(
                    f"the API asked to wait {retry_after_words(retry_after)}, longer than retry.stall_limit"
                    f" = {self._stall_limit:g} s: run the same command again later, or raise retry.stall_limit"
                )
            # The server said exactly how long: honour it, no jitter, never shorten a longer cooldown.
            if await self._call(lambda: self.ledger.report_429(started, retry_after, True)):
                self.cooldowns += 1
            return
        strikes = min(self._strikes + 1, 32)
        delay = backoff(strikes, base=self._cooldown_base, cap=min(self._cooldown_max, self._stall_limit))
        if await self._call(lambda: self.ledger.report_429(started, delay, False)):
            self._strikes = strikes
            self.cooldowns += 1
            log.warning("rate limited (429): all workers of the key pause %.2f s", delay)

    def report_success(self) -> None:
        """A request got through: the 429 streak (and its escalation) is over."""
        self._strikes = 0
        self._stall.answered()
