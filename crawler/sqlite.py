"""One SQLite connection setup and one transaction style for every SQLite file of the crawler.

The local job store, the users directory, the rate ledger's file and the history store open their files here
(a core module: the rate ledger sits below `stores`). Connections are in autocommit mode (no implicit
transactions); a write transaction is `immediate(db)`: BEGIN IMMEDIATE takes the write lock at BEGIN.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path


def connect(path: Path | str, *, busy_timeout: float = 5.0, synchronous: str = "NORMAL", read_only: bool = False,
            any_thread: bool = False, cache_mb: int | None = None,
            checkpoint_mb: int | None = None) -> sqlite3.Connection:
    """Open an SQLite file: autocommit (transactions are `immediate`), WAL, ``synchronous`` (NORMAL: the last
    transaction may be lost to a power cut, never torn; OFF for a file that outlives processes, not power cuts),
    another process's transaction waited for up to ``busy_timeout`` seconds. ``read_only``: the file must exist and
    refuses writes (no journal mode set: that is a write). ``any_thread``: used from a thread other than the
    opener's (one at a time). ``cache_mb``: a larger page cache (big index inserts stay in memory).
    ``checkpoint_mb``: the WAL is copied into the file when it passes this size (SQLite's default: 4 MB), and cut
    back to it afterwards (a big transaction's WAL does not keep its size): fewer checkpoints, each page rewritten
    by several commits in between copied once."""
    if read_only:
        target = f"{Path(path).resolve().as_uri()}?mode=ro"
        db = sqlite3.connect(target, uri=True, timeout=busy_timeout, isolation_level=None,
                             check_same_thread=not any_thread)
    else:
        db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=not any_thread)
    try:
        if not read_only:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            if checkpoint_mb is not None:
                page = int(db.execute("PRAGMA page_size").fetchone()[0])
                db.execute(f"PRAGMA wal_autocheckpoint={checkpoint_mb * 2**20 // page}")
                db.execute(f"PRAGMA journal_size_limit={checkpoint_mb * 2**20}")
        if cache_mb is not None:
            db.execute(f"PRAGMA cache_size={-1024 * cache_mb}")
    except BaseException:
        db.close()
        raise
    return db


def begin(db: sqlite3.Connection) -> None:
    """Begin a write transaction holding the write lock from the start. A deferred transaction that reads, then
    writes, fails at once with "database is locked" when another process wrote meanwhile (the busy timeout cannot
    help it); an IMMEDIATE one waits for the lock at BEGIN instead."""
    db.execute("BEGIN IMMEDIATE")


@contextlib.contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``with immediate(db):`` one write transaction: `begin`, then COMMIT, or ROLLBACK on any error."""
    begin(db)
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
