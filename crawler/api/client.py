"""The API client: owns the HTTP session, the rate gate, retries and the credit counters.

Every request goes through `Client.call`: pace (RateGate) -> send -> classify the answer by status
*and* body (`crawler.api.classify`) -> retry transient failures (`crawler.retry`), pausing with every
other call during an outage (`crawler.api.outage`). The endpoint methods live in `crawler.api.endpoints`.
The client knows nothing of jobs or signals: a run stops it through its `SendHook` (`crawler.engine.stop`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import ssl
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import aiohttp

from crawler.api.classify import JsonDict, interpret, response_kind
from crawler.api.endpoints import Endpoints
from crawler.api.outage import Outage
from crawler.api.unexpected import ShapeWatch
from crawler.config import Secret, Settings, load_settings
from crawler.config import api_key as key_from_env
from crawler.errors import (
    BudgetExhausted,
    CannotConnect,
    CrawlerError,
    Interrupted,
    ItemFailed,
    RateLimited,
    RetriesExhausted,
    RunStopped,
    TlsFailed,
    TransientError,
    UnexpectedShape,
    Unreachable,
    Unreadable,
    UsageError,
)
from crawler.options import ClientOptions
from crawler.rate.ledger import open_ledger
from crawler.rate.pacing import Pace, RateGate
from crawler.retry import retry_async

log = logging.getLogger("crawler.api.client")

T = TypeVar("T")


@dataclass(slots=True)
class Counters:
    """What the client has spent and met; `requests_sent` and `credits_billed` are CONTRACT.md's."""

    requests_sent: int = 0
    credits_billed: int = 0
    retries: int = 0
    rate_limited: int = 0
    latency: float = 0.0  # moving average of request seconds (for parallelism = "auto")
    by_endpoint: Counter[str] = field(default_factory=Counter)  # requests sent per path
    billed_by_endpoint: Counter[str] = field(default_factory=Counter)  # credits billed per path
    responses: Counter[str] = field(default_factory=Counter)  # every request sent, by `response_kind()`
    # Per path: what its requests met, their retries and their wait for the rate budget (a run's parts by endpoint).
    responses_by_endpoint: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    retries_by_endpoint: Counter[str] = field(default_factory=Counter)
    rate_wait_by_endpoint: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))

    def met(self, path: str, kind: str, n: int = 1) -> None:
        """Count ``n`` requests to ``path`` that met ``kind`` (one of `response_kind()`'s)."""
        self.responses[kind] += n
        self.responses_by_endpoint[path][kind] += n

    def add(self, other: Counters) -> None:
        """Count another client's requests as this one's (a lookup the command made before its job's client)."""
        self.requests_sent += other.requests_sent
        self.credits_billed += other.credits_billed
        self.retries += other.retries
        self.rate_limited += other.rate_limited
        self.by_endpoint.update(other.by_endpoint)
        self.billed_by_endpoint.update(other.billed_by_endpoint)
        self.responses.update(other.responses)
        for path, kinds in other.responses_by_endpoint.items():
            self.responses_by_endpoint[path].update(kinds)
        self.retries_by_endpoint.update(other.retries_by_endpoint)
        for path, seconds in other.rate_wait_by_endpoint.items():
            self.rate_wait_by_endpoint[path] += seconds


@dataclass(frozen=True, slots=True)
class Answered:
    """The latest answer's time on the wire and the rate headers it carried (``X-RateLimit-*``, ``Retry-After``)."""

    seconds: float
    rate_headers: Mapping[str, str]


def _rate_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower().startswith("x-ratelimit") or k.lower() == "retry-after"}


def check_base_url(url: str, *, allow_insecure_http: bool = False) -> str:
    """The base URL if it is safe to send the key to, else a UsageError (before any connection)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise UsageError(f"api.base_url {url!r} is not an http(s) URL (expected e.g. https://api.tikliveapi.com)")
    if parts.scheme == "http" and not allow_insecure_http and not _is_loopback(host):
        raise UsageError(
            f"refusing to send the API key over plain http to {host}: use https, "
            "or set api.allow_insecure_http = true in config.toml if you really mean it"
        )
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _transport_failure(path: str, exc: aiohttp.ClientError) -> tuple[str, bool, str | None]:
    """(what failed, whether no connection was made, the TLS error if it was one) for a transport error. Never keep
    the aiohttp exception: its request_info carries our request headers."""
    if isinstance(exc, (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch, ssl.SSLError)):  # permanent
        return f"{path}: TLS error", False, _tls_reason(exc)
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, unroutable, DNS: no server at all
        return f"{path}: cannot connect ({type(exc).__name__})", True, None
    return f"{path}: {type(exc).__name__}", False, None


def _tls_reason(exc: Exception) -> str:
    """The TLS failure in a few words (never the aiohttp exception, whose request_info holds our headers)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"certificate not accepted: {exc.certificate_error}"
    cause = getattr(exc, "os_error", exc)
    return str(cause) or type(cause).__name__


def _tls_message(base_url: str, reason: str) -> str:
    """One line for a TLS or certificate error before the API ever answered: what failed and what to check."""
    host = (urlsplit(base_url).hostname or "").lower()
    if _is_loopback(host):
        plain = base_url.replace("https://", "http://", 1)
        hint = f"a local simulator speaks plain http: use --base-url {plain}"
    else:
        hint = "check api.base_url / --base-url / TIKLIVE_BASE_URL and the host's certificate"
    return f"TLS/certificate error talking to {base_url} ({reason}): {hint}"


class SendHook:
    """The client's hook for whoever runs it (the stop policy is `crawler.engine.stop`'s): the tasks inside a call,
    the tasks whose request is under way (connecting, sent, or its answer being read: the answer is paid for), and
    `check`, which the client calls before every try waits or sends."""

    __slots__ = ("calling", "on_wire", "refusal")

    def __init__(self) -> None:
        self.calling: set[asyncio.Task[Any]] = set()
        self.on_wire: set[asyncio.Task[Any]] = set()
        self.refusal: RunStopped | None = None  # set by a stop: no request leaves any more

    def check(self) -> None:
        """Raise a copy of the refusal once one is set (nothing more is sent: a retry, a page, a 429's next try)."""
        if self.refusal is not None:
            stop = self.refusal
            refused = type(stop).__new__(type(stop), *stop.args)  # a copy, whatever its __init__ takes
            refused.__dict__.update(vars(stop))
            refused.refused = True
            raise refused


def _default_gate(o: ClientOptions, key: Secret, base_url: str, pace: Pace) -> RateGate:
    """The gate of a client given none: the key's ledger (rate.shared) paces it with every other client on the key."""
    ledger = open_ledger(o.rate.shared, key.reveal(), base_url) if o.rate.enabled else None
    r = o.retry
    return RateGate(pace, ledger=ledger, cooldown_base=max(r.base_delay, 0.05) if r.base_delay > 0 else 0.0,
                    cooldown_max=r.max_delay, stall_limit=r.stall_limit)


class Client(Endpoints):
    """TikLiveAPI client: ``async with Client() as c: async for post in c.user_posts(user_id): ...``

    Reads the key from TIKLIVE_API_KEY unless ``api_key`` is given. ``settings`` (`Settings` or `ClientOptions`, kept
    as ``options``) default to what the command line reads (TIKLIVE_BASE_URL, CRAWLER_CONFIG or ./config.toml, then
    defaults); ``base_url`` overrides either. Opened once; reuse after close
    is refused. ``request_budget`` caps requests_sent (``--max-credits``), in-flight included;
    ``reserve(n)``, when given, is called before the n-th request of this client leaves (a durable reservation),
    before the request waits for its rate slot.
    """

    def __init__(
        self,
        settings: Settings | ClientOptions | None = None,
        *,
        api_key: str | Secret | None = None,
        base_url: str | None = None,
        request_budget: int | None = None,
        max_connections: int = 100,
        gate: RateGate | None = None,
        reserve: Callable[[int], Awaitable[None] | None] | None = None,
    ) -> None:
        # Like the CLI: environment (TIKLIVE_BASE_URL, CRAWLER_CONFIG), then config.toml if present, then defaults.
        o = settings if isinstance(settings, ClientOptions) else (settings or load_settings()).client_options()
        if base_url is not None:
            o = dataclasses.replace(o, base_url=base_url)
        self.options = o
        self.base_url = check_base_url(o.base_url, allow_insecure_http=o.allow_insecure_http)
        if api_key is None:
            api_key = key_from_env()
        self._key = api_key if isinstance(api_key, Secret) else Secret(api_key)
        self.pace = Pace.of(o.rate)
        self.gate = gate if gate is not None else _default_gate(o, self._key, self.base_url, self.pace)
        r = o.retry
        self.outage = Outage(base_url=self.base_url, stall_limit=r.stall_limit, attempts=r.attempts,
                             base_delay=r.base_delay, max_delay=r.max_delay,
                             probe_timeout=o.timeout.connect + o.timeout.read)
        self.unexpected = ShapeWatch(o.data_dir, secret=self._key.reveal().encode())  # answers of an unexpected shape
        self.request_budget = request_budget
        self._reserve = reserve
        self._admitted = 0  # requests reserved but not yet sent (see `_admit`)
        self.counters = Counters()
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.hook = SendHook()  # what a run's stop reads and sets (`crawler.engine.stop`)
        self.last_answer: Answered | None = None  # the latest HTTP answer (`crawler doctor` reports it)

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r}, requests_sent={self.counters.requests_sent})"

    async def __aenter__(self) -> Client:
        if self._closed or self._session is not None:
            raise RuntimeError("a Client is opened once; create a new one")
        await self.gate.__aenter__()  # an unreachable ledger is a usage error before any request
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.options.timeout.connect, sock_read=self.options.timeout.read
        )
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, raise_for_status=False)
        # aiohttp silently re-sends an idempotent request once when a pooled connection drops; that
        # second request would bypass the rate gate and the credit counters, so every resend is ours.
        self._session._retry_connection = False
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session (idempotent)."""
        if self._closed:
            return
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()
            await self.gate.__aexit__(None, None, None)

    async def get(self, endpoint: str, params: Mapping[str, str | int] | None = None) -> JsonDict:
        """One API call: paced, retried on transient errors, classified; returns the JSON payload."""
        return await self.call(endpoint, params, lambda body: body)

    async def call(self, endpoint: str, params: Mapping[str, str | int] | None, parse: Callable[[JsonDict], T]) -> T:
        """One API call whose answer is parsed inside the retry: an answer of the wrong shape is retried too."""
        path = "/" + endpoint.strip("/") + "/"
        query = {k: str(v) for k, v in (params or {}).items()}
        target = path + "?" + urlencode(sorted(query.items()))
        unreadable = 0

        async def attempt() -> T:
            nonlocal unreadable
            try:
                return await self._attempt(path, query, target, parse)
            except TransientError as exc:
                self.hook.check()  # stopping: the answer under way failed; no backoff, no other try
                if isinstance(exc, Unreadable):
                    # A changed shape answers the same every time: one more try, then the item fails.
                    unreadable += 1
                    if unreadable > 1 or self.options.retry.attempts <= 1:
                        raise UnexpectedShape(f"{exc} (the same on {unreadable} tries)") from None
                raise

        def on_retry(exc: BaseException, tries: int, wait: float) -> None:
            self.counters.retries += 1
            self.counters.retries_by_endpoint[path] += 1
            log.info("retrying %s after %s (try %d, waiting %.2f s)", path, exc, tries, wait)

        me = asyncio.current_task()
        calling = self.hook.calling
        mark = me if me is not None and me not in calling else None  # a call inside a call: the outer's
        if mark is not None:
            calling.add(mark)
        try:
            return await retry_async(attempt, retry_on=TransientError, attempts=self.options.retry.attempts,
                                     base_delay=self.options.retry.base_delay,
                                     max_delay=self.options.retry.max_delay, on_retry=on_retry)
        except TransientError as exc:
            failed = RetriesExhausted(f"{exc} (gave up after {self.options.retry.attempts} tries)")
            failed.endpoint = path
            raise failed from None
        except ItemFailed as exc:
            exc.endpoint = path
            raise
        finally:
            if mark is not None:
                calling.discard(mark)

    async def _attempt(self, path: str, query: dict[str, str], target: str, parse: Callable[[JsonDict], T]) -> T:
        """One try: 429s and an outage are waited out here (they spend no try); the parsed answer."""
        outage = self.outage
        while True:
            self.hook.check()
            await outage.wait()
            try:
                started = await self._admit()
                self.counters.rate_wait_by_endpoint[path] += self.gate.last_wait
            except BaseException:
                outage.release()  # no request left: a probe turn this call held goes to the next caller
                raise
            try:
                body, raw = await self._send(path, query)
            except RateLimited as exc:
                outage.answered()
                self.counters.rate_limited += 1
                await self.gate.report_429(started, exc.retry_after)
                continue
            except Unreachable as exc:
                if outage.failed(target, exc):
                    continue  # an outage, not this item's fault: wait with everyone, spend no try
                raise
            except (BudgetExhausted, Interrupted):
                outage.release()
                raise  # nothing was sent
            except CrawlerError as exc:
                if isinstance(exc, RunStopped) and exc.refused:
                    outage.release()
                    raise  # nothing was sent: a stop refused it
                outage.answered()
                self.gate.report_success()  # any answer but a rate limit ends a 429 streak
                if isinstance(exc, Unreadable):
                    self.unexpected.unreadable_answer(path, exc.body)
                raise
            outage.answered()  # an answer, readable or not: never part of an outage
            self.gate.report_success()
            try:
                result = parse(body)
            except (TransientError, ValueError, TypeError, KeyError, AttributeError) as exc:
                text = str(exc) if isinstance(exc, TransientError) else f"{path}: unexpected answer ({exc})"
                self.counters.met(path, "ok", -1)
                self.counters.met(path, "unexpected_shape")
                self.unexpected.unreadable_answer(path, raw)
                raise Unreadable(text) from None
            self.unexpected.readable(path)
            return result

    async def _admit(self) -> float:
        """Wait for the request's credit (``reserve``), then for its rate slot; its start on the ledger's clock.
        In that order: a slot taken first and then held up by a slow grant (a row lock, an outage) would leave late,
        into a window the key's other processes have filled. `_send` follows at once, with no wait between."""
        if self._reserve is None:
            return await self.gate.acquire()
        self._admitted += 1  # reserved (or being reserved) and not yet sent: each reservation gets its own number
        try:
            reserving = self._reserve(self.counters.requests_sent + self._admitted)
            if reserving is not None:  # a reservation in a shared store (a PostgreSQL job's budget)
                await reserving
            return await self.gate.acquire()
        except BaseException:
            self._admitted -= 1
            raise

    async def _send(self, path: str, query: dict[str, str]) -> tuple[JsonDict, bytes]:
        """One request: the payload and the raw body it came in, or the error `interpret` makes of the answer."""
        if self._reserve is not None:
            self._admitted -= 1  # from here to requests_sent += 1 nothing waits: sent (or refused) now
        if self._session is None:
            raise RuntimeError("use the Client inside 'async with Client(...) as client'")
        self.hook.check()
        if self.request_budget is not None and self.counters.requests_sent >= self.request_budget:
            raise BudgetExhausted(f"the --max-credits budget of {self.request_budget} requests is spent")
        me = asyncio.current_task()
        if me is not None:
            self.hook.on_wire.add(me)
        self.counters.requests_sent += 1
        self.counters.by_endpoint[path] += 1
        log.debug("GET %s %s", path, query)
        failure: str | None = None
        refused = False
        tls: str | None = None
        status, raw, retry_after = 0, b"", None
        rate: dict[str, str] = {}
        begun = time.monotonic()
        try:
            async with self._session.get(
                self.base_url + path, params=query, headers={"X-Api-Key": self._key.reveal()}, allow_redirects=False
            ) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                rate = _rate_headers(resp.headers)
                raw = await resp.read()
        except TimeoutError:
            failure = f"{path}: timed out"
        except aiohttp.ClientError as exc:
            failure, refused, tls = _transport_failure(path, exc)
        finally:
            if me is not None:
                self.hook.on_wire.discard(me)
        took = time.monotonic() - begun
        c = self.counters
        c.latency = took if c.latency == 0.0 else 0.9 * c.latency + 0.1 * took
        if status:
            self.last_answer = Answered(took, rate)
        if failure is not None:
            c.met(path, response_kind(status, None))
            if status == 200:  # the answer began as a 200: the API billed it even if its body never arrived
                c.credits_billed += 1
                c.billed_by_endpoint[path] += 1
            if tls is not None:
                raise TlsFailed(_tls_message(self.base_url, tls))
            raise CannotConnect(failure) if refused else Unreachable(failure)
        result, billed = interpret(status, raw, retry_after, path)
        c.met(path, response_kind(status, result))
        if billed:
            self.counters.credits_billed += 1
            self.counters.billed_by_endpoint[path] += 1
        if isinstance(result, CrawlerError):
            raise result
        return result, raw

    # --- endpoints (see crawler.api.records for the records and the paginator) ---
