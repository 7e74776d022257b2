"""The tests' PostgreSQL server (CRAWLER_TEST_PG_URL, default the local one) and a schema of a test's own on it.
An unreachable server makes the test error, never skip."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

PG_URL = os.environ.get("CRAWLER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def schema_url(name: str) -> str:
    """The server's URL with ``name`` as the session's search path."""
    return f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{name}"


@contextlib.contextmanager
def private_schema(prefix: str = "t") -> Iterator[str]:
    """A new schema (``prefix``_ and 12 hex digits), dropped with all it holds on leaving; yields its name."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        yield name
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")
