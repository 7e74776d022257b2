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
from typing import Any

from crawler.errors import (
    BalanceExhausted,
    CrawlerError,
    KeyRejected,
    NotAnApiAnswer,
    NotFound,
    PageSizeRejected,
    PrivateAccount,
    RateLimited,
    TransientError,
    Unreachable,
)

JsonDict = dict[str, Any]

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

