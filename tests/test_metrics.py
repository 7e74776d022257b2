"""--metrics-file and --summary-json: what a scheduler reads after each run, checked against the simulator's own
counts (the crawler runs as a real subprocess; the simulator in this process)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from crawler.engine.metrics import SERIES
from crawler.jobs.prepare import job_lock
from crawler.sim.data import World, WorldConfig
from crawler.sim.server import Simulator
from tests.conftest import KEY, SimFactory

pytestmark = pytest.mark.slow  # every test here starts processes

WORLD = WorldConfig(seed=11, users=1_200)
FAULTS = frozenset({"5xx", "drop", "truncated", "malformed"})
FAST_TOML = "[rate]\nenabled = false\n[retry]\nbase_delay = 0\nmax_delay = 0\nstall_limit = 20\n"
# Paced by the crawler at 40/s while the server admits 30 a second: 429s, honoured by a shared cooldown.
PACED_TOML = ("[rate]\nlimit = 40\nwindow = 1\nmax_per_second = 40\nburst = 4\n"
              "[retry]\nbase_delay = 0\nmax_delay = 0\nstall_limit = 20\n")
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def handles(w: World, n: int) -> list[str]:
    """n handles of existing users (one profile row, one credit each)."""
    found = [w.handle(i) for i in range(w.config.users) if not w.is_missing(i)]
    return found[:n]


def environ(sim: Simulator, key: str = KEY) -> dict[str, str]:
    """A clean environment: no inherited crawler settings, the key and the simulator's URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRAWLER_", "TIKLIVE_"))}
    env.update(TIKLIVE_API_KEY=key, TIKLIVE_BASE_URL=sim.url)
    return env


async def crawler(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run `python -m crawler ARGS`; return (exit code, stderr)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=cwd, env=env,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def series(path: Path) -> Series:
    """Every sample of a metrics file, parsed by prometheus_client's own text parser."""
    out: Series = {}
    for family in text_string_to_metric_families(path.read_text(encoding="utf-8")):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: Series, name: str, command: str, **labels: str) -> float:
    """One sample's value (KeyError when the series is missing)."""
    return found[(name, frozenset({"command": command, **labels}.items()))]


def of(found: Series, command: str) -> Series:
    """The samples of one command."""
    return {k: v for k, v in found.items() if ("command", command) in k[1]}


async def test_the_metrics_and_the_summary_json_equal_the_simulators_counts(simulator: SimFactory,
                                                                            tmp_path: Path) -> None:
    """A run with faults and 429s: requests, billed credits, responses by outcome and 429s in the metrics file
    and the summary JSON are the simulator's counts; items are the input's; every series has `command`."""
    async with simulator(world=WORLD, fault_rate=0.15, faults=FAULTS, rate_limit=30, rate_window=1.0,
                         retry_after=0.05) as sim:
        names = handles(sim.world, 150)
        (tmp_path / "in.txt").write_text("\n".join(names) + "\n")
        (tmp_path / "paced.toml").write_text(PACED_TOML)
        (tmp_path / "m").mkdir()  # node_exporter's textfile directory
        code, err = await crawler(["profiles", "in.txt", "-o", "out.csv", "--config", "paced.toml", "--data-dir",
                                   "d", "--parallelism", "8", "--metrics-file", "m/crawler.prom",
                                   "--summary-json", "summary.json"], environ(sim), tmp_path)
        assert code in (0, 3), err
        stats = sim.stats
        assert stats.served_429 > 0 and all(stats.faults[k] > 0 for k in FAULTS)  # the run met all of them
        found = series(tmp_path / "m" / "crawler.prom")
        assert {name for name, _ in found} == set(SERIES)
        assert all(("command", "profiles") in labels for _, labels in found)
        assert value(found, "crawler_last_run_requests_sent", "profiles") == stats.requests
        assert value(found, "crawler_last_run_credits_billed", "profiles") == stats.billed[KEY]
        assert value(found, "crawler_last_run_rate_limited", "profiles") == stats.served_429
        responses = {dict(labels)["outcome"]: v for (name, labels), v in found.items()
                     if name == "crawler_last_run_responses"}
        assert responses == {
            "ok": stats.requests - stats.served_429 - sum(stats.faults.values()),
            "rate_limited": stats.served_429,
            "server_error": stats.faults["5xx"],
            "no_answer": stats.faults["drop"],
            "malformed": stats.faults["truncated"] + stats.faults["malformed"],
        }
        items = {dict(labels)["status"]: v for (name, labels), v in found.items() if name == "crawler_last_run_items"}
        assert items["done"] + items["failed"] == len(names) and items["pending"] == 0
        assert value(found, "crawler_last_run_exit_code", "profiles") == code
        success = value(found, "crawler_last_success_timestamp_seconds", "profiles")
        assert success == value(found, "crawler_last_run_timestamp_seconds", "profiles") > 0
        assert value(found, "crawler_last_run_rate_wait_seconds", "profiles") > 0  # paced: starts waited for the budget

        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["exit_code"] == code and summary["command"] == "profiles"
        assert summary["requests_sent"] == summary["run_requests"] == stats.requests
        assert summary["credits_billed"] == summary["run_credits_billed"] == stats.billed[KEY]
        assert summary["rate_limited"] == stats.served_429
        assert summary["responses"] == {k: int(v) for k, v in responses.items()}
        assert summary["items_done"] + summary["items_failed"] == len(names)
        assert summary["rate_wait_seconds"] == value(found, "crawler_last_run_rate_wait_seconds", "profiles")
        assert not [p.name for p in (tmp_path / "m").iterdir() if p.name not in ("crawler.prom", "crawler.prom.lock")]


async def test_a_failed_run_keeps_the_last_success_and_commands_share_one_file(simulator: SimFactory,
                                                                              tmp_path: Path) -> None:
    """Two commands write one file, each keeping the other's series; a run that does not complete (a rejected key,
    a budget stop, a locked job) records its exit code and keeps the previous last-success time; exit 2 leaves the
    file untouched."""
    (tmp_path / "fast.toml").write_text(FAST_TOML)
    prom = tmp_path / "all.prom"
    common = ["--config", "fast.toml", "--data-dir", "d", "--metrics-file", "all.prom", "-q"]
    async with simulator(world=WORLD) as sim:
        names = handles(sim.world, 6)
        (tmp_path / "in.txt").write_text("\n".join(names) + "\n")
        code, err = await crawler(["profiles", "in.txt", "-o", "p.csv", *common], environ(sim), tmp_path)
        assert code == 0, err
        first = series(prom)
        success = value(first, "crawler_last_success_timestamp_seconds", "profiles")
        assert value(first, "crawler_last_run_requests_sent", "profiles") == sim.stats.requests == 6

        before = sim.stats.requests
        code, err = await crawler(["posts", "in.txt", "-o", "posts.csv", "--max-credits", "3", *common],
                                  environ(sim), tmp_path)
        assert code == 4, err
        second = series(prom)
        assert of(second, "profiles") == of(first, "profiles")  # another command's series are kept as they were
        assert value(second, "crawler_last_run_exit_code", "posts") == 4
        assert value(second, "crawler_last_run_requests_sent", "posts") == sim.stats.requests - before == 3
        assert ("crawler_last_success_timestamp_seconds", frozenset({("command", "posts")})) not in second

        code, err = await crawler(["profiles", "in.txt", "-o", "other.csv", *common], environ(sim, "wrong-key"),
                                  tmp_path)
        assert code == 1, err
        third = series(prom)
        assert value(third, "crawler_last_run_exit_code", "profiles") == 1
        assert value(third, "crawler_last_success_timestamp_seconds", "profiles") == success  # kept
        assert value(third, "crawler_last_run_timestamp_seconds", "profiles") > success
        assert value(third, "crawler_last_run_responses", "profiles", outcome="key_rejected") >= 1
        assert of(third, "posts") == of(second, "posts")

        with job_lock(tmp_path / "p.csv"):  # the run ends by an error before it has a summary
            code, err = await crawler(["profiles", "in.txt", "-o", "p.csv", *common], environ(sim), tmp_path)
        assert code == 1 and "another crawler process" in err, err
        fourth = series(prom)
        assert value(fourth, "crawler_last_run_exit_code", "profiles") == 1
        assert value(fourth, "crawler_last_success_timestamp_seconds", "profiles") == success
        assert of(fourth, "posts") == of(second, "posts")

        text = prom.read_bytes()
        code, err = await crawler(["profiles", "in.txt", "-o", "p.csv", "--parallelism", "0", *common],
                                  environ(sim), tmp_path)
        assert code == 2, err
        assert prom.read_bytes() == text  # a usage error writes nothing

        code, err = await crawler(["posts", "in.txt", "-o", "posts.csv", *common], environ(sim), tmp_path)
        assert code == 0, err
        last = series(prom)
        assert value(last, "crawler_last_success_timestamp_seconds", "posts") > success
        assert of(last, "profiles") == of(fourth, "profiles")


async def test_ingest_writes_day_exit_code_and_parts(simulator: SimFactory, tmp_path: Path) -> None:
    """ingest --summary-json gives {day, exit_code, parts} (profiles and posts, each with its exit code), and its
    metrics count every request the simulator saw under command="ingest"."""
    (tmp_path / "fast.toml").write_text(FAST_TOML)
    async with simulator(world=WORLD) as sim:
        names = [sim.world.handle(i) for i in range(200) if (u := sim.world.user(i)) and u.videos < 40][:4]
        (tmp_path / "watch.txt").write_text("\n".join(names) + "\n")
        code, err = await crawler(["ingest", "watch.txt", "--out-dir", "out", "--posts", "--date", "2026-02-03",
                                   "--config", "fast.toml", "--data-dir", "d", "--summary-json", "s.json",
                                   "--metrics-file", "m.prom", "-q"], environ(sim), tmp_path)
        assert code in (0, 3), err
        record = json.loads((tmp_path / "s.json").read_text())
        assert record["day"] == "2026-02-03" and record["exit_code"] == code
        assert len(record["parts"]) == 2 and all("exit_code" in p for p in record["parts"])
        assert sum(p["run_requests"] for p in record["parts"]) == sim.stats.requests
        found = series(tmp_path / "m.prom")
        assert value(found, "crawler_last_run_requests_sent", "ingest") == sim.stats.requests
        assert value(found, "crawler_last_run_credits_billed", "ingest") == sim.stats.billed[KEY]


async def test_a_metrics_file_without_prom_is_exit_2_and_writes_nothing(simulator: SimFactory,
                                                                         tmp_path: Path) -> None:
    """--metrics-file must end in .prom (node_exporter reads nothing else): exit 2, one line, no request, no file."""
    (tmp_path / "fast.toml").write_text(FAST_TOML)
    async with simulator(world=WORLD) as sim:
        (tmp_path / "in.txt").write_text("\n".join(handles(sim.world, 2)) + "\n")
        for flags in (["--metrics-file", "m.txt"], ["--metrics-file", "no/such/dir/m.prom"],
                      ["--summary-json", "no/such/dir/s.json"]):
            before = sorted(p.name for p in tmp_path.iterdir())
            code, err = await crawler(["profiles", "in.txt", "-o", "out.csv", "--config", "fast.toml", *flags],
                                      environ(sim), tmp_path)
            assert code == 2 and len(err.strip().splitlines()) == 1 and flags[0] in err, err
            assert sim.stats.requests == 0 and sorted(p.name for p in tmp_path.iterdir()) == before


async def test_an_ingest_turned_away_by_a_held_out_dir_keeps_the_last_success(simulator: SimFactory,
                                                                              tmp_path: Path) -> None:
    """An ingest that finds its out-dir held (exit 0, nothing done) records its run but keeps the last success: a
    hung ingest holding the out-dir must not look like a nightly success to the stale-success alert."""
    import fcntl

    (tmp_path / "fast.toml").write_text(FAST_TOML)
    args = ["ingest", "watch.txt", "--out-dir", "out", "--config", "fast.toml", "--data-dir", "d", "--metrics-file",
            "m.prom", "-q"]
    async with simulator(world=WORLD) as sim:
        (tmp_path / "watch.txt").write_text("\n".join(handles(sim.world, 2)) + "\n")
        code, err = await crawler(args, environ(sim), tmp_path)
        assert code == 0, err
        first = series(tmp_path / "m.prom")
        success = value(first, "crawler_last_success_timestamp_seconds", "ingest")
        fd = os.open(tmp_path / "out" / ".ingest.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a running (or hung) ingest
            before = sim.stats.requests
            code, err = await crawler(args, environ(sim), tmp_path)
        finally:
            os.close(fd)
        assert code == 0 and "held by a running ingest" in err and sim.stats.requests == before
        held = series(tmp_path / "m.prom")
        assert value(held, "crawler_last_run_timestamp_seconds", "ingest") > success
        assert value(held, "crawler_last_success_timestamp_seconds", "ingest") == success
