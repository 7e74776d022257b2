"""The history store's connection (SQLite by default, PostgreSQL by URL) and the plumbing its SQL shares.

The SQL is the same on both databases (`?` placeholders are rewritten to `%s` for psycopg); only the connection,
the DDL types and the bulk path differ. The writing store (store.py) and the read queries (queries.py) build on
`HistoryDb`; every store call runs in one `StoreThread`, off the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import functools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

from crawler import sqlite
from crawler.errors import UsageError
from crawler.stores import postgres

SCHEMA_VERSION = 5  # the newest of the migrations (store.MIGRATIONS)
SNAPSHOT_COLUMNS = ("user_id", "day", "fetched_at", "handle", "followers", "following", "hearts", "videos", "likes",
                    "verified", "private")
T = TypeVar("T")


def is_postgres(url: str) -> bool:
    """The store at ``url`` is a PostgreSQL database (else a SQLite file)."""
    return url.startswith(("postgresql://", "postgres://"))


# --- connection setup: every connection to a history store is opened here ---

def pg_connect_kwargs(stall_limit: float, connect_timeout: float) -> dict[str, Any]:
    """libpq parameters of the history store's PostgreSQL connection: the job store's (stores/postgres.py), bounded
    by ``retry.stall_limit`` (how long an unreachable store may hold a run): keepalives probe an idle connection,
    ``tcp_user_timeout`` ends one whose sent data goes unacknowledged that long (a cut network, a frozen host, a
    proxy that stops forwarding), and a connect gives up after ``http.connect_timeout``."""
    return postgres.connect_kwargs(stall_limit, connect_timeout)


def connect(url: str, *, stall_limit: float, connect_timeout: float, readonly: bool) -> Any:
    """A new connection to the store at ``url`` (``readonly``: the database itself refuses writes; a SQLite file
    must exist then). UsageError when PostgreSQL cannot be reached."""
    if is_postgres(url):
        try:
            import psycopg
        except ImportError:
            raise UsageError("history.url is PostgreSQL but psycopg is not installed: pip install "
                             "'crawler[postgres]'") from None
        try:
            db = psycopg.connect(url, autocommit=True, **pg_connect_kwargs(stall_limit, connect_timeout))
            if readonly:  # after connecting, not as a connect option: that would replace the URL's own options
                db.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection failed"
            raise UsageError(f"cannot connect to the history database: {first}") from None
        return db
    if readonly:
        path = Path(url.removeprefix("sqlite:///")).resolve()
        if not path.is_file():
            raise UsageError(f"no history at {path}: run `crawler ingest` first, or point --data-dir /"
                             " --history-url at the store it wrote")
        return sqlite.connect(path, read_only=True, any_thread=True, busy_timeout=10.0, cache_mb=32)
    path = Path(url.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Another process's transaction (an ingest's commit, a big `history import`) is waited for, as long
    # as an unreachable store may hold a run; index inserts of a big backfill stay in memory. An ingest commit of
    # 100 profiles of a 300k-user store writes ~1,500 pages (each user's own index pages): checkpointed at 40 MB,
    # not after every commit (bench_history_scale: the mean commit 54 -> 35 ms).
    return sqlite.connect(path, busy_timeout=max(10.0, stall_limit), cache_mb=32, checkpoint_mb=40)


def reconnect(url: str, limits: tuple[float, float]) -> Any:
    """A PostgreSQL store's connection again, after it was lost (psycopg's error, not a UsageError, if not)."""
    import psycopg

    return psycopg.connect(url, autocommit=True, **pg_connect_kwargs(*limits))


# --- what a lost connection looks like ---

def connection_lost(exc: BaseException) -> bool:
    """A PostgreSQL history store's connection ended (server restart, network, terminated session); a transaction
    the server rolled back (a deadlock, a serialization failure) is not that. Only the driver's errors count (not
    those of an SQLite store or of a day file): `postgres.classify` reads them."""
    return type(exc).__module__.startswith("psycopg") and postgres.unreachable(exc)


def transient(exc: BaseException) -> bool:
    """A PostgreSQL history store's call worth making again: its connection was lost, or its transaction was
    rolled back for another's sake (a deadlock, a serialization failure)."""
    return type(exc).__module__.startswith("psycopg") and postgres.retriable(exc)


class StoreThread:
    """One thread that runs every call on a store, one at a time, in order (a connection used from one thread).

    A daemon thread, not a ThreadPoolExecutor: the executor's threads are joined at interpreter exit, so a call
    stuck on a silent database would keep a stopped process alive. Here the process exits; the stuck call dies
    with it (for a database, as if the process had been killed: the transaction is the commit point).
    """

    def __init__(self, name: str = "history") -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args, **kwargs)`` for the thread; its future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((functools.partial(fn, *args, **kwargs), future))
        return future

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in the thread and await it (a cancelled caller stops waiting, no more)."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, future = call
            if not future.set_running_or_notify_cancel():
                continue  # its caller stopped waiting before it began
            try:
                result = fn()
            except BaseException as exc:  # handed to the caller, whatever it is
                future.set_exception(exc)
            else:
                future.set_result(result)

    def close(self, *, wait: bool = True) -> None:
        """End the thread once the calls queued before are done (``wait``: and wait for that). Idempotent."""
        self._calls.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()


class HistoryDb:
    """A connection to a history store and the SQL plumbing both databases share. Closed idempotently."""

    version: int = SCHEMA_VERSION  # of the store's schema; a read-only store keeps the one it found

    def __init__(self, url: str, *, stall_limit: float = 300.0, connect_timeout: float = 5.0,
                 readonly: bool = False) -> None:
        self.url = url
        self.postgres = is_postgres(url)
        self._limits = (stall_limit, connect_timeout)
        self._db: Any = connect(url, stall_limit=stall_limit, connect_timeout=connect_timeout, readonly=readonly)

    @classmethod
    def open_readonly(cls, url: str, *, stall_limit: float = 300.0, connect_timeout: float = 5.0) -> Self:
        """Open an existing store for reading only: no migration, and the database itself refuses writes.

        SQLite opens the file with ``mode=ro``; PostgreSQL sessions are ``default_transaction_read_only``.
        The connection may be used from another thread (one at a time: the caller serialises).
        """
        store = cls.__new__(cls)
        HistoryDb.__init__(store, url, stall_limit=stall_limit, connect_timeout=connect_timeout, readonly=True)
        try:
            store.version = store._schema_version()
        except Exception:
            store.close()
            raise
        return store

    def __repr__(self) -> str:
        # A PostgreSQL URL may carry a password: show only the kind of store.
        return f"HistoryStore({'postgresql' if self.postgres else 'sqlite'})"

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def shut_down(self) -> None:
        """End a PostgreSQL store's connection from another thread: the call waiting on it fails (pgjobs.shut_down)."""
        if self.postgres and self._db is not None:
            postgres.shut_down(self._db)

    def reopen(self) -> None:
        """A PostgreSQL store whose connection was lost connects again (the schema is there: no migration)."""
        if self.postgres and self._db.closed:
            self._db = reconnect(self.url, self._limits)

    def _schema_version(self) -> int:
        """The store's schema version; UsageError if this is not a history store or a newer one."""
        try:
            version = int(self._rows("SELECT MAX(version) FROM schema_version")[0][0] or 0)
        except Exception:  # no such table: sqlite3.OperationalError / psycopg.errors.UndefinedTable
            version = 0
        if not version:
            raise UsageError(f"{self!r} holds no history (no schema_version): point --data-dir / --history-url"
                             " at the store `crawler ingest` wrote")
        if version > SCHEMA_VERSION:
            raise UsageError(f"the history store has schema version {version}, newer than this crawler's"
                             f" {SCHEMA_VERSION}: upgrade crawler")
        return version

    # --- the SQL both databases share ---

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._db.execute(self._sql(sql), params)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._exec(sql, params).fetchall())

    def _in(self, sql: str, values: Sequence[str], *params: Any) -> list[tuple[Any, ...]]:
        """Run ``sql`` whose `IN ({})` takes ``values`` (in chunks), after the fixed ``params``."""
        out: list[tuple[Any, ...]] = []
        for start in range(0, len(values), 500):
            chunk = list(values[start:start + 500])
            out.extend(self._rows(sql.format(", ".join("?" * len(chunk))), (*params, *chunk)))
        return out

    def _day(self, value: Any) -> str:
        return value.isoformat() if isinstance(value, dt.date) else str(value)

    def _begin(self) -> None:
        # SQLite: take the write lock at BEGIN (sqlite.begin says why).
        if self.postgres:
            self._db.execute("BEGIN")
        else:
            sqlite.begin(self._db)

    def _commit(self) -> None:
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction around the `put_*` writes (ingest's commit point)."""
        self._begin()
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._commit()
