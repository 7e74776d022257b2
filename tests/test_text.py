"""Text the API sends that no sink accepts as it is (half an emoji, a NUL) reaches every sink cleaned.

The simulator's world gives some users (`broken_text_fraction`) a nickname and post titles ending in a whole
emoji, a NUL and half an emoji, sent over real HTTP as escaped halves. The expected rows are the world's text
with the half replaced by U+FFFD and the NUL removed; the whole emoji (two escaped halves) stays one character.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from crawler.api.classify import classify
from crawler.errors import NotFound
from crawler.history.store import HistoryStore
from crawler.sim.data import World, WorldConfig
from tests.conftest import SimFactory, fast_settings
from tests.test_cli import crawler, environ, neutral, public_users, read_csv, setup_dir
from tests.test_distributed import Hosts, common, hosts, pg_url, schema, simulator  # noqa: F401  (fixtures)
from tests.test_ingest import day, rows, run, store_url, write_watch  # noqa: F401  (the fixture)

WORLD = WorldConfig(seed=23, users=1_000, missing_fraction=0.0, private_fraction=0.0, broken_text_fraction=0.5)
CUT = "\U0001f600\x00 \ud83d"  # the end of a broken text: a whole emoji, a NUL, half an emoji


def cleaned(text: str | None) -> str:
    """What a sink must hold for a text of the world: half an emoji is U+FFFD, a NUL is gone."""
    return (text or "").replace("\x00", "").replace("\ud83d", "\ufffd")


def watched(w: World) -> list[int]:
    """Four users of the world with broken text and two without, each with a few posts."""
    users = public_users(w, 60, max_videos=30)
    broken = [i for i in users if w.has_broken_text(i)][:4]
    plain = [i for i in users if not w.has_broken_text(i)][:2]
    assert len(broken) == 4 and len(plain) == 2, "the test world needs both kinds of users"
    user = w.user(broken[0])
    assert user is not None and user.nickname.endswith(CUT)
    return broken + plain


def expected(w: World, users: list[int]) -> tuple[dict[str, str], dict[str, str]]:
    """user id -> cleaned nickname and video id -> cleaned title, from the world."""
    nicknames = {w.user_id(i): cleaned(u.nickname) for i in users if (u := w.user(i)) is not None}
    titles = {p.video_id: cleaned(p.title) for i in users for p in w.posts(i)}
    assert any("\ufffd" in t for t in titles.values()) and any("\ufffd" in n for n in nicknames.values())
    return nicknames, titles


def test_every_string_of_an_answer_is_cleaned_where_it_is_decoded() -> None:
    """Values, keys and error messages of a body: two escaped halves are one character, a half alone is U+FFFD, a NUL
    is gone, and a pair sent as UTF-8 bytes of each half is joined too."""
    raw = (b'{"user": {"nickname": "a \\ud83d\\ude00 b \\ud83d", "t\\ude00": ["\\u0000x\\uDE00", 3, null]},'
           b' "cesu": "\xed\xa0\xbd\xed\xb8\x80!"}')
    body, billed = classify(200, raw, None, "/x/")
    assert billed
    assert body == {"user": {"nickname": "a \U0001f600 b \ufffd", "t\ufffd": ["x\ufffd", 3, None]},
                    "cesu": "\U0001f600!"}
    with pytest.raises(NotFound) as failed:
        classify(200, b'{"status": "error", "message": "user \\ud83d not found"}', None, "/x/")
    assert str(failed.value) == "/x/: user \ufffd not found"


@pytest.mark.slow
async def test_crawled_profiles_and_posts_are_written_with_the_half_emoji_replaced(simulator: SimFactory,
                                                                                  tmp_path: Path) -> None:
    """`crawler profiles` and `crawler posts` on users whose nickname and titles end in half an emoji and a NUL
    exit 0 and write each row with U+FFFD for the half, no NUL and the whole emoji kept."""
    async with simulator(world=WORLD) as sim:
        users = watched(sim.world)
        nicknames, titles = expected(sim.world, users)
        setup_dir(tmp_path, [sim.world.handle(i) for i in users])
        base = ["in.txt", "--config", "fast.toml", "--data-dir", "d", "-q"]
        code, _, err = await crawler(["profiles", *base, "-o", "profiles.csv"], environ(sim), tmp_path)
        assert code == 0, err
        code, _, err = await crawler(["posts", *base, "-o", "posts.csv"], environ(sim), tmp_path)
        assert code == 0, err
    assert {r["user_id"]: r["nickname"] for r in read_csv(tmp_path / "profiles.csv")} == {
        k: neutral(v) for k, v in nicknames.items()}
    assert {r["video_id"]: r["title"] for r in read_csv(tmp_path / "posts.csv")} == {
        k: neutral(v) for k, v in titles.items()}
    for name in ("profiles.csv", "posts.csv"):
        assert b"\x00" not in (tmp_path / name).read_bytes()


async def test_ingest_writes_the_half_emoji_replaced_to_the_history_and_day_files(
        simulator: SimFactory, tmp_path: Path, store_url: str) -> None:  # noqa: F811
    """An ingest of users with half an emoji and a NUL in their nickname and titles exits 0 on SQLite and on
    PostgreSQL; the store's nicknames and the day files' rows hold U+FFFD for the half and no NUL."""
    async with simulator(world=WORLD) as sim:
        users = watched(sim.world)
        nicknames, titles = expected(sim.world, users)
        write_watch(tmp_path / "watch.txt", [sim.world.handle(i) for i in users])
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=store_url)
        result = await run(tmp_path, settings, 0)
    assert result.exit_code == 0, result.outcomes
    store = HistoryStore(store_url)
    try:
        assert {uid: (store.user(uid) or ("", ""))[1] for uid in nicknames} == nicknames
    finally:
        store.close()
    out = tmp_path / "out"
    assert {r["user_id"]: r["nickname"] for r in rows(out / f"profiles-{day(0)}.csv")} == {
        k: neutral(v) for k, v in nicknames.items()}
    assert {r["video_id"]: r["title"] for r in rows(out / f"posts-{day(0)}.csv")} == {
        k: neutral(v) for k, v in titles.items()}


@pytest.mark.slow
async def test_a_postgresql_job_commits_the_half_emoji_replaced(hosts: Hosts, schema: str) -> None:  # noqa: F811
    """A PostgreSQL job (`--jobs-url`) of profiles, then one of posts, on users with half an emoji and a NUL in
    their text exit 0; the exported rows hold U+FFFD for the half and no NUL."""
    w = World(WORLD)
    users = watched(w)
    nicknames, titles = expected(w, users)
    src = hosts.root / "in.txt"
    src.write_text("\n".join(w.handle(i) for i in users) + "\n")
    async with simulator(hosts.key, world=WORLD) as sim:
        for command in ("profiles", "posts"):
            code, _, err = await hosts.run(command, [command, str(src), "-o", "out.csv", "--jobs-url", pg_url(schema),
                                                     *common(sim.url)])
            assert code == 0, err[-800:]
    profiles = read_csv(hosts.root / "profiles" / "out.csv")
    assert {r["user_id"]: r["nickname"] for r in profiles} == {k: neutral(v) for k, v in nicknames.items()}
    posts = read_csv(hosts.root / "posts" / "out.csv")
    assert {r["video_id"]: r["title"] for r in posts} == {k: neutral(v) for k, v in titles.items()}


@pytest.mark.slow
async def test_a_nul_in_an_input_line_is_a_failure_row_of_a_postgresql_job(hosts: Hosts, schema: str) -> None:  # noqa: F811
    """An input line holding NUL (PostgreSQL text refuses one; a UTF-16 file read as UTF-8 is full of them) is an
    `invalid_input` row with the NUL shown as \\x00, and the PostgreSQL job goes on (exit 3), never an error."""
    w = World(WORLD)
    users = watched(w)[:3]
    src = hosts.root / "in.txt"
    src.write_text("\n".join([w.handle(i) for i in users] + ["bad\x00name"]) + "\n")
    async with simulator(hosts.key, world=WORLD) as sim:
        code, _, err = await hosts.run("profiles", ["profiles", str(src), "-o", "out.csv", "--jobs-url",
                                                    pg_url(schema), *common(sim.url)])
    assert code == 3, err[-800:]
    failures = read_csv(hosts.root / "profiles" / "out.failures.csv")
    assert [(r["input"], r["reason"]) for r in failures] == [("bad\\x00name", "invalid_input")]
    assert len(read_csv(hosts.root / "profiles" / "out.csv")) == len(users)
