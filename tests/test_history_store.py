"""The history store's URL rules and `history top`'s order, on SQLite and on the PostgreSQL server (never skipped)."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from crawler.api.records import Profile
from crawler.cli import main
from crawler.errors import UsageError
from crawler.history.store import HistoryStore

PG_URL = os.environ.get("CRAWLER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
DAY0 = dt.date(2026, 3, 1)
BAD_URLS = (
    "postgresql+psycopg://alice:s3cr3t-pw@db.example/crawl",
    "mysql://alice:s3cr3t-pw@db.example/crawl",
    "postgresq://alice:s3cr3t-pw@db.example/crawl",
    "sqlite://s3cr3t-pw.db",
    # postgresql:// but not parseable: libpq's own message quotes the token it stopped at, here the password
    "postgresql://alice:s3cr3t-pw%zz@db.example/crawl",
    "postgresql://alice:s3cr3t-pw@[::1/crawl",
)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh history store URL: a SQLite file, or a private schema on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'history.db'}"
        return
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:  # unreachable server: the test errors, never skips
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _profile(user_id: str, handle: str, followers: int | None) -> Profile:
    return Profile(user_id=user_id, handle=handle, nickname=handle, sec_uid="", verified=False, private=False,
                   followers=followers, following=1, videos=1, hearts=1, likes=1, signature="")


@pytest.mark.parametrize("url", BAD_URLS)
def test_an_unsupported_history_url_is_exit_2_naming_the_key_without_the_password(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """history.url with another scheme (a driver suffix, another database, a typo) is exit 2 with one line naming
    the key, never the password, from the flag or config.toml, and nothing is created on disk."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIKLIVE_API_KEY", "sim-key")
    monkeypatch.setenv("TIKLIVE_BASE_URL", "http://127.0.0.1:9")  # were the URL accepted, nothing would answer
    monkeypatch.delenv("CRAWLER_CONFIG", raising=False)
    (tmp_path / "watch.txt").write_text("alice\n")
    (tmp_path / "c.toml").write_text(f'[history]\nurl = "{url}"\n[retry]\nstall_limit = 0.5\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    runs = (["ingest", "watch.txt", "--out-dir", "out", "--history-url", url],
            ["ingest", "watch.txt", "--out-dir", "out", "--config", "c.toml"],
            ["history", "top", "--history-url", url],
            ["history", "growth", "alice", "--config", "c.toml"])
    for argv in runs:
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "history.url" in lines[0], err
        assert "s3cr3t-pw" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(UsageError) as caught:
        HistoryStore(url)
    assert "history.url" in str(caught.value) and "s3cr3t-pw" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_unreachable_postgresql_history_is_exit_2_before_the_out_dir_exists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A well-formed postgresql:// history.url nobody answers at: one line, exit 2, no password, and ingest
    creates nothing (no out-dir, no lock file)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIKLIVE_API_KEY", "sim-key")
    monkeypatch.setenv("TIKLIVE_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("CRAWLER_CONFIG", raising=False)
    (tmp_path / "watch.txt").write_text("alice\n")
    url = f"postgresql://alice:s3cr3t-pw@127.0.0.1:{port}/crawl"
    assert main(["ingest", "watch.txt", "--out-dir", "out", "--history-url", url, "--rate-shared", "off"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "history database" in err and "s3cr3t-pw" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_plain_path_with_a_colon_and_a_sqlite_url_are_sqlite_files(tmp_path: Path) -> None:
    """A plain path (even with a ':' in it) and sqlite:///PATH open a SQLite file at exactly that path."""
    for url, path in ((str(tmp_path / "a:b.db"), tmp_path / "a:b.db"),
                      (f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "c.db")):
        store = HistoryStore(url)
        store.record_snapshot(DAY0, _profile("1", "alice", 10))
        store.close()
        assert path.is_file()


def test_top_ranks_unknown_gains_last_on_both_stores(store_url: str) -> None:
    """Users whose first or last count in the window is unknown rank after every known gain (NULLS LAST), ties by
    handle, the same on SQLite and PostgreSQL."""
    store = HistoryStore(store_url)
    try:
        counts = {  # handle: followers on day 0 and day 3 (None: the API gave no count)
            "aa_unknown_end": (100, None),
            "bb_grew": (100, 150),
            "cc_unknown_start": (None, 500),
            "dd_shrank": (100, 90),
            "ee_grew_most": (10, 1_000),
            "ff_never_known": (None, None),
            "gg_flat": (5, 5),
        }
        for n, (handle, (first, last)) in enumerate(counts.items()):
            store.record_snapshot(DAY0, _profile(str(n + 1), handle, first))
            store.record_snapshot(DAY0 + dt.timedelta(days=3), _profile(str(n + 1), handle, last))
        top = store.top("followers-gained", days=7)
        assert [(t.handle, t.gained) for t in top] == [
            ("ee_grew_most", 990), ("bb_grew", 50), ("gg_flat", 0), ("dd_shrank", -10),
            ("aa_unknown_end", None), ("cc_unknown_start", None), ("ff_never_known", None)]
        assert [t.handle for t in store.top("followers-gained", days=7, limit=4)] == [
            "ee_grew_most", "bb_grew", "gg_flat", "dd_shrank"]
    finally:
        store.close()


@pytest.mark.parametrize("url", BAD_URLS[-2:])
def test_an_unparseable_jobs_url_is_exit_2_without_the_password(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """jobs.url that libpq cannot parse is exit 2 with one line naming the key, never the password."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIKLIVE_API_KEY", "sim-key")
    monkeypatch.setenv("TIKLIVE_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("CRAWLER_CONFIG", raising=False)
    (tmp_path / "in.txt").write_text("alice\n")
    assert main(["profiles", "in.txt", "-o", "out.csv", "--jobs-url", url]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "jobs.url" in err, err
    assert "s3cr3t-pw" not in err


def test_the_postgresql_connection_finds_a_silent_peer_dead_within_the_stall_limit(store_url: str) -> None:
    """Every opening of a PostgreSQL store (ingest's, the read-only one and `history serve`'s) connects with a
    connect timeout, TCP keepalives and a TCP user timeout of retry.stall_limit (libpq's parameters of the session)."""
    if not store_url.startswith("postgresql://"):
        return  # a SQLite file has no connection to lose
    from crawler.history.serve import HISTORY, make_app

    store = HistoryStore(store_url, stall_limit=42, connect_timeout=3)
    readonly = HistoryStore.open_readonly(store_url, stall_limit=42, connect_timeout=3)
    served = make_app(store_url, stall_limit=42, connect_timeout=3)[HISTORY]
    try:
        for s in (store, readonly, served.store):
            params = s._db.info.get_parameters()
            assert params["connect_timeout"] == "3"
            assert params["keepalives"] == "1" and params["keepalives_idle"] == "14"
            assert params["tcp_user_timeout"] == "42000"
    finally:
        store.close()
        readonly.close()
        served.close()


def test_every_read_query_answers_on_a_store_the_database_opened_read_only(store_url: str) -> None:
    """`HistoryQueries` (what `history serve` holds) has no write method, and every one of its queries answers on a
    store opened read-only (a query that wrote would be refused by the database), on SQLite and PostgreSQL."""
    from crawler.history.queries import HistoryQueries

    day2 = DAY0 + dt.timedelta(days=2)
    store = HistoryStore(store_url)
    try:
        store.record_snapshot(DAY0, _profile("1", "alice", 10))
        store.record_snapshot(day2, _profile("1", "alicia", 15))
        store.record_rename("1", "alice", "alicia", day2)
    finally:
        store.close()
    queries = HistoryQueries.open_readonly(store_url)
    try:
        assert not any(hasattr(queries, name) for name in ("record_snapshot", "put_snapshot", "claim", "bulk_users"))
        assert queries.resolve("@alice") == ("1", "alicia") and queries.user("1") == ("alicia", "alicia")
        assert [(g.followers, g.delta) for g in queries.growth("alice")] == [(10, None), (15, 5)]
        assert [(t.handle, t.gained) for t in queries.top(days=7)] == [("alicia", 5)]
        assert [(d.snapshotted, d.gap) for d in queries.days()] == [(1, False), (0, True), (1, False)]
        assert [r[3] for r in queries.as_of(day2)] == ["alicia"] and queries.last_day() == day2
        assert len(list(queries.snapshots())) == queries.count() == queries.count("1") == 2
        assert [o.gains for o in queries.overview((7,))] == [{7: 5}]
        assert [s.followers for s in queries.series("1")] == [10, 15]
        assert queries.followers_since(["1"], day2) == {"1": [(day2.isoformat(), 15)]}
        assert queries.posts_per_day("1") == {}
        assert [(r.old, r.new) for r in queries.safe_renames("1")] == [("alice", "alicia")] == [
            (r.old, r.new) for r in queries.renames()]
        with pytest.raises(Exception, match=r"(?i)read.?only"):
            queries._exec("DELETE FROM snapshots")
    finally:
        queries.close()
