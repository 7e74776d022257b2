"""The key's rate ledger: every request start of every process using one API key is drawn from it.

The gate (`pacing.RateGate`) asks the ledger for a *reservation*: in one atomic step the ledger picks the
earliest moment that keeps every rule for the key as a whole, records it, and says how long to wait:

- even pacing: a GCRA schedule of one start per ``interval`` with ``burst - 1`` starts of tolerance;
- the rolling window: a start is never within ``window + margin`` of the ``limit``-th start before it;
- the per-second cap: likewise ``max_per_second`` per ``1 + margin`` seconds;
- the shared 429 cooldown: nothing starts before it ends (a slot that comes due inside a cooldown that
  began after it was granted is given back with `confirm`).

`confirm` also moves a slot that starts later than half the margin after its plan (a wake-up held up by a
busy CPU, a slow store) to its actual start, so the starts reserved after it count the window from when the
request really went out. Smaller lateness (a millisecond of wake-up jitter on every start) is left to the
margin: recording it would push the whole schedule back by its sum and waste budget.

No time more than a window ahead of the chain of honest ones is trusted (`ahead`): starts or a cooldown dated by a
clock that ran ahead and was set back since are dropped with a warning, and the key pauses one window, so such a
clock costs at most that window instead of holding the key for as long as it ran ahead.

Because slots are handed out in order, several processes sharing a ledger are paced like one crawler,
each process holding at most one reservation at a time (its gate's lock) gets its turn in every round,
and a late wake-up never shifts the slots already handed out. Times are the ledger's own clock: the wall
clock of this machine for the local file, the server's ``TIME`` for Redis, so hosts' clocks never matter.

Backends, chosen by ``rate.shared``: ``MemoryLedger`` ("off", this process only), ``FileLedger``
("local", SQLite in the user's state directory, every process of the user), ``RedisLedger`` (any host).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import os
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from crawler import sqlite
from crawler.config import masked
from crawler.errors import UsageError

T = TypeVar("T")
log = logging.getLogger("crawler.rate.ledger")

HOUR = 3600.0
SECOND_MARGIN = 0.025  # seconds of arrival jitter allowed for in the per-second cap
# Test-only: seconds added to this host's wall clock (a host whose clock runs fast). Redis never reads it.
_SKEW = float(os.environ.get("CRAWLER_TEST_CLOCK_SKEW", "0") or 0)


def wall_clock() -> float:
    """This host's wall clock in epoch seconds (the local ledger's clock)."""
    return time.time() + _SKEW


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


def _warn_ahead(where: str, dropped: int, rules: Rules) -> None:
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


def ledger_name(api_key: str, base_url: str) -> str:
    """The ledger's name: a hash of the key and the API's base URL (never the key itself)."""
    return hashlib.sha256(f"{api_key}\0{base_url.rstrip('/')}".encode()).hexdigest()[:20]


def owner_id() -> str:
    """This process as the ledger records it: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def state_dir() -> Path:
    """$XDG_STATE_HOME/crawler, else ~/.local/state/crawler."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "crawler"


def _mismatch(rules: Rules, stored: dict[str, float], where: str) -> None:
    mine = {"rate.limit": float(rules.limit), "rate.window": rules.window,
            "rate.max_per_second": float(rules.max_per_second)}
    for key, value in mine.items():
        theirs = stored.get(key)
        if theirs is not None and abs(theirs - value) > 1e-9:
            in_force = ", ".join(f"{k} = {stored[k]:g}" for k in mine if k in stored)
            raise UsageError(
                f"{key} = {value:g} differs from the key's ledger ({where}), in use with {in_force}:"
                " every process sharing the key must use the same values (or wait one window after the others stop)"
            )


# ----- in-process ("off") ---------------------------------------------------------------------------------


@dataclass
class _MemoryState:
    starts: list[tuple[float, str]] = field(default_factory=list)
    tat: float = 0.0
    cooldown_until: float = 0.0
    set_at: float = float("-inf")
    rate_limited: list[float] = field(default_factory=list)
    rules: dict[str, float] = field(default_factory=dict)
    seq: int = 0


_MEMORY: dict[str, _MemoryState] = {}  # one per key and API in this process: every client of the process shares it


class MemoryLedger:
    """``rate.shared = "off"``: the ledger lives in this process (every client of the process shares it)."""

    def __init__(self, name: str, *, clock: Callable[[], float] = time.monotonic, private: bool = False) -> None:
        self.name = name
        self.where = "this process (rate.shared = off)"
        self._clock = clock
        self._s = _MemoryState() if private else _MEMORY.setdefault(name, _MemoryState())

    async def open(self, rules: Rules | None) -> None:
        if rules is not None:
            s = self._s
            self._forget_ahead(rules, self._clock())
            if s.starts and s.starts[-1][0] > self._clock() - rules.span:
                _mismatch(rules, s.rules, self.where)
            s.rules = _rules_record(rules)

    async def aclose(self) -> None:
        return None

    def _forget_ahead(self, rules: Rules, now: float) -> None:
        s = self._s
        n = len(s.starts)
        while n and s.starts[n - 1][0] > now:
            n -= 1
        found = ahead(rules, now, s.tat, s.cooldown_until, s.set_at, [t for t, _ in s.starts[n:]])
        if found is not None:
            del s.starts[len(s.starts) - found.dropped:]
            s.tat, s.cooldown_until, s.set_at = found.tat, found.cooldown_until, found.set_at
            _warn_ahead(self.where, found.dropped, rules)

    async def reserve(self, rules: Rules, owner: str) -> Slot:
        s, now = self._s, self._clock()
        self._forget_ahead(rules, now)
        _drop_before(s.starts, now - rules.keep)
        starts = s.starts
        nth_w = starts[-rules.limit][0] if len(starts) >= rules.limit else None
        nth_s = starts[-rules.max_per_second][0] if len(starts) >= rules.max_per_second else None
        t, s.tat = next_start(rules, now, s.tat, s.cooldown_until, nth_w, nth_s)
        s.seq += 1
        token = f"{owner}|{s.seq}"
        starts.append((t, token))
        return Slot(t, t - now, token)

    async def confirm(self, slot: Slot, rules: Rules) -> float:
        s, now = self._s, self._clock()
        if s.cooldown_until > now and not cooldown_trusted(rules, now, s.set_at):
            self._forget_ahead(rules, now)
        if s.cooldown_until > now:
            s.starts[:] = [e for e in s.starts if e[1] != slot.token]
            return s.cooldown_until - now
        if now - slot.start > rules.late and (slot.start, slot.token) in s.starts:  # late: the only case with work
            s.starts.remove((slot.start, slot.token))
            bisect.insort(s.starts, (now, slot.token))  # kept in start order
        return 0.0

    async def report_429(self, started: float, seconds: float, exact: bool) -> bool:
        s, now = self._s, self._clock()
        s.rate_limited = [t for t in s.rate_limited if t > now - HOUR] + [now]
        s.cooldown_until, s.set_at, new = apply_429(now, s.cooldown_until, s.set_at, started, seconds, exact)
        return new

    async def status(self, rules: Rules) -> Status:
        s, now = self._s, self._clock()
        recent = [(t, o) for t, o in s.starts if t > now - rules.window]
        return _status(rules, now, recent, s.cooldown_until, s.set_at, sum(t > now - HOUR for t in s.rate_limited),
                       s.rules)


def _drop_before(starts: list[tuple[float, str]], cutoff: float) -> None:
    n = 0
    while n < len(starts) and starts[n][0] < cutoff:
        n += 1
    if n:
        del starts[:n]


def _rules_record(rules: Rules) -> dict[str, float]:
    return {"rate.limit": float(rules.limit), "rate.window": rules.window,
            "rate.max_per_second": float(rules.max_per_second)}


def _status(rules: Rules, now: float, recent: list[tuple[float, str]], cooldown_until: float, set_at: float,
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


# ----- this machine ("local") -----------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS starts (id INTEGER PRIMARY KEY, t REAL NOT NULL, token TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS starts_t ON starts (t);
CREATE INDEX IF NOT EXISTS starts_token ON starts (token);
CREATE TABLE IF NOT EXISTS state (k TEXT PRIMARY KEY, v REAL NOT NULL);
CREATE TABLE IF NOT EXISTS limited (t REAL NOT NULL);
"""


class FileLedger:
    """``rate.shared = "local"``: a SQLite file in the user's state directory, one per key and API.

    Every operation is one ``BEGIN IMMEDIATE`` transaction, run on a thread of its own so a lock held by
    another process never blocks the event loop.
    """

    def __init__(self, name: str, *, directory: Path | None = None, clock: Callable[[], float] = wall_clock) -> None:
        self.name = name
        self.path = (directory or state_dir()) / f"ledger-{name}.db"
        self.where = f"local file {self.path}"
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._pool: ThreadPoolExecutor | None = None

    async def open(self, rules: Rules | None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        try:
            await self._run(self._connect)
            if rules is not None:
                await self._run(lambda db: self._register(db, rules))
        except (OSError, sqlite3.Error) as exc:
            await self.aclose()
            raise UsageError(
                f"rate.shared = \"local\": cannot use the ledger file {self.path} ({exc}); make its directory"
                " writable (XDG_STATE_HOME sets where it lives), or set rate.shared to a redis:// URL or \"off\""
            ) from None

    def _connect(self, _: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A ledger outlives processes, not power cuts: the OS keeps it (synchronous=OFF).
        db = sqlite.connect(self.path, busy_timeout=30.0, synchronous="OFF", any_thread=True)
        db.executescript(_SCHEMA)
        self._db = db

    def _register(self, db: sqlite3.Connection, rules: Rules) -> None:
        with sqlite.immediate(db):
            now = self._clock()
            self._forget_ahead(db, rules, now)
            latest = db.execute("SELECT max(t) FROM starts").fetchone()[0]
            stored = dict(db.execute("SELECT k, v FROM state WHERE k LIKE 'rate.%'").fetchall())
            if latest is not None and latest > now - rules.span:
                _mismatch(rules, stored, self.where)
            db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", _rules_record(rules).items())

    async def aclose(self) -> None:
        db, self._db = self._db, None
        pool, self._pool = self._pool, None
        if pool is not None:
            if db is not None:
                await asyncio.get_running_loop().run_in_executor(pool, db.close)
            pool.shutdown(wait=False)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._pool is None:
            raise RuntimeError("the ledger is not open")
        db = self._db

        def call() -> T:
            try:
                return fn(db)  # type: ignore[arg-type]
            except sqlite3.OperationalError as exc:  # locked beyond the timeout, disk trouble
                raise LedgerUnavailable(f"{self.where}: {exc}") from None

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def reserve(self, rules: Rules, owner: str) -> Slot:
        return await self._run(lambda db: self._reserve(db, rules, owner))

    def _forget_ahead(self, db: sqlite3.Connection, rules: Rules, now: float) -> None:
        future = [row[0] for row in db.execute("SELECT t FROM starts WHERE t > ? ORDER BY t", (now,))]
        state = dict(db.execute("SELECT k, v FROM state WHERE k IN ('tat', 'cooldown_until', 'set_at')"))
        found = ahead(rules, now, state.get("tat", 0.0), state.get("cooldown_until", 0.0),
                      state.get("set_at", float("-inf")), future)
        if found is not None:
            db.execute("DELETE FROM starts WHERE t > ?", (found.after,))
            db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", (
                ("tat", found.tat), ("cooldown_until", found.cooldown_until), ("set_at", found.set_at)))
            _warn_ahead(self.where, found.dropped, rules)

    def _reserve(self, db: sqlite3.Connection, rules: Rules, owner: str) -> Slot:
        with sqlite.immediate(db):
            now = self._clock()
            self._forget_ahead(db, rules, now)
            db.execute("DELETE FROM starts WHERE t < ?", (now - rules.keep,))
            state = dict(db.execute("SELECT k, v FROM state WHERE k IN ('tat', 'cooldown_until', 'seq')"))
            nth = "SELECT t FROM starts ORDER BY t DESC LIMIT 1 OFFSET ?"
            row_w = db.execute(nth, (rules.limit - 1,)).fetchone()
            row_s = db.execute(nth, (rules.max_per_second - 1,)).fetchone()
            t, tat = next_start(rules, now, state.get("tat", 0.0), state.get("cooldown_until", 0.0),
                                row_w[0] if row_w else None, row_s[0] if row_s else None)
            seq = int(state.get("seq", 0)) + 1
            token = f"{owner}|{seq}"
            db.execute("INSERT INTO starts (t, token) VALUES (?, ?)", (t, token))
            db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", (("tat", tat), ("seq", seq)))
        return Slot(t, t - now, token)

    async def confirm(self, slot: Slot, rules: Rules) -> float:
        def run(db: sqlite3.Connection) -> float:
            with sqlite.immediate(db):
                now = self._clock()
                state = dict(db.execute("SELECT k, v FROM state WHERE k IN ('cooldown_until', 'set_at')"))
                until = state.get("cooldown_until", 0.0)
                if until > now and not cooldown_trusted(rules, now, state.get("set_at", float("-inf"))):
                    self._forget_ahead(db, rules, now)
                    until = db.execute("SELECT v FROM state WHERE k = 'cooldown_until'").fetchone()[0]
                if until <= now:
                    if now - slot.start > rules.late:  # late: recorded where it really starts (no write otherwise)
                        db.execute("UPDATE starts SET t = ? WHERE token = ?", (now, slot.token))
                    return 0.0
                db.execute("DELETE FROM starts WHERE token = ?", (slot.token,))
                return float(until - now)

        return await self._run(run)

    async def report_429(self, started: float, seconds: float, exact: bool) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            with sqlite.immediate(db):
                now = self._clock()
                state = dict(db.execute("SELECT k, v FROM state WHERE k IN ('cooldown_until', 'set_at')"))
                until, set_at, new = apply_429(now, state.get("cooldown_until", 0.0),
                                               state.get("set_at", float("-inf")), started, seconds, exact)
                db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)",
                               (("cooldown_until", until), ("set_at", set_at)))
                db.execute("DELETE FROM limited WHERE t < ?", (now - HOUR,))
                db.execute("INSERT INTO limited VALUES (?)", (now,))
                return new

        return await self._run(run)

    async def status(self, rules: Rules) -> Status:
        def run(db: sqlite3.Connection) -> Status:
            now = self._clock()
            recent = db.execute("SELECT t, token FROM starts WHERE t > ?", (now - rules.window,)).fetchall()
            state = dict(db.execute("SELECT k, v FROM state").fetchall())
            limited = db.execute("SELECT count(*) FROM limited WHERE t > ?", (now - HOUR,)).fetchone()[0]
            return _status(rules, now, recent, state.get("cooldown_until", 0.0), state.get("set_at", float("-inf")),
                           limited, state)

        return await self._run(run)


# ----- every host (Redis) ---------------------------------------------------------------------------------

# The same rules as `next_start` / `apply_429`, in Lua so each step is one atomic call stamped with the
# server's TIME. Numbers travel as '%.6f' strings: Redis turns a returned Lua number into an integer and
# tostring() keeps only 14 digits (0.1 ms of an epoch time).
_LUA_NOW = """
local function num(x) return string.format('%.6f', x) end
local tm = redis.call('TIME')
local now = tonumber(tm[1]) + tonumber(tm[2]) / 1000000
-- `ahead` in ledger.py: what a clock since set back left ahead is dropped and the key pauses one window;
-- returns how many starts were dropped, -1 when every time is trusted.
local function forget(span, keep, tol)
  local st = redis.call('HMGET', KEYS[2], 'tat', 'cooldown_until', 'set_at')
  local tat, cool, set_at = tonumber(st[1] or '0'), tonumber(st[2] or '0'), tonumber(st[3] or '-1e300')
  local cool_ok = set_at <= now + keep
  local reach = now
  if cool_ok then reach = math.max(now, cool) end
  local future = redis.call('ZRANGE', KEYS[1], '(' .. num(now), '+inf', 'BYSCORE', 'WITHSCORES')
  local trusted = 0
  for i = 2, #future, 2 do
    local t = tonumber(future[i])
    if t > reach + keep then break end
    reach, trusted = math.max(reach, t), trusted + 1
  end
  local after, dropped = reach + keep, #future / 2 - trusted
  if dropped == 0 and cool_ok and tat - tol <= after then return -1 end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '(' .. num(after), '+inf')
  if tat - tol > after then redis.call('HSET', KEYS[2], 'tat', num(now)) end
  if not cool_ok then cool = 0 end
  redis.call('HSET', KEYS[2], 'cooldown_until', num(math.max(cool, now + span)))
  if set_at > now then redis.call('HSET', KEYS[2], 'set_at', num(now)) end
  return dropped
end
"""

_RESERVE = _LUA_NOW + """
local limit, span = tonumber(ARGV[1]), tonumber(ARGV[2])
local mps, sspan = tonumber(ARGV[3]), tonumber(ARGV[4])
local interval, tol, keep = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local dropped = forget(span, keep, tol)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. num(now - keep))
local st = redis.call('HMGET', KEYS[2], 'tat', 'cooldown_until')
local tat, cool = tonumber(st[1] or '0'), tonumber(st[2] or '0')
local t = math.max(now, tat - tol, cool)
local n = redis.call('ZCARD', KEYS[1])
if n >= limit then
  local e = redis.call('ZRANGE', KEYS[1], -limit, -limit, 'WITHSCORES')
  t = math.max(t, tonumber(e[2]) + span)
end
if n >= mps then
  local e = redis.call('ZRANGE', KEYS[1], -mps, -mps, 'WITHSCORES')
  t = math.max(t, tonumber(e[2]) + sspan)
end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
local token = ARGV[8] .. '|' .. seq
redis.call('ZADD', KEYS[1], num(t), token)
redis.call('HSET', KEYS[2], 'tat', num(math.max(tat, t) + interval))
redis.call('PEXPIRE', KEYS[2], 86400000)
local ttl = math.ceil((keep + (t - now)) * 1000) + 60000
redis.call('PEXPIRE', KEYS[1], ttl)
return {num(t), num(t - now), token, dropped}
"""

_CONFIRM = _LUA_NOW + """
local st = redis.call('HMGET', KEYS[2], 'cooldown_until', 'set_at')
local cool, dropped = tonumber(st[1] or '0'), -1
if cool > now and tonumber(st[2] or '-1e300') > now + tonumber(ARGV[4]) then  -- a cooldown set ahead
  dropped = forget(tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
  cool = tonumber(redis.call('HGET', KEYS[2], 'cooldown_until'))
end
if cool > now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {num(cool - now), dropped}
end
local planned = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not planned then return {'-1', dropped} end  -- the ledger lost its state
if now - tonumber(planned) > tonumber(ARGV[2]) then redis.call('ZADD', KEYS[1], 'XX', num(now), ARGV[1]) end  -- late
return {'0', dropped}
"""

_REPORT_429 = _LUA_NOW + """
local started, seconds, exact = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
local st = redis.call('HMGET', KEYS[2], 'cooldown_until', 'set_at')
local cool, set_at = tonumber(st[1] or '0'), tonumber(st[2] or '-1e300')
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. num(now - 3600))
redis.call('ZADD', KEYS[3], num(now), num(now) .. ':' .. redis.call('HINCRBY', KEYS[2], 'seq', 1))
redis.call('PEXPIRE', KEYS[3], 3700000)
local new = started >= set_at
if (not exact) and (not new) then return 0 end
redis.call('HSET', KEYS[2], 'cooldown_until', num(math.max(cool, now + seconds)))
if new then redis.call('HSET', KEYS[2], 'set_at', num(now)) end
return new and 1 or 0
"""

_REGISTER = _LUA_NOW + """
local dropped = forget(tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]))
local latest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local stored = redis.call('HMGET', KEYS[2], 'rate.limit', 'rate.window', 'rate.max_per_second')
local active = latest[2] ~= nil and tonumber(latest[2]) > now - tonumber(ARGV[4])
if not active then
  redis.call('HSET', KEYS[2], 'rate.limit', ARGV[1], 'rate.window', ARGV[2], 'rate.max_per_second', ARGV[3])
  redis.call('PEXPIRE', KEYS[2], 86400000)
end
return {active and 1 or 0, stored[1] or '', stored[2] or '', stored[3] or '', dropped}
"""

_STATUS = _LUA_NOW + """
local recent = redis.call('ZRANGE', KEYS[1], '(' .. num(now - tonumber(ARGV[1])), '+inf', 'BYSCORE', 'WITHSCORES')
local limited = redis.call('ZCOUNT', KEYS[3], '(' .. num(now - 3600), '+inf')
local st = redis.call('HMGET', KEYS[2], 'cooldown_until', 'rate.limit', 'rate.window', 'rate.max_per_second', 'set_at')
return {num(now), recent, limited, st[1] or '', st[2] or '', st[3] or '', st[4] or '', st[5] or '-1e300'}
"""


class RedisLedger:
    """``rate.shared = "redis://..."``: the ledger in Redis, one Lua call per step, stamped with the server's TIME."""

    def __init__(self, name: str, url: str, *, timeout: float = 5.0) -> None:
        self.name = name
        self.url = url
        self.where = f"Redis {masked(url)}"
        self._timeout = timeout
        self._keys = [f"crawler:ledger:{{{name}}}:{part}" for part in ("starts", "state", "limited")]
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}

    def _connect(self) -> None:
        """A new client (a fresh connection pool) with the scripts registered on it."""
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No retries inside redis-py (its default is 10, with growing sleeps): the gate retries, so that
        # retry.stall_limit alone decides when a lost Redis ends the run.
        self._redis = aioredis.Redis.from_url(
            self.url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout, decode_responses=True,
            retry=Retry(NoBackoff(), 0),
        )
        for name, text in (("reserve", _RESERVE), ("confirm", _CONFIRM), ("report_429", _REPORT_429),
                           ("register", _REGISTER), ("status", _STATUS)):
            self._scripts[name] = self._redis.register_script(text)

    async def open(self, rules: Rules | None) -> None:
        try:
            import redis  # noqa: F401
        except ImportError:
            raise UsageError(f"rate.shared = {masked(self.url)} needs the redis package:"
                             " pip install 'crawler[redis]'") from None
        try:
            self._connect()
            await self._redis.ping()
            if rules is not None:
                active, *stored, dropped = await self._scripts["register"](
                    keys=self._keys, args=[rules.limit, rules.window, rules.max_per_second, rules.span, rules.keep,
                                           rules.tolerance])
                if int(dropped) >= 0:
                    _warn_ahead(self.where, int(dropped), rules)
                if int(active):
                    names = ("rate.limit", "rate.window", "rate.max_per_second")
                    _mismatch(rules, {k: float(v) for k, v in zip(names, stored, strict=True) if v}, self.where)
        except UsageError:
            await self.aclose()
            raise
        except Exception as exc:  # connection refused, auth, bad URL: one line, no password
            await self.aclose()
            raise UsageError(
                f"rate.shared = {masked(self.url)}: cannot use Redis ({type(exc).__name__}: "
                f"{masked(str(exc))}); start it, fix the URL, or set rate.shared = \"local\""
            ) from None

    async def aclose(self) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            with contextlib.suppress(Exception):  # a half-dead connection must not hold the gate
                await asyncio.wait_for(client.aclose(), 1.0)

    async def _script(self, name: str, args: list[Any]) -> Any:
        if self._redis is None:
            self._connect()
        try:
            return await self._scripts[name](keys=self._keys, args=args)
        except Exception as exc:  # any failure to reach the server: the gate retries, then stops the run
            if not (type(exc).__module__.startswith("redis") or isinstance(exc, (OSError, EOFError))):
                raise
            await self.aclose()  # the next step starts from a fresh pool, never from a half-dead connection
            raise LedgerUnavailable(f"{self.where}: {type(exc).__name__}: {masked(str(exc))}") from None

    async def reserve(self, rules: Rules, owner: str) -> Slot:
        t, wait, token, dropped = await self._script("reserve", [
            rules.limit, rules.span, rules.max_per_second, rules.second_span, rules.interval, rules.tolerance,
            rules.keep, owner])
        if int(dropped) >= 0:
            _warn_ahead(self.where, int(dropped), rules)
        return Slot(float(t), float(wait), str(token))

    async def confirm(self, slot: Slot, rules: Rules) -> float:
        pause, dropped = await self._script("confirm", [slot.token, repr(rules.late), rules.span, rules.keep,
                                                        rules.tolerance])
        if int(dropped) >= 0:
            _warn_ahead(self.where, int(dropped), rules)
        return float(pause)

    async def report_429(self, started: float, seconds: float, exact: bool) -> bool:
        return bool(int(await self._script("report_429", [started, seconds, "1" if exact else "0"])))

    async def status(self, rules: Rules) -> Status:
        now, recent, limited, cool, limit, win, mps, set_at = await self._script("status", [rules.window])
        pairs = [(float(recent[i + 1]), str(recent[i])) for i in range(0, len(recent), 2)]
        stored = {k: float(v) for k, v in (("rate.limit", limit), ("rate.window", win),
                                           ("rate.max_per_second", mps)) if v}
        return _status(rules, float(now), pairs, float(cool or 0), float(set_at), int(limited), stored)


def open_ledger(shared: str, api_key: str, base_url: str) -> Ledger:
    """The ledger ``rate.shared`` names for this key and API (not yet opened)."""
    name = ledger_name(api_key, base_url)
    if shared == "off":
        return MemoryLedger(name)
    if shared == "local":
        return FileLedger(name)
    if shared.startswith(("redis://", "rediss://")):
        return RedisLedger(name, shared)
    raise UsageError(f"rate.shared = {masked(shared)!r}: use \"local\", \"off\" or a redis:// URL")
