"""Outages from the user's side: the API going away mid-run pauses the run and stops it resumably (exit 1)
without failing items; a base URL that is not the API ends the run at once, without `not_found` rows.

The simulator runs in this process; the crawler is a real subprocess.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from crawler.api.client import Client
from crawler.api.outage import Outage
from crawler.engine.stats import ProgressReporter, Snapshot
from crawler.errors import NotAnApiAnswer, NotTheApi, OutageStalled, RetriesExhausted, Unreachable
from crawler.runs.local import Crawl, JobOptions, run_job
from crawler.sim.data import World, WorldConfig
from crawler.sim.server import SimConfig, Simulator
from tests.conftest import KEY, SimFactory, fast_settings
from tests.test_cli import crawler, environ, error_line, read_csv

WORLD = WorldConfig(seed=11, users=3_200)
# No pacing, no retry waits; an outage ends the run after 2 s without an answer.
OUTAGE_TOML = "[rate]\nenabled = false\n[retry]\nbase_delay = 0\nmax_delay = 0\nstall_limit = 2\n"


def existing_handles(w: World, n: int) -> list[str]:
    """n handles of users that exist in the world (their profile is one row each)."""
    found = [w.handle(i) for i in range(w.config.users) if not w.is_missing(i)]
    assert len(found) >= n
    return found[:n]


def free_port() -> int:
    """A loopback port nobody listens on now (the simulator is restarted on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def until(condition: Callable[[], bool], *, bound: float = 60.0) -> None:
    """Wait (bounded) until a server-side condition holds."""
    async with asyncio.timeout(bound):
        while not condition():
            await asyncio.sleep(0.01)


def sim_config(**changes: object) -> SimConfig:
    base: dict[str, object] = {"world": WORLD, "rate_limit": 1_000_000, "burst_limit": 1_000_000}
    base.update(changes)
    return SimConfig(**base)  # type: ignore[arg-type]


@pytest.mark.slow
async def test_the_simulator_stopped_mid_run_pauses_then_exit_1_and_the_same_command_finishes(
        tmp_path: Path) -> None:
    """The API going away mid-run: exit 1 with one line, no item failed, few requests; after it is back the same
    command completes with exactly one row per handle."""
    port = free_port()
    args = ["profiles", "in.txt", "-o", "out.csv", "--config", "outage.toml", "--data-dir", "d",
            "--parallelism", "4"]
    (tmp_path / "outage.toml").write_text(OUTAGE_TOML)
    async with Simulator(sim_config(latency=(0.002, 0.01)), port=port) as sim:
        handles = existing_handles(sim.world, 3_000)
        (tmp_path / "in.txt").write_text("\n".join(handles) + "\n")
        run = asyncio.create_task(crawler(args, environ(sim), tmp_path))
        await until(lambda: sim.stats.requests >= 200 or run.done())
        assert not run.done(), "the run must still be going when the API goes away"
        answered = sim.stats.requests
    code, _, err = await run  # the simulator is gone: connections are refused
    line = error_line(err)
    assert code == 1, err
    assert "no answer from the API" in line and "no item was marked failed" in line and "resume with" in line
    assert not (tmp_path / "out.failures.csv").exists()
    assert not (tmp_path / "out.csv").exists() and (tmp_path / "out.csv.part").exists()
    sent = int(next(x for x in err.splitlines() if "requests_sent" in x).split()[1].replace(",", ""))
    # Paused, not hammering: a few probes beyond what the server answered (the issue saw 3,812 sent).
    assert answered <= sent < answered + 100, err
    rows_before = len(read_csv(tmp_path / "out.csv.part"))
    assert 0 < rows_before < len(handles)

    async with Simulator(sim_config(), port=port) as back:
        code, _, err = await crawler(args, environ(back), tmp_path)
        assert code == 0, err
        assert back.stats.requests == len(handles) - rows_before  # only what was missing is fetched
    got = [r["handle"] for r in read_csv(tmp_path / "out.csv")]
    assert sorted(got) == sorted(handles)  # every row once: none lost, none twice


@pytest.mark.slow
async def test_a_wrong_base_path_ends_the_run_without_not_found_rows(simulator: SimFactory, tmp_path: Path) -> None:
    """`--base-url http://host/v1` answers 404 everywhere: exit 1 naming the base URL, no failure rows, no state."""
    async with simulator(world=WORLD) as sim:
        handles = existing_handles(sim.world, 50)
        (tmp_path / "in.txt").write_text("\n".join(handles) + "\n")
        (tmp_path / "fast.toml").write_text(OUTAGE_TOML.replace("stall_limit = 2", "stall_limit = 300"))
        code, _, err = await crawler(["profiles", "in.txt", "-o", "out.csv", "--config", "fast.toml",
                                      "--data-dir", "d", "--base-url", sim.url + "/v1", "--parallelism", "4"],
                                     environ(sim), tmp_path)
        assert sim.stats.requests <= 4 * 5  # stopped after a round of tries, never 50 users x 5 tries
    line = error_line(err)
    assert code == 1, err
    assert "does not answer like TikLiveAPI" in line and "/v1" in line and "--base-url" in line
    assert not (tmp_path / "out.failures.csv").exists()
    assert "not_found" not in err


async def test_an_item_fails_only_while_other_requests_are_answered() -> None:
    """A request that alone keeps failing is retries_exhausted; when every target fails it is an outage."""
    async with Simulator(sim_config(fault_rate=1.0, faults=frozenset({"5xx"}))) as sim:
        settings = fast_settings(sim.url, retry_attempts=3, retry_stall_limit=0.5)
        async with Client(settings, api_key=KEY) as client:
            with pytest.raises(RetriesExhausted):  # one target only: nothing says the API is down
                await client.get("/region-list/")
        async with Client(settings, api_key=KEY) as client:
            results = await asyncio.gather(*(client.get("/userid/", {"username": f"user{i}"}) for i in range(4)),
                                           return_exceptions=True)
        assert all(isinstance(r, OutageStalled) for r in results), results
        assert client.outage.pauses == 1


def test_outage_pauses_once_and_recovers_on_a_clock() -> None:
    """Failures over two targets start one pause; an answer ends it; the stall limit is measured on the clock."""
    now = [100.0]
    outage = Outage(base_url="http://x", stall_limit=10, attempts=5, clock=lambda: now[0])
    assert not outage.failed("/a?", Unreachable("/a/: HTTP 503"))
    assert not outage.failed("/a?", Unreachable("/a/: HTTP 503"))  # one target: may be that item's fault
    assert outage.failed("/b?", Unreachable("/b/: HTTP 503"))
    assert outage.active and outage.pauses == 1 and "PAUSED" in outage.status()
    outage.answered()
    assert not outage.active and outage.status() == ""
    outage.failed("/a?", Unreachable("x"))
    outage.failed("/b?", Unreachable("x"))
    assert outage.failed("/c?", Unreachable("x")) and outage.pauses == 2
    now[0] += 10
    with pytest.raises(OutageStalled, match="for 10 s"):
        outage.failed("/a?", Unreachable("x"))


def test_404_before_any_answer_is_not_the_api_but_after_one_it_is_an_outage() -> None:
    """A 404 from the first request on means a wrong base URL; once the API has answered, it counts as an outage."""
    outage = Outage(base_url="http://h/v1", stall_limit=60, attempts=2, clock=lambda: 0.0)
    outage.failed("/a?", NotAnApiAnswer("/a/: HTTP 404"))
    with pytest.raises(NotTheApi, match="http://h/v1 does not answer like TikLiveAPI"):
        outage.failed("/b?", NotAnApiAnswer("/b/: HTTP 404"))
    later = Outage(base_url="http://h", stall_limit=60, attempts=2, clock=lambda: 0.0)
    later.answered()
    later.failed("/a?", NotAnApiAnswer("/a/: HTTP 404"))
    assert later.failed("/b?", NotAnApiAnswer("/b/: HTTP 404")) is False  # two failures: below the threshold
    assert later.failed("/c?", NotAnApiAnswer("/c/: HTTP 404")) is True


def test_the_progress_line_shows_failures_and_a_pause() -> None:
    """The progress line names the failed items and, during an outage, the pause."""
    snap = Snapshot(10, 100, 9, 40, 38, failed=3, note="PAUSED: no API answer for 12 s (HTTP 503)")
    line = ProgressReporter("profiles", lambda: snap, quiet=True).line()
    assert "(3 failed)" in line and line.endswith("PAUSED: no API answer for 12 s (HTTP 503)")


async def test_a_paused_run_ends_at_the_stall_limit_not_at_the_next_probe() -> None:
    """Workers waiting for a probe 30 s away still stop once the stall limit (0.2 s) has passed."""
    outage = Outage(base_url="http://x", stall_limit=0.2, attempts=5, base_delay=30, max_delay=30)
    for target in ("/a?", "/b?", "/c?"):
        outage.failed(target, Unreachable("HTTP 503"))
    assert outage.active
    with pytest.raises(OutageStalled):
        await asyncio.wait_for(outage.wait(), 5)


async def test_the_progress_line_shows_the_pause_and_every_request_sent(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """During an outage the live line says PAUSED and counts the requests that found no API, like the summary."""
    async with Simulator(sim_config(latency=(0.002, 0.01))) as sim:
        names = existing_handles(sim.world, 2_000)
        (tmp_path / "in.txt").write_text("\n".join(names) + "\n")
        settings = fast_settings(sim.url, retry_stall_limit=1.0, parallelism=4, data_dir=str(tmp_path / "d"))
        job = JobOptions(command="profiles", input=str(tmp_path / "in.txt"), output=str(tmp_path / "out.csv"))
        crawl = Crawl(job, settings, api_key=KEY, quiet=False, progress_interval=0.05)
        run = asyncio.create_task(run_job(crawl, install_signals=False))
        await until(lambda: sim.stats.requests >= 100 or run.done())
        assert not run.done()
    outcome = await asyncio.wait_for(run, 60)
    assert outcome.exit_code == 1 and outcome.summary.items_failed == 0
    paused = [line for line in capsys.readouterr().err.splitlines() if "PAUSED: no API answer" in line]
    assert paused
    last = int(re.search(r"· ([\d,]+) requests sent", paused[-1]).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert last > sim.stats.requests  # the attempts that found no server are counted too
    assert last <= outcome.summary.requests_sent


@pytest.mark.slow
async def test_a_one_item_search_with_no_server_stops_resumably_then_completes(tmp_path: Path) -> None:
    """A search is one item: with nothing listening it is not failed but stopped (exit 1); once the API is
    there the same command completes."""
    port = free_port()
    (tmp_path / "outage.toml").write_text(OUTAGE_TOML)
    args = ["search-users", "cosmo", "-o", "s.csv", "--max-items", "5", "--config", "outage.toml", "--data-dir", "d"]
    env = environ(None, base_url=f"http://127.0.0.1:{port}")
    code, _, err = await crawler(args, env, tmp_path)
    line = error_line(err)
    assert code == 1 and "no answer from the API" in line and "resume with" in line, err
    assert not (tmp_path / "s.failures.csv").exists()
    async with Simulator(sim_config(), port=port) as sim:
        code, _, err = await crawler(args, env, tmp_path)
        assert sim.stats.requests >= 1
    assert code == 0, err
    assert 1 <= len(read_csv(tmp_path / "s.csv")) <= 5


async def test_an_api_back_within_the_stall_limit_resumes_every_worker_and_the_run_completes(
        tmp_path: Path) -> None:
    """The simulator stopped, the run paused, the simulator back on the same port: the run goes on by itself and
    ends exit 0 with one row per handle and no failure."""
    port = free_port()
    async with Simulator(sim_config(latency=(0.002, 0.01)), port=port) as sim:
        names = existing_handles(sim.world, 1_500)
        (tmp_path / "in.txt").write_text("\n".join(names) + "\n")
        job = JobOptions(command="profiles", input=str(tmp_path / "in.txt"), output=str(tmp_path / "out.csv"))
        settings = fast_settings(sim.url, retry_stall_limit=20.0, parallelism=4, data_dir=str(tmp_path / "d"))
        crawl = Crawl(job, settings, api_key=KEY)
        run = asyncio.create_task(run_job(crawl, install_signals=False))
        await until(lambda: sim.stats.requests >= 100 or run.done())
        assert not run.done()
    await until(lambda: crawl.client.outage.active or run.done())
    assert not run.done() and crawl.client.outage.pauses == 1
    async with Simulator(sim_config(), port=port):
        outcome = await asyncio.wait_for(run, 120)
    assert outcome.exit_code == 0 and outcome.summary.items_failed == 0
    assert sorted(r["handle"] for r in read_csv(tmp_path / "out.csv")) == sorted(names)
    assert not crawl.client.outage.active


async def test_a_probe_turn_given_up_without_a_request_passes_to_the_next_caller() -> None:
    """A call that took the probe turn and then sent nothing (its budget spent, a stop) releases the turn: the next
    caller probes now, not after the 20 s probe timeout."""
    now = [100.0]
    outage = Outage(base_url="http://x", stall_limit=600, attempts=5, clock=lambda: now[0])
    for target in ("/a?", "/b?", "/c?"):
        outage.failed(target, Unreachable("HTTP 503"))
    assert outage.active
    now[0] += 60  # past the probe's backoff
    await asyncio.wait_for(outage.wait(), 5)  # this caller's request is the probe
    second = asyncio.create_task(outage.wait())
    await asyncio.sleep(0)
    assert not second.done()  # the probe turn is held
    outage.release()  # ...but the probe sent nothing
    await asyncio.wait_for(second, 5)
