"""The key's rate ledger: the same rules on every backend (in-process, local file, Redis), and fair turns."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from crawler.errors import LedgerLost, UsageError
from crawler.rate.ledger import FileLedger, MemoryLedger, ledger_name
from crawler.rate.pacing import Pace, RateGate
from crawler.rate.redis_ledger import RedisLedger
from crawler.rate.rules import Ledger, LedgerUnavailable, Rules, Slot

REDIS_URL = "redis://127.0.0.1:6379/0"
BACKENDS = ["memory", "file", "redis"]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


def make(kind: str, name: str, tmp: Path, clock: FakeClock) -> Ledger:
    """A fresh ledger of one backend (Redis takes its own server's clock; the others the fake one)."""
    if kind == "memory":
        return MemoryLedger(name, clock=clock, private=True)
    if kind == "file":
        return FileLedger(name, directory=tmp, clock=clock)
    return RedisLedger(name, REDIS_URL)


@pytest.fixture
def clock() -> FakeClock:
    """The fake clock of the memory and file ledgers (Redis ignores it)."""
    return FakeClock()


@pytest.fixture(params=BACKENDS)
async def ledger(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Ledger]:
    """One opened ledger per backend, under a name no other test uses."""
    led = make(request.param, f"test-{uuid.uuid4().hex}", tmp_path, clock)
    await led.open(None)
    try:
        yield led
    finally:
        await led.aclose()


RULES = Rules(limit=20, window=2.0, max_per_second=8, burst=5, margin=0.05)


async def test_reservations_keep_every_rule_of_the_key(ledger: Ledger) -> None:
    """120 starts reserved at once are spread so no window, second or pacing interval ever holds too many."""
    slots = [await ledger.reserve(RULES, "host:1") for _ in range(120)]
    starts = [s.start for s in slots]
    assert starts == sorted(starts)
    eps = 1e-6
    # Window: the limit-th start after any start is at least window + margin later.
    assert all(starts[i + RULES.limit] - starts[i] >= RULES.span - eps for i in range(len(starts) - RULES.limit))
    # Per-second cap, with its margin.
    mps = RULES.max_per_second
    assert all(starts[i + mps] - starts[i] >= RULES.second_span - eps for i in range(len(starts) - mps))
    # Even pacing: never more than `burst` starts ahead of one start per interval.
    interval = max(RULES.span / RULES.limit, RULES.second_span / mps)
    for i, t in enumerate(starts):
        assert t >= starts[0] + (i - (RULES.burst - 1)) * interval - eps
    # And it is not slower than the rules require: 120 starts take about 115 intervals after the burst.
    assert starts[-1] - starts[0] <= (120 - RULES.burst) * interval + RULES.span
    assert all(abs(s.wait - (s.start - slots[0].start) + slots[0].wait) < 0.5 for s in slots)


async def test_a_429_pauses_every_later_start_and_a_burst_counts_once(ledger: Ledger, clock: FakeClock) -> None:
    """A cooldown holds back later reservations; a backoff 429 of a request older than it is one event."""
    first = await ledger.reserve(RULES, "host:1")
    clock.t += 0.01  # the answer comes after the start
    assert await ledger.report_429(first.start, 30.0, False)
    assert not await ledger.report_429(first.start, 30.0, False)  # same burst: no new event
    later = await ledger.reserve(RULES, "host:2")
    assert later.wait >= 29.0
    status = await ledger.status(RULES)
    assert status.cooldown_until is not None and status.rate_limited_last_hour == 2


async def test_a_slot_that_comes_due_inside_a_new_cooldown_is_given_back(ledger: Ledger) -> None:
    """confirm() refuses a slot granted before a 429 and removes it from the window's count."""
    rules = Rules(limit=2, window=10.0, max_per_second=10, burst=1, margin=0.0)
    a = await ledger.reserve(rules, "host:1")
    b = await ledger.reserve(rules, "host:1")
    assert b.wait > 4.0  # the second start is paced one interval (5 s) later
    assert await ledger.report_429(a.start, 20.0, True)
    assert await ledger.confirm(b, rules) > 15.0
    c = await ledger.reserve(rules, "host:1")
    # b was given back, so c is paced by a and the cooldown only, not pushed a window behind b.
    assert c.wait >= 19.0 and c.start - a.start < 25.0


# (margin, lateness): 0.3 s late is past half a 0.2 s margin; 0.02 s (plus any wake-up jitter of a busy machine
# in the Redis case) is well within half a 1 s margin.
@pytest.mark.parametrize(("margin", "late", "moved"), [(0.2, 0.3, True), (1.0, 0.02, False)])
async def test_a_slot_started_late_counts_from_its_actual_start(ledger: Ledger, clock: FakeClock, margin: float,
                                                                 late: float, moved: bool) -> None:
    """A slot confirmed more than half the margin after its planned start (a busy CPU) is recorded when it really
    went out, so the start the window rule sets after it keeps the whole window from the actual start; a few
    milliseconds of lateness are the margin's, so they do not push the schedule back."""
    rules = Rules(limit=1, window=0.5, max_per_second=10, burst=1, margin=margin)  # late past margin / 2: recorded
    await ledger.reserve(rules, "host:1")  # now: the next one is a window later
    a = await ledger.reserve(rules, "host:1")
    assert a.wait > rules.span - 0.1
    if isinstance(ledger, RedisLedger):  # the server's clock: really be late
        await asyncio.sleep(a.wait + late)
    else:
        clock.t += a.wait + late
    assert await ledger.confirm(a, rules) == 0
    wide = Rules(limit=1, window=10.0, max_per_second=10, burst=1, margin=margin)  # a window holding both starts
    assert (await ledger.status(wide)).started == 2  # moved or not, never added
    b = await ledger.reserve(rules, "host:1")
    if moved:  # a window after a's actual start (its plan was 0.3 s sooner)
        assert b.start >= a.start + late + rules.span - 1e-6
    else:  # a window after a's planned start
        assert b.start - (a.start + rules.span) < late / 2


async def test_where_the_per_second_cap_spaces_the_starts_its_own_margin_sets_what_is_late(
        ledger: Ledger, clock: FakeClock) -> None:
    """One start a second (the per-second cap binds, its margin 25 ms): a start 0.05 s late is recorded at its
    actual moment (half the window's 0.3 s margin would have let it pass), so the next one keeps a whole capped
    second from it."""
    rules = Rules(limit=100, window=1.0, max_per_second=1, burst=1, margin=0.3)
    await ledger.reserve(rules, "host:1")
    a = await ledger.reserve(rules, "host:1")
    if isinstance(ledger, RedisLedger):
        await asyncio.sleep(a.wait + 0.05)
    else:
        clock.t += a.wait + 0.05
    assert await ledger.confirm(a, rules) == 0
    b = await ledger.reserve(rules, "host:1")
    assert b.start >= a.start + 0.05 + rules.second_span - 1e-6


async def test_processes_that_disagree_on_the_limits_are_refused(tmp_path: Path) -> None:
    """A process with another rate.limit is refused while a process with other limits has the ledger open, accepted
    once none has (however recent their starts)."""
    clock = FakeClock()
    name = f"test-{uuid.uuid4().hex}"
    for kind in BACKENDS:
        first, second = make(kind, name, tmp_path, clock), make(kind, name, tmp_path, clock)
        if kind == "memory":  # two clients of one process share the in-process ledger by name
            first, second = MemoryLedger(name, clock=clock), MemoryLedger(name, clock=clock)
        await first.open(RULES)
        await first.reserve(RULES, "host:1")
        other = Rules(limit=30, window=2.0, max_per_second=8, burst=1, margin=0.05)
        with pytest.raises(UsageError, match=r"rate\.limit = 30 .*in use with rate\.limit = 20, .* by a running"):
            await second.open(other)
        await second.open(RULES)  # the same values are welcome
        await first.aclose()
        late = make(kind, name, tmp_path, clock) if kind != "memory" else MemoryLedger(name, clock=clock)
        with pytest.raises(UsageError, match=r"rate\.limit = 30"):  # the second is still open
            await late.open(other)
        await late.aclose()
        await second.aclose()
        third = make(kind, name, tmp_path, clock) if kind != "memory" else MemoryLedger(name, clock=clock)
        await third.open(other)  # at once: the starts are recent, but nobody uses the old values any more
        await third.aclose()


async def test_unreachable_redis_is_a_usage_error_without_the_password() -> None:
    """A Redis that does not answer at start is exit 2 naming rate.shared, with the password masked."""
    led = RedisLedger("x", "redis://:hunter2@127.0.0.1:1/0", timeout=1.0)
    with pytest.raises(UsageError, match=r"rate\.shared = redis://\*\*\*@127\.0\.0\.1:1/0") as info:
        await led.open(RULES)
    assert "hunter2" not in str(info.value)


async def test_an_unwritable_state_directory_is_a_usage_error(tmp_path: Path) -> None:
    """The local ledger's directory cannot be created: exit 2 naming rate.shared and the path."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    led = FileLedger("x", directory=blocker / "crawler")
    with pytest.raises(UsageError, match=r'rate\.shared = "local".*XDG_STATE_HOME'):
        await led.open(RULES)


def test_ledger_names_hide_the_key_and_separate_apis() -> None:
    """The name is a hash of key and base URL: the key never appears, another port is another ledger."""
    a = ledger_name("secret-key-123", "http://127.0.0.1:8000")
    assert "secret" not in a
    assert a != ledger_name("secret-key-123", "http://127.0.0.1:8001")
    assert a == ledger_name("secret-key-123", "http://127.0.0.1:8000/")


@pytest.mark.parametrize("kind", ["memory", "file", "redis"])
async def test_processes_waiting_on_one_key_take_turns(kind: str, tmp_path: Path) -> None:
    """Three gates (as three processes) with unequal worker counts each get at least 1/6 of the starts."""
    name = f"test-{uuid.uuid4().hex}"
    pace = Pace(limit=60, window=0.6, burst=1, max_per_second=1000, margin=0.0)
    ledgers: list[Callable[[], Ledger]] = [
        (lambda: MemoryLedger(name)) if kind == "memory"
        else (lambda: FileLedger(name, directory=tmp_path)) if kind == "file"
        else (lambda: RedisLedger(name, REDIS_URL))
    ] * 3
    gates = [RateGate(pace, ledger=make_ledger(), stall_limit=5.0) for make_ledger in ledgers]
    for n, gate in enumerate(gates):
        gate._owner = f"host:{n}"  # three "processes"
    got: Counter[int] = Counter()
    total = 90

    async def worker(n: int) -> None:
        while sum(got.values()) < total:
            await gates[n].acquire()
            got[n] += 1

    for gate in gates:
        await gate.__aenter__()
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(worker(n) for n, workers in enumerate((1, 4, 12)) for _ in range(workers)))
    finally:
        for gate in gates:
            await gate.__aexit__(None, None, None)
    assert sum(got.values()) >= total
    assert min(got.values()) >= total / 6, got


class FlakyLedger(MemoryLedger):
    """A ledger whose server is away for its first `down` reservations (as a restarting Redis would be)."""

    def __init__(self, name: str, down: int) -> None:
        super().__init__(name, private=True)
        self.down = down
        self.calls = 0

    async def reserve(self, rules: Rules, owner: str) -> Slot:
        self.calls += 1
        if self.calls <= self.down:
            raise LedgerUnavailable(f"away ({self.calls})")
        return await super().reserve(rules, owner)


async def test_a_ledger_away_for_a_moment_pauses_the_gate_and_it_goes_on() -> None:
    """A few failed reservations inside the stall limit are retried; only a lasting one ends the run."""
    pace = Pace(limit=60, window=1.0, burst=1, max_per_second=1000, margin=0.0)
    flaky = FlakyLedger(f"test-{uuid.uuid4().hex}", down=3)
    async with RateGate(pace, ledger=flaky, cooldown_base=0.1, cooldown_max=0.2, stall_limit=30.0) as gate:
        async with asyncio.timeout(20):
            await gate.acquire()
    assert flaky.calls == 4  # three failures retried, the fourth reservation admitted

    gone = FlakyLedger(f"test-{uuid.uuid4().hex}", down=10**9)
    async with RateGate(pace, ledger=gone, cooldown_base=0.1, cooldown_max=0.2, stall_limit=1.0) as gate:
        with pytest.raises(LedgerLost, match="has not answered for 1 s"):
            async with asyncio.timeout(20):
                await gate.acquire()
    assert gone.calls > 2  # retried until the stall limit, not given up at the first retry


DAY = 86_400.0


async def _write_a_day_ahead(ledger: Ledger, clock: FakeClock, rules: Rules) -> Slot:
    """What a run with the clock a day ahead leaves: a full window of starts, the schedule after them and a cooldown,
    all a day ahead; returns one of those starts (a slot a process still holds as the clock is set back)."""
    if not isinstance(ledger, RedisLedger):
        clock.t += DAY
        slots = [await ledger.reserve(rules, "fast:1") for _ in range(rules.limit)]
        clock.t += 0.01
        assert await ledger.report_429(slots[0].start, 30.0, False)
        clock.t -= DAY + 0.01
        return slots[-1]
    import redis.asyncio as aioredis  # the ledger's own layout: a sorted set of starts and a hash of state

    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        secs, micros = await client.time()
        ahead = secs + micros / 1e6 + DAY
        starts, state = (f"crawler:ledger:{{{ledger.name}}}:{part}" for part in ("starts", "state"))
        await client.zadd(starts, {f"fast:1|{n + 1}": ahead + n * rules.interval for n in range(rules.limit)})
        await client.hset(state, mapping={"tat": ahead + rules.limit * rules.interval, "seq": rules.limit,
                                          "cooldown_until": ahead + 30.0, "set_at": ahead})
    finally:
        await client.aclose()
    return Slot(ahead + (rules.limit - 1) * rules.interval, 0.0, f"fast:1|{rules.limit}")


async def test_starts_and_a_cooldown_a_day_ahead_cost_at_most_one_window(ledger: Ledger, clock: FakeClock) -> None:
    """A ledger holding a window of starts and a cooldown dated a day ahead (a clock that ran fast, set back since)
    holds the key back one window at most: a slot held across the change comes back within a window, the next
    start is due within a window, and the window after it is the key's whole budget again."""
    held = await _write_a_day_ahead(ledger, clock, RULES)
    assert (await ledger.status(RULES)).ahead == RULES.limit  # `crawler budget` shows them before they are dropped
    assert 0 <= await ledger.confirm(held, RULES) <= RULES.span + 0.01
    first = await ledger.reserve(RULES, "host:1")
    assert first.wait <= RULES.span + 0.01
    rest = [await ledger.reserve(RULES, "host:1") for _ in range(RULES.limit - 1)]
    assert rest[-1].start - first.start <= RULES.span + 1e-6  # the day-ahead starts count no more (1e-6: epoch floats)
    status = await ledger.status(RULES)
    assert status.ahead == 0 and (status.cooldown_until is None or status.cooldown_until <= first.start + 0.01)


async def test_two_processes_opening_with_other_limits_at_once_are_never_both_let_in() -> None:
    """Two ledgers of one key on Redis opened at the same moment with other limits (two hosts starting together):
    at most one of them runs; the registration is written before the check reads the others, so of two racing
    opens at least one sees the other. 20 rounds, each on a key of its own."""
    other = Rules(limit=30, window=2.0, max_per_second=8, burst=1, margin=0.05)
    for _ in range(20):
        name = f"test-{uuid.uuid4().hex}"
        ledgers = [RedisLedger(name, REDIS_URL), RedisLedger(name, REDIS_URL)]
        results = await asyncio.gather(ledgers[0].open(RULES), ledgers[1].open(other), return_exceptions=True)
        try:
            assert any(isinstance(r, UsageError) for r in results), results
            assert all(r is None or isinstance(r, UsageError) for r in results), results
        finally:
            for led in ledgers:
                await led.aclose()


@pytest.mark.parametrize("kind", ["file", "redis"])
async def test_an_open_ledger_stays_alive_while_it_sends_nothing(kind: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A process on another host counts as gone after owners.STALE without a heartbeat; a process that waits
    longer than that without reserving (a 429 cooldown, an outage's backoff) must still beat, or a newcomer with
    other limits would be let in beside it. Beats every 0.05 s here: the entry's time moves on with no reserve
    (the file ledger's by its clock, moved on by the test; Redis's by the server's)."""
    import sqlite3

    import redis.asyncio as aioredis

    from crawler.rate import owners

    monkeypatch.setattr(owners, "BEAT", 0.05)
    name, clock = f"test-{uuid.uuid4().hex}", FakeClock()
    led = make(kind, name, tmp_path, clock)
    await led.open(RULES)
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)

    async def seen() -> float:
        if kind == "redis":
            (value,) = (await client.hgetall(f"crawler:ledger:{{{name}}}:procs")).values()
            return float(value.rpartition(";")[2])
        with contextlib.closing(sqlite3.connect(tmp_path / f"ledger-{name}.db")) as db:
            return float(db.execute("SELECT seen FROM procs").fetchone()[0])

    try:
        first = await seen()
        clock.t += 100.0
        async with asyncio.timeout(5):
            while await seen() <= first:
                await asyncio.sleep(0.01)
    finally:
        await client.aclose()
        await led.aclose()
