"""The one classification of PostgreSQL errors (crawler/stores/postgres.py), fed real errors of a real server: a
deadlock, a serialization failure, a terminated session, a lock not granted, an idle transaction ended, bad SQL."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from crawler.stores import postgres
from crawler.stores.postgres import Failure, classify

PG = "postgresql://postgres@127.0.0.1:5432/test"


def caught(fn: Callable[[], object]) -> BaseException:
    """The error ``fn()`` raises."""
    try:
        fn()
    except BaseException as exc:
        return exc
    raise AssertionError("no error")


@pytest.fixture
def table() -> Iterator[str]:
    """A fresh table of two rows (id 1 and 2), dropped afterwards."""
    name = f"errs_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id INT PRIMARY KEY, x INT)")
        conn.execute(f"INSERT INTO {name} VALUES (1, 0), (2, 0)")
    yield name
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def test_a_real_deadlock_is_rolled_back_and_the_connection_goes_on(table: str) -> None:
    """Two transactions locking two rows in opposite orders: the one PostgreSQL picks gets a deadlock, classified
    as rolled back (retry the transaction), and its connection answers again after the rollback."""
    a, b = psycopg.connect(PG), psycopg.connect(PG)
    a.execute("SET deadlock_timeout = '100ms'")
    b.execute("SET deadlock_timeout = '100ms'")
    a.execute(f"UPDATE {table} SET x = 1 WHERE id = 1")
    b.execute(f"UPDATE {table} SET x = 1 WHERE id = 2")
    errors: list[BaseException] = []

    def cross(conn: psycopg.Connection[object], row: int) -> None:
        try:
            conn.execute(f"UPDATE {table} SET x = 2 WHERE id = {row}")
            conn.commit()
        except psycopg.Error as exc:
            errors.append(exc)
            conn.rollback()

    t = threading.Thread(target=cross, args=(a, 2))
    t.start()
    time.sleep(0.2)  # a waits for b's row
    cross(b, 1)
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], psycopg.errors.DeadlockDetected)
    assert classify(errors[0]) is Failure.ROLLED_BACK
    assert postgres.rolled_back(errors[0]) and postgres.retriable(errors[0]) and not postgres.unreachable(errors[0])
    for conn in (a, b):
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.close()


def test_a_real_serialization_failure_is_rolled_back(table: str) -> None:
    """A REPEATABLE READ transaction updating a row another committed since its snapshot is rolled back (40001)."""
    with psycopg.connect(PG) as a, psycopg.connect(PG, autocommit=True) as b:
        a.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        a.execute(f"SELECT x FROM {table} WHERE id = 1").fetchone()
        b.execute(f"UPDATE {table} SET x = 5 WHERE id = 1")
        exc = caught(lambda: a.execute(f"UPDATE {table} SET x = 6 WHERE id = 1"))
        assert isinstance(exc, psycopg.errors.SerializationFailure)
        assert classify(exc) is Failure.ROLLED_BACK


def test_a_terminated_session_and_a_refused_connect_are_unreachable() -> None:
    """A session ended by the server (a restart, pg_terminate_backend) and a server that refuses connections mean
    the store is unreachable: connect again and retry."""
    with psycopg.connect(PG, autocommit=True) as a, psycopg.connect(PG, autocommit=True) as b:
        pid = a.info.backend_pid
        b.execute("SELECT pg_terminate_backend(%s)", (pid,))
        exc = caught(lambda: a.execute("SELECT 1"))
        assert classify(exc) is Failure.UNREACHABLE
    refused = caught(lambda: psycopg.connect("postgresql://postgres@127.0.0.1:1/test", connect_timeout=2))
    assert classify(refused) is Failure.UNREACHABLE and postgres.retriable(refused)


def test_a_lock_not_granted_and_an_idle_transaction_ended_are_unreachable(table: str) -> None:
    """A lock a frozen holder keeps past lock_timeout, and a session the server ends for idling in a transaction,
    are retried like a lost connection (on a new one)."""
    with psycopg.connect(PG) as holder, psycopg.connect(PG) as waiter:
        holder.execute(f"UPDATE {table} SET x = 1 WHERE id = 1")
        waiter.execute("SET lock_timeout = '100ms'")
        exc = caught(lambda: waiter.execute(f"UPDATE {table} SET x = 2 WHERE id = 1"))
        assert isinstance(exc, psycopg.errors.LockNotAvailable)
        assert classify(exc) is Failure.UNREACHABLE
        holder.rollback()
    with psycopg.connect(PG) as idle:
        idle.execute("SET idle_in_transaction_session_timeout = '100ms'")
        idle.execute("SELECT 1")
        time.sleep(0.5)
        exc = caught(lambda: idle.execute("SELECT 1"))
        assert classify(exc) is Failure.UNREACHABLE


def test_bad_sql_a_constraint_and_other_errors_are_errors(table: str) -> None:
    """A missing table, a syntax error, a duplicate key and an error that is not the driver's are never retried."""
    with psycopg.connect(PG, autocommit=True) as conn:
        for sql in ("SELECT * FROM no_such_table_here", "SELEC 1", f"INSERT INTO {table} VALUES (1, 0)"):
            exc = caught(lambda sql=sql: conn.execute(sql))
            assert isinstance(exc, psycopg.Error)
            assert classify(exc) is Failure.ERROR and not postgres.retriable(exc), sql
    assert classify(ValueError("x")) is Failure.ERROR


def test_connect_kwargs_bound_a_silent_peer_by_the_timeout() -> None:
    """Keepalives every third of the timeout (three probes), a TCP user timeout of the whole timeout, in ms."""
    assert postgres.connect_kwargs(30.0, 5.0) == {
        "connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 10,
        "keepalives_count": 3, "tcp_user_timeout": 30000}


@pytest.mark.parametrize(("code", "same_session"), [("40P01", True), ("40001", True), ("57P01", False)])
async def test_the_job_store_retries_by_the_classification(code: str, same_session: bool,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A job-store transaction the server fails once with a deadlock or a serialization failure runs again on the
    same session; one failed as unreachable (admin shutdown) runs again on a new session; bad SQL is raised."""
    from crawler.stores.pg_jobs import PgJobStore

    schema = f"crawler_e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sessions: list[int] = []

    async def once(conn: psycopg.AsyncConnection[object]) -> str:
        sessions.append(conn.info.backend_pid)
        if len(sessions) == 1:
            await conn.execute(f"DO $$BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{code}'; END$$")
        return "done"

    try:
        async with PgJobStore(f"{PG}?options=-csearch_path%3D{schema}", stall_limit=10, heartbeat_timeout=2) as store:
            assert await store._run(once) == "done"
            assert len(sessions) == 2 and (sessions[0] == sessions[1]) is same_session
            assert ("transaction rolled back" in caplog.text) is same_session
            with pytest.raises(psycopg.errors.UndefinedTable):
                await store._run(lambda conn: conn.execute("SELECT * FROM no_such_table_here"))
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
