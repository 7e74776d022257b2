"""The API client: owns the HTTP session, the rate gate, retries and the credit counters.

Every request goes through `Client.get`: pace (RateGate) -> send -> classify the answer by status
*and* body (the API reports most errors as HTTP 200) -> retry transient failures with backoff.
Endpoint methods (paginators and single lookups) are thin wrappers over `crawler.api.records`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import ipaddress
import json
import logging
import math
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import aiohttp

from crawler.api import records as ep
from crawler.api.lists import LISTS, items, walk
from crawler.api.parse import parse_challenge, parse_music, parse_post, parse_profile, parse_regions, parse_user_id
from crawler.config import Secret, Settings, load_settings
from crawler.config import api_key as key_from_env
from crawler.errors import (
    BalanceExhausted,
    BudgetExhausted,
    CannotConnect,
    CrawlerError,
    Interrupted,
    ItemFailed,
    KeyRejected,
    NotAnApiAnswer,
    NotFound,
    NotTheApi,
    OutageStalled,
    PageSizeRejected,
    PrivateAccount,
    RateLimited,
    RetriesExhausted,
    TransientError,
    Unreachable,
    UsageError,
)
from crawler.options import ClientOptions
from crawler.rate.ledger import open_ledger
from crawler.rate.pacing import Pace, RateGate
from crawler.retry import retry_async

log = logging.getLogger("crawler.api.client")

JsonDict = dict[str, Any]
T = TypeVar("T")

# Words that classify an error body (lower-cased substring match), checked in this order.
# The reference documents rate limits as HTTP 429; a 200 message only counts as one with explicit words.
# A bare "limit" reads as the credit limit, as the reference's clients read it.
KEY_WORDS = ("api-key", "api key", "apikey", "sign up", "signup")
BARE_KEY_WORDS = (*KEY_WORDS, "unauthori", "forbidden")  # only when the whole body is the message
RATE_WORDS = ("rate limit", "too many", "slow down", "per second", "/second", "throttl", "try again later")
BALANCE_WORDS = ("balance", "credit", "purchase", "quota", "exhausted", "insufficient", "top up", "payment",
                 "limit")
PRIVATE_WORDS = ("private",)
NOT_FOUND_WORDS = ("not found", "not exist", "doesn't exist", "does not exist", "deleted", "no such",
                   "url parsing is failed", "check url", "unavailable")
# Keys that may appear beside `message` in a bare error body without making it a payload.
_ERROR_ONLY_KEYS = frozenset({"message", "msg", "error", "detail", "code", "status", "processed_time"})


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

    def add(self, other: Counters) -> None:
        """Count another client's requests as this one's (a lookup the command made before its job's client)."""
        self.requests_sent += other.requests_sent
        self.credits_billed += other.credits_billed
        self.retries += other.retries
        self.rate_limited += other.rate_limited
        self.by_endpoint.update(other.by_endpoint)
        self.billed_by_endpoint.update(other.billed_by_endpoint)
        self.responses.update(other.responses)


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


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:  # a value that is not a finite number is an endless wait: the gate ends the run on it
        return max(0.0, seconds) if math.isfinite(seconds) else math.inf
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _words(text: str, words: tuple[str, ...]) -> bool:
    return any(w in text for w in words)


def _message(body: Mapping[str, Any]) -> str:
    for key in ("message", "msg", "error", "detail"):
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
    return "error without a message"


# Text no sink can write: a UTF-16 surrogate (UTF-8 files, SQLite and PostgreSQL refuse one) or NUL (PostgreSQL).
_UNWRITABLE = re.compile("[\x00\ud800-\udfff]")
# Where such text can come from in a raw body: an escaped half or NUL, a half as UTF-8 bytes (json.loads decodes
# with surrogatepass), or any zero byte (a UTF-16/32 body). A body without any of these is not walked.
_ESCAPED = re.compile(rb"\\u(?:[dD][89a-fA-F]|0000)")


def clean_text(value: Any) -> Any:
    """Decoded JSON with every string writable: the two halves of a surrogate pair joined into their character,
    a half alone replaced by U+FFFD, NUL removed (a title or nickname cut in the middle of an emoji)."""
    if isinstance(value, str):
        if _UNWRITABLE.search(value) is None:
            return value
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace").replace("\x00", "")
    if isinstance(value, dict):
        return {clean_text(k): clean_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_text(v) for v in value]
    return value


def _loads(raw: bytes) -> Any:
    """json.loads, every string of the result writable (`clean_text`): the one place API text is decoded."""
    body = json.loads(raw)
    if b"\xed" in raw or b"\x00" in raw or _ESCAPED.search(raw) is not None:
        body = clean_text(body)
    return body


def classify(status: int, raw: bytes, retry_after: str | None, endpoint: str) -> tuple[JsonDict, bool]:
    """Turn one HTTP answer into (payload, billed) or raise the error it means (see `interpret`)."""
    result, billed = interpret(status, raw, retry_after, endpoint)
    if isinstance(result, CrawlerError):
        raise result
    return result, billed


def interpret(status: int, raw: bytes, retry_after: str | None, endpoint: str) -> tuple[JsonDict | CrawlerError, bool]:
    """One HTTP answer -> (payload or the error it means, whether the API billed it).

    Status first (429 rate limit, 5xx transient), then the body: an error body (a bare ``message`` or
    ``{"status":"error"}``) names a rejected key, an empty balance, a private account, a missing item
    or a rate limit by its words, in that order; any other error body is transient.
    """
    if status == 429:
        return RateLimited(f"{endpoint}: HTTP 429", _retry_after(retry_after)), False
    if status >= 500:
        return Unreachable(f"{endpoint}: HTTP {status}"), False
    if status in (401, 403):
        return KeyRejected(f"the API rejected the key (HTTP {status}): check TIKLIVE_API_KEY"), False
    if status == 402:
        return BalanceExhausted("the API balance is empty (HTTP 402): top up, then run the same command again"), False
    if status == 404:
        # The API says "not found" in a 200 body; a 404 comes from a server that does not know the path.
        return NotAnApiAnswer(f"{endpoint}: HTTP 404, not an API answer"), False
    if 300 <= status < 400:  # redirects are not followed: the key must not travel to another host
        return Unreachable(f"{endpoint}: unexpected redirect (HTTP {status})"), False
    billed = status == 200
    try:
        body = _loads(raw)
    except ValueError:
        if raw.lstrip()[:1] == b"<":
            return Unreachable(f"{endpoint}: malformed JSON, an HTML page (HTTP {status})"), billed
        return Unreachable(f"{endpoint}: malformed JSON (HTTP {status}, {len(raw)} bytes)"), billed
    if status != 200:
        return TransientError(f"{endpoint}: HTTP {status}"), False
    if not isinstance(body, dict):
        return Unreachable(f"{endpoint}: unexpected JSON {type(body).__name__}"), billed
    body = _unwrap(body)
    bare = "message" in body or "msg" in body or "error" in body
    bare = bare and set(body) <= _ERROR_ONLY_KEYS and body.get("status") != "error"
    if bare or body.get("status") == "error":
        text = _message(body)
        low = text.lower()
        # Key, balance and rate answers are never billed, whatever their shape; other error bodies are
        # billed when they are {"status":"error"} (CONTRACT.md assumes the worse), not when bare.
        if _words(low, BARE_KEY_WORDS if bare else KEY_WORDS):
            return KeyRejected(f"the API rejected the key ({text!r}): check TIKLIVE_API_KEY"), False
        if _words(low, RATE_WORDS):
            return RateLimited(f"{endpoint}: {text}"), False
        billed = billed and not bare
        if _words(low, PRIVATE_WORDS):
            return PrivateAccount(f"{endpoint}: {text}"), billed
        if "count" in low and _words(low, ("invalid", "at most", "too large", "maximum")):
            return PageSizeRejected(f"{endpoint}: {text}"), billed
        if _words(low, NOT_FOUND_WORDS):
            return NotFound(f"{endpoint}: {text}"), billed
        if _words(low, BALANCE_WORDS):
            return BalanceExhausted(
                f"the API says the balance is empty ({text!r}): top up, then run the same command again"
            ), False
        return TransientError(f"{endpoint}: API error {text!r}"), billed
    return body, billed


RESPONSE_KINDS = ("ok", "not_found", "private", "rate_limited", "server_error", "no_answer", "malformed",
                  "api_error", "key_rejected", "balance_empty", "not_the_api")


def response_kind(status: int, result: JsonDict | CrawlerError | None) -> str:
    """What one request met, for the metrics (`crawler_responses{outcome}`): one of RESPONSE_KINDS.

    ``result`` is `interpret()`'s verdict, None when no whole answer arrived (timeout, dropped or refused
    connection, a body cut short).
    """
    if result is None:
        return "no_answer"
    if not isinstance(result, CrawlerError):
        return "ok"
    kinds: tuple[tuple[type[CrawlerError], str], ...] = (
        (RateLimited, "rate_limited"), (NotAnApiAnswer, "not_the_api"), (KeyRejected, "key_rejected"),
        (BalanceExhausted, "balance_empty"), (NotFound, "not_found"), (PrivateAccount, "private"))
    for kind, name in kinds:
        if isinstance(result, kind):
            return name
    if status >= 500:
        return "server_error"
    return "malformed" if isinstance(result, Unreachable) else "api_error"


class GracefulStop:
    """SIGINT/SIGTERM for a worker pool (crawl, ingest, a PostgreSQL job's worker), over its `request_stop`.

    The first signal lets the requests under way be answered and committed: they are paid for. Nothing else is
    sent: the pool's `request_stop` (soft while ``_draining``) stops taking items; whatever waits inside a call
    with nothing under way (the rate gate, an outage, a retry's backoff) is cancelled; a worker committing a page
    is refused at its next request. A second signal stops at once.
    """

    _draining = False  # a first signal: the requests under way are being answered and committed
    _signals = 0
    quiet = True  # False: the first signal says how many answers it waits for
    client: Client

    def request_stop(self, error: CrawlerError) -> None:
        raise NotImplementedError

    def signalled(self, error: Interrupted) -> int:
        """Handle one signal; the number of answers the stop waits for."""
        self._signals += 1
        if self._signals > 1 or not hasattr(self, "client"):
            self._draining = False
            self.request_stop(error)
            return 0
        self._draining = True
        waiting, in_flight = self.client.stop_sending(error)
        self.request_stop(error)
        for task in waiting:
            task.cancel()
        if in_flight and not self.quiet:
            print(f"crawler: {error}: waiting for the {in_flight} requests already sent (paid for) to be answered and"
                  " written; send it again to stop at once", file=sys.stderr)
        return in_flight


def _unwrap(body: JsonDict) -> JsonDict:
    """Accept a tikwm-style envelope ``{"code":0,"msg":..,"data":{..}}`` defensively."""
    data = body.get("data")
    if isinstance(data, dict) and set(body) <= {"data", "code", "msg", "message", "processed_time", "status",
                                                "success", "ok"}:
        code = body.get("code", 0)
        if code not in (0, "0", None):
            return {"message": str(body.get("msg") or "error")}
        return data
    return body


class Outage:
    """The shared outage state: when requests to several targets get no API answer, every worker pauses.

    An item's transient failure counts against its own retries only while the API answers other
    requests; once the unanswered requests of a streak reach `threshold` over at least two targets,
    workers wait and one probe at a time (backing off from ``base_delay`` to ``max_delay``) checks
    whether the API is back. After ``stall_limit`` seconds without any answer the run stops with
    OutageStalled, leaving the items pending. Answers that are never the API's (404, HTML) from the
    first request on end the run at once with NotTheApi: a wrong base URL is not an outage.
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
        self._stall_limit = stall_limit
        self._attempts = max(1, attempts)
        self._base_delay = max(base_delay, 0.1)
        self._max_delay = max(max_delay, self._base_delay)
        self._probe_timeout = probe_timeout
        self._threshold = threshold
        self._clock = clock
        self._since: float | None = None  # first unanswered request of the current streak
        self._count = 0
        self._targets: set[str] = set()
        self._last_error = ""
        self._delay = self._base_delay
        self._probe_at = 0.0
        self._probe_until = 0.0
        self._recovered = asyncio.Event()
        self.active = False
        self.ever_answered = False
        self.pauses = 0  # distinct outages met

    def status(self) -> str:
        """'' when the API answers, else what the progress line shows."""
        if not self.active or self._since is None:
            return ""
        return f"PAUSED: no API answer for {self._clock() - self._since:.0f} s ({self._last_error})"

    def answered(self) -> None:
        """Any API answer (a payload, an error body, a 429): the API is reachable."""
        self.ever_answered = True
        self._probe_until = 0.0
        if self._since is None:
            return
        self._since, self._count, self._targets = None, 0, set()
        if self.active:
            self.active = False
            self._recovered.set()
            self._recovered = asyncio.Event()
            log.warning("the API answers again: all workers resume")

    def failed(self, target: str, exc: Unreachable) -> bool:
        """Count one unanswered request; True when it is part of an outage (the caller waits, not retries)."""
        now = self._clock()
        self._probe_until = 0.0
        if self._since is None:
            self._since = now
        self._count += 1
        if len(self._targets) < 2:
            self._targets.add(target)
        self._last_error = str(exc)
        if isinstance(exc, NotAnApiAnswer) and not self.ever_answered and self._count >= self._attempts:
            raise NotTheApi(
                f"{self._base_url} does not answer like TikLiveAPI ({exc}): check api.base_url / --base-url /"
                " TIKLIVE_BASE_URL (no path after the host); nothing was marked failed"
            )
        # Several targets failing together is an outage; so is finding no server at all, even for one item.
        if not self.active and self._count >= self._threshold and (
                len(self._targets) >= 2 or isinstance(exc, CannotConnect)):
            self.active = True
            self.pauses += 1
            self._delay = self._base_delay
            log.warning("no API answer on %d requests (%s): all workers pause", self._count, exc)
        elif self.active:
            self._delay = min(self._delay * 2, self._max_delay)
        if self.active:
            self._probe_at = now + self._delay
            self._check(now)
        return self.active

    def _check(self, now: float) -> None:
        if self._since is not None and now - self._since >= self._stall_limit:
            raise OutageStalled(
                f"no answer from the API at {self._base_url} for {now - self._since:.0f} s ({self._last_error});"
                " no item was marked failed: check the network and api.base_url, then run the same command again"
            )

    async def wait(self) -> None:
        """Return at once while the API answers; during an outage, wait for recovery or a probe turn."""
        while self.active:
            now = self._clock()
            self._check(now)
            if now >= self._probe_at and now >= self._probe_until:
                self._probe_until = now + self._probe_timeout  # this caller's request is the probe
                return
            timeout = max(self._probe_at, self._probe_until) - now
            if self._since is not None:  # wake up at the stall limit, not at the next probe after it
                timeout = min(timeout, self._since + self._stall_limit - now)
            recovered = self._recovered
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recovered.wait(), timeout=max(timeout, 0.01))


class Client:
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
        if gate is None:
            # The key's ledger (rate.shared) paces this client with every other one on the key; none when off.
            ledger = open_ledger(o.rate.shared, self._key.reveal(), self.base_url) if o.rate.enabled else None
            gate = RateGate(
                self.pace,
                ledger=ledger,
                cooldown_base=max(o.retry.base_delay, 0.05) if o.retry.base_delay > 0 else 0.0,
                cooldown_max=o.retry.max_delay,
                stall_limit=o.retry.stall_limit,
            )
        self.gate = gate
        self.outage = Outage(
            base_url=self.base_url,
            stall_limit=o.retry.stall_limit,
            attempts=o.retry.attempts,
            base_delay=o.retry.base_delay,
            max_delay=o.retry.max_delay,
            probe_timeout=o.timeout.connect + o.timeout.read,
        )
        self.request_budget = request_budget
        self._reserve = reserve
        self._admitted = 0  # requests reserved but not yet sent (see `_admit`)
        self.counters = Counters()
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._refusing: Interrupted | None = None  # set by stop_sending(): no request leaves any more
        self._calling: set[asyncio.Task[Any]] = set()  # tasks inside call()
        # Tasks whose request is under way (connecting, sent, or its answer being read): an answer is paid for.
        self.on_wire: set[asyncio.Task[Any]] = set()

    def stop_sending(self, error: Interrupted) -> tuple[set[asyncio.Task[Any]], int]:
        """From now on every call raises a copy of ``error`` before anything more is sent (a retry, a page, a 429's
        next try). Returns the tasks inside a call whose request is not under way (waiting for the rate gate, an
        outage or a retry's backoff: a graceful stop cancels them) and how many requests are under way (their
        answers are paid for: a graceful stop lets them come and be committed)."""
        self._refusing = error
        return self._calling - self.on_wire, len(self.on_wire)

    def _refuse(self) -> None:
        if self._refusing is not None:
            raise Interrupted(str(self._refusing), self._refusing.code)

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
        outage = self.outage

        async def attempt() -> T:
            while True:
                self._refuse()
                await outage.wait()
                started = await self._admit()
                try:
                    body = await self._send(path, query)
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
                    raise  # nothing was sent
                except CrawlerError:
                    outage.answered()
                    self.gate.report_success()  # any answer but a rate limit ends a 429 streak
                    raise
                self.gate.report_success()
                try:
                    result = parse(body)
                except (TransientError, ValueError, TypeError, KeyError, AttributeError) as exc:
                    # A body without the API's shape is no API answer either (it counts toward an outage).
                    text = str(exc) if isinstance(exc, TransientError) else f"{path}: unexpected answer ({exc})"
                    shape = Unreachable(text)
                    if outage.failed(target, shape):
                        continue
                    raise shape from None
                outage.answered()
                return result

        async def attempt_or_stop() -> T:
            try:
                return await attempt()
            except TransientError:
                self._refuse()  # stopping: the answer under way failed; no backoff, no other try
                raise

        def on_retry(exc: BaseException, tries: int, wait: float) -> None:
            self.counters.retries += 1
            log.info("retrying %s after %s (try %d, waiting %.2f s)", path, exc, tries, wait)

        me = asyncio.current_task()
        mark = me if me is not None and me not in self._calling else None  # a call inside a call: the outer's
        if mark is not None:
            self._calling.add(mark)
        try:
            result = await retry_async(
                attempt_or_stop,
                retry_on=TransientError,
                attempts=self.options.retry.attempts,
                base_delay=self.options.retry.base_delay,
                max_delay=self.options.retry.max_delay,
                on_retry=on_retry,
            )
        except TransientError as exc:
            failed = RetriesExhausted(f"{exc} (gave up after {self.options.retry.attempts} tries)")
            failed.endpoint = path
            raise failed from None
        except ItemFailed as exc:
            exc.endpoint = path
            raise
        finally:
            if mark is not None:
                self._calling.discard(mark)
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

    async def _send(self, path: str, query: dict[str, str]) -> JsonDict:
        if self._reserve is not None:
            self._admitted -= 1  # from here to requests_sent += 1 nothing waits: sent (or refused) now
        if self._session is None:
            raise RuntimeError("use the Client inside 'async with Client(...) as client'")
        self._refuse()
        if self.request_budget is not None and self.counters.requests_sent >= self.request_budget:
            raise BudgetExhausted(f"the --max-credits budget of {self.request_budget} requests is spent")
        me = asyncio.current_task()
        if me is not None:
            self.on_wire.add(me)
        self.counters.requests_sent += 1
        self.counters.by_endpoint[path] += 1
        log.debug("GET %s %s", path, query)
        failure: str | None = None
        refused = False
        status, raw, retry_after = 0, b"", None
        begun = time.monotonic()
        try:
            async with self._session.get(
                self.base_url + path, params=query, headers={"X-Api-Key": self._key.reveal()}, allow_redirects=False
            ) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                raw = await resp.read()
        except TimeoutError:
            failure = f"{path}: timed out"
        except aiohttp.ClientConnectorError as exc:  # refused, unroutable, DNS: no server at all
            refused = True
            failure = f"{path}: cannot connect ({type(exc).__name__})"
        except aiohttp.ClientError as exc:
            # Never keep the aiohttp exception: its request_info carries our request headers.
            failure = f"{path}: {type(exc).__name__}"
        finally:
            if me is not None:
                self.on_wire.discard(me)
        took = time.monotonic() - begun
        c = self.counters
        c.latency = took if c.latency == 0.0 else 0.9 * c.latency + 0.1 * took
        if failure is not None:
            c.responses[response_kind(status, None)] += 1
            if status == 200:  # the answer began as a 200: the API billed it even if its body never arrived
                c.credits_billed += 1
                c.billed_by_endpoint[path] += 1
            raise CannotConnect(failure) if refused else Unreachable(failure)
        result, billed = interpret(status, raw, retry_after, path)
        c.responses[response_kind(status, result)] += 1
        if billed:
            self.counters.credits_billed += 1
            self.counters.billed_by_endpoint[path] += 1
        if isinstance(result, CrawlerError):
            raise result
        return result

    # --- endpoints (see crawler.api.records for the records and the paginator) ---

    async def user_id(self, handle: str) -> str:
        """The numeric user id of a handle (`/userid/`)."""
        return await self.call("/userid/", {"username": handle}, parse_user_id)

    async def user_info(self, handle: str | None = None, *, user_id: str | None = None) -> ep.Profile:
        """A profile by handle (`/userinfo-by-username/`) or by id (`/userinfo-by-id/`)."""
        if user_id is not None:
            return await self.call("/userinfo-by-id/", {"userid": user_id}, parse_profile)
        if handle is None:
            raise ValueError("user_info needs a handle or user_id")
        return await self.call("/userinfo-by-username/", {"username": handle}, parse_profile)

    async def post_detail(self, video_id: str, *, source: str = "") -> ep.Post:
        """One post by numeric id (`/post-detail/`)."""
        return await self.call("/post-detail/", {"url": ep.video_url(video_id)},
                               lambda body: parse_post(body, source or video_id))

    async def music_info(self, music_id: str) -> ep.Music:
        """Music metadata (`/music-info/`)."""
        return await self.call("/music-info/", {"music_id": music_id}, parse_music)

    async def challenge_info(self, challenge_id: str | None = None, *, name: str | None = None) -> ep.Challenge:
        """A hashtag by id (`/challenge-info-id/`) or name (`/challenge-info-name/`)."""
        source = challenge_id or name or ""
        if challenge_id is not None:
            return await self.call("/challenge-info-id/", {"id": challenge_id}, lambda b: parse_challenge(b, source))
        if name is not None:
            return await self.call("/challenge-info-name/", {"name": name}, lambda b: parse_challenge(b, source))
        raise ValueError("challenge_info needs an id or a name")

    async def regions(self) -> list[ep.Region]:
        """The region codes `/search-video/` accepts (`/region-list/`)."""
        return await self.call("/region-list/", None, parse_regions)

    def pages(self, kind: str, params: Mapping[str, str | int], **options: Any) -> AsyncGenerator[ep.Page[Any], None]:
        """The page-by-page walk of one list (see `endpoints.walk`); the crawl uses this to commit per page."""
        return walk(self, LISTS[kind], params, **options)

    def user_posts(self, user_id: str, **options: Any) -> AsyncGenerator[ep.Post, None]:
        """A user's posts, newest first (`/user-posts/`)."""
        return items(self.pages("posts", {"userid": user_id}, **options), options.get("max_items"))

    def user_liked(self, user_id: str, **options: Any) -> AsyncGenerator[ep.Post, None]:
        """Posts a user liked (`/user-liked/`)."""
        return items(self.pages("liked", {"userid": user_id}, **options), options.get("max_items"))

    def user_followers(self, user_id: str, **options: Any) -> AsyncGenerator[ep.Follow, None]:
        """A user's followers, most recent first (`/user-followers/`; TikTok ends lists near 5,000)."""
        return items(self.pages("followers", {"userid": user_id}, **options), options.get("max_items"))

    def user_following(self, user_id: str, **options: Any) -> AsyncGenerator[ep.Follow, None]:
        """Accounts a user follows (`/user-following/`)."""
        return items(self.pages("following", {"userid": user_id}, **options), options.get("max_items"))

    def post_comments(self, video_id: str, **options: Any) -> AsyncGenerator[ep.Comment, None]:
        """Top-level comments of a post (`/post-comments/`)."""
        params = {"url": ep.video_url(video_id)}
        return items(self.pages("comments", params, **options), options.get("max_items"))

    def comment_replies(self, video_id: str, comment_id: str, **options: Any) -> AsyncGenerator[ep.Comment, None]:
        """Replies to one comment (`/post-comment-replies/`)."""
        params = {"video_id": video_id, "comment_id": comment_id}
        return items(self.pages("replies", params, **options), options.get("max_items"))

    def search_videos(
        self, keyword: str, *, publish_time: int = 0, sort_by: int = 0, region: str | None = None, **options: Any
    ) -> AsyncGenerator[ep.Post, None]:
        """Videos matching a keyword (`/search-video/`)."""
        params: dict[str, str | int] = {"keyword": keyword, "publish_time": publish_time, "sort_by": sort_by}
        if region:
            params["region"] = region
        return items(self.pages("search_videos", params, **options), options.get("max_items"))

    def search_users(self, keyword: str, **options: Any) -> AsyncGenerator[ep.UserHit, None]:
        """Users matching a keyword (`/search-user/`)."""
        return items(self.pages("search_users", {"keyword": keyword}, **options), options.get("max_items"))

    def search_challenges(self, keyword: str, **options: Any) -> AsyncGenerator[ep.Challenge, None]:
        """Hashtags matching a keyword (`/search-challenge/`)."""
        params = {"keyword": keyword}
        return items(self.pages("search_challenges", params, **options), options.get("max_items"))

    def music_posts(self, music_id: str, **options: Any) -> AsyncGenerator[ep.Post, None]:
        """Posts using a sound (`/music-posts/`)."""
        return items(self.pages("music_posts", {"music_id": music_id}, **options), options.get("max_items"))

    def challenge_posts(self, challenge_id: str, **options: Any) -> AsyncGenerator[ep.Post, None]:
        """Posts under a hashtag (`/challenge-posts/`)."""
        params = {"challenge_id": challenge_id}
        return items(self.pages("challenge_posts", params, **options), options.get("max_items"))
