"""PostgreSQL plumbing shared by the job store, its queue and the history store: one set of connection options,
one classification of errors (`classify`), and one way to wait out a lost server (`Outage`).

Every wait on a lost server is bounded by ``retry.stall_limit``; a peer gone silent is found by TCP keepalives and a
TCP user timeout (`connect_kwargs`), a call that never returns by `deadline`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from crawler.errors import RunStopped
from crawler.retry import Halt, Stall, jitter, retry_until_stall

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("crawler.stores.postgres")
T = TypeVar("T")


class StoreLost(RunStopped):
    """PostgreSQL (jobs.url, history.url) did not answer for retry.stall_limit seconds."""


class Failure(enum.Enum):
    """What an error of a PostgreSQL call means for the caller."""

    UNREACHABLE = "unreachable"  # the server or the connection is gone (or a lock was not granted): connect again
    ROLLED_BACK = "rolled back"  # SQLSTATE class 40 (deadlock, serialization): the same transaction again
    ERROR = "error"  # a bug or a user error (bad SQL, a constraint, a missing table): raised, never retried


def classify(exc: BaseException) -> Failure:
    """The one reading of a PostgreSQL call's error. By SQLSTATE class 40 first: psycopg's DeadlockDetected and
    SerializationFailure are OperationalErrors but not TransactionRollbacks, and the connection is fine after them.
    Then a lost server, a broken connection, a lock not granted within lock_timeout (a frozen worker holds it), a
    session ended for idling in a transaction, or an OSError (a socket, a timeout) under the driver: unreachable."""
    import psycopg

    if isinstance(exc, psycopg.Error) and (exc.sqlstate or "").startswith("40"):
        return Failure.ROLLED_BACK
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, OSError,
                        psycopg.errors.IdleInTransactionSessionTimeout)):
        return Failure.UNREACHABLE
    return Failure.ERROR


def unreachable(exc: BaseException) -> bool:
    """The server or the connection is gone: connect again and retry (until the stall limit)."""
    return classify(exc) is Failure.UNREACHABLE


def rolled_back(exc: BaseException) -> bool:
    """The server rolled the transaction back for another's sake (a deadlock, a serialization failure): the same
    transaction is asked again, and the connection was never lost."""
    return classify(exc) is Failure.ROLLED_BACK


def retriable(exc: BaseException) -> bool:
    """Worth another try: unreachable or rolled back (not a bug or a user error)."""
    return classify(exc) is not Failure.ERROR


class Outage:
    """How a PostgreSQL caller waits out a lost server (the job store, its queue, ingest's history store):
    retries with backoff until the outage reaches ``retry.stall_limit`` (then StoreLost), the stop at once after
    `abandon()`. The waits, the limit and the stop are the retry seam's (`crawler.retry`)."""

    def __init__(self, where: str, stall_limit: float) -> None:
        self.where = where
        self.stall_limit = stall_limit
        self.streak = Stall(stall_limit)  # the store's own outage: it spans the store's calls
        self._halt = Halt()

    def abandon(self, error: RunStopped) -> None:
        """From now on, a lost server raises ``error`` at once instead of being waited for."""
        self._halt.set(error)

    def _began(self, exc: BaseException, what: str = "lost") -> None:
        log.warning("%s: %s (%s); retrying", self.where, "transaction rolled back" if rolled_back(exc) else what,
                    type(exc).__name__)

    async def pause(self, exc: BaseException, down: float | None, delay: float, what: str = "lost") -> float:
        """The step every retry takes after a lost server: the stop at once after `abandon()`, StoreLost once the
        outage (begun at `down`; None: now) reaches the stall limit, else the backoff `delay`, cut short by a
        stop. Returns when the outage began."""
        if self._halt.error is not None:
            raise self._halt.error from None
        stall = Stall(self.stall_limit, since=down)
        if down is None:
            self._began(exc, what)
        stall.failed()
        if stall.expired:
            raise self.lost() from None
        await self._halt.wait(min(jitter(delay), max(stall.left(), 0.01)))
        assert stall.since is not None
        return stall.since

    def lost(self) -> StoreLost:
        """The stop of a server that has not answered for the stall limit."""
        return StoreLost(f"{self.where} has not answered for {self.stall_limit:g} s (retry.stall_limit); what was"
                         " committed is kept: start PostgreSQL and run the same command again")

    async def retry(self, call: Callable[[], Awaitable[T]],
                    retriable: Callable[[BaseException], bool] = retriable, *, stall: Stall | None = None) -> T:
        """Await ``call()`` (a new try each time) until it gets an answer: an error ``retriable`` says is worth
        another try is waited out until the stall limit (``stall``: the streak, if it outlives this call)."""
        stall = stall or Stall(self.stall_limit)
        stall.limit = self.stall_limit  # (a store's limit may have changed since its streak began)

        def on_retry(exc: BaseException, tries: int, wait: float) -> None:
            if tries == 1:
                self._began(exc)

        return await retry_until_stall(call, retriable=retriable, stall=stall, lost=self.lost, halt=self._halt,
                                       on_retry=on_retry)


def shut_down(conn: Any) -> None:
    """End a PostgreSQL connection's stream from outside: a call waiting on it (a server that accepts TCP but never
    answers) fails at once, as on a lost connection. Closing the connection object stays its owner's part."""
    with contextlib.suppress(Exception), socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:  # closed: none
        sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def deadline(seconds: float, expire: Callable[[], None]) -> Iterator[None]:
    """The per-call deadline of PostgreSQL calls: ``expire()`` (a `shut_down`) if the block takes longer than
    ``seconds`` (``retry.stall_limit``), so the call fails as on a lost connection and is retried on a new one."""
    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        yield
    finally:
        timer.cancel()


def retrieved(task: asyncio.Future[Any]) -> None:
    """A done callback: a task's error is read, so a caller that stopped waiting leaves no "never retrieved"."""
    if not task.cancelled():
        task.exception()


def connect_kwargs(heartbeat_timeout: float, connect_timeout: float) -> dict[str, Any]:
    """libpq parameters of every connection of a worker: TCP keepalives (an idle connection) and a TCP user
    timeout (data in flight) so a peer gone silent (a cut network, a frozen host) is found dead within about the
    heartbeat timeout, and a connect timeout."""
    every = max(1, round(heartbeat_timeout / 3))
    # Keepalives only probe an idle connection: a query sent into a silent network waits on TCP's retransmissions
    # (about 15 minutes), so tcp_user_timeout bounds how long sent data may go unacknowledged.
    return {"connect_timeout": max(1, round(connect_timeout)), "keepalives": 1, "keepalives_idle": every,
            "keepalives_interval": every, "keepalives_count": 3,
            "tcp_user_timeout": max(1000, round(heartbeat_timeout * 1000))}


async def bound_session(conn: psycopg.AsyncConnection[Any], heartbeat_timeout: float) -> None:
    """A frozen worker (SIGSTOP, a swapped-out VM) must not hold a lock others wait on for longer than the
    heartbeat timeout: the server ends its session once it sits idle in a transaction that long, and a statement
    waiting for a lock gives up after it (LockNotAvailable, retried like a lost connection)."""
    ms = max(1000, round(heartbeat_timeout * 1000))
    await conn.execute(f"SET idle_in_transaction_session_timeout = {ms}")
    await conn.execute(f"SET lock_timeout = {ms}")


async def connect(url: str, *, name: str, heartbeat_timeout: float, connect_timeout: float = 5.0,
                  autocommit: bool = True, bound: bool = True) -> psycopg.AsyncConnection[Any]:
    """A worker's connection (`connect_kwargs`), named ``name`` in pg_stat_activity; ``bound``: its locks and idle
    transactions bounded by the heartbeat timeout (`bound_session`)."""
    import psycopg

    conn = await psycopg.AsyncConnection.connect(url, autocommit=autocommit, application_name=name,
                                                 **connect_kwargs(heartbeat_timeout, connect_timeout))
    if bound:
        try:
            await bound_session(conn, heartbeat_timeout)
        except BaseException:
            await conn.close()
            raise
    return conn


async def close(conn: psycopg.AsyncConnection[Any] | None) -> None:
    """Close a connection, waiting at most 2 s: a half-dead connection must not hold the run."""
    if conn is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 2.0)
