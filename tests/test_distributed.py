"""One job, several hosts: a PostgreSQL job (jobs.url) worked by a starter and `crawler work` processes.

Every process is a real subprocess in its own working, data and state directory (as separate hosts would
be), on one key whose ledger is in Redis; the job lives in a PostgreSQL schema of this test's own (dropped
after). The simulator runs in this process and counts every request. Rate and heartbeat are scaled down
(a 2 s heartbeat timeout) so the tests take seconds; PostgreSQL and Redis missing is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import random
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from crawler.rate.pacing import Pace
from crawler.sim.data import World, WorldConfig
from crawler.sim.server import SimConfig, Simulator
from crawler.stores.pg_schema import REGISTER_LOCK
from tests.conftest import answer_at_once
from tests.pg import private_schema

pytestmark = pytest.mark.slow  # every test here starts processes

REDIS = "redis://127.0.0.1:6379/0"
WORLD = WorldConfig(seed=7, users=2_000)
RATE = ["--rate", "2400", "--window", "60"]  # 40 a second: the per-second cap
HEARTBEAT = 2.0
FAULTS = frozenset({"5xx", "drop", "truncated", "malformed"})
KEY_COLUMNS = ("video_id", "source_handle", "create_time", "region", "title", "play_count", "digg_count",
               "comment_count", "share_count")  # CONTRACT.md's posts columns (the media URLs are signed per call)


def pg_url(schema: str, port: int = 5432) -> str:
    """The jobs URL of a schema (its tables and pgqueuer's go there through the search path)."""
    return f"postgresql://postgres@127.0.0.1:{port}/test?options=-csearch_path%3D{schema}"


@pytest.fixture
def schema() -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped when it ends."""
    with private_schema("crawler_t") as name:
        yield name


@contextlib.asynccontextmanager
async def simulator(key: str, **config: Any) -> AsyncIterator[Simulator]:
    """The simulator on loopback, limits above our pace (so no 429), small latency."""
    settings: dict[str, Any] = {"world": WORLD, "keys": {key: None}, "rate_limit": 1_000_000, "burst_limit": 1_000_000,
                                "latency": (0.005, 0.02)}
    async with Simulator(SimConfig(**(settings | config))) as sim:
        yield sim


class Hosts:
    """Crawler subprocesses, each in its own directory tree (cwd, data, state, HOME) as a separate host."""

    def __init__(self, root: Path, key: str) -> None:
        self.root = root
        self.key = key
        self.procs: list[asyncio.subprocess.Process] = []
        self.stderr: dict[int, list[str]] = {}
        self.readers: dict[int, asyncio.Task[None]] = {}

    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CRAWLER_", "TIKLIVE_"))}
        home = self.root / name / "home"
        env.update(TIKLIVE_API_KEY=self.key, HOME=str(home), XDG_STATE_HOME=str(home / "state"))
        return env

    async def start(self, name: str, args: list[str], *, stall_limit: float = 10.0, heartbeat: float = HEARTBEAT,
                    read_timeout: float | None = None, extra_env: dict[str, str] | None = None, config: str = ""
                    ) -> asyncio.subprocess.Process:
        cwd = self.root / name
        cwd.mkdir(parents=True, exist_ok=True)
        (cwd / "config.toml").write_text(
            f"[retry]\nstall_limit = {stall_limit}\nbase_delay = 0.05\nmax_delay = 0.5\n"
            f"[jobs]\nheartbeat_timeout = {heartbeat}\n{config}"
            + ("" if read_timeout is None else f"[http]\nread_timeout = {read_timeout}\n"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "crawler", *args, cwd=cwd, env=self.env(name) | (extra_env or {}),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self.procs.append(proc)
        lines: list[str] = []
        self.stderr[proc.pid] = lines

        async def drain() -> None:
            assert proc.stderr is not None
            async for line in proc.stderr:
                lines.append(line.decode())

        self.readers[proc.pid] = asyncio.get_running_loop().create_task(drain())
        return proc

    async def cut_and_go_on(self, proxy: Proxy, proc: asyncio.subprocess.Process) -> None:
        """PostgreSQL cut under a process stopped at a kill point; the process continued until it says it retries
        (or ends)."""
        proxy.cut()
        proc.send_signal(signal.SIGCONT)
        lines = self.stderr[proc.pid]
        await until(lambda: proc.returncode is not None or any("retrying" in line for line in lines),
                    "the process retrying")

    async def job_id(self, proc: asyncio.subprocess.Process, bound: float = 60) -> str:
        """The job id the starter printed."""
        async with asyncio.timeout(bound):
            while True:
                for line in self.stderr[proc.pid]:
                    found = re.match(r"crawler: job ([0-9a-f]{12}) ", line)
                    if found:
                        return found.group(1)
                assert proc.returncode is None, "".join(self.stderr[proc.pid])
                await asyncio.sleep(0.05)

    async def finish(self, proc: asyncio.subprocess.Process, bound: float = 180) -> tuple[int, str]:
        """Wait for a process (bounded): its exit code and stderr."""
        code = await asyncio.wait_for(proc.wait(), bound)
        await asyncio.wait_for(self.readers[proc.pid], 10)  # the stderr reader has read to the end
        return code, "".join(self.stderr[proc.pid])

    async def run(self, name: str, args: list[str], bound: float = 120) -> tuple[int, str, str]:
        """Run a short command to its end: exit code, stdout, stderr."""
        proc = await self.start(name, args)
        assert proc.stdout is not None
        out = await asyncio.wait_for(proc.stdout.read(), bound)
        code, err = await self.finish(proc, bound)
        return code, out.decode(), err

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()


@pytest.fixture
async def hosts(tmp_path: Path) -> AsyncIterator[Hosts]:
    """Processes under a key no other test uses (so the Redis ledger is this test's own)."""
    h = Hosts(tmp_path, f"key-{uuid.uuid4().hex}")
    try:
        yield h
    finally:
        h.kill_all()
        for proc in h.procs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 10)


def handles(root: Path, n: int, offset: int = 0) -> Path:
    """n existing handles of the world (private ones included), one per line."""
    path = root / f"handles-{n}-{offset}.txt"
    path.write_text("\n".join(World(WORLD).sample_handles(offset + n)[offset:]) + "\n")
    return path


def rows(path: Path) -> list[tuple[str, ...]]:
    """The CONTRACT columns of every row (one header checked; a BOM skipped)."""
    text = path.read_text(encoding="utf-8-sig")
    with path.open(encoding="utf-8-sig", newline="") as fh:
        found = [tuple(r[c] for c in KEY_COLUMNS) for r in csv.DictReader(fh)]
    assert text.count("video_id,source_handle") == 1
    return found


def worked(stderr: str) -> int:
    """Items a process worked, from its lines."""
    return sum(int(m.replace(",", "")) for m in re.findall(r"([\d,]+) items worked here", stderr))


def taken_over(stderr: str) -> int:
    """Items a process lost to a takeover (their late pages discarded), from its lines."""
    return sum(int(m.replace(",", "")) for m in re.findall(r"([\d,]+) items? it held went to other workers", stderr))


def common(sim_url: str, *extra: str) -> list[str]:
    return ["--base-url", sim_url, *RATE, "--rate-shared", REDIS, "--parallelism", "4", *extra]


SINGLE_CODE: dict[Path, int] = {}


async def single_host(hosts: Hosts, src: Path, sim: Simulator, *extra: str) -> tuple[list[tuple[str, ...]], int]:
    """The same job on one host with local SQLite state: its rows and the requests it sent (its exit code, 0 or 3
    for private accounts, in SINGLE_CODE)."""
    before = sim.stats.requests
    code, _, err = await hosts.run("single", ["posts", str(src), "-o", "out.csv", *common(sim.url, *extra)], 180)
    assert code == 0 or (code == 3 and re.search(r"failures +private: \d+$", err, re.M)), err[-800:]
    SINGLE_CODE[src] = code
    return rows(hosts.root / "single" / "out.csv"), sim.stats.requests - before


async def until(condition: Callable[[], Any], what: str, bound: float = 60.0) -> None:
    """Poll a condition, bounded."""
    async with asyncio.timeout(bound):
        while not await _value(condition()):
            await asyncio.sleep(0.05)


async def _value(v: Any) -> Any:
    return await v if asyncio.iscoroutine(v) else v


async def pg_value(schema: str, sql: str, *args: Any) -> Any:
    """One value from the test's schema."""
    async with await psycopg.AsyncConnection.connect(pg_url(schema)) as conn:
        cur = await conn.execute(sql, args)
        row = await cur.fetchone()
        return None if row is None else row[0]


async def test_three_hosts_one_job_equal_a_single_host_run(hosts: Hosts, schema: str) -> None:
    """Starter + two `work` processes on 150 handles with faults: OUT.csv's rows are a single-host run's, once each;
    every process worked items; `crawler jobs` counts what the simulator counted; `crawler export` is OUT.csv (its
    BOM too, without --bom: the job keeps its starter's output.bom)."""
    src = handles(hosts.root, 150)
    url = pg_url(schema)
    async with simulator(hosts.key, fault_rate=0.1, faults=FAULTS) as sim:
        expected, _ = await single_host(hosts, src, sim, "--max-items", "30")
        before, billed_before = sim.stats.requests, sum(sim.stats.billed.values())
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url, "--bom",
                                                *common(sim.url, "--max-items", "30")])
        jid = await hosts.job_id(starter)
        workers = [await hosts.start(f"w{n}", ["work", "--jobs-url", url, "--job", jid, "--until-idle",
                                               *common(sim.url)]) for n in range(2)]
        code, err = await hosts.finish(starter)
        assert code == SINGLE_CODE[src], err[-800:]  # the same exit code as the single-host run
        results = [await hosts.finish(w) for w in workers]
        sent, billed = sim.stats.requests - before, sum(sim.stats.billed.values()) - billed_before
        assert sim.stats.faults, "the faults were on"
    for code, werr in results:
        assert code == 0, werr[-800:]
    out = hosts.root / "starter" / "out.csv"
    got = rows(out)
    assert len(got) == len(set(got))  # none twice
    assert set(got) == set(expected) and len(got) == len(expected)
    single_failures = (hosts.root / "single" / "out.failures.csv").read_text()
    assert (hosts.root / "starter" / "out.failures.csv").read_text() == single_failures
    counts = [worked(err)] + [worked(e) for _, e in results]
    assert all(c > 0 for c in counts), counts
    assert sum(counts) >= 150 - 5  # private accounts fail fast; every item was worked by someone
    code, listing, err = await hosts.run("jobs", ["jobs", "--jobs-url", url, "--json"])
    assert code == 0, err
    (job,) = json.loads(listing)
    assert job["id"] == jid and job["pending"] == 0 and job["items"] == 150
    assert job["requests_sent"] == sent and job["credits_billed"] == billed
    assert len(job["workers"]) == 3
    # Each of the three said it ended (its row goes a day later), none was left for the week of a killed one.
    assert await pg_value(schema, "SELECT count(*) FROM crawler_workers WHERE ended IS NOT NULL") == 3
    code, _, err = await hosts.run("export", ["export", jid, "-o", str(hosts.root / "again.csv"), "--jobs-url", url])
    assert code == 0, err
    assert out.read_bytes().startswith("\ufeff".encode())
    assert (hosts.root / "again.csv").read_bytes() == out.read_bytes()
    # An existing file is replaced only with --overwrite (CONTRACT: never a file this tool did not write).
    mine = hosts.root / "mine.csv"
    mine.write_text("someone's,data\n")
    code, _, err = await hosts.run("export", ["export", jid, "-o", str(mine), "--jobs-url", url])
    assert code == 2 and "--overwrite" in err.strip().splitlines()[-1], err
    assert mine.read_text() == "someone's,data\n"
    code, _, err = await hosts.run("export", ["export", jid, "-o", str(mine), "--jobs-url", url, "--overwrite"])
    assert code == 0 and mine.read_bytes() == out.read_bytes(), err


async def test_an_unreachable_jobs_url_is_exit_2_before_any_request(hosts: Hosts) -> None:
    """PostgreSQL not there: one line naming jobs.url with the password masked (in the URL's user part or in its
    `password=` parameter, which libpq accepts; the user name stays), exit 2, no request sent."""
    src = handles(hosts.root, 5)
    shown = {"postgresql://postgres:s3cret@127.0.0.1:1/test": "postgresql://***@127.0.0.1:1/test",
             "postgresql://postgres@127.0.0.1:1/test?password=s3cret": "postgresql://postgres@127.0.0.1:1/test"
                                                                       "?password=***"}
    async with simulator(hosts.key) as sim:
        for dead, masked in shown.items():
            code, _, err = await hosts.run("dead", ["posts", str(src), "-o", "out.csv", "--jobs-url", dead,
                                                   *common(sim.url)])
            assert code == 2 and "s3cret" not in err, err
            assert err.strip().splitlines()[-1].startswith(f"crawler: jobs.url = {masked}"), err
    assert sim.stats.requests == 0


async def test_the_job_id_is_printed_once_the_job_exists(hosts: Hosts, schema: str) -> None:
    """The starter frozen the moment it prints the job id: the job is already in PostgreSQL, so `crawler work --job
    ID` started on seeing the line finds it."""
    src = handles(hosts.root, 5, offset=1900)
    async with simulator(hosts.key) as sim:
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", pg_url(schema),
                                                *common(sim.url)], extra_env={"CRAWLER_TEST_STOP_AT": "job_printed:1"})
        jid = await hosts.job_id(starter)
        await until(lambda: _stopped(starter.pid), "the starter frozen after printing")
        exists = await pg_value(schema, "SELECT count(*) FROM crawler_items WHERE job = %s", jid)
        starter.send_signal(signal.SIGCONT)
        code, err = await hosts.finish(starter)
    assert exists == 5
    assert code in (0, 3), err[-800:]


async def test_ten_sigkills_of_random_workers_lose_and_duplicate_nothing(hosts: Hosts, schema: str) -> None:
    """Ten SIGKILLs of random `work` processes at random moments, each restarted: rows exact, none twice, the killed
    workers' items finish, and the simulator saw at most a single-host run's requests plus two a held item
    (a page, a /userid/) for each of the at most --parallelism items a kill leaves."""
    rng = random.Random(12)
    src = handles(hosts.root, 60, offset=300)
    opts = ("--max-items", "60", "--page-size", "5")  # walks of many pages: a takeover must go on from the cursor
    url = pg_url(schema)
    kills = 0
    async with simulator(hosts.key) as sim:
        expected, baseline = await single_host(hosts, src, sim, *opts)
        before = sim.stats.requests
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url,
                                                *common(sim.url, *opts)])
        jid = await hosts.job_id(starter)
        work = ["work", "--jobs-url", url, "--job", jid, "--until-idle", *common(sim.url)]
        workers = [await hosts.start(f"w{n}", work) for n in range(2)]
        while kills < 10 and starter.returncode is None:
            mark = sim.stats.requests + rng.randint(5, 25)
            await until(lambda m=mark: sim.stats.requests >= m or starter.returncode is not None,  # type: ignore[misc]
                        "requests", 60)
            n = rng.randrange(2)
            if workers[n].returncode is None:
                workers[n].kill()
                await workers[n].wait()
                kills += 1
            workers[n] = await hosts.start(f"w{n}", work)
        code, err = await hosts.finish(starter)
        for w in workers:
            await hosts.finish(w)
        sent = sim.stats.requests - before
    assert kills >= 5, kills  # most kills landed while the job ran
    assert code == SINGLE_CODE[src], err[-800:]
    got = rows(hosts.root / "starter" / "out.csv")
    assert len(got) == len(set(got)) and set(got) == set(expected)
    print(f"ten kills: {sent} requests against a single-host run's {baseline}, {kills} kills")
    # Each kill leaves at most --parallelism (4) items in hand; each costs its taker the page in flight again and,
    # when the taker is another host, its own /userid/ lookup (user ids are learned per data directory).
    assert sent <= baseline + kills * 2 * 4, (sent, baseline, kills)


async def test_a_worker_stopped_past_its_lease_has_its_late_page_discarded(hosts: Hosts, schema: str) -> None:
    """SIGSTOP a worker holding an item until another worker has taken the item over and finished it, then SIGCONT:
    its late page is discarded (it reports the item taken over) and no row is there twice."""
    src = handles(hosts.root, 40, offset=500)
    opts = ("--max-items", "60", "--page-size", "10")
    url = pg_url(schema)
    async with simulator(hosts.key, latency=(0.1, 0.2)) as sim:
        expected, baseline = await single_host(hosts, src, sim, *opts)
        before = sim.stats.requests
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url,
                                                *common(sim.url, *opts)])
        jid = await hosts.job_id(starter)
        worker = await hosts.start("w", ["work", "--jobs-url", url, "--job", jid, "--until-idle", "--metrics-file",
                                         "w.prom", *common(sim.url)])
        mine = f"%:{worker.pid}:%"
        held = "SELECT min(seq) FROM crawler_items WHERE status = 'pending' AND owner LIKE %s AND pages > 0"
        await until(lambda: pg_value(schema, held, mine), "the worker holding an item it has committed pages of")
        worker.send_signal(signal.SIGSTOP)
        seq = await pg_value(schema, held, mine)
        assert seq is not None
        done = "SELECT status = 'done' AND owner NOT LIKE %s FROM crawler_items WHERE seq = %s"
        try:
            # The takeover needs the worker's heartbeat to go stale (2 s) and a poll of another consumer; the bound is
            # for a machine so loaded that the processes barely run (it has taken over 60 s in a full parallel run).
            await until(lambda: pg_value(schema, done, mine, seq), "the item taken over and finished", 150)
        except TimeoutError:  # what the starter and the queue were doing, for the report
            try:
                item = await pg_value(schema, "SELECT status || ' ' || coalesce(owner, '-') FROM crawler_items"
                                              " WHERE seq = %s", seq)
                queue = await pg_value(schema, "SELECT string_agg(status || ' ' || heartbeat::text, '; ')"
                                               " FROM pgqueuer WHERE dedupe_key LIKE %s", f"%:{seq}")
            except Exception as exc:
                item = queue = repr(exc)
            raise AssertionError(f"item {seq} not taken over: {item}; queue: {queue}; starter:\n"
                                 + "".join(hosts.stderr[starter.pid])[-3000:]) from None
        worker.send_signal(signal.SIGCONT)
        code, err = await hosts.finish(starter)
        wcode, werr = await hosts.finish(worker)
        sent = sim.stats.requests - before
    # Each item the stopped worker held (at most --parallelism 4) costs the taker its page in flight again and its
    # own /userid/ lookup (user ids are learned per host, in its data directory): at most two requests an item.
    assert sent <= baseline + 2 * 4, (sent, baseline)
    assert code == SINGLE_CODE[src], err[-800:]
    assert wcode == 0, werr[-800:]
    assert taken_over(werr) >= 1, werr[-800:]
    assert 'crawler_last_run_exit_code{command="work"} 0' in (hosts.root / "w" / "w.prom").read_text()
    got = rows(hosts.root / "starter" / "out.csv")
    assert len(got) == len(set(got)) and set(got) == set(expected)


async def test_a_worker_frozen_holding_the_job_row_lock_does_not_stop_the_others(hosts: Hosts, schema: str) -> None:
    """A worker SIGSTOPped inside its budget transaction, holding the job row's lock, and never woken: the server
    ends its session after the heartbeat timeout, the starter and another worker (whose own --max-pages and
    --page-size differ from the job's) finish the job with a single-host run's rows once each, and the simulator
    saw at most a single-host run's requests plus two per item the frozen worker held (a page, a /userid/)."""
    src = handles(hosts.root, 40, offset=1500)
    opts = ("--max-items", "60", "--page-size", "10")
    url = pg_url(schema)
    async with simulator(hosts.key) as sim:
        expected, baseline = await single_host(hosts, src, sim, *opts)
        before = sim.stats.requests
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url,
                                                *common(sim.url, *opts)])
        jid = await hosts.job_id(starter)
        work = ["work", "--jobs-url", url, "--job", jid, "--until-idle", *common(sim.url)]
        frozen = await hosts.start("frozen", work, extra_env={"CRAWLER_TEST_STOP_AT": "granting:3"})
        await until(lambda: frozen.returncode is not None or _stopped(frozen.pid), "the worker frozen at its grant")
        assert frozen.returncode is None, hosts.stderr[frozen.pid]
        # Its own --max-pages/--page-size must not change the job's output (the job's options are the starter's).
        other = await hosts.start("w", [*work, "--max-pages", "2", "--page-size", "3"])
        code, err = await hosts.finish(starter)
        wcode, werr = await hosts.finish(other)
        sent = sim.stats.requests - before
        frozen.kill()
    assert code == SINGLE_CODE[src], err[-800:]
    assert wcode == 0, werr[-800:]
    got = rows(hosts.root / "starter" / "out.csv")
    assert len(got) == len(set(got)) and set(got) == set(expected)
    print(f"frozen worker: {sent} requests against a single-host run's {baseline}")
    assert sent <= baseline + 2 * 4, (sent, baseline)  # as in the test above: a page and a /userid/ an item held


def _stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP): state T in /proc."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    return False


async def test_a_worker_whose_commit_fails_stops_at_once_and_the_job_ends_once(hosts: Hosts, schema: str) -> None:
    """A `crawler work` whose commit writer fails with an error no rule expects (CRAWLER_TEST_FAIL_AT: a bug, a string
    the database refuses) exits 1 within 10 s of holding items, its last line naming the error, no traceback; the
    starter takes its items over and ends the job with a single-host run's rows once each."""
    src = handles(hosts.root, 60, offset=1700)
    opts = ("--max-items", "60", "--page-size", "10")
    url = pg_url(schema)
    async with simulator(hosts.key, latency=(0.02, 0.05)) as sim:
        expected, _ = await single_host(hosts, src, sim, *opts)
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url,
                                                *common(sim.url, *opts)])
        jid = await hosts.job_id(starter)
        worker = await hosts.start("w", ["work", "--jobs-url", url, "--job", jid, "--until-idle", *common(sim.url)],
                                   extra_env={"CRAWLER_TEST_FAIL_AT": "job_commit:1"})
        held = "SELECT count(*) FROM crawler_items WHERE owner LIKE %s"
        await until(lambda: worker.returncode is not None or pg_value(schema, held, f"%:{worker.pid}:%"),
                    "the worker holding items")
        wcode, werr = await hosts.finish(worker, bound=10)
        code, err = await hosts.finish(starter)
    assert wcode == 1, werr[-800:]
    last = werr.strip().splitlines()[-1]
    assert last.startswith("crawler: ") and "RuntimeError: test failure at job_commit:1" in last, werr[-800:]
    assert "Traceback" not in werr, werr[-3000:]
    assert code == SINGLE_CODE[src], err[-800:]
    assert worked(werr) == 0 and worked(err) == 60, (werr[-800:], err[-800:])  # the starter took the worker's items
    got = rows(hosts.root / "starter" / "out.csv")
    assert len(got) == len(set(got)) and set(got) == set(expected)


async def test_a_slow_credit_grant_keeps_every_window_of_the_key_within_its_limit(hosts: Hosts, schema: str) -> None:
    """A starter and a worker of one PostgreSQL job on one key (one Redis ledger), every credit grant held 2 s
    (CRAWLER_TEST_HOLD_AT): the simulator, at 20 requests per 2 s, counts at most 20 in any 2 s and answers no 429
    (a request waits for its grant before it takes its rate slot, so it leaves at its slot, not 2 s after)."""
    src = handles(hosts.root, 160, offset=200)
    url = pg_url(schema)
    # rate.margin 0.2 s, not the default 50 ms: interpreters on a busy machine can hold a start back by more.
    flags = ["--base-url", "", "--rate", "20", "--window", "2", "--rate-shared", REDIS, "--parallelism", "16"]
    env, config = {"CRAWLER_TEST_HOLD_AT": "grant:2"}, "[rate]\nmargin = 0.2\n"
    async with simulator(hosts.key, rate_limit=20, rate_window=2.0, burst_limit=20) as sim:
        flags[1] = sim.url
        starter = await hosts.start("starter", ["profiles", str(src), "-o", "out.csv", "--jobs-url", url, *flags],
                                    extra_env=env, config=config)
        jid = await hosts.job_id(starter)
        worker = await hosts.start("w", ["work", "--jobs-url", url, "--job", jid, "--until-idle", *flags],
                                   extra_env=env, config=config)
        code, err = await hosts.finish(starter)
        wcode, werr = await hosts.finish(worker)
    assert code == 0 and wcode == 0, (err[-800:], werr[-800:])
    assert worked(err) > 0 and worked(werr) > 0, (err[-800:], werr[-800:])  # both sent requests
    assert sim.stats.served_429 == 0 and sim.stats.max_in_window <= 20, sim.stats.snapshot()


async def test_max_credits_is_the_whole_jobs_budget_across_workers_and_kills(hosts: Hosts, schema: str) -> None:
    """--max-credits 300 over three workers, two of them SIGKILLed and restarted: the simulator counts ≤ 300; the
    starter and the restarted workers (which took part) stop resumable (exit 4); exporting the unfinished job is exit 2
    with its pending count."""
    src = handles(hosts.root, 300)
    url = pg_url(schema)
    async with simulator(hosts.key) as sim:
        # Answers are held below while a worker restarts: no request waits out its read timeout meanwhile.
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url,
                                                *common(sim.url, "--max-items", "30", "--max-credits", "300")],
                                    read_timeout=120)
        jid = await hosts.job_id(starter)
        # One worker is given the job, the other takes whatever job is open: both end on the job's budget.
        work = [["work", "--jobs-url", url, *job, "--until-idle", *common(sim.url)] for job in (["--job", jid], [])]
        workers = [await hosts.start(f"w{n}", work[n], read_timeout=120) for n in range(2)]
        for n, mark in ((0, 80), (1, 160)):
            await until(lambda m=mark: sim.stats.requests >= m, "requests", 60)  # type: ignore[misc]
            # Answers held while a worker restarts, until it holds items of the job: it takes part in the job however
            # slowly it starts (without --job, one that came after the budget stop would rightly find nothing: 0).
            sim.answering.clear()
            workers[n].kill()
            await workers[n].wait()
            workers[n] = await hosts.start(f"w{n}", work[n], read_timeout=120)
            await until(lambda p=workers[n].pid: pg_value(  # type: ignore[misc]
                schema, "SELECT count(*) FROM crawler_items WHERE job = %s AND owner LIKE %s", jid, f"%:{p}:%"),
                "the restarted worker holding items of the job")
            sim.answering.set()
        code, err = await hosts.finish(starter)
        ends = [await hosts.finish(w) for w in workers]
    assert code == 4, err[-800:]
    assert 250 <= sim.stats.requests <= 300, sim.stats.requests
    # The workers are idle only because the job may not spend more: resumable, 4, and the line says how to go on.
    for wcode, werr in ends:
        assert wcode == 4 and f"job {jid}" in werr.strip().splitlines()[-1], werr[-800:]
        assert "higher --max-credits" in werr.strip().splitlines()[-1]
    code, _, err = await hosts.run("export", ["export", jid, "-o", str(hosts.root / "x.csv"), "--jobs-url", url])
    assert code == 2 and re.search(r"not finished \([\d,]+ items pending\)", err), err
    assert not (hosts.root / "x.csv").exists()


async def test_the_starter_killed_then_run_again_resumes_and_exports(hosts: Hosts, schema: str) -> None:
    """The starting process SIGKILLed mid-run: the same command again resumes the job (same id) and writes OUT.csv
    with a single-host run's rows, once each."""
    src = handles(hosts.root, 60, offset=700)
    opts = ("--max-items", "60", "--page-size", "20")
    url = pg_url(schema)
    async with simulator(hosts.key) as sim:
        expected, _ = await single_host(hosts, src, sim, *opts)
        args = ["posts", str(src), "-o", "out.csv", "--jobs-url", url, *common(sim.url, *opts)]
        first = await hosts.start("starter", args)
        jid = await hosts.job_id(first)
        mark = sim.stats.requests + 60
        await until(lambda: sim.stats.requests >= mark, "the job under way")
        first.kill()
        await first.wait()
        assert await pg_value(schema, "SELECT count(*) FROM crawler_items WHERE status = 'pending'") > 0
        again = await hosts.start("starter", args)
        assert await hosts.job_id(again) == jid
        code, err = await hosts.finish(again)
    assert code == SINGLE_CODE[src], err[-800:]
    got = rows(hosts.root / "starter" / "out.csv")
    assert len(got) == len(set(got)) and set(got) == set(expected)


class Proxy:
    """A TCP proxy to PostgreSQL that the test controls: `cut()` drops every connection and refuses new ones;
    `freeze()` stops forwarding but keeps every connection open (a server that stops answering), `thaw()` goes on."""

    def __init__(self) -> None:
        self.port = 0
        self.up = True
        self.refused = 0  # connections refused while down
        self.held = 0  # chunks of data received while frozen and not forwarded yet
        self.held_event = asyncio.Event()  # set when a chunk is held
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._pipes: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()

    def freeze(self) -> None:
        self.held_event.clear()
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        self.up = False
        for w in list(self._pipes):
            w.transport.abort()
        self._pipes.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            self.refused += 1
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)
        self._pipes.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if not self._flowing.is_set():
                        self.held += 1
                        self.held_event.set()
                        await self._flowing.wait()
                        self.held -= 1
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_postgresql_cut_mid_run_workers_wait_and_lose_nothing(hosts: Hosts, schema: str) -> None:
    """The connections to PostgreSQL cut for a few seconds mid-run (within retry.stall_limit): the starter and a
    worker wait and go on, pgqueuer's errors logged on one line each; the rows are a single-host run's, once each."""
    src = handles(hosts.root, 80, offset=900)
    opts = ("--max-items", "60", "--page-size", "20")
    async with simulator(hosts.key) as sim, Proxy() as proxy:
        expected, _ = await single_host(hosts, src, sim, *opts)
        url = pg_url(schema, proxy.port)
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url,
                                                *common(sim.url, *opts)], stall_limit=30)
        jid = await hosts.job_id(starter)
        worker = await hosts.start("w", ["work", "--jobs-url", url, "--job", jid, "--until-idle", *common(sim.url)],
                                   stall_limit=30)
        mark = sim.stats.requests + 80
        await until(lambda: sim.stats.requests >= mark, "both under way")
        proxy.cut()
        cut_at = sim.stats.requests
        await asyncio.sleep(4)  # the outage itself (not a synchronisation)
        proxy.up = True
        code, err = await hosts.finish(starter)
        wcode, werr = await hosts.finish(worker)
    assert code == SINGLE_CODE[src], err[-800:]
    assert wcode == 0, werr[-800:]
    assert "Traceback" not in err + werr, (err + werr)[-3000:]  # warnings of one line, nothing a user can't read
    # pgqueuer's own errors are seen at the default level, with their message (they were hidden below -vv).
    assert re.search(r" ERROR pgqueuer: .+: OperationalError: \S", err + werr), (err + werr)[-3000:]
    assert cut_at < sim.stats.requests  # the run went on after the outage
    got = rows(hosts.root / "starter" / "out.csv")
    assert len(got) == len(set(got)) and set(got) == set(expected)


async def test_two_postgresql_outages_further_apart_than_the_stall_limit_each_get_the_whole_limit(
        hosts: Hosts, schema: str) -> None:
    """Two short outages (each well within retry.stall_limit = 5 s), the second more than the stall limit after the
    first: the run waits out both and finishes with a single-host run's rows (the first outage's clock is reset
    once the queue runs again)."""
    src = handles(hosts.root, 160, offset=1700)
    opts = ("--max-items", "60", "--page-size", "10")  # ~20 s of requests at 40 a second: both outages fall in it
    async with simulator(hosts.key) as sim, Proxy() as proxy:
        expected, _ = await single_host(hosts, src, sim, *opts)
        url = pg_url(schema, proxy.port)
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url,
                                                *common(sim.url, *opts)], stall_limit=5)
        await hosts.job_id(starter)
        mark = sim.stats.requests + 40
        await until(lambda: sim.stats.requests >= mark, "under way")
        for n in range(2):
            proxy.cut()
            await asyncio.sleep(1.5)  # the outage itself (not a synchronisation)
            proxy.up = True
            mark = sim.stats.requests + 40
            await until(lambda m=mark: sim.stats.requests >= m or starter.returncode is not None,  # type: ignore[misc]
                        "going again")
            if n == 0:
                await asyncio.sleep(5)  # the gap between the outages: longer than the stall limit
        assert starter.returncode is None, "the job outlasted both outages"
        code, err = await hosts.finish(starter)
    assert code == SINGLE_CODE[src], err[-800:]
    got = rows(hosts.root / "starter" / "out.csv")
    assert len(got) == len(set(got)) and set(got) == set(expected)


async def test_postgresql_lost_for_good_ends_the_run_with_one_line(hosts: Hosts, schema: str) -> None:
    """PostgreSQL gone past retry.stall_limit: the starter exits 1 with one line naming jobs.url."""
    src = handles(hosts.root, 80, offset=900)
    async with simulator(hosts.key) as sim, Proxy() as proxy:
        url = pg_url(schema, proxy.port)
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url,
                                                *common(sim.url, "--max-items", "60", "--page-size", "20")],
                                    stall_limit=3)
        await hosts.job_id(starter)
        mark = sim.stats.requests + 40
        await until(lambda: sim.stats.requests >= mark, "under way")
        proxy.cut()
        code, err = await hosts.finish(starter, bound=60)
    assert code == 1, err[-800:]
    last = err.strip().splitlines()[-1]
    assert "jobs.url = postgresql://" in last and "has not answered" in last, last


@pytest.mark.parametrize("back", [True, False], ids=["back", "gone"])
async def test_postgresql_cut_as_the_starter_enqueues_is_retried_like_any_store_call(hosts: Hosts, schema: str,
                                                                                     back: bool) -> None:
    """PostgreSQL cut just as the starter puts the job's items on the queue (pgqueuer's own connection): the starter
    pauses and retries like at any store call; PostgreSQL back, it finishes with a single-host run's rows; gone past
    retry.stall_limit, it exits 1 with the one line naming jobs.url."""
    src = handles(hosts.root, 20, offset=1920)
    opts = ("--max-items", "20", "--page-size", "10")
    async with simulator(hosts.key) as sim, Proxy() as proxy:
        expected, _ = await single_host(hosts, src, sim, *opts)
        url = pg_url(schema, proxy.port)
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url,
                                                *common(sim.url, *opts)], stall_limit=30 if back else 3,
                                    extra_env={"CRAWLER_TEST_STOP_AT": "enqueuing:1"})
        await until(lambda: _stopped(starter.pid), "the starter about to enqueue")
        await hosts.cut_and_go_on(proxy, starter)
        proxy.up = back
        code, err = await hosts.finish(starter)
    assert "Traceback" not in err, err[-3000:]
    if not back:
        last = err.strip().splitlines()[-1]
        assert code == 1 and "jobs.url = postgresql://" in last and "has not answered" in last, err[-800:]
        return
    assert code == SINGLE_CODE[src], err[-800:]
    got = rows(hosts.root / "starter" / "out.csv")
    assert expected and len(got) == len(set(got)) and set(got) == set(expected)


async def test_postgresql_cut_as_a_stopped_worker_puts_its_items_back_is_retried(hosts: Hosts, schema: str) -> None:
    """A worker stopped by SIGTERM, PostgreSQL cut just as its session puts the items it leaves back on the queue:
    it retries like at any store call and, PostgreSQL back, exits 143 with its one line; the starter finishes with
    a single-host run's rows."""
    src = handles(hosts.root, 60, offset=1300)
    opts = ("--max-items", "60", "--page-size", "10")
    async with simulator(hosts.key, latency=(0.02, 0.05)) as sim, Proxy() as proxy:
        expected, _ = await single_host(hosts, src, sim, *opts)
        url = pg_url(schema, proxy.port)
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url,
                                                *common(sim.url, *opts)], stall_limit=30)
        jid = await hosts.job_id(starter)
        worker = await hosts.start("w", ["work", "--jobs-url", url, "--job", jid, "--until-idle", *common(sim.url)],
                                   stall_limit=30, extra_env={"CRAWLER_TEST_STOP_AT": "enqueuing:1"})
        held = "SELECT count(*) FROM crawler_items WHERE status = 'pending' AND owner LIKE %s"
        await until(lambda: pg_value(schema, held, f"%:{worker.pid}:%"), "the worker holding items")
        worker.send_signal(signal.SIGTERM)
        await until(lambda: _stopped(worker.pid) or worker.returncode is not None, "the worker putting items back")
        pending = await pg_value(schema, "SELECT count(*) FROM crawler_items WHERE status = 'pending'")
        await hosts.cut_and_go_on(proxy, worker)
        proxy.up = True
        wcode, werr = await hosts.finish(worker)
        code, err = await hosts.finish(starter)
    assert pending > 0  # items to put back (an empty list needs no connection)
    assert wcode == 143 and "SIGTERM" in werr.strip().splitlines()[-1], werr[-800:]
    assert "Traceback" not in err + werr, (err + werr)[-3000:]
    assert code == SINGLE_CODE[src], err[-800:]
    got = rows(hosts.root / "starter" / "out.csv")
    assert len(got) == len(set(got)) and set(got) == set(expected)


async def test_a_key_worked_from_another_host_needs_one_redis_ledger(hosts: Hosts, schema: str) -> None:
    """While host A works the key through a local ledger, a worker on host B exits 2 naming rate.shared and the
    fix, before taking any item."""
    src = handles(hosts.root, 60, offset=1100)
    url = pg_url(schema)
    async with simulator(hosts.key, latency=(0.05, 0.1)) as sim:
        local = ["--base-url", sim.url, *RATE, "--rate-shared", "local", "--parallelism", "2"]
        starter = await hosts.start("a", ["posts", str(src), "-o", "out.csv", "--jobs-url", url, *local],
                                    extra_env={"CRAWLER_TEST_HOSTNAME": "host-a"})
        jid = await hosts.job_id(starter)
        other = await hosts.start("b", ["work", "--jobs-url", url, "--job", jid, "--until-idle", *local],
                                  extra_env={"CRAWLER_TEST_HOSTNAME": "host-b"})
        code, err = await hosts.finish(other)
        taken = await pg_value(schema, "SELECT count(*) FROM crawler_items WHERE owner LIKE 'host-b:%%'")
        with contextlib.suppress(ProcessLookupError):
            starter.kill()
        await starter.wait()
    assert code == 2, err[-800:]
    last = err.strip().splitlines()[-1]
    assert "rate.shared = 'local'" in last and "host-a" in last and "redis://" in last, last
    assert taken == 0


async def test_two_hosts_registering_together_on_one_key_with_local_ledgers_one_is_refused(hosts: Hosts,
                                                                                         schema: str) -> None:
    """Host B's worker checks the key's workers while host A's has checked but not yet committed its registration
    (both through local ledgers): B waits for A's and exits 2 naming host A and the fix; A works on."""
    url = pg_url(schema)
    async with simulator(hosts.key) as sim:
        local = ["--jobs-url", url, "--base-url", sim.url, *RATE, "--rate-shared", "local"]
        # A heartbeat far longer than A stays frozen: A counts as live however slowly B starts.
        first = await hosts.start("a", ["work", *local], heartbeat=120, extra_env={
            "CRAWLER_TEST_HOSTNAME": "host-a", "CRAWLER_TEST_STOP_AT": "registering:1"})
        await until(lambda: _stopped(first.pid) or first.returncode is not None, "host A inside its registration")
        second = await hosts.start("b", ["work", "--until-idle", *local], heartbeat=120,
                                   extra_env={"CRAWLER_TEST_HOSTNAME": "host-b"})
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND NOT granted"
        await until(lambda: second.returncode is not None or pg_value(schema, waiting, REGISTER_LOCK),
                    "host B past its check, or waiting for A's registration")
        first.send_signal(signal.SIGCONT)
        code, err = await hosts.finish(second, bound=60)
        alive = first.returncode is None
        first.send_signal(signal.SIGTERM)
        fcode, ferr = await hosts.finish(first, bound=60)
    assert code == 2, err[-800:]
    last = err.strip().splitlines()[-1]
    assert "host-a" in last and "redis://" in last, last
    assert alive and fcode == 143, ferr[-800:]


async def test_sigterm_stops_a_worker_and_the_starter_cleanly_and_the_job_resumes(hosts: Hosts, schema: str) -> None:
    """SIGTERM: a worker exits 143 and hands its items back at once (none left held by it); the starter exits 143
    saying how to resume; the same command then finishes the job with a single-host run's rows."""
    src = handles(hosts.root, 60, offset=1300)
    opts = ("--max-items", "60", "--page-size", "10")
    url = pg_url(schema)
    async with simulator(hosts.key, latency=(0.02, 0.05)) as fast:
        expected, _ = await single_host(hosts, src, fast, *opts)
    # The starter is frozen at its first commit until it gets its signal, and the job's answers are slow enough
    # that the worker cannot end it alone before its own: on a loaded machine a starter left running had finished
    # the job before the worker took an item, or before its SIGTERM came (killed by it after the run, exit -15).
    async with simulator(hosts.key, latency=(0.1, 0.2)) as sim:
        args = ["posts", str(src), "-o", "out.csv", "--jobs-url", url, *common(sim.url, *opts)]
        starter = await hosts.start("starter", args, extra_env={"CRAWLER_TEST_STOP_AT": "job_commit:1"})
        jid = await hosts.job_id(starter)
        await until(lambda: _stopped(starter.pid), "the starter at its first commit", bound=120)
        worker = await hosts.start("w", ["work", "--jobs-url", url, "--job", jid, "--until-idle", "--metrics-file",
                                         "w.prom", *common(sim.url)])
        mine = f"%:{worker.pid}:%"
        held = "SELECT count(*) FROM crawler_items WHERE status = 'pending' AND owner LIKE %s"
        await until(lambda: pg_value(schema, held, mine), "the worker holding items", bound=120)
        worker.send_signal(signal.SIGTERM)
        wcode, werr = await hosts.finish(worker, bound=60)
        left = await pg_value(schema, held, mine)
        starter.send_signal(signal.SIGTERM)
        starter.send_signal(signal.SIGCONT)
        try:
            code, err = await hosts.finish(starter, bound=60)
        except TimeoutError:
            raise AssertionError("the starter did not end after SIGTERM:\n"
                                 + "".join(hosts.stderr[starter.pid])[-3000:]) from None
        again = await hosts.start("starter", args)
        final, ferr = await hosts.finish(again)
    assert wcode == 143, werr[-800:]
    assert left == 0
    assert code == 143 and "resume with: crawler posts" in err.strip().splitlines()[-1], err[-800:]
    assert final == SINGLE_CODE[src], ferr[-800:]
    got = rows(hosts.root / "starter" / "out.csv")
    assert len(got) == len(set(got)) and set(got) == set(expected)


async def test_sigterm_during_the_export_leaves_no_output_and_the_same_command_exports(hosts: Hosts,
                                                                                       schema: str) -> None:
    """SIGTERM while the starter writes OUT.csv: exit 143 saying how to resume, no OUT.csv and no temporary file
    left; the same command then writes OUT.csv with a single-host run's rows."""
    src = handles(hosts.root, 20, offset=1880)
    opts = ("--max-items", "20", "--page-size", "10")
    async with simulator(hosts.key) as sim:
        expected, _ = await single_host(hosts, src, sim, *opts)
        args = ["posts", str(src), "-o", "out.csv", "--jobs-url", pg_url(schema), *common(sim.url, *opts)]
        starter = await hosts.start("starter", args, extra_env={"CRAWLER_TEST_STOP_AT": "exporting:1"})
        await until(lambda: _stopped(starter.pid), "the starter exporting", bound=120)
        starter.send_signal(signal.SIGTERM)
        starter.send_signal(signal.SIGCONT)
        code, err = await hosts.finish(starter, bound=30)
        left = sorted(p.name for p in (hosts.root / "starter").iterdir() if p.name.startswith("out.csv"))
        again = await hosts.start("starter", args)
        final, ferr = await hosts.finish(again)
    assert code == 143 and "resume with: crawler posts" in err.strip().splitlines()[-1], err[-800:]
    assert left == [], left
    assert final == SINGLE_CODE[src], ferr[-800:]
    got = rows(hosts.root / "starter" / "out.csv")
    assert expected and len(got) == len(set(got)) and set(got) == set(expected)


async def test_a_worker_whose_job_another_stopped_for_its_budget_exits_4(hosts: Hosts, schema: str) -> None:
    """`crawler work --until-idle` (no --job) working a job that another worker stops for its --max-credits (what a
    worker whose budget lease came back empty writes): idle only because that job may not spend more, it exits 4
    with the line naming the job, not 0 as if the work were done."""
    src = handles(hosts.root, 40, offset=1900)
    url = pg_url(schema)
    # Half-second answers: the job (about 120 requests) lasts far longer than a worker takes to start on a busy
    # machine, and the budget stop below comes while many items are left (it is refused otherwise).
    async with simulator(hosts.key, latency=(0.5, 0.5)) as sim:
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url,
                                                *common(sim.url, "--max-items", "20", "--page-size", "10")])
        jid = await hosts.job_id(starter)
        worker = await hosts.start("w", ["work", "--jobs-url", url, "--until-idle", *common(sim.url)])
        held = "SELECT count(*) FROM crawler_items WHERE status = 'pending' AND owner LIKE %s"
        await until(lambda: pg_value(schema, held, f"%:{worker.pid}:%"), "the worker holding items")
        async with await psycopg.AsyncConnection.connect(pg_url(schema), autocommit=True) as conn:
            stopped = await conn.execute(
                "UPDATE crawler_jobs SET status = 'budget' WHERE id = %s AND (SELECT count(*) FROM crawler_items"
                " WHERE job = %s AND status = 'pending') > 16", (jid, jid))
            assert stopped.rowcount == 1  # more items left than both processes hold at a time
        wcode, werr = await hosts.finish(worker)
        await hosts.finish(starter)
    assert wcode == 4, werr[-800:]
    assert f"job {jid}" in werr.strip().splitlines()[-1] and "higher --max-credits" in werr, werr[-800:]


async def test_a_first_sigterm_to_a_worker_commits_the_pages_under_way(hosts: Hosts, schema: str) -> None:
    """The starter of a PostgreSQL job, walking posts against a slow API, gets SIGTERM: nothing leaves but what was
    under way (at most the requests it says it waits for), those pages are committed, so the same command then
    completes the job with no request more than a single-host run of the same job (the answers were not lost)."""
    src = handles(hosts.root, 6, offset=1700)
    opts = ("--max-items", "30", "--page-size", "5")
    url = pg_url(schema)
    async with simulator(hosts.key) as fast:
        expected, baseline = await single_host(hosts, src, fast, *opts)
    args = ["posts", str(src), "-o", "out.csv", "--jobs-url", url]
    async with simulator(hosts.key, latency=(1.0, 1.0)) as sim:
        starter = await hosts.start("starter", [*args, *common(sim.url, *opts)])
        await until(lambda: sim.stats.requests >= 10 or starter.returncode is not None, "walks a few pages in")
        assert starter.returncode is None, "".join(hosts.stderr[starter.pid])
        before = sim.stats.requests
        starter.send_signal(signal.SIGTERM)
        code, err = await hosts.finish(starter, bound=60)
        after = sim.stats.requests
        waited = re.search(r"waiting for the (\d+) requests already sent", err)
        assert code == 143 and waited, err[-800:]
        assert after - before <= int(waited.group(1))  # only what was under way at the signal
        answer_at_once(sim)
        again = await hosts.start("starter", [*args, *common(sim.url, *opts)])
        code, err = await hosts.finish(again)
        total = sim.stats.requests
    assert code == SINGLE_CODE[src], err[-800:]
    got = rows(hosts.root / "starter" / "out.csv")
    assert len(got) == len(set(got)) and set(got) == set(expected)
    assert total <= baseline, (total, baseline)  # no answer under way at the signal was fetched again


async def test_sigterm_while_the_starter_waits_for_workers_past_the_budget_stops_it(hosts: Hosts, schema: str) -> None:
    """The job stopped for its budget while another worker still holds items (its requests hang on a slow
    simulator): the starter waiting for that worker stops at once on SIGTERM with exit 143 (which outranks the
    budget's 4), not a heartbeat timeout later."""
    src = handles(hosts.root, 40, offset=1840)
    url = pg_url(schema)
    cwd = hosts.root / "starter"
    cwd.mkdir(parents=True)
    # A long heartbeat timeout (the job's: the starter's): the worker counts as live for the starter's whole wait.
    (cwd / "long.toml").write_text("[retry]\nstall_limit = 10\n[jobs]\nheartbeat_timeout = 20\n")
    async with simulator(hosts.key) as sim, simulator(hosts.key, fault_rate=1.0, faults=frozenset({"slow"}),
                                                       slow_seconds=60) as slow:
        # The starter paced at 2 requests a second: the worker takes items long before the starter is done.
        args = ["posts", str(src), "-o", "out.csv", "--jobs-url", url, "--config", "long.toml", "--base-url", sim.url,
                "--rate", "120", "--window", "60", "--rate-shared", REDIS, "--parallelism", "4", "--max-items", "20",
                "--page-size", "10"]
        starter = await hosts.start("starter", args)
        jid = await hosts.job_id(starter)
        worker = await hosts.start("w", ["work", "--jobs-url", url, "--job", jid, *common(slow.url)])
        held = "SELECT count(*) FROM crawler_items WHERE status = 'pending' AND owner LIKE %s"
        await until(lambda: pg_value(schema, held, f"%:{worker.pid}:%"), "the worker holding items")
        # What a worker whose --max-credits lease came back empty writes (PgLease.take): the job stopped for its
        # budget. The starter finishes the items in hand (no cap of its own) and then waits for the worker's.
        async with await psycopg.AsyncConnection.connect(pg_url(schema), autocommit=True) as conn:
            await conn.execute("UPDATE crawler_jobs SET status = 'budget' WHERE id = %s", (jid,))
        # The starter's session ended (it left: its worker row aged by a day): it is waiting for the worker.
        left = "SELECT count(*) FROM crawler_workers WHERE pid = %s AND seen < now() - interval '1 hour'"
        await until(lambda: starter.returncode is not None or pg_value(schema, left, starter.pid),
                    "the starter waiting")
        still = await pg_value(schema, held, f"%:{worker.pid}:%")
        starter.send_signal(signal.SIGTERM)
        code, err = await hosts.finish(starter, bound=60)
    assert still > 0  # the starter was waiting for the worker when it got SIGTERM
    assert code == 143 and "resume with: crawler posts" in err.strip().splitlines()[-1], err[-800:]
    assert not (cwd / "out.csv").exists()


async def test_work_warns_once_about_the_job_options_it_ignores(hosts: Hosts, schema: str) -> None:
    """`crawler work` given --max-credits, --page-size or --raw (the job's options, its starter's) prints one warning
    line naming them; without them, no warning."""
    url = pg_url(schema)
    code, _, err = await hosts.run("w", ["work", "--jobs-url", url, "--until-idle", "--max-credits", "5",
                                         "--page-size", "10", "--raw"])
    plain, _, perr = await hosts.run("w", ["work", "--jobs-url", url, "--until-idle"])
    assert code == 0 and plain == 0, err + perr
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1, err
    assert all(flag in warnings[0] for flag in ("--max-credits", "--page-size", "--raw")), warnings
    assert "--max-items" not in warnings[0] and "--bom" not in warnings[0], warnings
    assert "warning" not in perr, perr


async def test_a_postgresql_job_resolves_names_again_after_crawl_id_ttl_days(hosts: Hosts, schema: str) -> None:
    """crawl.id_ttl_days = 0 holds for a PostgreSQL job's workers too: a handle -> id binding already in the data
    directory (here a wrong one) is expired, so every name is asked of /userid/ again and no other user's posts are
    taken for it."""
    from crawler.stores.users import UserDirectory

    src = handles(hosts.root, 4, offset=1700)
    names = src.read_text().split()
    world = World(WORLD)
    cwd = hosts.root / "starter"
    users = UserDirectory(cwd / ".crawler" / "users.db")
    for name in names:
        users.learn(name, world.user_id(0))  # bound now, to somebody else's id
    users.close()
    (cwd / "ttl.toml").write_text(f"[retry]\nstall_limit = 10\nbase_delay = 0.05\nmax_delay = 0.5\n"
                                  f"[jobs]\nheartbeat_timeout = {HEARTBEAT}\n[crawl]\nid_ttl_days = 0\n")
    async with simulator(hosts.key) as sim:
        code, _, err = await hosts.run("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", pg_url(schema),
                                                   "--config", "ttl.toml", *common(sim.url, "--max-items", "5")])
        asked = sim.stats.by_endpoint["/userid"]
    assert code in (0, 3), err[-800:]
    assert asked == len(names), (asked, err[-800:])
    videos = [r[0] for r in rows(cwd / "out.csv")]
    assert len(videos) == len(set(videos))  # four names, never one other user's posts four times


async def test_a_worker_resolves_again_a_handle_older_than_its_id_ttl_days(hosts: Hosts, schema: str) -> None:
    """`crawler work` trusts a cached handle -> id no longer than its crawl.id_ttl_days: with 1 day, handles
    learned two days ago cost one `/userid/` call each (the worker used the 7-day default whatever the setting)."""
    from crawler.stores.users import UserDirectory

    world = World(WORLD)
    indexes = [i for i in range(200) if (u := world.user(i)) is not None and not u.private][:3]
    names = [world.handle(i) for i in indexes]
    src = hosts.root / "three.txt"
    src.write_text("\n".join(names) + "\n")
    cache = UserDirectory(hosts.root / "w" / ".crawler" / "users.db", clock=lambda: time.time() - 2 * 86400)
    try:
        for i in indexes:
            cache.learn(world.handle(i), world.user_id(i))
    finally:
        cache.close()
    (hosts.root / "ttl.toml").write_text(f"[crawl]\nid_ttl_days = 1\n[jobs]\nheartbeat_timeout = {HEARTBEAT}\n")
    url = pg_url(schema)
    async with simulator(hosts.key) as sim:
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url, "--max-items",
                                                "5", *common(sim.url)],
                                    extra_env={"CRAWLER_TEST_KILL_AT": "job_printed:1"})
        jid = await hosts.job_id(starter)
        await starter.wait()
        worker = await hosts.start("w", ["work", "--jobs-url", url, "--job", jid, "--until-idle", *common(sim.url)],
                                   extra_env={"CRAWLER_CONFIG": str(hosts.root / "ttl.toml")})
        code, err = await hosts.finish(worker)
        assert code == 0, err[-800:]
        assert sim.stats.by_endpoint["/userid"] == len(names)


async def test_the_input_file_is_never_the_output_of_a_postgresql_job(hosts: Hosts, schema: str) -> None:
    """`-o` naming the input file: exit 2 before any request, the input untouched, whether the job is new, run again
    with --restart, or resumed (created by an earlier run to another output); --overwrite is the way to mean it."""
    src = hosts.root / "handles.csv"  # a list of handles, one a line, that happens to end in .csv
    src.write_bytes(handles(hosts.root, 5, offset=1940).read_bytes())
    before = src.read_bytes()
    url = pg_url(schema)
    async with simulator(hosts.key) as sim:
        first = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url,
                                              *common(sim.url)], extra_env={"CRAWLER_TEST_STOP_AT": "job_printed:1"})
        jid = await hosts.job_id(first)
        await until(lambda: _stopped(first.pid), "the starter frozen once the job exists")
        first.kill()
        await first.wait()
        for extra in ([], ["--restart"]):
            code, _, err = await hosts.run("starter", ["posts", str(src), "-o", str(src), "--jobs-url", url,
                                                       *common(sim.url), *extra])
            assert code == 2 and "is the input file" in err.strip().splitlines()[-1], err[-800:]
            assert src.read_bytes() == before
        assert sim.stats.requests == 0
        assert await pg_value(schema, "SELECT count(*) FROM crawler_items WHERE job = %s", jid) == 5  # kept


async def test_the_starters_summary_and_metrics_count_what_it_billed(hosts: Hosts, schema: str) -> None:
    """The starter alone on a small job (two private accounts), with --summary-json and --metrics-file: this run's
    credits_billed and responses are the simulator's (not 0 and none) and its failures by reason the failures file's,
    as a local run reports them."""
    src = handles(hosts.root, 10, offset=400)
    async with simulator(hosts.key) as sim:
        code, _, err = await hosts.run("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", pg_url(schema),
                                                   "--summary-json", "s.json", "--metrics-file", "m.prom",
                                                   *common(sim.url, "--max-items", "20")])
        sent, billed = sim.stats.requests, sum(sim.stats.billed.values())
    assert code == 3, err[-800:]
    summary = json.loads((hosts.root / "starter" / "s.json").read_text())
    with (hosts.root / "starter" / "out.failures.csv").open(newline="") as fh:
        reasons = [r["reason"] for r in csv.DictReader(fh)]
    assert summary["failures"] == {"private": 2} and reasons == ["private", "private"], summary
    assert (summary["run_requests"], summary["run_credits_billed"]) == (sent, billed), summary
    assert sum(summary["responses"].values()) == sent, summary
    # the rate used, as a local run reports it (the per-second cap and the margin), not the --rate asked for
    assert summary["rate_used"] == Pace(limit=2400, window=60.0).effective_rate < 2400, summary
    prom = (hosts.root / "starter" / "m.prom").read_text()
    assert re.search(rf'^crawler_last_run_credits_billed{{command="posts"}} {billed}\.0$', prom, re.M), prom
    assert re.search(r'^crawler_last_run_responses{command="posts",outcome="ok"} [1-9]', prom, re.M), prom


async def test_the_region_lookup_of_a_postgresql_job_counts_under_its_max_credits(hosts: Hosts, schema: str) -> None:
    """`search-videos --region --max-credits 3 --jobs-url` with no region list cached: the simulator receives 3
    requests in all, the region lookup included (exit 4), and the job's requests_sent is that count."""
    w = World(WORLD)
    region = max(sorted(w.regions()), key=lambda r: len(w.search_videos("dance", region=r)))
    assert len(w.search_videos("dance", region=region)) >= 6, "the search needs 3 pages of 2"
    async with simulator(hosts.key) as sim:
        code, _, err = await hosts.run("starter", ["search-videos", "dance", "-o", "out.csv", "--region", region,
                                                   "--jobs-url", pg_url(schema), "--summary-json", "s.json",
                                                   *common(sim.url, "--parallelism", "1", "--page-size", "2",
                                                           "--max-credits", "3")])
    assert code == 4, err[-800:]
    assert sim.stats.requests == 3 and sim.stats.by_endpoint["/region-list"] == 1, sim.stats.snapshot()
    summary = json.loads((hosts.root / "starter" / "s.json").read_text())
    assert (summary["requests_sent"], summary["run_requests"]) == (3, 3), summary


async def test_a_postgresql_job_counts_failed_reply_walks_in_items_failed(hosts: Hosts, schema: str) -> None:
    """`comments --with-replies --max-pages 1 --jobs-url` on a post whose comments fit one page but some of whose
    replies do not: exit 3, and each capped reply walk (a failures file row) is counted in items_failed."""
    w = World(WORLD)
    post = next(p for i in range(WORLD.users) if not w.is_missing(i) and not w.is_private(i) for p in w.posts(i)
                if 0 < len(list(w.comments(p.video_id))) <= 20
                and any(c.reply_total > 20 for c in w.comments(p.video_id)))
    capped = {f"{post.video_id},{c.comment_id}" for c in w.comments(post.video_id) if c.reply_total > 20}
    (hosts.root / "in.txt").write_text(post.video_id + "\n")
    async with simulator(hosts.key) as sim:
        code, _, err = await hosts.run("starter", ["comments", str(hosts.root / "in.txt"), "-o", "out.csv",
                                                   "--with-replies", "--jobs-url", pg_url(schema),
                                                   "--summary-json", "s.json",
                                                   *common(sim.url, "--max-pages", "1", "--page-size", "20")])
    assert code == 3, err[-800:]
    with (hosts.root / "starter" / "out.failures.csv").open(newline="") as fh:
        assert {r["input"] for r in csv.DictReader(fh)} == capped
    summary = json.loads((hosts.root / "starter" / "s.json").read_text())
    assert (summary["items_done"], summary["items_failed"]) == (1, len(capped)), summary
    assert f"crawler: {len(capped)} items failed; see " in err, err[-800:]


async def test_crawler_jobs_lists_a_service_worker_that_worked_the_job_after_it_goes_idle(hosts: Hosts,
                                                                                         schema: str) -> None:
    """A `crawler work` service (no --until-idle) works items of a job, then idles waiting for new jobs: `crawler
    jobs` still lists it among the job's workers seen, beside the starter."""
    src = handles(hosts.root, 40, offset=1000)
    url = pg_url(schema)
    async with simulator(hosts.key, latency=(0.02, 0.05)) as sim:
        starter = await hosts.start("starter", ["posts", str(src), "-o", "out.csv", "--jobs-url", url,
                                                *common(sim.url, "--max-items", "30", "--page-size", "10")])
        jid = await hosts.job_id(starter)
        service = await hosts.start("w", ["work", "--jobs-url", url, *common(sim.url)])
        code, err = await hosts.finish(starter)
        idle = "SELECT count(*) FROM crawler_workers WHERE pid = %s AND job IS NULL"
        await until(lambda: pg_value(schema, idle, service.pid), "the service idle, waiting for new jobs")
        jcode, listing, jerr = await hosts.run("jobs", ["jobs", "--jobs-url", url, "--json"])
        service.send_signal(signal.SIGTERM)
        wcode, werr = await hosts.finish(service, bound=60)
    assert code in (0, 3), err[-800:]
    assert worked(werr) > 0, werr[-800:]
    assert jcode == 0, jerr
    (job,) = json.loads(listing)
    assert job["id"] == jid
    assert sorted(w["pid"] for w in job["workers"]) == sorted([starter.pid, service.pid]), job["workers"]
    assert wcode == 143, werr[-800:]


async def test_a_finished_job_run_again_without_bom_still_exports_its_output_byte_for_byte(hosts: Hosts,
                                                                                          schema: str) -> None:
    """A job finished with --bom, its command run again without --bom ("already complete", nothing written): `crawler
    export` still reproduces OUT.csv byte for byte (the BOM it was written with)."""
    src = handles(hosts.root, 5, offset=1400)
    url = pg_url(schema)
    args = ["posts", str(src), "-o", "out.csv", "--jobs-url", url]
    async with simulator(hosts.key) as sim:
        first, _, err = await hosts.run("starter", [*args, "--bom", *common(sim.url, "--max-items", "10")])
        assert first in (0, 3), err[-800:]
        again, _, err = await hosts.run("starter", [*args, *common(sim.url, "--max-items", "10")])
        assert again == first and "already complete" in err, err[-800:]
    out = hosts.root / "starter" / "out.csv"
    jid = await pg_value(schema, "SELECT id FROM crawler_jobs")
    code, _, err = await hosts.run("export", ["export", jid, "-o", str(hosts.root / "again.csv"), "--jobs-url", url])
    assert code == 0, err
    assert out.read_bytes().startswith("\ufeff".encode())
    assert (hosts.root / "again.csv").read_bytes() == out.read_bytes()


async def test_sigterm_while_postgresql_is_away_stops_a_worker_at_once(hosts: Hosts, schema: str) -> None:
    """PostgreSQL cut mid-run and a `crawler work` (a systemd service) sent SIGTERM while it waits for it: it exits 143
    within a few seconds, not after retry.stall_limit (60 s here; systemd kills a unit after 90 s by default), and the
    job, resumed, has a single-host run's rows once each."""
    src = handles(hosts.root, 60, offset=1300)
    opts = ("--max-items", "60", "--page-size", "10")
    async with simulator(hosts.key, latency=(0.02, 0.05)) as sim, Proxy() as proxy:
        expected, _ = await single_host(hosts, src, sim, *opts)
        url = pg_url(schema, proxy.port)
        args = ["posts", str(src), "-o", "out.csv", "--jobs-url", url, *common(sim.url, *opts)]
        starter = await hosts.start("starter", args, stall_limit=60)
        jid = await hosts.job_id(starter)
        worker = await hosts.start("w", ["work", "--jobs-url", url, "--job", jid, *common(sim.url)], stall_limit=60)
        mine = f"%:{worker.pid}:%"
        held = "SELECT count(*) FROM crawler_items WHERE status = 'pending' AND owner LIKE %s"
        await until(lambda: worker.returncode is not None or pg_value(schema, held, mine), "the worker holding items")
        assert worker.returncode is None, hosts.stderr[worker.pid]
        proxy.cut()
        await until(lambda: any("lost" in line or "failed" in line for line in hosts.stderr[worker.pid]),
                    "the worker noticing the outage", 30)
        worker.send_signal(signal.SIGTERM)
        starter.send_signal(signal.SIGTERM)
        wcode, werr = await hosts.finish(worker, bound=15)
        code, err = await hosts.finish(starter, bound=15)
        proxy.up = True
        again = await hosts.start("starter", args, stall_limit=60)
        final, ferr = await hosts.finish(again)
    assert wcode == 143, werr[-800:]
    assert code == 143 and "resume with: crawler posts" in err.strip().splitlines()[-1], err[-800:]
    assert "Traceback" not in werr + err, (werr + err)[-3000:]
    assert final == SINGLE_CODE[src], ferr[-800:]
    got = rows(hosts.root / "starter" / "out.csv")
    assert len(got) == len(set(got)) and set(got) == set(expected)


async def test_an_edited_input_continues_its_postgresql_job_and_closes_the_one_it_supersedes(hosts: Hosts,
                                                                                            schema: str) -> None:
    """A starter stopped part-way, its input edited (items added) and started again: its rows are kept, no done
    item is fetched again, the output is a single-host run's, and `crawler jobs` lists no open old job."""
    world = World(WORLD)
    names = world.sample_handles(1530)[1500:]
    src = hosts.root / "in.txt"
    src.write_text("\n".join(names[:20]) + "\n")
    opts = ("--max-items", "20", "--page-size", "10")
    url = pg_url(schema)
    async with simulator(hosts.key, latency=(0.3, 0.3), record_arrivals=True) as sim:
        args = ["posts", str(src), "-o", "out.csv", "--jobs-url", url, *common(sim.url, *opts)]
        starter = await hosts.start("starter", args)
        old = await hosts.job_id(starter)
        done_sql = "SELECT count(*) FROM crawler_items WHERE job = %s AND status = 'done'"
        await until(lambda: _at_least(pg_value(schema, done_sql, old), 4), "the starter finishing some items")
        starter.send_signal(signal.SIGTERM)
        code, err = await hosts.finish(starter, bound=60)
        assert code == 143, err[-800:]
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute("SELECT key FROM crawler_items WHERE job = %s AND status = 'done'", (old,))
            done = [k for (k,) in await cur.fetchall()]
        src.write_text("\n".join(names) + "\n")  # ten handles added
        since = len(sim.stats.targets)
        again = await hosts.start("starter", args)
        code, err = await hosts.finish(again)
        asked = {v for t in sim.stats.targets[since:] for vs in parse_qs(urlsplit(t).query).values() for v in vs}
        expected, _ = await single_host(hosts, src, sim, *opts)
    assert code == SINGLE_CODE[src], err[-800:]
    done_ids = {v for h in done for v in (h, world.user_id(world.index_by_handle(h) or 0))}
    assert done and not asked & done_ids  # not one request for an item the stopped job had done
    assert set(names[20:]) <= asked  # the added ones were fetched
    got = rows(hosts.root / "starter" / "out.csv")
    assert len(got) == len(set(got)) and set(got) == set(expected)
    code, listing, err = await hosts.run("jobs", ["jobs", "--jobs-url", url, "--json"])
    assert code == 0, err
    assert [(j["id"] == old, j["status"]) for j in json.loads(listing)] == [(False, "done")]


async def test_another_input_sharing_under_half_of_a_postgresql_job_is_refused_then_continued(hosts: Hosts,
                                                                                            schema: str) -> None:
    """a.txt, then b.txt (sharing 1 of its 4 handles) for the same -o of a --jobs-url job: exit 2 before any request
    with the line a local job gives, the job left as it was; with --continue the job goes on with b's new items."""
    names = World(WORLD).sample_handles(1560)[1550:]
    first, other = hosts.root / "a.txt", hosts.root / "b.txt"
    first.write_text("\n".join(names[:3]) + "\n")
    other.write_text("\n".join(names[2:6]) + "\n")
    url = pg_url(schema)
    async with simulator(hosts.key) as sim:
        for where, jobs in (("starter", ["--jobs-url", url]), ("local", [])):
            code, _, err = await hosts.run(where, ["profiles", str(first), "-o", "out.csv", *jobs, *common(sim.url)])
            assert code == 0, err[-800:]
        before = sim.stats.requests
        lines = {}
        for where, jobs in (("starter", ["--jobs-url", url]), ("local", [])):
            code, _, err = await hosts.run(where, ["profiles", str(other), "-o", "out.csv", *jobs, *common(sim.url)])
            assert code == 2, err[-800:]
            lines[where] = err.strip().splitlines()[-1]
        refused = sim.stats.requests - before
        _, listing, _ = await hosts.run("jobs", ["jobs", "--jobs-url", url, "--json"])
        code, _, err = await hosts.run("starter", ["profiles", str(other), "-o", "out.csv", "--jobs-url", url,
                                                   "--continue", *common(sim.url)])
        added = sim.stats.requests - before
    assert refused == 0
    assert f"out.csv holds the job of {first}, and {other} shares 1 of its 4 items with it" in lines["starter"]
    assert "--restart" in lines["starter"] and "--continue" in lines["starter"]
    assert lines["starter"] == lines["local"]  # the local job store's check, word for word
    assert [(j["items"], j["done"], j["status"]) for j in json.loads(listing)] == [(3, 3, "done")]
    assert code == 0 and added == 3, err[-800:]  # only the three new handles asked
    with (hosts.root / "starter" / "out.csv").open(encoding="utf-8", newline="") as fh:
        assert sorted(r["handle"] for r in csv.DictReader(fh)) == sorted(names[:6])


async def _at_least(value: Any, n: int) -> bool:
    return int(await value or 0) >= n


async def test_auto_parallelism_grows_a_postgresql_worker_with_the_latency(hosts: Hosts, schema: str) -> None:
    """parallelism = "auto" in a PostgreSQL job at 100 requests per second keeps few items at a time at no latency and
    grows to rate × latency at 0.3 s (the server sees that many requests at once), each item worked once, no 429."""
    chosen: dict[float, int] = {}
    at_once: dict[float, int] = {}
    for n, latency in enumerate((0.0, 0.3)):
        src = handles(hosts.root, 300, offset=1300 + 300 * n)  # two jobs: each input its own
        async with simulator(hosts.key, latency=(latency, latency), rate_limit=100, rate_window=1.0,
                             burst_limit=100) as sim:
            code, _, err = await hosts.run(f"starter{n}", [
                "profiles", str(src), "-o", "out.csv", "--jobs-url", pg_url(schema), "--summary-json", "s.json",
                "--base-url", sim.url, "--rate", "100", "--window", "1", "--max-per-second", "100",
                "--rate-shared", REDIS], 180)
            assert code == 0, err[-800:]
            assert sim.stats.served_429 == 0, sim.stats.snapshot()
            # One request per profile: an item worked twice would ask twice.
            assert sim.stats.by_endpoint["/userinfo-by-username"] == 300, sim.stats.snapshot()
            at_once[latency] = sim.stats.max_in_flight
        with (hosts.root / f"starter{n}" / "out.csv").open(encoding="utf-8", newline="") as fh:
            names = [r["handle"] for r in csv.DictReader(fh)]
        assert sorted(names) == sorted(src.read_text().split())
        chosen[latency] = json.loads((hosts.root / f"starter{n}" / "s.json").read_text())["parallelism"]
    assert chosen[0.3] > chosen[0.0], chosen
    assert chosen[0.3] >= 100 * 0.3, chosen  # enough items at a time to keep 100/s busy at 0.3 s each
    # Server-side: well past the 8 a fixed default holds at once (rate × latency is ~28 at the ledger's margin).
    assert at_once[0.3] > 16 and at_once[0.3] > at_once[0.0], at_once
