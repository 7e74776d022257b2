"""The output without `-o` is named after the input, and another input file for a job's output is noticed:
the real command line against the simulator on loopback (issue 23, item 1)."""

from __future__ import annotations

import os
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from crawler.jobs.prepare import default_output
from crawler.sim.data import World, WorldConfig
from crawler.sim.server import Simulator
from tests.conftest import SimFactory
from tests.test_cli import FAST_TOML, crawler, environ, error_line, public_users, read_csv

WORLD = WorldConfig(seed=11, users=1_000)
RUN = ["--config", "fast.toml", "--data-dir", "d"]


def users(w: World, n: int) -> list[int]:
    """n public users (each is one profile row, one credit)."""
    return public_users(w, n, max_videos=10**9, min_videos=0)


def write_list(path: Path, w: World, who: list[int]) -> None:
    """A list of these users' handles."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(w.handle(i) + "\n" for i in who), encoding="utf-8")


def ids(path: Path) -> list[tuple[str, str, str]]:
    """(user_id, handle, followers) of every row of a profiles CSV."""
    return sorted((r["user_id"], r["handle"], r["followers"]) for r in read_csv(path))


def world_ids(w: World, who: list[int]) -> list[tuple[str, str, str]]:
    """What a profiles CSV of these users holds, by the simulator's world."""
    found = [(w.user_id(i), w.handle(i), w.user(i)) for i in who]
    return sorted((uid, handle, str(u.followers)) for uid, handle, u in found if u is not None)


async def run(sim: Simulator, tmp: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str, int]:
    """`crawler ARGS` in `tmp`; (exit code, stderr, requests the simulator received meanwhile)."""
    before = sim.stats.requests
    code, _, err = await crawler([*args, *RUN], environ(sim), tmp, stdin=stdin)
    return code, err, sim.stats.requests - before


def test_default_output_names() -> None:
    """LIST.COMMAND.csv for a file (in the current directory), KEYWORD.COMMAND.csv for a search (a safe file
    name), stdin.COMMAND.DAY.csv for stdin and for a pipe."""
    day = date(2026, 12, 6)
    assert default_output("profiles", "lists/listA.txt", "users", today=day) == "listA.profiles.csv"
    assert default_output("posts", "/tmp/x/users", "users", today=day) == "users.posts.csv"
    assert default_output("profiles", "-", "users", today=day) == "stdin.profiles.2026-12-06.csv"
    read, write = os.pipe()
    try:
        assert default_output("posts", f"/dev/fd/{read}", "users", today=day) == "stdin.posts.2026-12-06.csv"
    finally:
        os.close(read)
        os.close(write)
    assert default_output("search-users", " cosmo girl/../x ", "keyword") == "cosmo-girl-..-x.search-users.csv"
    assert default_output("search-videos", "../..", "keyword") == "keyword.search-videos.csv"
    assert default_output("search-videos", "café", "keyword") == "café.search-videos.csv"


@pytest.mark.slow
async def test_a_search_without_o_is_named_after_its_keyword(simulator: SimFactory, tmp_path: Path) -> None:
    """`crawler search-users "cosmo girl"` writes cosmo-girl.search-users.csv here."""
    (tmp_path / "fast.toml").write_text(FAST_TOML)
    async with simulator(world=WORLD) as sim:
        code, err, sent = await run(sim, tmp_path, "search-users", "cosmo girl", "--max-pages", "1")
    assert code in (0, 3) and sent == 1, err
    assert (tmp_path / "cosmo-girl.search-users.csv").is_file()


@pytest.mark.slow
async def test_two_lists_without_o_leave_two_files_with_their_own_rows(simulator: SimFactory,
                                                                        tmp_path: Path) -> None:
    """`crawler profiles listA.txt; crawler profiles listB.txt` write listA.profiles.csv and listB.profiles.csv in
    the current directory, each with its own list's profiles; nothing goes to a shared profiles.csv."""
    (tmp_path / "fast.toml").write_text(FAST_TOML)
    async with simulator(world=WORLD) as sim:
        w = sim.world
        found = users(w, 6)
        a, b = found[:3], found[3:]
        write_list(tmp_path / "lists" / "listA.txt", w, a)
        write_list(tmp_path / "lists" / "listB.txt", w, b)
        for name in ("listA", "listB"):
            code, err, _ = await run(sim, tmp_path, "profiles", f"lists/{name}.txt")
            assert code == 0, err
            assert "another input" not in err and "edited" not in err, err
    assert ids(tmp_path / "listA.profiles.csv") == world_ids(w, a)
    assert ids(tmp_path / "listB.profiles.csv") == world_ids(w, b)
    assert not (tmp_path / "profiles.csv").exists() and not (tmp_path / "lists" / "listA.profiles.csv").exists()


@pytest.mark.slow
async def test_stdin_gets_a_dated_name_and_another_list_piped_the_same_day_is_refused(simulator: SimFactory,
                                                                                       tmp_path: Path) -> None:
    """`-` writes stdin.profiles.DAY.csv (DAY in UTC); piping the same list again that day finds the job done,
    and a list sharing none of its items is exit 2 before any request."""
    (tmp_path / "fast.toml").write_text(FAST_TOML)
    days = {datetime.now(UTC).date().isoformat()}
    async with simulator(world=WORLD) as sim:
        w = sim.world
        found = users(w, 6)
        first = "".join(w.handle(i) + "\n" for i in found[:3]).encode()
        code, err, sent = await run(sim, tmp_path, "profiles", "-", stdin=first)
        assert code == 0 and sent == 3, err
        code, err, sent = await run(sim, tmp_path, "profiles", "-", stdin=first)
        assert code == 0 and sent == 0 and "already complete" in err, err
        other = "".join(w.handle(i) + "\n" for i in found[3:]).encode()
        code, err, sent = await run(sim, tmp_path, "profiles", "-", stdin=other)
    days.add(datetime.now(UTC).date().isoformat())
    written = [p for p in (tmp_path / f"stdin.profiles.{d}.csv" for d in days) if p.exists()]
    assert len(written) == 1 and ids(written[0]) == world_ids(w, found[:3])
    assert code == 2 and sent == 0, err
    line = error_line(err)
    assert "stdin" in line and "shares 0 of its 3 items" in line and "--restart" in line and "--continue" in line


@pytest.mark.slow
async def test_another_list_of_the_same_name_sharing_under_half_is_refused_then_continued(simulator: SimFactory,
                                                                                          tmp_path: Path) -> None:
    """a/list.txt then b/list.txt (both list.profiles.csv here, sharing 1 of 4 items): exit 2 naming both files
    and --restart/--continue with no request sent; with --continue the job goes on, says so, keeps a's rows."""
    (tmp_path / "fast.toml").write_text(FAST_TOML)
    async with simulator(world=WORLD) as sim:
        w = sim.world
        found = users(w, 6)
        a, b = found[:3], [found[2], *found[3:]]
        write_list(tmp_path / "a" / "list.txt", w, a)
        write_list(tmp_path / "b" / "list.txt", w, b)
        code, err, _ = await run(sim, tmp_path, "profiles", "a/list.txt")
        assert code == 0, err
        code, err, sent = await run(sim, tmp_path, "profiles", "b/list.txt")
        assert code == 2 and sent == 0, err
        line = error_line(err)
        assert "list.profiles.csv holds the job of a/list.txt" in line and "b/list.txt shares 1 of its 4" in line
        assert "--restart" in line and "--continue" in line
        assert ids(tmp_path / "list.profiles.csv") == world_ids(w, a)
        code, err, sent = await run(sim, tmp_path, "profiles", "b/list.txt", "--continue")
        assert code == 0 and sent == 3, err
    assert "another input file than the job's: a/list.txt → b/list.txt; its rows stay" in err
    assert "the input was edited" not in err
    assert ids(tmp_path / "list.profiles.csv") == world_ids(w, found)


@pytest.mark.slow
async def test_an_edited_copy_under_a_new_name_goes_on_and_says_so(simulator: SimFactory, tmp_path: Path) -> None:
    """`-o out.csv` with list.txt, then with an edited copy list-v2.txt sharing 3 of its 4 items: the job goes on
    (only the new item fetched), and the summary names both files instead of "the input was edited"."""
    (tmp_path / "fast.toml").write_text(FAST_TOML)
    async with simulator(world=WORLD) as sim:
        w = sim.world
        found = users(w, 5)
        write_list(tmp_path / "list.txt", w, found[:4])
        write_list(tmp_path / "list-v2.txt", w, found[1:])
        code, err, _ = await run(sim, tmp_path, "profiles", "list.txt", "-o", "out.csv")
        assert code == 0, err
        code, err, sent = await run(sim, tmp_path, "profiles", "list-v2.txt", "-o", "out.csv")
    assert code == 0 and sent == 1, err
    assert ("another input file than the job's: list.txt → list-v2.txt; its rows stay (1 new items added, 1 done"
            " items no longer in it)") in err
    assert "the input was edited" not in err
    assert ids(tmp_path / "out.csv") == world_ids(w, found)
