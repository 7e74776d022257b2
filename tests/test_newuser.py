"""The rest of what a new user trips over, from the user's side: --max-pages, estimate's assumptions,
`crawler sim`, messages that point the right way, the Python Client's settings, status/history corners.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from crawler.api.client import Client
from crawler.sim.data import World, WorldConfig
from tests.conftest import KEY, SimFactory
from tests.test_cli import FAST_TOML, crawler, environ, error_line, public_users, read_csv

WORLD = WorldConfig(seed=11, users=1_000)
RUN = ["--config", "fast.toml", "--data-dir", "d"]
ROOT = Path(__file__).resolve().parent.parent


def setup(tmp: Path, lines: list[str]) -> None:
    (tmp / "in.txt").write_text("\n".join(lines) + "\n")
    (tmp / "fast.toml").write_text(FAST_TOML)


@pytest.mark.slow
async def test_max_pages_truncation_is_a_failure_row_and_a_summary_line(simulator: SimFactory,
                                                                        tmp_path: Path) -> None:
    """`posts --max-pages 1 --page-size 5`: exit 3, a pagination_guard row per cut walk, the summary says so."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        long = public_users(w, 2, min_videos=12, max_videos=60)
        short = public_users(w, 1, min_videos=1, max_videos=4)
        setup(tmp_path, [w.handle(i) for i in long + short])
        code, _, err = await crawler(["posts", "in.txt", "-o", "out.csv", "--max-pages", "1", "--page-size", "5",
                                      *RUN], environ(sim), tmp_path)
    assert code == 3, err
    assert "2 walks stopped at the --max-pages cap of 1" in err
    failures = {r["input"]: (r["reason"], r["detail"]) for r in read_csv(tmp_path / "out.failures.csv")}
    assert set(failures) == {w.handle(i) for i in long}
    assert all(reason == "pagination_guard" and "--max-pages" in detail for reason, detail in failures.values())
    rows = [r["source_handle"] for r in read_csv(tmp_path / "out.csv")]
    assert sorted(rows.count(w.handle(i)) for i in long) == [5, 5]
    assert rows.count(w.handle(short[0])) == len(list(w.posts(short[0])))


@pytest.mark.slow
async def test_estimate_prints_its_assumptions_and_advice_for_the_command(simulator: SimFactory,
                                                                          tmp_path: Path) -> None:
    """`estimate followers` names the list cap, private accounts and page size; `estimate liked` after profiles
    does not advise running profiles (it cannot learn liked counts)."""
    async with simulator(world=WORLD) as sim:
        setup(tmp_path, [sim.world.handle(i) for i in public_users(sim.world, 3)])
        code, out, err = await crawler(["estimate", "followers", "in.txt", *RUN], environ(sim), tmp_path)
        assert code == 0, err
        assert "5,000" in out and "private account costs one request" in out and re.search(r"\d+ rows per page", out)
        assert "`crawler profiles`" in out
        code, _, err = await crawler(["profiles", "in.txt", "-o", "p.csv", "-q", *RUN], environ(sim), tmp_path)
        assert code == 0, err
        code, out, err = await crawler(["estimate", "liked", "in.txt", *RUN], environ(sim), tmp_path)
        assert code == 0, err
        assert "crawler profiles" not in out and "--max-pages" in out
        assert sim.stats.requests == 3  # only the profiles run asked the API


@pytest.mark.slow
async def test_crawler_sim_takes_its_options_and_names_handles_that_exist() -> None:
    """`crawler sim --help` exits 0 with its options; `crawler sim --port 0` prints its URL and real handles."""
    code, out = await asyncio.wait_for(_run(["sim", "--help"]), 30)
    assert code == 0 and "--port" in out and "usage: crawler sim" in out

    sim = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler", "sim", "--port", "0", "--users", "300", "--seed", "5", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE)
    try:
        assert sim.stdout is not None
        first = (await asyncio.wait_for(sim.stdout.readline(), 30)).decode()
        assert re.fullmatch(r"Simulator listening on http://127\.0\.0\.1:\d+\n", first), first
        hint = ""
        for _ in range(3):  # the media host's line may come first
            hint = (await asyncio.wait_for(sim.stdout.readline(), 30)).decode()
            if "handles that exist" in hint:
                break
        named = re.search(r"handles that exist: ([^;]+);", hint)
        assert named, hint
        world = World(WorldConfig(seed=5, users=300))
        for handle in named.group(1).split(", "):
            i = world.index_by_handle(handle)
            assert i is not None and not world.is_missing(i) and not world.is_private(i), handle
        sim.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(sim.wait(), 30) == 0
    finally:
        if sim.returncode is None:
            sim.kill()
            await sim.wait()


async def _run(args: list[str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["output under a file", "output where nothing can be created", "input directory",
                                  "unknown endpoint", "unknown column"])
async def test_messages_say_what_is_wrong_and_leave_nothing_behind(simulator: SimFactory, tmp_path: Path,
                                                                   case: str) -> None:
    """Each mistake: exit 2, one line naming the real problem, no request, no file left behind."""
    args, words = {
        "output under a file": (["profiles", "in.txt", "-o", "in.txt/p.csv"], ["in.txt is a file, not a directory"]),
        "output where nothing can be created": (["profiles", "in.txt", "-o", "/proc/crawler-issue-11.csv"],
                                                ["cannot create files in /proc"]),
        "input directory": (["profiles", "sub", "-o", "p.csv"], ["input sub is a directory"]),
        "unknown endpoint": (["get", "bogus-endpoint"], ["not a known API endpoint", "userinfo-by-username"]),
        "unknown column": (["profiles", "in.txt", "--column", "nosuch", "-o", "p.csv"], ["--column nosuch"]),
    }[case]
    async with simulator(world=WORLD) as sim:
        setup(tmp_path, ["somebody"])
        (tmp_path / "sub").mkdir()
        code, _, err = await crawler([*args, "--config", "fast.toml"], environ(sim), tmp_path)
        assert sim.stats.requests == 0
    line = error_line(err)
    assert code == 2, err
    assert all(w in line for w in words), line
    assert {p.name for p in tmp_path.iterdir()} == {"in.txt", "fast.toml", "sub"}
    assert not any(Path("/proc").glob("crawler-issue-11*"))


@pytest.mark.slow
async def test_help_points_to_a_docs_section_that_exists() -> None:
    """Every job command's help names docs/jobs.md's Settings section, and that page has it."""
    code, out = await asyncio.wait_for(_run(["profiles", "--help"]), 30)
    assert code == 0 and "Settings section of docs/jobs.md" in out and "CONTRACT" not in out
    assert "\n## Settings\n" in (ROOT / "docs" / "jobs.md").read_text()


async def test_python_client_reads_settings_like_the_cli(simulator: SimFactory, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`Client()` honours TIKLIVE_BASE_URL and ./config.toml (so a notebook never calls the real host); an
    argument overrides them."""
    async with simulator(world=WORLD) as sim:
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("CRAWLER_CONFIG", raising=False)
        monkeypatch.setenv("TIKLIVE_BASE_URL", sim.url)
        monkeypatch.setenv("TIKLIVE_API_KEY", KEY)
        (tmp_path / "config.toml").write_text("[retry]\nattempts = 2\n[rate]\nenabled = false\n")
        async with Client() as client:
            assert client.base_url == sim.url and client.options.retry.attempts == 2
            regions = await client.regions()
        assert regions and sim.stats.requests == 1
        assert Client(base_url="http://127.0.0.1:9").base_url == "http://127.0.0.1:9"
        monkeypatch.delenv("TIKLIVE_BASE_URL")
        (tmp_path / "config.toml").write_text(f'[api]\nbase_url = "{sim.url}"\n')
        assert Client().base_url == sim.url


@pytest.mark.slow
async def test_status_takes_the_part_path_the_summary_printed(simulator: SimFactory, tmp_path: Path) -> None:
    """After a stopped run, `status OUT.csv.part` (the path it printed) shows the job."""
    async with simulator(world=WORLD) as sim:
        setup(tmp_path, [sim.world.handle(i) for i in public_users(sim.world, 4)])
        code, _, err = await crawler(["profiles", "in.txt", "-o", "out.csv", "--max-credits", "2",
                                      "--parallelism", "1", *RUN], environ(sim), tmp_path)
        assert code == 4 and "out.csv.part" in err, err
        code, out, err = await crawler(["status", "out.csv.part"], environ(sim), tmp_path)
    assert code == 0, err
    assert "profiles -> out.csv.part (unfinished)" in out and "2 done" in out


@pytest.mark.slow
async def test_history_plot_draws_known_handles_and_queries_never_create_a_store(simulator: SimFactory,
                                                                                 tmp_path: Path) -> None:
    """`history growth` on no store: exit 2, nothing created; `history plot a b nosuch`: a PNG of a and b, one
    line naming @nosuch."""
    async with simulator(world=WORLD) as sim:
        names = [sim.world.handle(i) for i in public_users(sim.world, 2)]
        setup(tmp_path, names)
        code, _, err = await crawler(["history", "growth", names[0], "--data-dir", "d"], environ(sim), tmp_path)
        assert code == 2 and "no history at" in error_line(err)
        assert not (tmp_path / "d").exists()
        code, _, err = await crawler(["ingest", "in.txt", "--out-dir", "daily", "-q", *RUN], environ(sim), tmp_path)
        assert code == 0, err
        code, _, err = await crawler(["history", "plot", "@" + names[0], names[1], "nosuch", "-o", "g.png",
                                      "--data-dir", "d"], environ(sim), tmp_path)
    assert code == 0, err
    assert "no history for @nosuch: drawing the others" in err
    assert f"@{names[0]}" in err and f"@{names[1]}" in err
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_environment_leaks_between_tests() -> None:
    """Guard: the tests above restore the environment they changed (monkeypatch)."""
    assert os.environ.get("TIKLIVE_BASE_URL", "") != "http://127.0.0.1:9"
