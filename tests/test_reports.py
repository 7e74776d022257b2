"""What schedulers and monitoring read, checked by their own tools: `promtool check metrics` on the metrics file of
every command (several commands sharing one file), the lifetime counters, and the summary JSON's types and per-part
counts against the simulator's."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KEY, SimFactory
from tests.test_distributed import pg_url, schema  # noqa: F401 (the fixture)
from tests.test_metrics import FAST_TOML, WORLD, crawler, environ, handles, series, value

pytestmark = pytest.mark.slow  # every test here starts processes

PROFILE_PATHS = ("/userinfo-by-username", "/userinfo-by-id", "/userid")  # the simulator's paths, no trailing slash
POST_PATHS = ("/user-posts",)


def promtool(path: Path) -> None:
    """`promtool check metrics` (Debian's prometheus package) accepts the file: no error, no lint warning."""
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: apt-get install prometheus (.ci/run installs it)"
    done = subprocess.run([tool, "check", "metrics"], input=path.read_bytes(), capture_output=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout.decode() + done.stderr.decode() + path.read_text())


async def test_promtool_accepts_the_file_of_every_command_and_counters_add_up(simulator: SimFactory,
                                                                              tmp_path: Path) -> None:
    """profiles (twice), posts, ingest, download and a failed run write one file in turn: promtool accepts it after
    each; the `_total` counters are the simulator's requests summed over the runs, `last_run` gauges the last's."""
    (tmp_path / "fast.toml").write_text(FAST_TOML)
    prom = tmp_path / "all.prom"
    common = ["--config", "fast.toml", "--data-dir", "d", "--metrics-file", "all.prom", "-q"]
    async with simulator(world=WORLD) as sim:
        (tmp_path / "in.txt").write_text("\n".join(handles(sim.world, 5)) + "\n")
        sent: dict[str, list[int]] = {}

        async def run(command: str, args: list[str], codes: tuple[int, ...] = (0,), key: str = KEY) -> None:
            before = sim.stats.requests
            code, err = await crawler(args + common, environ(sim, key), tmp_path)
            assert code in codes, err
            sent.setdefault(command, []).append(sim.stats.requests - before)
            promtool(prom)
            found = series(prom)
            assert value(found, "crawler_last_run_exit_code", command) == code
            assert value(found, "crawler_last_run_requests_sent", command) == sent[command][-1]
            assert value(found, "crawler_requests_sent_total", command) == sum(sent[command])

        await run("profiles", ["profiles", "in.txt", "-o", "p.csv"])
        await run("profiles", ["profiles", "in.txt", "-o", "p2.csv"])
        await run("posts", ["posts", "in.txt", "-o", "posts.csv", "--max-items", "3"])
        await run("ingest", ["ingest", "in.txt", "--out-dir", "out", "--posts", "--max-items", "3"])
        with (tmp_path / "posts.csv").open(newline="", encoding="utf-8") as fh:
            ids = [row["video_id"] for row in csv.DictReader(fh)][:3]
        (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
        await run("download", ["download", "ids.txt", "-o", "media", "--what", "cover", "--summary-json", "dl.json"])
        assert sent["download"] == [3]  # one /post-detail/ each
        dl = json.loads((tmp_path / "dl.json").read_text())
        assert (dl["schema_version"], dl["command"], dl["exit_code"], dl["posts_done"], dl["files_run"]) == (
            1, "download", 0, 3, 3)
        assert dl["failures"] == {} and dl["failures_file"] is None and dl["reason"] is None
        assert dl["run_requests"] == sum(dl["responses"].values()) == 3 and type(dl["rate_wait_seconds"]) is float
        await run("profiles", ["profiles", "in.txt", "-o", "p3.csv"], codes=(1,), key="wrong-key")

        found = series(prom)
        assert {labels for _, labels in found} >= {frozenset({("command", c)}) for c in sent}
        billed = sum(v for (name, _), v in found.items() if name == "crawler_credits_billed_total")
        assert billed == sim.stats.billed[KEY]  # every billed request of every run, each once
        assert value(found, "crawler_last_run_credits_billed", "profiles") == 0  # the rejected key's run


async def test_work_writes_its_metrics_and_summary(simulator: SimFactory, tmp_path: Path,
                                                   schema: str) -> None:  # noqa: F811 (the fixture imported above)
    """`crawler work` takes --metrics-file and --summary-json: promtool accepts the file; the starter's and the
    worker's requests add up to the simulator's."""
    import asyncio

    (tmp_path / "fast.toml").write_text(FAST_TOML)
    async with simulator(world=WORLD, latency=(0.05, 0.05)) as sim:  # a job long enough for the worker to join
        (tmp_path / "in.txt").write_text("\n".join(handles(sim.world, 60)) + "\n")
        url = pg_url(schema)
        starter = crawler(["profiles", "in.txt", "-o", "p.csv", "--jobs-url", url, "--config", "fast.toml",
                           "--data-dir", "d", "--metrics-file", "start.prom", "-q"], environ(sim), tmp_path)
        worker = crawler(["work", "--until-idle", "--jobs-url", url, "--config", "fast.toml", "--data-dir", "w",
                          "--metrics-file", "work.prom", "--summary-json", "work.json", "-q"], environ(sim), tmp_path)
        (code, err), (wcode, werr) = await asyncio.gather(starter, worker)
        assert code == 0, err
        assert wcode == 0, werr
        promtool(tmp_path / "work.prom")
        found = series(tmp_path / "work.prom")
        started = series(tmp_path / "start.prom")
        worked = value(found, "crawler_last_run_requests_sent", "work")
        assert worked + value(started, "crawler_last_run_requests_sent", "profiles") == sim.stats.requests
        record = json.loads((tmp_path / "work.json").read_text())
        assert record["schema_version"] == 1 and record["command"] == "work" and record["exit_code"] == 0
        assert record["run_requests"] == worked and isinstance(record["rate_wait_seconds"], float)


def _check_types(record: dict[str, Any]) -> None:
    """A summary's numbers are numbers and its absent values null."""
    for key in ("items_total", "items_done", "items_failed", "items_pending", "rows_written", "requests_sent",
                "credits_billed", "run_requests", "run_credits_billed", "rate_limited", "retries", "parallelism",
                "exit_code"):
        assert type(record[key]) is int, (key, record[key])
    for key in ("elapsed", "rate_wait_seconds"):
        assert type(record[key]) is float, (key, record[key])
    assert record["rate_used"] is None or type(record["rate_used"]) is float
    assert (record["rate_used"] is None) == (record["rate_window_seconds"] is None)
    assert record["reason"] is None or record["reason"]
    assert record["failures_file"] is None if not record["failures"] else isinstance(record["failures_file"], str)
    assert all(type(n) is int for n in [*record["failures"].values(), *record["responses"].values()])
    assert sum(record["responses"].values()) == record["run_requests"]


async def test_summary_json_types_and_ingest_parts_add_up(simulator: SimFactory, tmp_path: Path) -> None:
    """A local job's and an ingest's summary JSON: schema_version, numbers as numbers, null for absent values; each
    ingest part's requests and responses are the simulator's for that part's endpoints, faults included."""
    paced = "[rate]\nlimit = 100000\nwindow = 60\n[retry]\nbase_delay = 0\nmax_delay = 0\nstall_limit = 20\n"
    (tmp_path / "paced.toml").write_text(paced)
    (tmp_path / "fast.toml").write_text(FAST_TOML)
    faults = frozenset({"5xx", "drop"})
    async with simulator(world=WORLD) as sim:
        (tmp_path / "in.txt").write_text("\n".join(handles(sim.world, 4)) + "\n")
        code, err = await crawler(["profiles", "in.txt", "-o", "p.csv", "--config", "fast.toml", "--data-dir", "d",
                                   "--summary-json", "job.json", "-q"], environ(sim), tmp_path)
        assert code == 0, err
        job = json.loads((tmp_path / "job.json").read_text())
        assert job["schema_version"] == 1 and job["command"] == "profiles"
        _check_types(job)
        assert job["rate_used"] is None and job["failures_file"] is None and job["reason"] is None
        assert job["run_requests"] == sim.stats.requests == 4

    async with simulator(world=WORLD, fault_rate=0.2, faults=faults) as sim:
        names = [sim.world.handle(i) for i in range(300) if (u := sim.world.user(i)) and 5 < u.videos < 60][:5]
        (tmp_path / "watch.txt").write_text("\n".join([*names, "no_such_user_zz9"]) + "\n")
        code, err = await crawler(["ingest", "watch.txt", "--out-dir", "out", "--posts", "--config", "paced.toml",
                                   "--data-dir", "d2", "--summary-json", "ingest.json", "-q"], environ(sim), tmp_path)
        assert code in (0, 3), err
        record = json.loads((tmp_path / "ingest.json").read_text())
        assert record["schema_version"] == 1 and record["command"] == "ingest" and record["held_by"] is None
        profiles, posts = record["parts"]
        for part in (profiles, posts):
            _check_types(part)
            assert 0 < part["rate_used"] <= 100000 and part["rate_window_seconds"] == 60.0  # the pace, capped
        by_endpoint = sim.stats.by_endpoint
        assert profiles["run_requests"] == sum(by_endpoint[p] for p in PROFILE_PATHS) > 0
        assert posts["run_requests"] == sum(by_endpoint[p] for p in POST_PATHS) > 0
        assert profiles["run_requests"] + posts["run_requests"] == sim.stats.requests
        errors = profiles["responses"].get("server_error", 0) + posts["responses"].get("server_error", 0)
        assert errors == sim.stats.faults["5xx"] > 0
        assert profiles["responses"]["not_found"] >= 1 and "not_found" not in posts["responses"]
