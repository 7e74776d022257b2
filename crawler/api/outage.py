"""The shared outage state of a client: when requests to several targets get no API answer, every call pauses.

`Client.call` reports each answer or unanswered request here and waits in `Outage.wait` before sending; the probe's
backoff, its jitter and the stall limit come from the one retry seam (`crawler.retry`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from crawler.errors import Blocked, CannotConnect, NotAnApiAnswer, NotTheApi, OutageStalled, TlsFailed, Unreachable
from crawler.retry import Stall, backoff, pause

log = logging.getLogger("crawler.api.client")


class Outage:
    """The shared outage state: when requests to several targets get no API answer, every worker pauses.

    An item's transient failure counts against its own retries only while the API answers other
    requests; once the unanswered requests of a streak reach `threshold` over at least two targets,
    workers wait and one probe at a time (backing off from ``base_delay`` to ``max_delay``) checks
    whether the API is back. After ``stall_limit`` seconds without any answer the run stops with
    OutageStalled, leaving the items pending. Answers that are never the API's (404, HTML) from the
    first request on end the run at once with NotTheApi: a wrong base URL is not an outage; nor is a TLS or
    certificate error before any answer (https to a plain-http host), which ends it at the first request.
    """

    def __init__(
        self,
        *,
        base_url: str,
        stall_limit: float,
        attempts: int,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        probe_timeout: float = 20.0,
        threshold: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base_url = base_url
        self._stall = Stall(stall_limit, clock=clock)  # the streak of unanswered requests
        self._attempts = max(1, attempts)
        self._base_delay = max(base_delay, 0.1)
        self._max_delay = max(max_delay, self._base_delay)
        self._probe_timeout = probe_timeout
        self._threshold = threshold
        self._clock = clock
        self._targets: set[str] = set()
        self._last_error = ""
        self._probes = 0  # unanswered requests since the pause began: the probe's backoff
        self._probe_at = 0.0
        self._probe_until = 0.0
        self._recovered = asyncio.Event()
        self.active = False
        self.ever_answered = False
        self.pauses = 0  # distinct outages met

    def status(self) -> str:
        """'' when the API answers, else what the progress line shows."""
        if not self.active or self._stall.since is None:
            return ""
        return f"PAUSED: no API answer for {self._stall.elapsed():.0f} s ({self._last_error})"

    def answered(self) -> None:
        """Any API answer (a payload, an error body, a 429): the API is reachable."""
        self.ever_answered = True
        self._probe_until = 0.0
        if self._stall.since is None:
            return
        self._stall.answered()
        self._targets = set()
        if self.active:
            self.active = False
            self._recovered.set()
            self._recovered = asyncio.Event()
            log.warning("the API answers again: all workers resume")

    def failed(self, target: str, exc: Unreachable) -> bool:
        """Count one unanswered request; True when it is part of an outage (the caller waits, not retries)."""
        self._probe_until = 0.0
        if isinstance(exc, TlsFailed) and not self.ever_answered:
            raise NotTheApi(f"{exc}; nothing was marked failed")  # permanent: waiting for it is no use
        self._stall.failed()
        count = self._stall.tries
        if len(self._targets) < 2:
            self._targets.add(target)
        self._last_error = str(exc)
        if isinstance(exc, NotAnApiAnswer) and not self.ever_answered and count >= self._attempts:
            raise NotTheApi(
                f"{self._base_url} does not answer like TikLiveAPI ({exc}): check api.base_url / --base-url /"
                " TIKLIVE_BASE_URL (no path after the host); nothing was marked failed"
            )
        # Several targets failing together is an outage; so is finding no server at all, or a proxy, firewall or CDN
        # refusing every request in front of it, even for one item.
        if not self.active and count >= self._threshold and (
                len(self._targets) >= 2 or isinstance(exc, (CannotConnect, Blocked))):
            self.active = True
            self.pauses += 1
            self._probes = 0
            log.warning("no API answer on %d requests (%s): all workers pause", count, exc)
        if self.active:
            self._probes += 1
            self._probe_at = self._clock() + backoff(self._probes, base=self._base_delay, cap=self._max_delay)
            self._check()
        return self.active

    def release(self) -> None:
        """A call that passed `wait` sent nothing after all (its budget spent, a stop, cancelled): if it held the probe
        turn, the next caller takes it now rather than after the probe timeout."""
        self._probe_until = 0.0
        if self.active:
            self._recovered.set()  # wake the waiters: one of them probes
            self._recovered = asyncio.Event()

    def _check(self) -> None:
        if self._stall.expired:
            raise OutageStalled(
                f"no answer from the API at {self._base_url} for {self._stall.elapsed():.0f} s ({self._last_error});"
                " no item was marked failed: check the network and api.base_url, then run the same command again"
            )

    async def wait(self) -> None:
        """Return at once while the API answers; during an outage, wait for recovery or a probe turn."""
        while self.active:
            now = self._clock()
            self._check()
            if now >= self._probe_at and now >= self._probe_until:
                self._probe_until = now + self._probe_timeout  # this caller's request is the probe
                return
            # Wake up at the stall limit, not at the next probe after it.
            timeout = min(max(self._probe_at, self._probe_until) - now, self._stall.left())
            await pause(max(timeout, 0.01), self._recovered)
