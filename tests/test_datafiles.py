"""Data files for programs (docs/columns.md): `--format parquet|jsonl` written from the complete CSV, typed, without
the formula guard; the daily profiles files' day and fetched_at columns.

Crawls run against the simulator on loopback; expected ids, counts and times come from the simulator's World, never
from crawler.api.records. Parquet files are read back with pyarrow, JSON Lines with the json module.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
import re
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crawler.runs.ingest import TEST_NOW_ENV, ingest
from crawler.sim.data import Post, World, WorldConfig
from crawler.sinks.csv_sink import cell, unguard
from tests.conftest import KEY, SimFactory, fast_settings
from tests.test_cli import FAST_TOML, crawler, environ, error_line, public_users
from tests.test_crawl import crawl_once
from tests.test_distributed import WORLD as DIST_WORLD
from tests.test_distributed import Hosts, common, hosts, pg_url, schema  # noqa: F401  (hosts, schema: the fixtures)
from tests.test_distributed import simulator as dist_simulator

WORLD = WorldConfig(seed=11, users=1_000)
FORMULA = ("=", "+", "-", "@", "\t", "\r")
UTC = dt.UTC


def read_back(path: Path) -> list[dict[str, Any]]:
    """The rows of a data file as Python values: Parquet through pyarrow, JSON Lines through json."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()  # type: ignore[no-any-return]
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def when(value: Any) -> dt.datetime:
    """A time read back: a tz-aware datetime from Parquet, ISO-8601 text ending in Z from JSON Lines."""
    if isinstance(value, str):
        assert value.endswith("Z"), value
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime) and value.utcoffset() == dt.timedelta(0), value
    return value


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def users_with_formula_titles(w: World, n: int) -> list[int]:
    """n public users whose posts include titles starting with = or - (and some without a title)."""
    found = [i for i in public_users(w, 200, max_videos=40)
             if any((p.title or "").startswith(("=", "-")) for p in w.posts(i))]
    assert len(found) >= n, "the test world has too few users with formula-like titles"
    return found[:n]


def posts_of(w: World, users: list[int]) -> dict[str, Post]:
    return {p.video_id: p for i in users for p in w.posts(i)}


# --- the guard and its inverse ---

def test_unguard_removes_exactly_the_apostrophe_the_guard_added() -> None:
    """Every text comes back from its guarded cell as it was, a leading ' of its own included; --raw keeps it."""
    texts = ["=1+1", "-10 kg", "+1", "@name", "\tx", "\rx", "'=x", "''-1", "'plain", "'", "''", "plain", "", "a=b"]
    for text in texts:
        assert unguard(cell(text)) == text, text
        assert cell(text, raw=True) == text
    assert cell("'=x") == "''=x" and cell("'plain") == "'plain"


# --- job outputs against the World ---

@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
async def test_posts_data_file_has_the_worlds_ids_counts_and_utc_times(simulator: SimFactory, tmp_path: Path,
                                                                       fmt: str) -> None:
    """OUT.parquet / OUT.jsonl of a posts job: string ids, integer counts and UTC times equal to the World's, and
    titles starting with = or - without the guard's ' (which the CSV keeps)."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        users = users_with_formula_titles(w, 4)
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), output_format=fmt)
        out = tmp_path / "posts.csv"
        outcome = await crawl_once(settings, "posts", [w.handle(i) for i in users], out)
    assert outcome.exit_code == 0
    want = posts_of(w, users)
    got = read_back(out.with_suffix(f".{fmt}"))
    assert sorted(r["video_id"] for r in got) == sorted(want)
    if fmt == "parquet":
        schema = pq.read_schema(out.with_suffix(".parquet"))
        assert schema.field("video_id").type == pa.string() and schema.field("play_count").type == pa.int64()
        assert schema.field("create_time").type == pa.timestamp("us", tz="UTC")
        assert schema.field("pinned").type == pa.bool_()
    for row in got:
        p = want[row["video_id"]]
        assert row["title"] == (p.title or "")
        assert (row["play_count"], row["digg_count"], row["comment_count"], row["share_count"]) == (
            p.play_count, p.digg_count, p.comment_count, p.share_count)
        assert all(type(row[k]) is int for k in ("play_count", "digg_count", "share_count", "duration"))
        assert when(row["create_time"]) == dt.datetime.fromtimestamp(p.create_time, UTC)
        assert row["author_id"] == w.user_id(p.author_index) and row["music_id"] == p.music_id
    formula = {v for v, p in want.items() if (p.title or "").startswith(FORMULA)}
    assert any(want[v].title.startswith("=") for v in formula) and any(want[v].title.startswith("-") for v in formula)
    for row in csv_rows(out):
        if row["video_id"] in formula:
            assert row["title"] == "'" + (want[row["video_id"]].title or "")


async def test_comment_ids_with_blanks_beside_them_survive_exactly(simulator: SimFactory, tmp_path: Path) -> None:
    """comments --with-replies as Parquet: 24-digit comment ids, 19-digit video ids and parent_comment_id (blank for
    top-level comments, 24 digits for replies) come back as the World's strings, counts as int64, times as UTC."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        posts = [p for i in public_users(w, 300, max_videos=40) for p in w.posts(i)
                 if 1 <= p.comment_count <= 25 and any(c.reply_total for c in w.comments(p.video_id))][:5]
        assert len(posts) == 5
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), output_format="parquet")
        out = tmp_path / "comments.csv"
        outcome = await crawl_once(settings, "comments", [p.video_id for p in posts], out, with_replies=True)
    assert outcome.exit_code == 0
    want = {}
    for p in posts:
        for c in w.comments(p.video_id):
            want[c.comment_id] = c
            want.update((r.comment_id, r) for r in w.replies(p.video_id, c.comment_id))
    table = pq.read_table(out.with_suffix(".parquet"))
    assert table.schema.field("comment_id").type == pa.string()
    assert table.schema.field("parent_comment_id").type == pa.string()
    assert table.schema.field("digg_count").type == pa.int64()
    got = table.to_pylist()
    assert sorted(r["comment_id"] for r in got) == sorted(want)
    parents = [r["parent_comment_id"] for r in got]
    assert "" in parents and any(len(x) >= 19 for x in parents), "the column must mix blanks and long ids"
    assert all(len(p.video_id) == 19 for p in posts)
    for row in got:
        c = want[row["comment_id"]]
        assert (row["video_id"], row["parent_comment_id"]) == (c.video_id, c.parent_comment_id or "")
        assert row["text"] == c.text and row["digg_count"] == c.digg_count
        assert when(row["create_time"]) == dt.datetime.fromtimestamp(c.create_time, UTC)
        if c.parent_comment_id is None:
            assert row["reply_total"] == c.reply_total


async def test_followers_data_file_has_string_ids_and_integer_counts(simulator: SimFactory, tmp_path: Path) -> None:
    """followers as Parquet: user ids are the World's strings; follower and video counts its integers; formula-like
    nicknames without the guard's '."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        users = [i for i in public_users(w, 100) if 1 <= w.user(i).followers <= 150][:3]  # type: ignore[union-attr]
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), output_format="parquet")
        out = tmp_path / "followers.csv"
        outcome = await crawl_once(settings, "followers", [w.handle(i) for i in users], out)
    assert outcome.exit_code == 0
    want = {(w.handle(i), w.user_id(f.user_index)): w.user(f.user_index) for i in users for f in w.followers(i)}
    table = pq.read_table(out.with_suffix(".parquet"))
    assert table.schema.field("user_id").type == pa.string() and table.schema.field("followers").type == pa.int64()
    got = table.to_pylist()
    assert sorted((r["source_handle"], r["user_id"]) for r in got) == sorted(want)
    for row in got:
        u = want[(row["source_handle"], row["user_id"])]
        assert u is not None
        assert (row["followers"], row["videos"], row["nickname"]) == (u.followers, u.videos, u.nickname)
    assert any(r["nickname"].startswith("=") for r in got), "the case must include a formula-like nickname"


async def test_a_finished_job_run_again_with_format_writes_its_data_file_for_nothing(simulator: SimFactory,
                                                                                    tmp_path: Path) -> None:
    """A job finished as CSV, run again with --format jsonl: already complete, no request, OUT.jsonl written."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        users = public_users(w, 3, max_videos=20)
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"))
        out = tmp_path / "profiles.csv"
        assert (await crawl_once(settings, "profiles", [w.handle(i) for i in users], out)).exit_code == 0
        assert not out.with_suffix(".jsonl").exists()
        sent = sim.stats.requests
        again = await crawl_once(settings.replace(output_format="jsonl"), "profiles", [w.handle(i) for i in users],
                                 out)
        assert again.summary.status == "already complete" and sim.stats.requests == sent
    got = read_back(out.with_suffix(".jsonl"))
    assert [r["user_id"] for r in got] == [w.user_id(i) for i in users]
    assert [r["followers"] for r in got] == [w.user(i).followers for i in users]  # type: ignore[union-attr]
    assert all(isinstance(r["verified"], bool) for r in got)


# --- ingest's day files ---

async def test_profiles_day_files_carry_day_and_fetched_at(simulator: SimFactory, tmp_path: Path) -> None:
    """Each profiles-DAY.csv row says its UTC day and fetch time (ISO-8601, UTC), in two columns at the end."""
    fetched = dt.datetime(2026, 1, 1, 3, 4, 5, tzinfo=UTC)
    async with simulator(world=WORLD) as sim:
        w = sim.world
        users = public_users(w, 4, max_videos=20)
        (tmp_path / "watch.txt").write_text("\n".join(w.handle(i) for i in users) + "\n")
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"))
        result = await ingest(str(tmp_path / "watch.txt"), tmp_path / "out", settings, api_key=KEY,
                              install_signals=False, clock=lambda: fetched, with_posts=False)
    assert result.exit_code == 0
    path = tmp_path / "out" / "profiles-2026-01-01.csv"
    with path.open(encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[-2:] == ["day", "fetched_at"] and header[0] == "user_id"
    rows = csv_rows(path)
    assert sorted(r["user_id"] for r in rows) == sorted(w.user_id(i) for i in users)
    for r in rows:
        assert r["day"] == "2026-01-01"
        assert dt.datetime.fromisoformat(r["fetched_at"]) == fetched
        assert dt.datetime.fromisoformat(r["fetched_at"]).utcoffset() == dt.timedelta(0)


async def test_a_day_file_begun_by_an_earlier_version_keeps_its_columns(simulator: SimFactory,
                                                                        tmp_path: Path) -> None:
    """A profiles-DAY.csv begun without day and fetched_at (an upgrade mid-day) gets rows of its own width."""
    old = ["user_id", "handle", "nickname", "sec_uid", "verified", "private", "followers", "following", "videos",
           "hearts", "likes", "signature"]
    async with simulator(world=WORLD) as sim:
        w = sim.world
        users = public_users(w, 3, max_videos=20)
        (tmp_path / "watch.txt").write_text("\n".join(w.handle(i) for i in users) + "\n")
        (tmp_path / "out").mkdir()
        path = tmp_path / "out" / "profiles-2026-01-01.csv"
        path.write_text(",".join(old) + "\n")
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"))
        result = await ingest(str(tmp_path / "watch.txt"), tmp_path / "out", settings, api_key=KEY,
                              install_signals=False, clock=lambda: dt.datetime(2026, 1, 1, 3, tzinfo=UTC),
                              with_posts=False)
    assert result.exit_code == 0
    with path.open(encoding="utf-8", newline="") as fh:
        lines = list(csv.reader(fh))
    assert lines[0] == old and len(lines) == 1 + len(users)
    assert all(len(line) == len(old) for line in lines)


# --- the command line ---

NO_PYARROW = """
import sys

class NoPyarrow:
    '''pyarrow is not installed, as far as this process can tell.'''

    def find_spec(self, name, path=None, target=None):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoPyarrow())
from crawler.cli import main
raise SystemExit(main())
"""


async def crawler_without_pyarrow(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """`crawler ARGS` in a Python whose imports of pyarrow fail (as when it is not installed)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", NO_PYARROW, *args, cwd=cwd, env=env,
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_format_parquet_without_pyarrow_is_a_usage_error_before_any_request(simulator: SimFactory,
                                                                                  tmp_path: Path) -> None:
    """Without pyarrow importable, --format parquet exits 2 with one line naming crawler[parquet], sends nothing and
    leaves no file; --format jsonl needs no pyarrow and completes."""
    async with simulator(world=WORLD) as sim:
        users = public_users(sim.world, 3, max_videos=20)
        (tmp_path / "in.txt").write_text("\n".join(sim.world.handle(i) for i in users) + "\n")
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        before = sorted(p.name for p in tmp_path.iterdir())
        args = ["profiles", "in.txt", "-o", "out.csv", "--config", "fast.toml", "--data-dir", "d"]
        code, _, err = await crawler_without_pyarrow([*args, "--format", "parquet"], environ(sim), tmp_path)
        assert code == 2, err
        line = error_line(err)
        assert "pyarrow" in line and "crawler[parquet]" in line and len(err.strip().splitlines()) == 1
        assert sim.stats.requests == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        code, _, err = await crawler_without_pyarrow([*args, "--format", "jsonl", "-q"], environ(sim), tmp_path)
        assert code == 0, err
    assert [r["user_id"] for r in read_back(tmp_path / "out.jsonl")] == [sim.world.user_id(i) for i in users]


@pytest.mark.slow
async def test_history_export_format_parquet(simulator: SimFactory, tmp_path: Path) -> None:
    """`crawler history export --format parquet` after an ingest: FILE.parquet beside FILE.csv with the World's user
    ids as strings, followers as int64, the day as a date and fetched_at as a UTC timestamp."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        users = public_users(w, 5, max_videos=20)
        (tmp_path / "watch.txt").write_text("\n".join(w.handle(i) for i in users) + "\n")
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        env = environ(sim) | {TEST_NOW_ENV: "2026-01-01T03:00:00"}
        common = ["--config", "fast.toml", "--data-dir", "d"]
        code, _, err = await crawler(["ingest", "watch.txt", "--out-dir", "out", "-q", *common], env, tmp_path)
        assert code == 0, err
        code, _, err = await crawler(["history", "export", "-o", "snaps.csv", "--format", "parquet", *common], env,
                                     tmp_path)
        assert code == 0, err
        assert "snaps.parquet" in err
    table = pq.read_table(tmp_path / "snaps.parquet")
    assert table.schema.field("user_id").type == pa.string() and table.schema.field("followers").type == pa.int64()
    assert table.schema.field("day").type == pa.date32()
    assert table.schema.field("fetched_at").type == pa.timestamp("us", tz="UTC")
    got = {r["user_id"]: r for r in table.to_pylist()}
    assert sorted(got) == sorted(w.user_id(i) for i in users)
    for i in users:
        u = w.user(i)
        assert u is not None
        row = got[u.user_id]
        assert (row["handle"], row["followers"], row["hearts"], row["verified"]) == (
            u.handle, u.followers, u.hearts, u.verified)
        assert row["day"] == dt.date(2026, 1, 1)
        assert row["fetched_at"] == dt.datetime(2026, 1, 1, 3, tzinfo=UTC)


@pytest.mark.slow
async def test_a_postgresql_job_and_crawler_export_write_data_files(hosts: Hosts, schema: str) -> None:  # noqa: F811
    """A PostgreSQL job's starter with --format jsonl writes OUT.jsonl beside OUT.csv; `crawler export --format
    parquet` writes FILE.parquet beside FILE.csv; both hold the World's profiles."""
    url = pg_url(schema)
    w = World(DIST_WORLD)
    users = public_users(w, 6, max_videos=20)
    src = hosts.root / "in.txt"
    src.write_text("\n".join(w.handle(i) for i in users) + "\n")
    async with dist_simulator(hosts.key) as sim:
        code, _, err = await hosts.run("starter", ["profiles", str(src), "-o", "out.csv", "--jobs-url", url,
                                                   "--format", "jsonl", *common(sim.url)])
        assert code == 0, err[-800:]
        jid = re.search(r"crawler: job ([0-9a-f]{12}) ", err)
        assert jid is not None, err
        again = hosts.root / "again.csv"
        code, _, err = await hosts.run("export", ["export", jid.group(1), "-o", str(again), "--jobs-url", url,
                                                  "--format", "parquet"])
        assert code == 0, err
    want = {w.user_id(i): w.user(i) for i in users}
    for path in (hosts.root / "starter" / "out.jsonl", again.with_suffix(".parquet")):
        got = read_back(path)
        assert sorted(r["user_id"] for r in got) == sorted(want), path
        for row in got:
            u = want[row["user_id"]]
            assert u is not None
            assert (row["followers"], row["hearts"], row["private"], row["nickname"]) == (
                u.followers, u.hearts, u.private, u.nickname)
