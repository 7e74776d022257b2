"""Request pacing for the client: when may the next request start, and the shared 429 cooldown.

Three rules, all applied to every start (retries included):
- even pacing through an aiolimiter leaky bucket of capacity ``burst`` (no start-up burst beyond it);
- a hard rolling-window log: never more than ``limit`` starts in any ``window + margin`` seconds,
  and never more than ``max_per_second`` in any ``1 + margin`` seconds. The margin absorbs jitter
  between our send time and the server's arrival time, so the server's window never sees more;
- one cooldown shared by every worker after a 429: a burst of 429s is one event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from crawler.errors import RateLimitStalled

log = logging.getLogger("crawler.pacing")


@dataclass(frozen=True, slots=True)
class Pace:
    """Pacing settings, in requests and seconds."""

    limit: int = 200
    window: float = 60.0
    burst: int = 1
    max_per_second: int = 40
    margin: float | None = None  # None: max(0.05 s, 0.5% of the window)
    enabled: bool = True

    @property
    def safety(self) -> float:
        """Seconds added to each window so arrival jitter cannot push the server's count over."""
        return self.margin if self.margin is not None else max(0.05, 0.005 * self.window)

    @property
    def interval(self) -> float:
        """Seconds between evenly paced starts."""
        per_window = (self.window + self.safety) / self.limit
        per_second = (1.0 + self.safety) / self.max_per_second
        return max(per_window, per_second)

    @property
    def effective_rate(self) -> float:
        """Requests per window actually used (what the summary reports)."""
        return self.window / self.interval if self.enabled else float("inf")


class RateGate:
    """Admits request starts under the Pace rules and runs the shared 429 cooldown."""

    def __init__(
        self,
        pace: Pace,
        *,
        cooldown_base: float = 1.0,
        cooldown_max: float = 30.0,
        stall_limit: float = 300.0,
    ) -> None:
        self.pace = pace
        # A capacity-1 bucket loses every late wake-up (epoll rounds timeouts up to 1 ms, plus a loop hop):
        # measured 2.4% slow. So the bucket runs 3% ahead and the rolling log below holds the exact limit;
        # once the log is full each start follows its predecessor of one window earlier, evenly.
        lead = 0.97
        self._limiter = AsyncLimiter(pace.burst, pace.burst * pace.interval * lead) if pace.enabled else None
        self._window_log: deque[float] = deque(maxlen=max(1, pace.limit))
        self._second_log: deque[float] = deque(maxlen=max(1, pace.max_per_second))
        self._lock = asyncio.Lock()
        self._cooldown_base = cooldown_base
        self._cooldown_max = cooldown_max
        self._stall_limit = stall_limit
        self._cooldown_until = 0.0
        self._cooldown_set_at = float("-inf")
        self._strikes = 0
        self._stall_since: float | None = None
        self.cooldowns = 0  # distinct 429 events (bursts count once)

    @staticmethod
    def now() -> float:
        """The gate's clock (monotonic seconds)."""
        return time.monotonic()

    def _earliest(self, now: float) -> float:
        """The earliest moment the next start may happen, given the logs and the cooldown."""
        t = self._cooldown_until
        if not self.pace.enabled:
            return t
        safety = self.pace.safety
        if len(self._window_log) == self._window_log.maxlen:
            t = max(t, self._window_log[0] + self.pace.window + safety)
        if len(self._second_log) == self._second_log.maxlen:
            t = max(t, self._second_log[0] + 1.0 + safety)
        return t

    async def acquire(self) -> float:
        """Wait until one request may start; return its start time (pass it to report_429)."""
        async with self._lock:  # FIFO: one caller at a time takes the next slot
            while True:
                wait = self._cooldown_until - self.now()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self._limiter is not None:
                    await self._limiter.acquire()
                now = self.now()
                wait = self._earliest(now) - now
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if self.pace.enabled:
                self._window_log.append(now)
                self._second_log.append(now)
            return now

    def report_429(self, started: float, retry_after: float | None) -> None:
        """Start (or extend) the shared cooldown after a 429 for a request started at ``started``.

        Raises RateLimitStalled when 429s have continued for longer than the stall limit.
        """
        now = self.now()
        if self._stall_since is None:
            self._stall_since = now
        elif now - self._stall_since > self._stall_limit:
            raise RateLimitStalled(
                f"the API has answered 429 (rate limit) for {now - self._stall_since:.0f} s without a break; "
                "another client may be using the same key: check it, lower --rate, or raise retry.stall_limit"
            )
        if retry_after is not None:
            # The server said exactly how long: honour it, no jitter, never shorten a longer cooldown.
            self._cooldown_until = max(self._cooldown_until, now + retry_after)
            if started >= self._cooldown_set_at:
                self.cooldowns += 1
                self._cooldown_set_at = now
            return
        if started < self._cooldown_set_at:
            return  # part of a burst already answered by the current cooldown
        self._strikes = min(self._strikes + 1, 32)
        self.cooldowns += 1
        delay = min(self._cooldown_max, self._cooldown_base * 2 ** (self._strikes - 1))
        delay = delay / 2 + random.uniform(0, delay / 2)  # equal jitter: never near zero
        self._cooldown_until = max(self._cooldown_until, now + delay)
        self._cooldown_set_at = now
        log.warning("rate limited (429): all workers pause %.2f s", delay)

    def report_success(self) -> None:
        """A request got through: the 429 streak (and its escalation) is over."""
        self._strikes = 0
        self._stall_since = None
