"""``rate.shared = "redis://..."``: the key's rate ledger in Redis, for every host (the rules in Lua)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from crawler.config import masked
from crawler.errors import UsageError
from crawler.rate import owners
from crawler.rate.rules import (
    LedgerUnavailable,
    Rules,
    Slot,
    Status,
    mismatch,
    rules_record,
    status_of,
    warn_ahead,
)

# The same rules as `next_start` / `apply_429`, in Lua so each step is one atomic call stamped with the
# server's TIME. Numbers travel as '%.6f' strings: Redis turns a returned Lua number into an integer and
# tostring() keeps only 14 digits (0.1 ms of an epoch time).
_LUA_NOW = """
local function num(x) return string.format('%.6f', x) end
local tm = redis.call('TIME')
local now = tonumber(tm[1]) + tonumber(tm[2]) / 1000000
-- `ahead` in rules.py: what a clock since set back left ahead is dropped and the key pauses one window;
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
redis.call('HSET', KEYS[2], 'rate.limit', ARGV[1], 'rate.window', ARGV[2], 'rate.max_per_second', ARGV[3])
redis.call('PEXPIRE', KEYS[2], 86400000)
return dropped
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
        self._procs = f"crawler:ledger:{{{name}}}:procs"  # the processes using the key: ident -> limits;seen
        self._ident = owners.registration()
        self._registered = False
        self._beater: asyncio.Task[None] | None = None
        self._limits = ""
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
                await self._register(rules)
        except UsageError:
            await self.aclose()
            raise
        except Exception as exc:  # connection refused, auth, bad URL: one line, no password
            await self.aclose()
            raise UsageError(
                f"rate.shared = {masked(self.url)}: cannot use Redis ({type(exc).__name__}: "
                f"{masked(str(exc))}); start it, fix the URL, or set rate.shared = \"local\""
            ) from None

    async def _register(self, rules: Rules) -> None:
        """Join the processes using the key, then check ``rules`` against the others (dead ones are dropped); on a
        mismatch, `open` leaves again. Joining first: of two hosts opening at once, at least one sees the other
        (checking first, both could see nobody and both join)."""
        sec, usec = await self._redis.time()
        now = sec + usec / 1e6
        self._limits = owners.encode(rules_record(rules))
        await self._redis.hset(self._procs, self._ident, f"{self._limits};{now!r}")
        await self._redis.pexpire(self._procs, 86_400_000)
        self._registered = True
        self._beater = asyncio.get_running_loop().create_task(owners.beating(self._beat_once))
        live = []
        for ident, value in (await self._redis.hgetall(self._procs)).items():
            limits, _, seen = value.rpartition(";")
            entry = owners.Registered(ident, owners.decode(limits), float(seen or 0))
            if ident == self._ident:
                continue
            if owners.alive(entry, now):
                live.append(entry)
            else:
                await self._redis.hdel(self._procs, ident)
        mismatch(rules, live, self.where)
        dropped = await self._scripts["register"](
            keys=self._keys, args=[rules.limit, rules.window, rules.max_per_second, rules.span, rules.keep,
                                   rules.tolerance])
        if int(dropped) >= 0:
            warn_ahead(self.where, int(dropped), rules)

    async def _beat_once(self) -> None:
        if self._redis is not None:
            sec, usec = await self._redis.time()
            await self._redis.hset(self._procs, self._ident, f"{self._limits};{sec + usec / 1e6!r}")

    async def aclose(self) -> None:
        beater, self._beater = self._beater, None
        await owners.stop(beater)
        if self._registered and self._redis is not None:
            self._registered = False
            with contextlib.suppress(Exception):  # a killed process's entry is dropped by the next to open
                await asyncio.wait_for(self._redis.hdel(self._procs, self._ident), 1.0)
        await self._close_client()

    async def _close_client(self) -> None:
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
            await self._close_client()  # the next step starts from a fresh pool, never from a half-dead connection
            raise LedgerUnavailable(f"{self.where}: {type(exc).__name__}: {masked(str(exc))}") from None

    async def reserve(self, rules: Rules, owner: str) -> Slot:
        t, wait, token, dropped = await self._script("reserve", [
            rules.limit, rules.span, rules.max_per_second, rules.second_span, rules.interval, rules.tolerance,
            rules.keep, owner])
        if int(dropped) >= 0:
            warn_ahead(self.where, int(dropped), rules)
        return Slot(float(t), float(wait), str(token))

    async def confirm(self, slot: Slot, rules: Rules) -> float:
        pause, dropped = await self._script("confirm", [slot.token, repr(rules.late), rules.span, rules.keep,
                                                        rules.tolerance])
        if int(dropped) >= 0:
            warn_ahead(self.where, int(dropped), rules)
        return float(pause)

    async def report_429(self, started: float, seconds: float, exact: bool) -> bool:
        return bool(int(await self._script("report_429", [started, seconds, "1" if exact else "0"])))

    async def status(self, rules: Rules) -> Status:
        now, recent, limited, cool, limit, win, mps, set_at = await self._script("status", [rules.window])
        pairs = [(float(recent[i + 1]), str(recent[i])) for i in range(0, len(recent), 2)]
        stored = {k: float(v) for k, v in (("rate.limit", limit), ("rate.window", win),
                                           ("rate.max_per_second", mps)) if v}
        return status_of(rules, float(now), pairs, float(cool or 0), float(set_at), int(limited), stored)
