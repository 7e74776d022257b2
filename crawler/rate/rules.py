"""The key's rate rules as pure functions of (rules, now, state), and the contract every ledger keeps.

Shared by every backend (`crawler.rate.ledger`: in-process and local file; `crawler.rate.redis_ledger`, whose Lua
mirrors `next_start`, `apply_429` and `ahead`); what the rules mean is told in `crawler.rate.ledger`.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from crawler.errors import UsageError
from crawler.rate.owners import Registered

log = logging.getLogger("crawler.rate.ledger")

HOUR = 3600.0
SECOND_MARGIN = 0.025  # seconds of arrival jitter allowed for in the per-second cap


class LedgerUnavailable(Exception):
    """The ledger's store did not answer (Redis down, file locked too long); the gate retries."""


@dataclass(frozen=True, slots=True)
class Rules:
    """The key's limits in the form the ledger applies them (seconds)."""

    limit: int
    window: float
    max_per_second: int
    burst: int
    margin: float

    @property
    def span(self) -> float:
        """No ``limit`` starts within this many seconds."""
        return self.window + self.margin

    @property
    def second_span(self) -> float:
        """No ``max_per_second`` starts within this many seconds: the second gets its own small margin (the
        window's, 0.3 s at 60 s, would cost the per-second cap 23% where it binds)."""
        return 1.0 + min(self.margin, SECOND_MARGIN)

    @property
    def interval(self) -> float:
        """Seconds between evenly paced starts of the key as a whole."""
        return max(self.span / self.limit, self.second_span / self.max_per_second)

    @property
    def tolerance(self) -> float:
        """How far ahead of the even schedule a start may come (``burst - 1`` intervals)."""
        return (self.burst - 1) * self.interval

    @property
    def late(self) -> float:
        """A start later than this after its planned moment is recorded at its actual moment (`confirm`): half the
        margin of the rule that spaces the starts (the per-second cap's is its own, smaller one)."""
        per_second_binds = self.burst > 1 or self.second_span / self.max_per_second >= self.span / self.limit
        return (self.second_span - 1.0 if per_second_binds else self.margin) / 2

    @property
    def keep(self) -> float:
        """How long a start matters to any rule."""
        return max(self.span, self.second_span)


@dataclass(frozen=True, slots=True)
class Slot:
    """A reserved start: ``start`` on the ledger's clock, ``wait`` seconds from the reservation.

    ``token`` is ``owner|seq``; ``seq`` counts the ledger's reservations, so a ``seq`` lower than one seen
    before means the ledger lost its state (a Redis that restarted empty).
    """

    start: float
    wait: float
    token: str

    @property
    def seq(self) -> int:
        """The ledger's reservation counter at this slot."""
        return int(self.token.rpartition("|")[2])


@dataclass(frozen=True, slots=True)
class Status:
    """What `crawler budget` shows of a ledger."""

    at: float
    started: int
    processes: dict[str, int]
    cooldown_until: float | None
    rate_limited_last_hour: int
    limit: int | None
    window: float | None
    max_per_second: int | None
    ahead: int = 0  # starts dated beyond the `horizon` (a clock set back): the next reservation drops them
    ahead_cooldown: bool = False  # likewise a cooldown set ahead


def next_start(rules: Rules, now: float, tat: float, cooldown_until: float,
               nth_in_window: float | None, nth_in_second: float | None) -> tuple[float, float]:
    """The earliest allowed start and the new GCRA schedule time (one rule for every backend but Redis's Lua).

    ``nth_in_window`` is the ``limit``-th latest recorded start (None if fewer), ``nth_in_second`` the
    ``max_per_second``-th latest.
    """
    t = max(now, tat - rules.tolerance, cooldown_until)
    if nth_in_window is not None:
        t = max(t, nth_in_window + rules.span)
    if nth_in_second is not None:
        t = max(t, nth_in_second + rules.second_span)
    return t, max(tat, t) + rules.interval


def apply_429(now: float, cooldown_until: float, set_at: float, started: float, seconds: float,
              exact: bool) -> tuple[float, float, bool]:
    """A 429 for a request started at ``started``: (cooldown_until, set_at, whether it is a new event).

    ``exact`` (a Retry-After) is always honoured; a backoff delay is ignored for a request that started
    before the current cooldown was set (one cooldown per burst of 429s).
    """
    new_event = started >= set_at
    if not exact and not new_event:
        return cooldown_until, set_at, False
    return max(cooldown_until, now + seconds), (now if new_event else set_at), new_event


def cooldown_trusted(rules: Rules, now: float, set_at: float) -> bool:
    """Whether a cooldown set at ``set_at`` can be trusted: a cooldown is set at the ledger's ``now``, so one set
    more than `Rules.keep` ahead of it was written by a clock that ran ahead and has been set back since."""
    return set_at <= now + rules.keep


def horizon(rules: Rules, now: float, cooldown_until: float, set_at: float, future: list[float]) -> float:
    """The latest start the ledger trusts; ``future`` holds the starts dated after ``now``, earliest first.

    `next_start` places a start at most `Rules.keep` after the latest of now, the cooldown's end and the starts
    already recorded, so honest starts ahead of now form a chain with no gap wider than that. A start beyond the
    chain was dated by a clock since set back: trusted, it would hold the key back by as much as that clock ran ahead.
    """
    reach = max(now, cooldown_until) if cooldown_trusted(rules, now, set_at) else now
    for t in future:
        if t > reach + rules.keep:
            break
        reach = max(reach, t)
    return reach + rules.keep


@dataclass(frozen=True, slots=True)
class Ahead:
    """What a clock since set back left in the ledger (see `ahead`): the starts dated after ``after`` are dropped
    (``dropped`` of them) and the ledger's state becomes ``tat``, ``cooldown_until`` and ``set_at``."""

    after: float
    dropped: int
    tat: float
    cooldown_until: float
    set_at: float


def ahead(rules: Rules, now: float, tat: float, cooldown_until: float, set_at: float,
          future: list[float]) -> Ahead | None:
    """None when the ledger's times can be trusted; else what replaces them (one rule for every backend but Redis's
    Lua, which mirrors it): starts beyond the `horizon`, a cooldown set ahead and a schedule beyond the last trusted
    start are dropped, and the key pauses one window from now, since the requests those starts stood for went out
    before now, perhaps within the last window. A clock set back costs at most that window."""
    after = horizon(rules, now, cooldown_until, set_at, future)
    dropped = len(future) - bisect.bisect_right(future, after)
    cool_ok, tat_ok = cooldown_trusted(rules, now, set_at), tat - rules.tolerance <= after
    if not dropped and cool_ok and tat_ok:
        return None
    return Ahead(after, dropped, tat if tat_ok else now, max(cooldown_until if cool_ok else 0.0, now + rules.span),
                 min(set_at, now))


def warn_ahead(where: str, dropped: int, rules: Rules) -> None:
    log.warning("the key's rate ledger (%s) held %d starts or a cooldown dated more than a window ahead (a clock"
                " that ran ahead was set back): dropped; the key pauses one window (%.1f s) so the API's limit holds",
                where, dropped, rules.span)


class Ledger(Protocol):
    """One key's ledger; every method is atomic for every process sharing it."""

    name: str
    where: str

    async def open(self, rules: Rules | None) -> None:
        """Connect; with ``rules``, check them against the ledger's (UsageError if they differ while in use)."""

    async def aclose(self) -> None:
        """Release connections (idempotent)."""

    async def reserve(self, rules: Rules, owner: str) -> Slot:
        """Record the next start for ``owner`` and return it."""

    async def confirm(self, slot: Slot, rules: Rules) -> float:
        """0 if ``slot`` may start now (recorded from now if that is later than planned); else give it back and
        return the seconds a cooldown still runs.

        A negative answer means the ledger no longer knows the slot: it lost its state (see `Slot.seq`).
        """

    async def report_429(self, started: float, seconds: float, exact: bool) -> bool:
        """Start or extend the shared cooldown; True when this 429 is a new event."""

    async def status(self, rules: Rules) -> Status:
        """Starts in the last window of ``rules`` and the rest of `Status` (read only: nothing is dropped)."""


def mismatch(rules: Rules, live: list[Registered], where: str) -> None:
    """UsageError if a process alive now (`crawler.rate.owners.alive`) uses the key with other limits."""
    mine = rules_record(rules)
    for entry in live:
        for key, value in mine.items():
            theirs = entry.limits.get(key)
            if theirs is not None and abs(theirs - value) > 1e-9:
                in_force = ", ".join(f"{k} = {entry.limits[k]:g}" for k in mine if k in entry.limits)
                host, pid = entry.ident.split("|")[:2]
                raise UsageError(
                    f"{key} = {value:g} differs from the key's ledger ({where}), in use with {in_force} by a running"
                    f" process ({host}, pid {pid}): every process sharing the key must use the same values"
                    " (or start this one after that process ends)"
                )


def rules_record(rules: Rules) -> dict[str, float]:
    return {"rate.limit": float(rules.limit), "rate.window": rules.window,
            "rate.max_per_second": float(rules.max_per_second)}


def status_of(rules: Rules, now: float, recent: list[tuple[float, str]], cooldown_until: float, set_at: float,
              limited: int, stored: dict[str, float]) -> Status:
    after = horizon(rules, now, cooldown_until, set_at, sorted(t for t, _ in recent if t > now))
    trusted = cooldown_trusted(rules, now, set_at)
    processes: Counter[str] = Counter()
    started = 0
    for t, token in recent:
        process = token.rpartition("|")[0]
        processes[process] += t <= now
        started += t <= now
    limit, window, per_second = (stored.get(k) for k in ("rate.limit", "rate.window", "rate.max_per_second"))
    return Status(
        at=now, started=started, processes=dict(processes),
        cooldown_until=cooldown_until if cooldown_until > now and trusted else None,
        rate_limited_last_hour=limited,
        limit=int(limit) if limit is not None else None, window=window,
        max_per_second=int(per_second) if per_second is not None else None,
        ahead=sum(t > after for t, _ in recent), ahead_cooldown=cooldown_until > now and not trusted,
    )
