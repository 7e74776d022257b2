"""The one SQLite setup (crawler/sqlite.py): its pragmas, and write transactions that hold the lock from BEGIN."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from crawler import sqlite


def test_connect_sets_wal_synchronous_busy_timeout_and_autocommit(tmp_path: Path) -> None:
    """A file opened here is in WAL mode, at the synchronous level asked, waits the busy timeout asked for another
    process's lock, and runs no transaction of its own (autocommit)."""
    db = sqlite.connect(tmp_path / "a.db", busy_timeout=12.5, synchronous="OFF", cache_mb=8)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 0  # OFF
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 12500
    assert db.execute("PRAGMA cache_size").fetchone()[0] == -8192
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES (1)")
    assert not db.in_transaction
    assert sqlite.connect(tmp_path / "b.db").execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL by default


def test_immediate_takes_the_write_lock_at_begin(tmp_path: Path) -> None:
    """While one connection is inside `immediate`, another's `immediate` fails at BEGIN (after its busy timeout),
    before it has read anything, rather than failing later on a write after a read."""
    path = tmp_path / "s.db"
    first = sqlite.connect(path)
    first.execute("CREATE TABLE t (x)")
    second = sqlite.connect(path, busy_timeout=0.05)
    with sqlite.immediate(first):
        first.execute("SELECT count(*) FROM t").fetchone()  # only a read: a deferred BEGIN would hold no lock yet
        with pytest.raises(sqlite3.OperationalError, match="locked"), sqlite.immediate(second):
            pytest.fail("BEGIN IMMEDIATE did not wait for the other writer")
        assert not second.in_transaction
    with sqlite.immediate(second):  # the lock is free again
        second.execute("INSERT INTO t VALUES (2)")
    assert first.execute("SELECT x FROM t").fetchall() == [(2,)]


def test_immediate_rolls_back_on_any_error(tmp_path: Path) -> None:
    """A write transaction that raises leaves nothing written and no transaction open."""
    db = sqlite.connect(tmp_path / "r.db")
    db.execute("CREATE TABLE t (x)")
    with pytest.raises(KeyError), sqlite.immediate(db):
        db.execute("INSERT INTO t VALUES (1)")
        raise KeyError("boom")
    assert not db.in_transaction
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 0


def test_read_only_refuses_writes_and_needs_the_file(tmp_path: Path) -> None:
    """A read-only connection reads an existing file, refuses to write it, and does not create a missing one."""
    path = tmp_path / "ro.db"
    db = sqlite.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES (7)")
    ro = sqlite.connect(path, read_only=True, any_thread=True)
    assert ro.execute("SELECT x FROM t").fetchall() == [(7,)]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.execute("INSERT INTO t VALUES (8)")
    with pytest.raises(sqlite3.OperationalError):
        sqlite.connect(tmp_path / "missing.db", read_only=True)
    assert not (tmp_path / "missing.db").exists()
