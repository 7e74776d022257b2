"""The simulated TikLiveAPI server: key, rate, balance, faults and billing around the seeded world.

Every API request goes through, in order: method/path, key, rate (429), balance, latency, fault,
endpoint; a test that clears `Simulator.answering` holds every answer before the latency until it sets it.
Billing follows CONTRACT.md "Credits": an answer is billed when it is HTTP 200 without a
bare-`message` body (successes, `{"status":"error"}` answers, truncated and malformed 200s).
Admin paths under `/__sim/` are not API requests: not counted, not billed, no key.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

from aiohttp import web

from crawler.sim import render
from crawler.sim.data import World, WorldConfig
from crawler.sim.endpoints import ENDPOINTS, call_endpoint
from crawler.sim.media import MediaConfig, MediaHost
from crawler.sim.seeded import hash64, str_hash, unit

FAULT_KINDS = frozenset({"5xx", "drop", "truncated", "malformed", "slow"})  # "faults on" by default
# Opt-in kinds: "cut" answers 200 with its headers, then drops the connection halfway through the body.
EXTRA_FAULT_KINDS = frozenset({"cut"})
MSG_NO_KEY = "Please sign up to tikliveapi.com"  # [C2] live-tested by a third party
MSG_BAD_KEY = "Api-Key is not available"  # [C2]
MSG_RATE = "Too many requests, please slow down"  # [G] body of the 429 is unknown
MSG_BALANCE = "Your credit balance is exhausted. Please purchase more credits."  # [G] wording unknown
MSG_DAILY = "Free Api Limit: {n} request/ 1 day."  # §5.1 [T]: the look-alike's daily quota, HTTP 200
# §5.1 [T]: the look-alike sits behind Cloudflare; a blocked request gets a 403 page, not the API's JSON.
_FIREWALL = ("<!DOCTYPE html><html><head><title>Attention Required! | Cloudflare</title></head><body>"
             "<h1>Sorry, you have been blocked</h1><p>This website is using a security service.</p></body></html>")
_MALFORMED = ("<!DOCTYPE html><html><head><title>Error</title></head>"
              "<body><h1>Something went wrong</h1><p>Please try again later.</p></body></html>")
_5XX = ((500, "Internal Server Error"), (502, "<html><body><h1>502 Bad Gateway</h1></body></html>"),
        (503, "Service Unavailable"))


def _default_keys() -> Mapping[str, int | None]:
    return {"sim-key": None}


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Behaviour of one simulator instance; `keys` maps API key -> credit balance (None = unlimited)."""

    world: WorldConfig = field(default_factory=WorldConfig)
    keys: Mapping[str, int | None] = field(default_factory=_default_keys)
    rate_limit: int = 200
    rate_window: float = 60.0
    burst_limit: int = 50
    retry_after: float | str | None = None  # a simulator extension (the real API documents no Retry-After);
    # a string is sent as it is (e.g. "1e400")
    always_429: bool = False
    latency: tuple[float, float] = (0.0, 0.0)
    latency_live: bool = False  # draw latencies like the live API's (`render.live_latency`) within `latency`
    fault_rate: float = 0.0
    faults: frozenset[str] = FAULT_KINDS
    slow_seconds: float = 30.0
    quirks: bool = False
    rounded_only: bool = False  # profiles carry only the display-rounded `stats`, no exact `statsV2` (§5.1)
    seed: int = 1
    drop_fields: tuple[tuple[str, str], ...] = ()  # (endpoint, field): removed from that endpoint's answers
    add_fields: tuple[tuple[str, str], ...] = ()  # (endpoint, field): a field no client knows, added
    record_arrivals: bool = False  # keep every arrival time (sim clock) in stats.arrivals, for rate tests
    media: MediaConfig = field(default_factory=MediaConfig)  # the media host on its own port
    unreadable: frozenset[str] = frozenset()  # paths ("/post-detail") whose 200s wrap the answer under "result"
    daily_quota: int | None = None  # billed requests per key and UTC day; then the quota text (HTTP 200, unbilled)
    firewall: bool = False  # every request answered HTTP 403 with an HTML page, as a firewall or CDN would

    def __post_init__(self) -> None:
        unknown = set(self.faults) - FAULT_KINDS - EXTRA_FAULT_KINDS
        if unknown:
            known = sorted(FAULT_KINDS | EXTRA_FAULT_KINDS)
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}; known: {known}")
        if self.rate_limit < 0 or self.rate_window <= 0 or self.burst_limit < 0:
            raise ValueError("rate_limit and burst_limit must be >= 0 and rate_window > 0")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("fault_rate must be within [0, 1]")
        if not 0.0 <= self.latency[0] <= self.latency[1]:
            raise ValueError("latency must be (min, max) with 0 <= min <= max")
        for endpoint, name in (*self.drop_fields, *self.add_fields):
            if "/" + endpoint.strip("/") not in ENDPOINTS or not name:
                raise ValueError(f"{endpoint}:{name}: not ENDPOINT:FIELD with an endpoint of the API, e.g."
                                 " post-detail:id")
        unknown_paths = set(self.unreadable) - set(ENDPOINTS)
        if unknown_paths:
            raise ValueError(f"unreadable: unknown endpoints {sorted(unknown_paths)}; known: {sorted(ENDPOINTS)}")
        if self.daily_quota is not None and self.daily_quota < 0:
            raise ValueError("daily_quota must be >= 0")


class Stats:
    """Live counters, readable by tests and benchmarks; `snapshot()` gives a JSON-ready copy.

    `requests` and `by_endpoint` count every API request (not admin ones), key errors included;
    `max_in_window` / `max_in_second` are exact per key (the largest over keys) and count every
    arrival with a valid key, 429ed ones included. `max_in_flight` is the most requests being answered at once
    (past the key, rate and balance checks: in their latency).
    """

    __slots__ = ("arrivals", "billed", "by_endpoint", "faults", "in_flight", "max_in_flight", "max_in_second",
                 "max_in_window", "requests", "served_429", "targets")

    def __init__(self) -> None:
        self.requests = 0
        self.by_endpoint: Counter[str] = Counter()
        self.served_429 = 0
        self.faults: Counter[str] = Counter()
        self.billed: Counter[str] = Counter()
        self.max_in_window = 0
        self.max_in_second = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.arrivals: list[float] = []  # only with SimConfig.record_arrivals
        self.targets: list[str] = []  # path and query of every API request, only with SimConfig.record_arrivals

    def snapshot(self) -> dict[str, Any]:
        """A copy of the counters as plain JSON-ready values."""
        return {"requests": self.requests, "by_endpoint": dict(self.by_endpoint),
                "served_429": self.served_429, "faults": dict(self.faults), "billed": dict(self.billed),
                "max_in_window": self.max_in_window, "max_in_second": self.max_in_second,
                "max_in_flight": self.max_in_flight}


class _KeyWindows:
    """Arrival and acceptance times of one key, trimmed to the windows they are checked against."""

    __slots__ = ("accepted", "in_second", "in_window")

    def __init__(self) -> None:
        self.in_window: deque[float] = deque()
        self.in_second: deque[float] = deque()
        self.accepted: deque[float] = deque()


def _trim(times: deque[float], after: float) -> None:
    # Windows are half-open, (t - w, t]: an arrival exactly w seconds ago has left the window.
    while times and times[0] <= after:
        times.popleft()


class Simulator:
    """The simulator as an async context manager: serves on loopback between enter and exit.

    `clock` (default `time.monotonic`) times the rate windows; tests pass a fake clock to move time.
    Media URLs in answers point at `media_url`, a second listener served by `media` (sim/media.py).
    """

    def __init__(self, config: SimConfig = SimConfig(), *, host: str = "127.0.0.1", port: int = 0,
                 clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.world = World(config.world)
        self.stats = Stats()
        self.url = ""
        self.media = MediaHost(config.world.seed, config.media)
        self.media_url = ""
        self._media_runner: web.AppRunner | None = None
        self._host, self._port = host, port
        self._clock = clock or time.monotonic
        self._balances: dict[str, int | None] = dict(config.keys)
        self._today: Counter[tuple[str, str]] = Counter()  # (key, UTC day) -> billed (or held) requests
        self._windows: dict[str, _KeyWindows] = {}
        self._seen: Counter[int] = Counter()  # n-th time each exact request arrived, for fault draws
        self.answering = asyncio.Event()  # cleared by a test: requests arrive (counted) but get no answer until set
        self.answering.set()
        self._runner: web.AppRunner | None = None
        self._used = False

    async def __aenter__(self) -> Simulator:
        if self._used:
            raise RuntimeError("a Simulator can be started only once")
        self._used = True
        # A short shutdown: handlers still sleeping in a "slow" fault are cancelled, not awaited.
        self._runner = web.AppRunner(make_app(self), shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        port = self._runner.addresses[0][1]
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.url = f"http://{host}:{port}"
        self._media_runner = web.AppRunner(self.media.app(), shutdown_timeout=0.5)
        await self._media_runner.setup()
        await web.TCPSite(self._media_runner, self._host, 0).start()
        self.media_url = self.media.base = f"http://{host}:{self._media_runner.addresses[0][1]}"
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        media, self._media_runner = self._media_runner, None
        if media is not None:
            await media.cleanup()

    def balance(self, key: str) -> int | None:
        """Credits left for a key (None = unlimited); in-flight requests hold theirs already."""
        return self._balances[key]

    def topup(self, key: str, credits: int) -> None:
        """Add credits to a key, creating it if unknown; an unlimited key stays unlimited."""
        current = self._balances.get(key, 0)
        self._balances[key] = None if current is None else current + credits

    def advance_day(self, days: int = 1) -> None:
        """Move the world forward by whole days."""
        self.world.advance(days)

    # ----- the request path --------------------------------------------------------------------------

    def _admit(self, key: str) -> bool:
        """Record an arrival for `key`; True if it is within the rate and burst limits."""
        cfg, now = self.config, self._clock()
        w = self._windows.setdefault(key, _KeyWindows())
        _trim(w.in_window, now - cfg.rate_window)
        _trim(w.in_second, now - 1.0)
        _trim(w.accepted, now - cfg.rate_window)
        w.in_window.append(now)
        w.in_second.append(now)
        if cfg.record_arrivals:
            self.stats.arrivals.append(now)
        self.stats.max_in_window = max(self.stats.max_in_window, len(w.in_window))
        self.stats.max_in_second = max(self.stats.max_in_second, len(w.in_second))
        if cfg.always_429 or len(w.accepted) >= cfg.rate_limit or len(w.in_second) > cfg.burst_limit:
            return False
        w.accepted.append(now)
        return True

    def _draw_fault(self, h: int) -> str | None:
        cfg = self.config
        if not cfg.faults or unit(hash64(h, 3)) >= cfg.fault_rate:
            return None
        kinds = sorted(cfg.faults)
        return kinds[hash64(h, 4) % len(kinds)]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one HTTP request: admin paths, or the API pipeline described in the module docstring."""
        if request.path.startswith("/__sim/"):
            return await self._admin(request)
        path = request.path.rstrip("/") or "/"
        self.stats.requests += 1
        self.stats.by_endpoint[path] += 1
        if self.config.record_arrivals:
            self.stats.targets.append(request.path_qs)
        if self.config.firewall:  # in front of the API: no path, key or billing of the API's applies
            return web.Response(status=403, text=_FIREWALL, content_type="text/html")
        if path not in ENDPOINTS:
            return _json({"message": "Endpoint not found"}, status=404)  # [G]
        if request.method != "GET":
            return _json({"message": "Method not allowed"}, status=405, headers={"Allow": "GET"})  # [G]
        key = request.headers.get("X-Api-Key", "")
        if not key:
            return _json({"message": MSG_NO_KEY})
        if key not in self._balances:
            return _json({"message": MSG_BAD_KEY})
        if not self._admit(key):
            self.stats.served_429 += 1
            after = self.config.retry_after
            headers = {} if after is None else {"Retry-After": after if isinstance(after, str) else f"{after:g}"}
            return _json({"message": MSG_RATE}, status=429, headers=headers)
        quota = self.config.daily_quota
        day = (key, datetime.datetime.now(datetime.UTC).date().isoformat())
        if quota is not None:
            if self._today[day] >= quota:
                return _json({"message": MSG_DAILY.format(n=quota)})
            self._today[day] += 1  # held like a credit: refunded unless billed
        balance = self._balances[key]
        if balance is not None:
            if balance <= 0:
                if quota is not None:
                    self._today[day] -= 1
                return _json({"message": MSG_BALANCE})
            # Hold the credit now so concurrent requests cannot overdraw; refunded unless billed.
            self._balances[key] = balance - 1
        billed = False
        st = self.stats
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            response = await self._serve(request, path, key)
            billed = response.status == 200
            return response
        finally:
            st.in_flight -= 1
            if billed:
                self.stats.billed[key] += 1
            else:
                if balance is not None:
                    self._balances[key] = (self._balances[key] or 0) + 1
                if quota is not None:
                    self._today[day] -= 1

    async def _serve(self, request: web.Request, path: str, key: str) -> web.StreamResponse:
        """Latency, fault and endpoint; every 200 this returns is billable (balance/key errors are earlier)."""
        cfg = self.config
        params = {k: v for k, v in request.query.items()}
        sig = str_hash(path + "?" + "&".join(f"{k}={v}" for k, v in sorted(params.items())))
        n = self._seen[sig]
        self._seen[sig] = n + 1
        h = hash64(cfg.seed, sig, n)
        await self.answering.wait()
        low, high = cfg.latency
        if high > 0:
            draw = render.live_latency if cfg.latency_live else render.jitter
            await asyncio.sleep(draw(hash64(h, 1), low, high))
        fault = self._draw_fault(h)
        if fault is not None:
            self.stats.faults[fault] += 1
        if fault == "5xx":
            status, text = _5XX[hash64(h, 5) % 3]
            return web.Response(status=status, text=text, content_type="text/plain")
        if fault == "drop":
            if request.transport is not None:
                request.transport.abort()  # the client sees the connection close with no response
            return web.Response(status=599)  # never written: the transport is gone
        if fault == "slow":
            await asyncio.sleep(cfg.slow_seconds)
            return web.Response(status=504, text="Gateway Time-out", content_type="text/plain")
        q = render.draw_quirks(hash64(h, 2)) if cfg.quirks else render.CANONICAL
        if cfg.rounded_only:
            q = replace(q, exact_counts=False)
        payload = call_endpoint(path, self.world, params, q, self.media)
        drop = [f for e, f in cfg.drop_fields if "/" + e.strip("/") == path]
        add = [f for e, f in cfg.add_fields if "/" + e.strip("/") == path]
        if (drop or add) and payload.get("status") != "error":
            payload = render.reshape(payload, drop, add)
        if path in cfg.unreadable and "message" not in payload:  # readable JSON, not the record: the same each try
            payload = {"result": payload}
        if fault == "malformed":
            return web.Response(text=_MALFORMED, content_type="text/html")
        # Half an emoji cannot be UTF-8: it is sent as an escaped half (`\ud83d`), as JSON encoders write it.
        text = json.dumps(payload, ensure_ascii=cfg.world.broken_text_fraction > 0)
        if fault == "truncated":
            text = text[: len(text) // 2]
        if fault == "cut":  # a billed 200 whose body never fully arrives
            body = text.encode()
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            if request.transport is not None:
                request.transport.abort()
            return resp
        return web.Response(text=text, content_type="application/json")

    async def _admin(self, request: web.Request) -> web.StreamResponse:
        """The /__sim/ control paths: stats, advance, topup."""
        path = request.path.rstrip("/")
        try:
            if path == "/__sim/stats" and request.method == "GET":
                return _json(self.stats.snapshot() | {"day": self.world.day, "balances": self._balances,
                                                      "media": self.media.stats.snapshot()})
            if path == "/__sim/advance" and request.method == "POST":
                self.advance_day(int(request.query.get("days", "1")))
                return _json({"day": self.world.day})
            if path == "/__sim/topup" and request.method == "POST":
                key = request.query["key"]
                self.topup(key, int(request.query["credits"]))
                return _json({"key": key, "balance": self._balances[key]})
        except (KeyError, ValueError) as exc:
            return _json({"message": f"bad admin request: {exc!r}"}, status=400)
        return _json({"message": "unknown admin path or method"}, status=404)


def _json(payload: Mapping[str, Any], *, status: int = 200, headers: Mapping[str, str] | None = None
          ) -> web.Response:
    return web.Response(text=json.dumps(payload, ensure_ascii=False), status=status,
                        content_type="application/json", headers=headers)


def make_app(sim: Simulator) -> web.Application:
    """The aiohttp application serving `sim` (one catch-all route; dispatch is in `Simulator.handle`)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", sim.handle)
    return app
