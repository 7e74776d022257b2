"""The one seam to the `backoff` library (kept small so it can be swapped without touching the client)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import backoff

T = TypeVar("T")
log = logging.getLogger("crawler.retry")


def retry_async(
    call: Callable[[], Awaitable[T]],
    *,
    retry_on: type[Exception],
    attempts: int | None,
    base_delay: float,
    max_delay: float,
    max_time: float | None = None,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
) -> Awaitable[T]:
    """Await ``call()`` up to ``attempts`` times (None: no count) and ``max_time`` seconds while it raises ``retry_on``.

    Waits grow exponentially from ``base_delay`` (capped at ``max_delay``) with full jitter;
    ``base_delay == 0`` turns the waits off (test mode). The last error propagates.
    """

    def _backed_off(details: Any) -> None:
        exc = details.get("exception")
        if on_retry is not None and isinstance(exc, BaseException):
            on_retry(exc, int(details["tries"]), float(details.get("wait") or 0.0))

    async def once() -> T:
        # backoff picks its synchronous retry loop unless the target is a coroutine *function*: a lambda or a
        # partial returning a coroutine would be "called" once, succeed, and never be retried when awaited.
        return await call()

    decorated = backoff.on_exception(
        backoff.expo,
        retry_on,
        max_tries=None if attempts is None else max(1, attempts),
        max_time=max_time,
        jitter=backoff.full_jitter if base_delay > 0 else None,
        factor=base_delay,
        max_value=max_delay,
        on_backoff=_backed_off,
        logger=None,
    )(once)
    result: Awaitable[T] = decorated()
    return result
