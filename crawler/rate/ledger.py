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

Every process that opens a ledger with its limits registers (`crawler.rate.owners`) and must agree with the
processes registered and alive now (`rules.mismatch`); a process that ended, even killed, binds nobody.

Backends, chosen by ``rate.shared``: ``MemoryLedger`` ("off", this process only), ``FileLedger``
("local", SQLite in the user's state directory, every process of the user), ``RedisLedger`` (any host).
"""
import asyncio
import bisect
import contextlib
import hashlib
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from crawler import sqlite, testing
from crawler.config import masked
from crawler.errors import UsageError
from crawler.files import lock_file
from crawler.rate import owners
from crawler.rate.redis_ledger import RedisLedger
from crawler.rate.rules import (
    HOUR,
    Ledger,
    LedgerUnavailable,
    Rules,
    Slot,
    Status,
    ahead,
    apply_429,
    cooldown_trusted,
    mismatch,
    next_start,
    rules_record,
    status_of,
    warn_ahead,
)

T = TypeVar("T")
log = logging.getLogger("crawler.rate.ledger")



def wall_clock() -> float:
    """This host's wall clock in epoch seconds (the local ledger's clock)."""
    return time.time() + testing.CLOCK_SKEW  # (a test-only skew: crawler/testing.py)


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
    procs: dict[str, owners.Registered] = field(default_factory=dict)  # the clients open now (all alive)


_MEMORY: dict[str, _MemoryState] = {}  # one per key and API in this process: every client of the process shares it


class MemoryLedger:
    """``rate.shared = "off"``: the ledger lives in this process (every client of the process shares it)."""

    def __init__(self, name: str, *, clock: Callable[[], float] = time.monotonic, private: bool = False) -> None:
        self.name = name
        self.where = "this process (rate.shared = off)"
        self._clock = clock
        self._s = _MemoryState() if private else _MEMORY.setdefault(name, _MemoryState())
        self._ident = owners.registration()

    async def open(self, rules: Rules | None) -> None:
        if rules is not None:
            s = self._s
            self._forget_ahead(rules, self._clock())
            mismatch(rules, list(s.procs.values()), self.where)
            s.rules = rules_record(rules)
            s.procs[self._ident] = owners.Registered(self._ident, s.rules, self._clock())

    async def aclose(self) -> None:
        self._s.procs.pop(self._ident, None)

    def _forget_ahead(self, rules: Rules, now: float) -> None:
        s = self._s
        n = len(s.starts)
        while n and s.starts[n - 1][0] > now:
            n -= 1
        found = ahead(rules, now, s.tat, s.cooldown_until, s.set_at, [t for t, _ in s.starts[n:]])
        if found is not None:
            del s.starts[len(s.starts) - found.dropped:]
            s.tat, s.cooldown_until, s.set_at = found.tat, found.cooldown_until, found.set_at
            warn_ahead(self.where, found.dropped, rules)

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
        return status_of(rules, now, recent, s.cooldown_until, s.set_at, sum(t > now - HOUR for t in s.rate_limited),
                         s.rules)


def _drop_before(starts: list[tuple[float, str]], cutoff: float) -> None:
    n = 0
    while n < len(starts) and starts[n][0] < cutoff:
        n += 1
    if n:
        del starts[:n]


# ----- this machine ("local") -----------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS starts (id INTEGER PRIMARY KEY, t REAL NOT NULL, token TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS starts_t ON starts (t);
CREATE INDEX IF NOT EXISTS starts_token ON starts (token);
CREATE TABLE IF NOT EXISTS state (k TEXT PRIMARY KEY, v REAL NOT NULL);
CREATE TABLE IF NOT EXISTS limited (t REAL NOT NULL);
CREATE TABLE IF NOT EXISTS procs (ident TEXT PRIMARY KEY, limits TEXT NOT NULL, seen REAL NOT NULL);
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
        self._held = contextlib.ExitStack()  # the shared lock that says this ledger is in use (`prune_idle`)
        self._ident = owners.registration()
        self._registered = False
        self._beater: asyncio.Task[None] | None = None

    async def open(self, rules: Rules | None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        try:
            await self._run(self._connect)
            if rules is not None:
                await self._run(lambda db: self._register(db, rules))
                self._beater = asyncio.get_running_loop().create_task(owners.beating(
                    lambda: self._run(self._beat_once)))
        except UsageError:  # other limits in use: release the file and its lock
            await self.aclose()
            raise
        except (OSError, sqlite3.Error) as exc:
            await self.aclose()
            raise UsageError(
                f"rate.shared = \"local\": cannot use the ledger file {self.path} ({exc}); make its directory"
                " writable (XDG_STATE_HOME sets where it lives), or set rate.shared to a redis:// URL or \"off\""
            ) from None

    def _connect(self, _: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._held.enter_context(lock_file(_lock_path(self.path), wait=True, shared=True))
        prune_idle(self.path.parent, keep=self.path)
        # A ledger outlives processes, not power cuts: the OS keeps it (synchronous=OFF).
        db = sqlite.connect(self.path, busy_timeout=30.0, synchronous="OFF", any_thread=True)
        db.executescript(_SCHEMA)
        self._db = db

    def _register(self, db: sqlite3.Connection, rules: Rules) -> None:
        with sqlite.immediate(db):
            now = self._clock()
            self._forget_ahead(db, rules, now)
            live = []
            for ident, limits, seen in db.execute("SELECT ident, limits, seen FROM procs").fetchall():
                entry = owners.Registered(ident, owners.decode(limits), seen)
                if owners.alive(entry, now):
                    live.append(entry)
                else:  # a process that ended without closing its ledger (killed): its limits bind nobody
                    db.execute("DELETE FROM procs WHERE ident = ?", (ident,))
            mismatch(rules, live, self.where)
            db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", rules_record(rules).items())
            db.execute("INSERT OR REPLACE INTO procs VALUES (?, ?, ?)",
                       (self._ident, owners.encode(rules_record(rules)), now))
            self._registered = True

    def _beat_once(self, db: sqlite3.Connection) -> None:
        """Alive, for a process on another host sharing the file (a shared home)."""
        with sqlite.immediate(db):
            db.execute("UPDATE procs SET seen = ? WHERE ident = ?", (self._clock(), self._ident))

    async def aclose(self) -> None:
        beater, self._beater = self._beater, None
        await owners.stop(beater)
        db, self._db = self._db, None
        pool, self._pool = self._pool, None
        if pool is not None:
            if db is not None:
                await asyncio.get_running_loop().run_in_executor(pool, self._unregister, db)
                await asyncio.get_running_loop().run_in_executor(pool, db.close)
            pool.shutdown(wait=False)
        self._held.close()

    def _unregister(self, db: sqlite3.Connection) -> None:
        if self._registered:
            self._registered = False
            with contextlib.suppress(sqlite3.Error):  # a killed process's entry is dropped by the next to open
                db.execute("DELETE FROM procs WHERE ident = ?", (self._ident,))

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
            warn_ahead(self.where, found.dropped, rules)

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
            return status_of(rules, now, recent, state.get("cooldown_until", 0.0), state.get("set_at", float("-inf")),
                             limited, state)

        return await self._run(run)


IDLE_DAYS = 7  # a local ledger unused this long, and open in no process, is removed


def _lock_path(db: Path) -> Path:
    return db.with_suffix(".lock")


def prune_idle(directory: Path, *, keep: Path | None = None, idle_days: float = IDLE_DAYS) -> list[Path]:
    """Remove the ledger files in `directory` (other than `keep`) last used more than `idle_days` ago that no
    process has open (each open ledger holds a shared lock on its ``.lock`` file); the ledgers removed.

    Run whenever a local ledger is opened: one ledger per key and API accumulates otherwise (a rotated key, a
    test URL), and nobody runs a cleanup command. A removed ledger holds nothing a run needs: its starts and
    cooldown are older than any window. Housekeeping never fails a run: an error leaves the file for next time.
    """
    removed: list[Path] = []
    cutoff = time.time() - idle_days * 86400
    for db in sorted(directory.glob("ledger-*.db")):
        if db == keep:
            continue
        parts = [db, *(db.with_name(db.name + end) for end in ("-wal", "-shm", "-journal"))]
        try:
            if _last_use(parts) >= cutoff:
                continue
            with lock_file(_lock_path(db)) as fd:
                if fd is None or _last_use(parts) >= cutoff:  # open in a process, or used since the look above
                    continue
                for part in parts:
                    part.unlink(missing_ok=True)
                _lock_path(db).unlink(missing_ok=True)  # holding its lock: a process waiting for it takes a new one
            removed.append(db)
        except OSError as exc:
            log.debug("ledger housekeeping: %s: %s", db, exc)
    if removed:
        log.info("removed %d rate ledger(s) idle for over %g days in %s", len(removed), idle_days, directory)
    return removed


def _last_use(parts: list[Path]) -> float:
    """The latest change of a ledger's files (a write commits into the -wal file, a checkpoint into the db)."""
    times = []
    for part in parts:
        with contextlib.suppress(FileNotFoundError):
            times.append(part.stat().st_mtime)
    return max(times, default=0.0)


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
