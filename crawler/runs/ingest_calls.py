"""Ingest's calls to the history store: each in the store's own thread (`StoreThread`), so a silent database never
holds the loop; on PostgreSQL a lost connection or a deadlock is asked again; after a signal a call gets
STOP_GRACE seconds, then the store is given up (the run ends as a kill would leave it)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from crawler.config import masked
from crawler.errors import Interrupted, RunStopped
from crawler.history.db import StoreThread, connection_lost, transient
from crawler.history.store import HistoryStore
from crawler.runs.ingest_files import DayFiles
from crawler.stores.postgres import Outage, deadline

log = logging.getLogger("crawler.runs.ingest_calls")

# After SIGINT/SIGTERM, how long a history-store call may take before the run stops waiting for it (a silent
# server): the run then ends as a kill would leave it, and the next run cuts the day files back to what committed.
STOP_GRACE = 5.0
T = TypeVar("T")


class StoreCalls:
    """The history store of one run and the thread every call to it runs in. `open` it, then `call` it."""

    def __init__(self, url: str, *, stall_limit: float) -> None:
        self.url = url
        self.stall_limit = stall_limit
        self.store: HistoryStore  # used only in self.thread (see call)
        self.files: DayFiles | None = None  # forget what a failed call appended (`_again`)
        self.thread: StoreThread | None = None
        self.signalled: Interrupted | None = None  # SIGINT/SIGTERM: store calls get STOP_GRACE to answer
        self.stopping = asyncio.Event()  # set with signalled
        self.lost: RunStopped | None = None  # a store call that did not answer in time: no more calls
        self.outage: Outage | None = None  # a PostgreSQL store's retries (the job store's)

    def signal(self, error: Interrupted) -> None:
        """A signal: calls from now on get STOP_GRACE to answer, and a store that is away now is not waited for."""
        self.signalled = self.signalled or error
        self.stopping.set()
        if self.outage is not None:
            self.outage.abandon(self.signalled)

    async def open(self, *, connect_timeout: float) -> HistoryStore:
        """Start the store's thread and open the store in it (a SQLite connection stays in the thread that made it)."""
        self.thread = StoreThread("history")
        self.store = await self.call(HistoryStore, self.url, stall_limit=self.stall_limit,
                                     connect_timeout=connect_timeout)
        if self.store.postgres:
            self.outage = Outage(f"history.url = {masked(self.url)}", self.stall_limit)
        return self.store

    async def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a history-store call in the store's thread and await it (`call_once`). On PostgreSQL, a lost
        connection or a transaction rolled back for another's sake (a deadlock) is asked again, on a new connection
        if need be, as the job store does: with backoff until ``retry.stall_limit``, the stop at once after a signal.
        """
        if self.outage is None:  # SQLite, or the store being opened
            try:
                return await self.call_once(fn, *args, **kwargs)
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                # What committed is kept; the next run cuts the day files back to it and goes on from there.
                self.lost = RunStopped(
                    f"history.url = {masked(self.url)}: the connection was lost"
                    f" ({type(exc).__name__}: {first_line(exc)}); what was committed is kept: run the same command"
                    " again once it answers")
                raise self.lost from None
        try:
            return await self.outage.retry(functools.partial(self._call_by_deadline, fn, *args, **kwargs), transient)
        except RunStopped as exc:  # the stall limit, or a signal during the outage: no more calls
            self.lost = self.lost or exc
            raise

    async def _call_by_deadline(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """One try of a PostgreSQL store's call: a server that accepts it but never answers has the connection
        ended after ``retry.stall_limit`` (the call then fails as on a lost connection)."""
        with deadline(self.stall_limit, self.store.shut_down):
            return await self.call_once(self._again, fn, *args, **kwargs)

    def _again(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn`` in the store's thread, made so that it can be made again: the store first connects again if its
        connection was lost, and the day files forget what ``fn`` appended if it fails (they are opened again at
        their committed lengths, so a retried commit writes its rows once)."""
        self.store.reopen()
        before = self.files.lengths() if self.files is not None else {}
        try:
            return fn(*args, **kwargs)
        except Exception:
            if self.files is not None:
                self.files.forget_changed(before)
            raise

    async def call_once(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a history-store call in the store's thread and await it: the loop stays free (requests go on, a
        signal is handled) whatever the database does.

        After SIGINT/SIGTERM a call gets STOP_GRACE seconds to answer; one that does not (a silent server) is
        given up, and so is the store: the run ends with the signal's exit, as a kill would leave it (the store's
        transaction is the commit point; the next run cuts the day files back to what committed).
        """
        if self.lost is not None:
            raise self.lost
        assert self.thread is not None
        call = asyncio.wrap_future(self.thread.submit(fn, *args, **kwargs))
        try:
            if not self.stopping.is_set():
                stopping = asyncio.ensure_future(self.stopping.wait())
                try:
                    await asyncio.wait((call, stopping), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
            if not call.done():
                await asyncio.wait((call,), timeout=STOP_GRACE)
        except BaseException:
            call.cancel()  # a call not begun yet is dropped; one under way finishes in its thread
            raise
        if not call.done():
            call.cancel()
            stop = self.signalled
            assert stop is not None
            self.lost = Interrupted(f"{stop}; the history store did not answer within {STOP_GRACE:g} s, so what it"
                                    " had not committed is fetched again", stop.code)
            log.warning("the history store did not answer within %g s of the stop: giving it up", STOP_GRACE)
            raise self.lost
        return call.result()

    async def close(self, *, opened: bool) -> None:
        """The end of the run: close the day files and the store, unless a call was given up (the thread is stuck
        in it: the files and the store go with the process); the thread is let go either way."""
        if self.lost is None:
            if self.files is not None:
                self.files.close()
            if opened:
                with contextlib.suppress(Exception):
                    await self.call_once(self.store.close)  # never retried: nothing is left to keep
        if self.thread is not None:
            self.thread.close(wait=False)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return masked(text.splitlines()[0]) if text else "no message"
