"""The real command line (`python -m crawler` in a subprocess) against the simulator on loopback: exit codes,
one-line errors, settings precedence, CSV bytes, signals, estimate and `get`.

The simulator runs in this process, so its server-side counters are read directly.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from crawler.sim.data import World, WorldConfig
from crawler.sim.server import Simulator
from tests.conftest import KEY, SimFactory, answer_at_once

pytestmark = pytest.mark.slow  # every test here starts processes

WORLD = WorldConfig(seed=11, users=1_000)
# No pacing and no retry waits: the simulator's limits are raised by the fixture.
FAST_TOML = "[rate]\nenabled = false\n[retry]\nbase_delay = 0\nmax_delay = 0\n"
FORMULA = ("=", "+", "-", "@", "\t", "\r")


async def crawler(args: list[str], env: dict[str, str], cwd: Path, *, stdin: bytes | None = None
                  ) -> tuple[int, str, str]:
    """Run `python -m crawler ARGS`; return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler", *args, cwd=cwd, env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def environ(sim: Simulator | None, *, key: str | None = KEY, base_url: str | None = None) -> dict[str, str]:
    """A clean environment: no inherited crawler settings, the key and the simulator's URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRAWLER_", "TIKLIVE_"))}
    if key is not None:
        env["TIKLIVE_API_KEY"] = key
    url = base_url or (sim.url if sim is not None else None)
    if url is not None:
        env["TIKLIVE_BASE_URL"] = url
    return env


def error_line(err: str) -> str:
    """The one line a failed run ends with; no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "a non-zero exit must say why"
    assert lines[-1].startswith("crawler: "), err
    return lines[-1]


def neutral(text: str | None) -> str:
    """The CSV cell CONTRACT.md promises for a text value."""
    if text is None:
        return ""
    return "'" + text if text.startswith(FORMULA) else text


def read_csv(path: Path) -> list[dict[str, str]]:
    """All rows of a CSV file (a BOM, if any, is not part of the first column's name)."""
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def public_users(w: World, n: int, *, max_videos: int = 60, min_videos: int = 1) -> list[int]:
    """n public users with a small number of posts."""
    found: list[int] = []
    for i in range(w.config.users):
        u = w.user(i)
        if u is not None and not u.private and min_videos <= u.videos <= max_videos:
            found.append(i)
            if len(found) == n:
                return found
    raise AssertionError("too few matching users in the test world")


def post_keys(w: World, users: Iterable[int]) -> set[tuple[str, str]]:
    """(source_handle, video_id) of every post of these users (the input being their handles)."""
    return {(w.handle(i), p.video_id) for i in users for p in w.posts(i)}


def written_posts(path: Path) -> list[tuple[str, str]]:
    """(source_handle, video_id) of every row of a posts CSV."""
    return [(r["source_handle"], r["video_id"]) for r in read_csv(path)]


def setup_dir(tmp: Path, lines: list[str], files: dict[str, str] | None = None) -> None:
    """in.txt with these lines, fast.toml, and any other files (name -> text)."""
    (tmp / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp / "fast.toml").write_text(FAST_TOML)
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)


# --- 0 and 3 ---

async def test_exit_0_when_every_item_succeeds_reading_stdin(simulator: SimFactory, tmp_path: Path) -> None:
    """A job whose items all succeed exits 0, reads `-` as stdin and renames OUT.csv.part to OUT.csv."""
    async with simulator(world=WORLD) as sim:
        users = public_users(sim.world, 6)
        setup_dir(tmp_path, [])
        stdin = ("\n".join("@" + sim.world.handle(i).upper() for i in users) + "\n").encode()
        code, _, err = await crawler(["posts", "-", "-o", "out.csv", "--config", "fast.toml", "--data-dir", "d"],
                                     environ(sim), tmp_path, stdin=stdin)
        assert code == 0, err
        assert "Traceback" not in err
        rows = written_posts(tmp_path / "out.csv")
        assert len(rows) == len(set(rows)) and set(rows) == post_keys(sim.world, users)
        assert not (tmp_path / "out.csv.part").exists()
        assert not (tmp_path / "out.failures.csv").exists()


async def test_exit_3_when_some_items_fail(simulator: SimFactory, tmp_path: Path) -> None:
    """Failed items give exit 3, one line naming the failures file, and each failure in it with its reason."""
    async with simulator(world=WORLD) as sim:
        users = public_users(sim.world, 4)
        setup_dir(tmp_path, [sim.world.handle(i) for i in users] + ["ghost_account_404", "not a handle!"])
        code, _, err = await crawler(["profiles", "in.txt", "-o", "out.csv", "-q", "--config", "fast.toml",
                                      "--data-dir", "d"], environ(sim), tmp_path)
        assert code == 3, err
        line = error_line(err)
        assert "2 items failed" in line and "out.failures.csv" in line
        assert len(err.strip().splitlines()) == 1
        failures = {r["input"]: r["reason"] for r in read_csv(tmp_path / "out.failures.csv")}
        assert failures == {"ghost_account_404": "not_found", "not a handle!": "invalid_input"}
        assert {r["user_id"] for r in read_csv(tmp_path / "out.csv")} == {sim.world.user_id(i) for i in users}


# --- 2: usage and configuration errors, before any request ---

BAD = "bad.toml"
# case -> (arguments after `posts`, files to write, words the error line must contain)
USAGE_ERRORS: dict[str, tuple[list[str], dict[str, str], list[str]]] = {
    "bad flag": (["in.txt", "--no-such-flag"], {}, ["--no-such-flag"]),
    "missing key": (["in.txt"], {}, ["TIKLIVE_API_KEY"]),
    "missing input file": (["nope.txt"], {}, ["nope.txt"]),
    "zero parallelism flag": (["in.txt", "--parallelism", "0"], {}, ["--parallelism", "crawl.parallelism"]),
    "unknown key": (["in.txt", "--config", BAD], {BAD: "[crawl]\nparalelism = 3\n"}, ["crawl.paralelism", BAD]),
    "malformed toml": (["in.txt", "--config", BAD], {BAD: "[crawl\nparallelism = 3\n"}, [BAD, "TOML"]),
    "negative rate": (["in.txt", "--config", BAD], {BAD: "[rate]\nlimit = -5\n"}, ["rate.limit", BAD]),
    "zero parallelism": (["in.txt", "--config", BAD], {BAD: "[crawl]\nparallelism = 0\n"},
                         ["crawl.parallelism", BAD]),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
async def test_usage_and_config_errors_exit_2_with_one_line_before_any_request(
        simulator: SimFactory, tmp_path: Path, case: str) -> None:
    """Bad flags, a missing key or input file and invalid config values exit 2 with one line naming the culprit."""
    rest, files, words = USAGE_ERRORS[case]
    async with simulator(world=WORLD) as sim:
        setup_dir(tmp_path, [sim.world.handle(i) for i in public_users(sim.world, 2)], files)
        args = ["posts", *rest, "-o", "out.csv", "--data-dir", "d"]
        code, _, err = await crawler(args, environ(sim, key=None if case == "missing key" else KEY), tmp_path)
        assert code == 2, err
        line = error_line(err)
        assert len(err.strip().splitlines()) == 1, err
        for word in words:
            assert word in line
        assert sim.stats.requests == 0
        assert not (tmp_path / "out.csv").exists()


# --- 1 ---

async def test_exit_1_when_the_api_rejects_the_key(simulator: SimFactory, tmp_path: Path) -> None:
    """An unknown key is answered by the API and ends the run with exit 1 and one line; nothing is billed."""
    async with simulator(world=WORLD) as sim:
        setup_dir(tmp_path, [sim.world.handle(i) for i in public_users(sim.world, 3)])
        code, _, err = await crawler(["posts", "in.txt", "-o", "out.csv", "-q", "--config", "fast.toml",
                                      "--data-dir", "d"], environ(sim, key="not-a-key"), tmp_path)
        assert code == 1, err
        assert "TIKLIVE_API_KEY" in error_line(err)
        assert sim.stats.requests >= 1
        assert sum(sim.stats.billed.values()) == 0


async def test_exit_1_on_a_permanent_429_stall(simulator: SimFactory, tmp_path: Path) -> None:
    """A server answering only 429 ends the run after retry.stall_limit with exit 1 and one line."""
    async with simulator(world=WORLD, always_429=True, retry_after=0.05) as sim:
        setup_dir(tmp_path, [sim.world.handle(i) for i in public_users(sim.world, 3)],
                  {"stall.toml": FAST_TOML + "stall_limit = 1.0\n"})
        code, _, err = await crawler(["posts", "in.txt", "-o", "out.csv", "-q", "--config", "stall.toml",
                                      "--data-dir", "d"], environ(sim), tmp_path)
        assert code == 1, err
        assert "429" in error_line(err)
        assert sim.stats.served_429 >= 2
        assert sum(sim.stats.billed.values()) == 0


# --- 4 ---

async def test_exit_4_at_max_credits_counted_on_the_server_then_a_larger_budget_completes(
        simulator: SimFactory, tmp_path: Path) -> None:
    """--max-credits 7: the server receives at most 7 requests, exit 4 with a resume line; 1000 completes exactly."""
    async with simulator(world=WORLD) as sim:
        users = public_users(sim.world, 8, min_videos=31)
        setup_dir(tmp_path, [sim.world.handle(i) for i in users])
        base = ["posts", "in.txt", "-o", "out.csv", "-q", "--config", "fast.toml", "--data-dir", "d",
                "--parallelism", "3"]
        code, _, err = await crawler([*base, "--max-credits", "7"], environ(sim), tmp_path)
        assert code == 4, err
        line = error_line(err)  # the same cap would stop again at once: the printed command raises it
        assert "raise the cap: crawler posts in.txt" in line and line.endswith("--max-credits 14")
        assert 0 < sim.stats.requests <= 7
        assert (tmp_path / "out.csv.part").exists() and not (tmp_path / "out.csv").exists()

        code, _, err = await crawler([*base, "--max-credits", "1000"], environ(sim), tmp_path)
        assert code == 0, err
        rows = written_posts(tmp_path / "out.csv")
        assert len(rows) == len(set(rows)) and set(rows) == post_keys(sim.world, users)
        code, out, _ = await crawler(["status", "out.csv"], environ(sim), tmp_path)
        assert code == 0
        assert f"requests_sent   {sim.stats.requests:,}" in out  # the job counted every request the server saw


async def test_the_region_lookup_is_counted_in_requests_sent_and_under_max_credits(simulator: SimFactory,
                                                                                  tmp_path: Path) -> None:
    """`search-videos --region` with --max-credits 3 and no region list cached: the server receives 3 requests in
    all, the region lookup included (exit 4), and the job's requests_sent is the server's count, then too after a
    larger budget completes it."""
    async with simulator(world=WORLD) as sim:
        region = max(sorted(sim.world.regions()), key=lambda r: len(sim.world.search_videos("dance", region=r)))
        assert len(sim.world.search_videos("dance", region=region)) >= 6, "the search needs 3 pages of 2"
        setup_dir(tmp_path, [])
        base = ["search-videos", "dance", "-o", "out.csv", "-q", "--config", "fast.toml", "--data-dir", "d",
                "--parallelism", "1", "--page-size", "2", "--region", region]
        code, _, err = await crawler([*base, "--max-credits", "3"], environ(sim), tmp_path)
        assert code == 4, err
        assert sim.stats.requests == 3 and sim.stats.by_endpoint["/region-list"] == 1
        code, out, _ = await crawler(["status", "out.csv"], environ(sim), tmp_path)
        assert code == 0 and f"requests_sent   {sim.stats.requests:,}" in out, out
        code, _, err = await crawler([*base, "--max-credits", "1000"], environ(sim), tmp_path)
        assert code == 0, err
        code, out, _ = await crawler(["status", "out.csv"], environ(sim), tmp_path)
        assert code == 0 and f"requests_sent   {sim.stats.requests:,}" in out, out


async def test_exit_4_when_the_balance_is_empty(simulator: SimFactory, tmp_path: Path) -> None:
    """A key with 5 credits: five billed answers, then exit 4 with one line saying to top up and how to resume."""
    async with simulator(world=WORLD, keys={"small": 5}) as sim:
        setup_dir(tmp_path, [sim.world.handle(i) for i in public_users(sim.world, 8)])
        code, _, err = await crawler(["posts", "in.txt", "-o", "out.csv", "-q", "--config", "fast.toml",
                                      "--data-dir", "d"], environ(sim, key="small"), tmp_path)
        assert code == 4, err
        line = error_line(err)
        assert "top up" in line and "resume with: crawler posts in.txt" in line
        assert sim.stats.billed["small"] == 5
        assert (tmp_path / "out.csv.part").exists() and not (tmp_path / "out.csv").exists()


# --- 130 / 143 ---

async def started(args: list[str], sim: Simulator, cwd: Path) -> asyncio.subprocess.Process:
    """`python -m crawler ARGS` running against the simulator, its stderr piped (for a test to signal it)."""
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=cwd, env=environ(sim),
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)


async def _wait_for(predicate: Callable[[], bool], proc: asyncio.subprocess.Process, what: str) -> None:
    """Poll a condition (bounded) while the crawler runs."""
    for _ in range(3_000):
        if predicate() or proc.returncode is not None:
            break
        await asyncio.sleep(0.01)
    assert predicate(), f"the crawler never reached: {what}"


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_a_signal_stops_cleanly_and_the_printed_resume_command_completes(
        simulator: SimFactory, tmp_path: Path, sig: signal.Signals, code: int) -> None:
    """SIGINT/SIGTERM against a slow API: exit 130/143, the last line gives the command that then completes exactly."""
    async with simulator(world=WORLD, latency=(0.5, 0.5)) as sim:
        users = public_users(sim.world, 6)
        setup_dir(tmp_path, [sim.world.handle(i) for i in users])
        args = ["profiles", "in.txt", "-o", "out.csv", "--config", "fast.toml", "--data-dir", "d",
                "--parallelism", "2"]
        proc = await started(args, sim, tmp_path)
        # A worker asks for its next item only after committing its last: 3 requests mean a committed row.
        await _wait_for(lambda: sim.stats.requests >= 3, proc, "a committed row")
        proc.send_signal(sig)
        _, raw_err = await asyncio.wait_for(proc.communicate(), timeout=30)
        err = raw_err.decode()
        assert proc.returncode == code, err
        line = error_line(err)
        assert sig.name in line
        assert not (tmp_path / "out.csv").exists()
        assert len(read_csv(tmp_path / "out.csv.part")) >= 1  # what was complete was kept
        assert sim.stats.requests < len(users)  # it stopped, not finished

        hint = shlex.split(line.split("resume with: ", 1)[1])
        assert hint[0] == "crawler" and hint[1:] == args
        answer_at_once(sim)
        again, _, err2 = await crawler(hint[1:], environ(sim), tmp_path)
        assert again == 0, err2
    rows = [r["user_id"] for r in read_csv(tmp_path / "out.csv")]
    assert len(rows) == len(set(rows)) and set(rows) == {sim.world.user_id(i) for i in users}


def summary_count(err: str, name: str) -> int:
    """A job counter from the end-of-run summary (the job's, across runs)."""
    match = re.search(rf"{name}\s+([\d,]+)", err)
    assert match, err
    return int(match.group(1).replace(",", ""))


async def test_a_first_signal_lets_the_requests_in_flight_be_answered_and_written(
        simulator: SimFactory, tmp_path: Path) -> None:
    """SIGTERM while four requests are out: they are paid for, so they are answered and their rows committed before
    exit 143; nothing else is sent. The job's two counters equal what the simulator saw and billed, and the .part
    file holds a row for every request sent (none is fetched again on resume)."""
    async with simulator(world=WORLD, latency=(1.0, 1.0)) as sim:
        users = public_users(sim.world, 12)
        setup_dir(tmp_path, [sim.world.handle(i) for i in users])
        args = ["profiles", "in.txt", "-o", "out.csv", "--config", "fast.toml", "--data-dir", "d",
                "--parallelism", "4"]
        proc = await started(args, sim, tmp_path)
        await _wait_for(lambda: sim.stats.requests >= 6, proc, "a second round of requests out")
        proc.send_signal(signal.SIGTERM)
        _, raw_err = await asyncio.wait_for(proc.communicate(), timeout=30)
        err = raw_err.decode()
        sent, billed = sim.stats.requests, sum(sim.stats.billed.values())
    assert proc.returncode == 143, err
    assert "SIGTERM" in error_line(err)
    assert sent < len(users)  # it stopped, not finished
    assert summary_count(err, "requests_sent") == sent
    assert summary_count(err, "credits_billed") == billed
    assert len(read_csv(tmp_path / "out.csv.part")) == billed == sent  # every request out was answered and kept
    assert "waiting for the" in err and "requests already sent" in err  # it said why the stop takes a moment


async def test_after_a_first_signal_no_walk_asks_for_another_page(simulator: SimFactory, tmp_path: Path) -> None:
    """Posts walks of many pages, SIGTERM mid-walk: the requests under way are answered and committed, and not one
    more leaves (a drained worker's next page is refused): the simulator sees at most the requests the crawler said
    it waits for, both counters equal the simulator's, and the resume completes every walk exactly once."""
    async with simulator(world=WORLD, latency=(1.0, 1.0)) as sim:
        users = public_users(sim.world, 6, min_videos=40, max_videos=60)
        setup_dir(tmp_path, [sim.world.handle(i) for i in users])
        args = ["posts", "in.txt", "-o", "out.csv", "--config", "fast.toml", "--data-dir", "d",
                "--parallelism", "4", "--page-size", "5"]
        proc = await started(args, sim, tmp_path)
        await _wait_for(lambda: sim.stats.requests >= 10, proc, "walks a few pages in")
        before = sim.stats.requests
        proc.send_signal(signal.SIGTERM)
        _, raw_err = await asyncio.wait_for(proc.communicate(), timeout=60)
        err = raw_err.decode()
        after, billed = sim.stats.requests, sum(sim.stats.billed.values())
        assert proc.returncode == 143, err
        waited = re.search(r"waiting for the (\d+) requests already sent", err)
        assert waited, err
        assert after - before <= int(waited.group(1))  # only what was under way at the signal
        assert summary_count(err, "requests_sent") == after
        assert summary_count(err, "credits_billed") == billed
        answer_at_once(sim)
        again, _, err2 = await crawler(args, environ(sim), tmp_path)
        assert again == 0, err2
    assert sorted(written_posts(tmp_path / "out.csv")) == sorted(post_keys(sim.world, users))


async def test_a_second_signal_stops_at_once_without_the_answers_in_flight(simulator: SimFactory,
                                                                          tmp_path: Path) -> None:
    """SIGTERM while four slow requests are out, then SIGTERM again once the crawler says it is waiting for them: it
    exits 143 without their answers (no row for them) and the resume command still completes exactly."""
    async with simulator(world=WORLD, latency=(5.0, 5.0)) as sim:
        users = public_users(sim.world, 6)
        setup_dir(tmp_path, [sim.world.handle(i) for i in users])
        args = ["profiles", "in.txt", "-o", "out.csv", "--config", "fast.toml", "--data-dir", "d",
                "--parallelism", "4"]
        proc = await started(args, sim, tmp_path)
        assert proc.stderr is not None
        await _wait_for(lambda: sim.stats.requests >= 4, proc, "four requests out")
        proc.send_signal(signal.SIGTERM)
        said = b""
        while b"requests already sent" not in said:
            line = await asyncio.wait_for(proc.stderr.readline(), timeout=30)
            assert line, "the crawler ended without saying it waits for the requests in flight"
            said += line
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), timeout=30)
        await asyncio.wait_for(proc.wait(), timeout=30)
        err = (said + rest).decode()
        sent = sim.stats.requests
        assert proc.returncode == 143, err
        assert "SIGTERM" in error_line(err)
        assert len(read_csv(tmp_path / "out.csv.part")) == 0 < sent  # the answers in flight were not waited for
        answer_at_once(sim)
        again, _, err2 = await crawler(args, environ(sim), tmp_path)
        assert again == 0, err2
    rows = [r["user_id"] for r in read_csv(tmp_path / "out.csv")]
    assert len(rows) == len(set(rows)) and set(rows) == {sim.world.user_id(i) for i in users}


async def test_ctrl_c_while_the_input_is_read_stops_before_any_request(simulator: SimFactory,
                                                                       tmp_path: Path) -> None:
    """SIGINT while a long input is being stored exits 130 with a resume line and no request; resuming completes."""
    async with simulator(world=WORLD) as sim:
        users = public_users(sim.world, 10)
        handles = [sim.world.handle(i) for i in users]
        setup_dir(tmp_path, [handles[n % len(handles)] for n in range(60_000)])  # long, but ten items
        args = ["profiles", "in.txt", "-o", "out.csv", "-q", "--config", "fast.toml", "--data-dir", "d"]
        proc = await started(args, sim, tmp_path)
        state = tmp_path / "out.csv.state.db"
        await _wait_for(state.exists, proc, "the start of ingestion")
        proc.send_signal(signal.SIGINT)
        _, raw_err = await asyncio.wait_for(proc.communicate(), timeout=60)
        err = raw_err.decode()
        assert proc.returncode == 130, err
        assert "resume with: crawler profiles in.txt" in error_line(err)
        assert sim.stats.requests == 0
        code, _, err = await crawler(args, environ(sim), tmp_path)
        assert code == 0, err
    assert sorted(r["user_id"] for r in read_csv(tmp_path / "out.csv")) == sorted(map(sim.world.user_id, users))


# --- settings precedence ---

async def test_settings_precedence_flag_over_env_over_config(simulator: SimFactory, tmp_path: Path) -> None:
    """config.toml's parallelism is the one used and a flag beats it; TIKLIVE_BASE_URL beats the config's URL,
    --base-url beats the environment."""
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    async with simulator(world=WORLD) as sim:
        users = public_users(sim.world, 8)
        config = FAST_TOML + f'[api]\nbase_url = "{dead}"\n[crawl]\nparallelism = 3\n'
        setup_dir(tmp_path, [sim.world.handle(i) for i in users], {"config.toml": config})
        # ./config.toml is read by default; the environment's URL beats it.
        code, _, err = await crawler(["profiles", "in.txt", "-o", "a.csv", "--data-dir", "d"], environ(sim),
                                     tmp_path)
        assert code == 0, err
        assert re.search(r"^\s*parallelism\s+3$", err, re.MULTILINE), err
        # Flags beat both the environment (a dead URL now) and the file.
        code, _, err = await crawler(["profiles", "in.txt", "-o", "b.csv", "--data-dir", "d", "--parallelism", "5",
                                      "--base-url", sim.url], environ(sim, base_url=dead), tmp_path)
        assert code == 0, err
        assert re.search(r"^\s*parallelism\s+5$", err, re.MULTILINE), err
        assert len(read_csv(tmp_path / "b.csv")) == len(users)


# --- CSV bytes ---

async def test_formula_cells_are_neutralised_unless_raw_and_bom_ids_and_line_ends(simulator: SimFactory,
                                                                                tmp_path: Path) -> None:
    """Titles starting with = + - @ get a leading ' unless --raw; --bom writes a BOM; ids are full text; \\n ends."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        users: list[int] = []
        for i in public_users(w, 200):
            users.append(i)
            if sum(1 for j in users for p in w.posts(j) if (p.title or "").startswith(FORMULA)) >= 4:
                break
        posts = {p.video_id: p for j in users for p in w.posts(j)}
        assert {(p.title or " ")[0] for p in posts.values()} & set("=+-@"), "the case needs formula-like titles"
        setup_dir(tmp_path, [w.handle(i) for i in users])
        base = ["posts", "in.txt", "--config", "fast.toml", "--data-dir", "d", "-q"]
        code, _, err = await crawler([*base, "-o", "plain.csv", "--bom"], environ(sim), tmp_path)
        assert code == 0, err
        code, _, err = await crawler([*base, "-o", "raw.csv", "--raw"], environ(sim), tmp_path)
        assert code == 0, err

    plain, raw = (tmp_path / "plain.csv").read_bytes(), (tmp_path / "raw.csv").read_bytes()
    assert plain.startswith(b"\xef\xbb\xbfvideo_id,") and raw.startswith(b"video_id,")
    for data in (plain, raw):
        assert b"\r" not in data and data.endswith(b"\n")
        for vid in posts:
            assert b"\n" + vid.encode() + b"," in data  # the id as 19 digits at a row start, not 7.0E+18
    for name, expect in (("plain.csv", neutral), ("raw.csv", lambda t: t or "")):
        rows = read_csv(tmp_path / name)
        assert len(rows) == len(posts)
        for row in rows:
            assert re.fullmatch(r"\d{19}", row["video_id"])
            assert row["title"] == expect(posts[row["video_id"]].title)


# --- estimate and get ---

def _expected_credits(err_or_out: str) -> tuple[bool, int]:
    m = re.search(r"expected credits_billed: (at least )?([\d,]+)", err_or_out)
    assert m, err_or_out
    return bool(m.group(1)), int(m.group(2).replace(",", ""))


async def test_estimate_is_a_lower_bound_then_exact_once_profiles_are_known(simulator: SimFactory,
                                                                           tmp_path: Path) -> None:
    """`estimate posts` says at least 2 credits a handle; after `profiles` exactly what the posts run bills."""
    async with simulator(world=WORLD) as sim:
        users = public_users(sim.world, 10, max_videos=100)
        setup_dir(tmp_path, [sim.world.handle(i) for i in users] + ["not a handle!"])
        common = ["--config", "fast.toml", "--data-dir", "d"]
        code, out, err = await crawler(["estimate", "posts", "in.txt", *common], environ(sim), tmp_path)
        assert code == 0, err
        assert _expected_credits(out) == (True, 2 * len(users))
        assert sim.stats.requests == 0  # estimating costs nothing

        code, _, err = await crawler(["profiles", "in.txt", "-o", "profiles.csv", "-q", *common], environ(sim),
                                     tmp_path)
        assert code == 3, err
        code, out, err = await crawler(["estimate", "posts", "in.txt", *common], environ(sim), tmp_path)
        assert code == 0, err
        bounded, credits = _expected_credits(out)
        assert not bounded

        before = sum(sim.stats.billed.values())
        code, _, err = await crawler(["posts", "in.txt", "-o", "posts.csv", "-q", *common], environ(sim), tmp_path)
        assert code == 3, err
        assert sum(sim.stats.billed.values()) - before == credits


async def test_estimate_after_profiles_is_exact_for_a_private_account(simulator: SimFactory, tmp_path: Path) -> None:
    """After `profiles`, `estimate posts` for a private account with many videos predicts its one billed answer."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        private = next(i for i in range(w.config.users)
                       if not w.is_missing(i) and w.is_private(i) and w.user(i).videos > 60)  # type: ignore[union-attr]
        setup_dir(tmp_path, [w.handle(private)])
        common = ["--config", "fast.toml", "--data-dir", "d"]
        code, _, err = await crawler(["profiles", "in.txt", "-o", "profiles.csv", "-q", *common], environ(sim),
                                     tmp_path)
        assert code == 0, err
        code, out, err = await crawler(["estimate", "posts", "in.txt", *common], environ(sim), tmp_path)
        assert code == 0, err
        _, credits = _expected_credits(out)
        before = sum(sim.stats.billed.values())
        code, _, err = await crawler(["posts", "in.txt", "-o", "posts.csv", "-q", *common], environ(sim), tmp_path)
        assert code == 3, err  # the private account is a failure with reason private
        assert sum(sim.stats.billed.values()) - before == 1
        assert credits == 1


async def test_estimate_honours_max_items(simulator: SimFactory, tmp_path: Path) -> None:
    """After `profiles`, `estimate posts --max-items 5` predicts the one page a user `posts --max-items 5` pays."""
    async with simulator(world=WORLD) as sim:
        users = public_users(sim.world, 5, min_videos=31, max_videos=90)
        setup_dir(tmp_path, [sim.world.handle(i) for i in users])
        common = ["--config", "fast.toml", "--data-dir", "d", "--max-items", "5"]
        code, _, err = await crawler(["profiles", "in.txt", "-o", "profiles.csv", "-q", "--config", "fast.toml",
                                      "--data-dir", "d"], environ(sim), tmp_path)
        assert code == 0, err
        code, out, err = await crawler(["estimate", "posts", "in.txt", *common], environ(sim), tmp_path)
        assert code == 0, err
        _, credits = _expected_credits(out)
        before = sum(sim.stats.billed.values())
        code, _, err = await crawler(["posts", "in.txt", "-o", "posts.csv", "-q", *common], environ(sim), tmp_path)
        assert code == 0, err
        assert sum(sim.stats.billed.values()) - before == len(users)
        assert credits == len(users)


async def test_get_prints_the_raw_json_and_says_it_costs_one_credit(simulator: SimFactory, tmp_path: Path) -> None:
    """`crawler get userinfo-by-username username=X` prints the API's JSON, says "1 credit" and sends one request."""
    async with simulator(world=WORLD) as sim:
        i = public_users(sim.world, 1)[0]
        setup_dir(tmp_path, [])
        code, out, err = await crawler(["get", "userinfo-by-username", f"username={sim.world.handle(i)}",
                                        "--config", "fast.toml"], environ(sim), tmp_path)
        assert code == 0, err
        assert "1 credit" in err
        body = json.loads(out)
        assert body["user"]["id"] == sim.world.user_id(i)
        assert body["user"]["uniqueId"] == sim.world.handle(i)
        assert sim.stats.requests == 1 and sim.stats.by_endpoint["/userinfo-by-username"] == 1


async def test_get_and_regions_keep_max_credits(simulator: SimFactory, tmp_path: Path) -> None:
    """`crawler get` and `crawler regions` with --max-credits 0 send nothing: exit 4 saying the budget is spent."""
    async with simulator(world=WORLD) as sim:
        setup_dir(tmp_path, [])
        for args in (["get", "region-list"], ["regions"]):
            code, out, err = await crawler([*args, "--max-credits", "0", "--config", "fast.toml"], environ(sim),
                                           tmp_path)
            assert code == 4, err
            assert "--max-credits budget of 0 requests is spent" in error_line(err)
            assert not out
        assert sim.stats.requests == 0


async def test_download_takes_no_row_shaping_flags(tmp_path: Path) -> None:
    """`download` writes files, not CSV rows: its --help does not offer --page-size, --max-pages, --max-items,
    --bom or --raw, and one of them given is exit 2 naming it (it would have been silently ignored)."""
    code, out, _ = await crawler(["download", "--help"], environ(None), tmp_path)
    assert code == 0 and "--rate-shared" in out and "--max-credits" in out
    assert not [flag for flag in ("--page-size", "--max-pages", "--max-items", "--bom", "--raw") if flag in out], out
    code, _, err = await crawler(["download", "in.txt", "-o", "media", "--page-size", "5"], environ(None), tmp_path)
    assert code == 2 and "--page-size" in error_line(err), err
    assert not (tmp_path / "media").exists()
