"""Billing and error classification: one HTTP answer (status, body) -> the payload or the error it means.

Pure functions, tested without a network; `Client._send` calls `interpret` once per answer. New rules go here.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from crawler.errors import (
    BalanceExhausted,
    Blocked,
    CrawlerError,
    KeyRejected,
    NotAnApiAnswer,
    NotFound,
    PageSizeRejected,
    PrivateAccount,
    QuotaSpent,
    RateLimited,
    TransientError,
    Unreachable,
    Unreadable,
)

JsonDict = dict[str, Any]

# The words each classification keys on, checked in this order on an error body's message (lower-cased), with
# the source of each in ../shared/api-reference.md (docs/jobs.md "Exit codes" repeats this table). The reference
# documents rate limits as HTTP 429, so a 200 message is one only with explicit words; a bare "limit" reads as
# the credit limit, as the reference's clients read it; a day's limit is a quota, not an empty balance.
KEY_WORDS = ("api-key", "api key", "apikey", "sign up", "signup")
BARE_KEY_WORDS = (*KEY_WORDS, "unauthori", "forbidden")  # only when the whole body is the message
QUOTA_WORDS = ("/ 1 day", "/1 day", "/ day", "/day", "per day", "a day", "daily", "each day")
RATE_WORDS = ("rate limit", "too many", "slow down", "per second", "/second", "throttl", "try again later")
PRIVATE_WORDS = ("private",)
PAGE_SIZE_WORDS = ("invalid", "at most", "too large", "maximum")  # with "count" in the message
NOT_FOUND_WORDS = ("not found", "not exist", "doesn't exist", "does not exist", "deleted", "no such",
                   "url parsing is failed", "check url", "unavailable")
BALANCE_WORDS = ("balance", "credit", "purchase", "quota", "exhausted", "insufficient", "top up", "payment",
                 "limit")


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the classification table: what an error body's words make of it, and where that is written."""

    verdict: str  # the error it makes of the answer
    words: tuple[str, ...]
    source: str  # ../shared/api-reference.md section, confidence tag and source id


RULES: tuple[Rule, ...] = (
    Rule("KeyRejected (exit 1)", KEY_WORDS,
         "§5 [C2] S8 S6: 'Please sign up to tikliveapi.com', 'Api-Key is not available'"),
    Rule("KeyRejected (exit 1)", ("unauthori", "forbidden"), "§5 [C] S6, only in a body that is the message alone"),
    Rule("QuotaSpent (exit 4)", QUOTA_WORDS, "§5.1 [T]: 'Free Api Limit: 10000 request/ 1 day.'; §5 tikwm [T] T1"),
    Rule("RateLimited (waited out)", RATE_WORDS, "§5 tikwm [T] T4: 'Free Api Limit: 1 request/second.'; §5 [D] S2"),
    Rule("PrivateAccount (private)", PRIVATE_WORDS, "§5 [G]; S6 maps the word"),
    Rule("PageSizeRejected (falls back once)", PAGE_SIZE_WORDS, "[G], with 'count' in the message"),
    Rule("NotFound (not_found)", NOT_FOUND_WORDS,
         "§5 [C] S6: 'Not found post'; §5 tikwm [T] T4: 'Url parsing is failed!'"),
    Rule("BalanceExhausted (exit 4)", BALANCE_WORDS, "§5 [C] S7 S6: the words their clients match"),
)
# Status rules beside the words: 429 rate (§5 [D] S2); 5xx transient (§5 [D] S2); 402 balance [G]; 404 not the
# API (the API says "not found" in 200 bodies, §5 [C] S6); 401/403 with the API's JSON: the key (§5 [C] S6),
# with any other body: a proxy, firewall or CDN (§5.1 [T], Cloudflare in front of the look-alike, S8); an object
# with a non-zero `code` and a `msg`/`message` is an error whatever else it carries (§5 tikwm [T], §5.1 [T]).
# Keys that may appear beside `message` in a bare error body without making it a payload.
_ERROR_ONLY_KEYS = frozenset({"message", "msg", "error", "detail", "code", "status", "processed_time"})


def parse_retry_after(value: str | None) -> float | None:
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
        return RateLimited(f"{endpoint}: HTTP 429", parse_retry_after(retry_after)), False
    if status >= 500:
        return Unreachable(f"{endpoint}: HTTP {status}"), False
    if status in (401, 403):
        return _refused(status, raw, endpoint), False
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
    if not isinstance(body, dict):  # JSON, but not the object every answer is: an answer of another shape
        return Unreadable(f"{endpoint}: unexpected answer (JSON {type(body).__name__})", raw), billed
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
        if _words(low, QUOTA_WORDS):
            return QuotaSpent(f"the key's daily quota is spent ({text!r}): the same command goes on after it"
                              " resets"), False
        if _words(low, RATE_WORDS):
            return RateLimited(f"{endpoint}: {text}"), False
        billed = billed and not bare
        if _words(low, PRIVATE_WORDS):
            return PrivateAccount(f"{endpoint}: {text}"), billed
        if "count" in low and _words(low, PAGE_SIZE_WORDS):
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
                  "api_error", "key_rejected", "balance_empty", "not_the_api", "unexpected_shape", "quota_spent",
                  "blocked")


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
        (BalanceExhausted, "balance_empty"), (NotFound, "not_found"), (PrivateAccount, "private"),
        (Unreadable, "unexpected_shape"), (QuotaSpent, "quota_spent"), (Blocked, "blocked"))
    for kind, name in kinds:
        if isinstance(result, kind):
            return name
    if status >= 500:
        return "server_error"
    return "malformed" if isinstance(result, Unreachable) else "api_error"


_ENVELOPE_KEYS = frozenset({"data", "code", "msg", "message", "processed_time", "status", "success", "ok"})


def _unwrap(body: JsonDict) -> JsonDict:
    """Accept a tikwm-style envelope ``{"code":0,"msg":..,"data":{..}}`` defensively; a non-zero ``code`` with a
    ``msg``/``message`` is an error body whatever else it carries (``"data": []`` or null)."""
    code = body.get("code", 0)
    failed = code not in (0, "0", None) and not isinstance(code, bool)
    text = body.get("msg") or body.get("message")
    if failed and isinstance(text, str) and text:
        return {"message": text}
    data = body.get("data")
    if isinstance(data, dict) and set(body) <= _ENVELOPE_KEYS:
        return {"message": str(text or "error")} if failed else data
    return body


def _refused(status: int, raw: bytes, endpoint: str) -> CrawlerError:
    """HTTP 401/403: the key, when the body is the API's JSON; else whatever stands in front of the API."""
    try:
        body = _loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict):
        text = _message(_unwrap(body))
        return KeyRejected(f"the API rejected the key (HTTP {status}, {text!r}): check TIKLIVE_API_KEY")
    stripped = raw.lstrip()
    page = ("an HTML page" if stripped[:1] == b"<" else "an empty body" if not stripped
            else "a body that is not the API's JSON")
    return Blocked(f"HTTP {status} with {page}: a proxy, firewall or CDN refused the request, not the API"
                   f" ({endpoint})")
