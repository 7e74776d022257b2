"""The error tree: every failure the crawler can name, and the exit code it maps to.

    CrawlerError
    ├── UsageError             bad flag, config value or input form; found before any request (exit 2)
    ├── RunStopped             the whole run must end
    │   ├── KeyRejected        missing/unknown key answered by the API (exit 1)
    │   ├── RateLimitStalled   429s without a break for longer than retry.stall_limit (exit 1)
    │   ├── OutageStalled      no API answer (down, 5xx, not the API) for retry.stall_limit; resumable (exit 1)
    │   ├── NotTheApi          the base URL answers, but never like the API (wrong path or host) (exit 1)
    │   ├── LedgerLost         the key's rate ledger stopped answering for retry.stall_limit (exit 1)
    │   ├── JobLocked          another process is running the same job (exit 1)
    │   ├── ShapeChanged       one endpoint's answers unreadable 10 times in a row; resumable (exit 1)
    │   ├── BalanceExhausted   the API says the credit balance is empty; resumable (exit 4)
    │   ├── QuotaSpent         the API says the key's daily quota is spent; resumable (exit 4)
    │   ├── BudgetExhausted    --max-credits reached; resumable (exit 4)
    │   ├── DiskFull           a file could not be written: full disk or read-only directory; resumable (exit 1)
    │   └── Interrupted        SIGINT / SIGTERM: committed what was complete (exit 130 / 143)
    ├── ItemFailed             one input item failed; the run goes on (exit 3 at the end)
    │   ├── NotFound           user / post / music / challenge does not exist   reason not_found
    │   ├── PrivateAccount     the account is private                           reason private
    │   ├── RetriesExhausted   transient errors outlasted retry.attempts        reason retries_exhausted
    │   ├── UnexpectedShape    a 200 whose JSON is not the record expected, twice  reason unexpected_shape
    │   ├── PageSizeRejected   the API refused the `count` asked for (the paginator falls back once)
    │   └── MediaUnavailable   the media host refused a file even after a refresh  reason media_unavailable
    └── TransientError         retried inside the client, never seen by callers
        ├── RateLimited        HTTP 429 (or a rate-limit message): handled by the shared cooldown
        ├── Unreadable         a 200 whose JSON is not the record expected: an answer, retried once
        └── Unreachable        no API answer: transport error, 5xx, truncated or non-JSON body
            ├── CannotConnect  no connection at all (refused, unroutable, DNS)
            │   └── TlsFailed  a TLS or certificate error: before any answer, NotTheApi at once (exit 1)
            ├── Blocked        HTTP 401/403 with a page that is not the API's JSON (proxy, firewall, CDN)
            └── NotAnApiAnswer HTTP 404: the server does not know the path (a wrong base URL?)

Unreachable answers on requests for more than one item in a row (or CannotConnect/Blocked on any) are an outage
(api.outage.Outage), not item failures: every worker pauses, and after retry.stall_limit the run ends with
OutageStalled, its items still pending. Unreadable answers are answers (never an outage): the item fails with
UnexpectedShape after one retry, and 10 in a row from one endpoint stop the run with ShapeChanged
(`crawler.api.unexpected`).

Messages never contain the API key: the client builds them from status, endpoint and the server's text.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar


class CrawlerError(Exception):
    """Base of every error the crawler raises on purpose."""

    exit_code: ClassVar[int] = 1


class UsageError(CrawlerError):
    """A user mistake found before any request was sent: flag, config key, value or input."""

    exit_code = 2


class RunStopped(CrawlerError):
    """The run cannot go on."""

    exit_code = 1
    refused = False  # a copy a stopping client raises instead of sending (`SendHook.check`): nothing was sent


class KeyRejected(RunStopped):
    """The API rejected the key (missing, unknown or disabled)."""


class RateLimitStalled(RunStopped):
    """The API answered 429 without a break for longer than the stall limit."""


class OutageStalled(RunStopped):
    """No request got an API answer for longer than the stall limit; in-flight items stay pending."""

    resumable = True


class NotTheApi(RunStopped):
    """The base URL answers, but every answer is a 404 or a page that is not the API's."""


class LedgerLost(RunStopped):
    """The key's rate ledger (state file or Redis) did not answer for longer than the stall limit."""


class JobLocked(RunStopped):
    """Another process holds this job's lock."""


class Interrupted(RunStopped):
    """Stopped by a signal after committing what was complete."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ShapeChanged(RunStopped):
    """One endpoint's answers could not be read 10 times in a row: the API changed shape; items stay pending."""

    resumable = True


class QuotaSpent(RunStopped):
    """The API says the key's daily quota is spent; the job goes on after the quota resets."""

    exit_code = 4
    resumable = True


class BalanceExhausted(RunStopped):
    """The API says the account has no credits left; the job can resume after a top-up."""

    exit_code = 4


class BudgetExhausted(RunStopped):
    """The job's --max-credits budget is spent; the job can resume with a larger budget."""

    exit_code = 4


class DiskFull(RunStopped):
    """A file could not be written (a full disk, a read-only directory): what was committed stays committed.

    Made by `disk_error` only, which names the path and the fix; before any request it is a UsageError.
    """


class ItemFailed(CrawlerError):
    """One input item failed; its reason goes to the failures file and the run goes on."""

    reason: ClassVar[str] = "retries_exhausted"
    endpoint: str = ""  # the API path that failed, set by the client


class NotFound(ItemFailed):
    """The user, post, music or challenge does not exist."""

    reason = "not_found"


class PrivateAccount(ItemFailed):
    """The account is private, so its lists cannot be read."""

    reason = "private"


class RetriesExhausted(ItemFailed):
    """Transient errors (5xx, timeouts, drops, bad JSON, unknown error bodies) outlasted the retries."""

    reason = "retries_exhausted"


class UnexpectedShape(ItemFailed):
    """A 200 whose JSON is not the record expected, on two tries; its body is kept (`crawler.api.unexpected`)."""

    reason = "unexpected_shape"


class PageSizeRejected(ItemFailed):
    """The API answered an error about the page size (`count`); the paginator retries at the default once."""

    reason = "retries_exhausted"


class MediaUnavailable(ItemFailed):
    """The media host refused a file (403/404/410) even with a URL renewed through /post-detail/."""

    reason = "media_unavailable"


class TransientError(CrawlerError):
    """A failure worth retrying: 5xx, timeout, dropped connection, malformed JSON, unknown error body."""


class Unreadable(TransientError):
    """A 200 that parses as JSON but not as the record expected: retried once, then UnexpectedShape.

    ``body`` is the raw answer, for `crawler.api.unexpected` to keep; never shown."""

    def __init__(self, message: str, body: bytes = b"") -> None:
        super().__init__(message)
        self.body = body


class Unreachable(TransientError):
    """No API answer: a transport error, a 5xx, a truncated or non-JSON body."""


class CannotConnect(Unreachable):
    """No connection could be made (refused, unroutable, DNS): never the fault of one item."""


class TlsFailed(CannotConnect):
    """A TLS handshake or certificate error (https to a plain-http host, a bad certificate): permanent, never an
    outage, when the API never answered (`crawler.api.outage`)."""


class Blocked(Unreachable):
    """HTTP 401/403 with a body that is not the API's JSON: a proxy, firewall or CDN refused the request."""


class NotAnApiAnswer(Unreachable):
    """HTTP 404: the API answers "not found" in a 200 body, so a 404 means a server that does not know the path."""


class RateLimited(TransientError):
    """HTTP 429 or a rate-limit message; ``retry_after`` is the server's Retry-After in seconds, if sent."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# ----- CONTRACT.md's exit codes, in one place ------------------------------------------------------------


EXIT_PRECEDENCE = (2, 1, 130, 143, 4, 3, 0)  # when several exit codes apply, the first in this order wins


def rank(error: CrawlerError) -> int:
    """CONTRACT.md's precedence when several stops apply: 2, 1, 130/143, 4 (lower wins)."""
    code = error.code if isinstance(error, Interrupted) else error.exit_code
    return {2: 0, 1: 1, 130: 2, 143: 2, 4: 3}.get(code, 4)


def run_exit_code(error: CrawlerError | None, *, failed: bool) -> int:
    """The exit code of a run that ended with ``error`` (None: it completed), with or without failed items."""
    if isinstance(error, Interrupted):
        return error.code
    if error is not None:
        return error.exit_code
    return 3 if failed else 0


# ----- the disk: a full or read-only file system is the user's to fix, never a bug ---------------------------

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_READ_ONLY = frozenset({errno.EROFS, errno.EACCES})
# CANTOPEN: every store's directory is made before its file is opened, so it means one we may not write to
_SQLITE_READ_ONLY = frozenset({sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN})


def disk_error(exc: BaseException, where: str | Path, *, before_requests: bool = False) -> CrawlerError | None:
    """The error a full disk or an unwritable directory is, or None for any other exception.

    ``exc`` may be an exception group (a task group's), an OSError or SQLite's own error (which names no
    file: ``where`` does). One line naming the path and the fix: a UsageError (exit 2) before any request
    was sent, else DiskFull (exit 1; the same command resumes).
    """
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    number = exc.errno if isinstance(exc, OSError) else None
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    code = code & 0xFF if isinstance(code, int) else None  # SQLite's primary result code
    full = number in _FULL or code == sqlite3.SQLITE_FULL
    read_only = number in _READ_ONLY or code in _SQLITE_READ_ONLY
    if not (full or read_only):
        return None
    path = os.path.abspath(getattr(exc, "filename", None) or where)
    if full:
        message = f"the disk holding {path} is full: free some space there, then run the same command"
    else:
        message = (f"cannot write to {path} (a read-only file system or no permission): make it writable, then"
                   " run the same command")
    return UsageError(message) if before_requests else DiskFull(message)


@contextlib.contextmanager
def disk_problems(where: str | Path, *, started: Callable[[], bool]) -> Iterator[None]:
    """Raise a full disk or an unwritable directory met inside as `disk_error` names it; ``started()`` says
    whether a request was sent."""
    try:
        yield
    except Exception as exc:
        problem = disk_error(exc, where, before_requests=not started())
        if problem is None:
            raise
        raise problem from None
