"""The deployment files under deploy/: what the docs print, the units under a real systemd, the cron line as printed.

The systemd test starts a private `systemd --user` (systemd 252 here; `.ci/run` installs it): in a mount namespace of
its own (`unshare --mount`) with a tmpfs on /run/systemd holding the `system/` marker a manager looks for, its
runtime and configuration directories in the test's temporary directory, and its own cgroup
(`/sys/fs/cgroup/{systemd,unified}/crawler-test-*`; started in the root cgroup, a manager would move every process
of the machine into its `init.scope`). Everything it started is killed and its cgroups removed when the test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import psycopg
import pytest

from crawler.runs.ingest import TEST_NOW_ENV
from crawler.sim.server import Simulator
from tests.conftest import KEY, SimFactory
from tests.test_cli import FAST_TOML, crawler, environ, error_line, public_users
from tests.test_distributed import pg_url, pg_value, schema  # noqa: F401 (a fixture)
from tests.test_ingest import day, write_watch
from tests.test_ingest_edges import WORLD, assert_day_0_complete

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = DEPLOY / "systemd"
SHIPPED_CRAWLER = "/srv/crawler/.venv/bin/crawler"  # where the docs install the package
CODE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def venv_crawler() -> Path:
    """The `crawler` script of the virtualenv running the tests (what `make install` puts there)."""
    path = Path(sys.executable).parent / "crawler"
    assert path.exists(), f"{path} is missing: install the package into the test's virtualenv (make install)"
    return path


def test_every_deploy_file_is_printed_verbatim_in_the_docs() -> None:
    """Each file under deploy/ appears whole, byte for byte, in a fenced block of README.md or a docs/ page."""
    blocks = {b for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
              for b in CODE.findall(page.read_text(encoding="utf-8"))}
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
    assert files
    missing = [str(p.relative_to(ROOT)) for p in files if p.read_text(encoding="utf-8") not in blocks]
    assert not missing, f"not printed verbatim in docs/: {missing}"


def test_the_units_state_their_clean_exits_and_keep_comments_on_lines_of_their_own() -> None:
    """systemd allows comments only at the start of a line; the daily job's documented ends (3, 4, 130, 143) and the
    worker's clean stops (130, 143) are successes; both wait for the network, run as `crawler` in a state
    directory and read the key from the 0600 env file; the daily job writes its metrics and summary JSON."""
    for path in sorted(UNITS.iterdir()):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert line.lstrip()[:1] in ("#", ";") or "#" not in line, f"{path.name}:{n}: an inline comment"
    for name, clean in (("crawler-daily.service", {"3", "4", "130", "143"}), ("crawler-worker.service",
                                                                              {"130", "143"})):
        keys = directives(UNITS / name)
        assert set(keys["SuccessExitStatus"].split()) == clean, name
        assert keys["After"] == keys["Wants"] == "network-online.target", name
        assert keys["User"] == "crawler" and keys["StateDirectory"].split()[0] == "crawler", name
        assert keys["EnvironmentFile"] == "/etc/crawler/env", name
    start = directives(UNITS / "crawler-daily.service")["ExecStart"].split()
    assert "--metrics-file" in start and "--summary-json" in start
    assert "TIKLIVE_API_KEY=your-key" in (DEPLOY / "crawler.env").read_text(encoding="utf-8").splitlines()


def directives(path: Path) -> dict[str, str]:
    """A unit file's `Key=value` lines (one value per key in these files)."""
    pairs = (line.split("=", 1) for line in path.read_text(encoding="utf-8").splitlines()
             if "=" in line and not line.startswith(("#", ";")))
    return {k: v for k, v in pairs}


@pytest.mark.slow
async def test_systemd_analyze_verify_accepts_the_shipped_units(tmp_path: Path) -> None:
    """`systemd-analyze verify` loads the three files as shipped and has nothing to say; the executable they name
    is stood in for by a stub on a tmpfs over /srv, in a mount namespace of the check's own."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: apt-get install systemd (see .ci/run)"
    script = (f"set -e; mount -t tmpfs tmpfs /srv; mkdir -p {Path(SHIPPED_CRAWLER).parent};"
              f" printf '#!/bin/sh\\n' > {SHIPPED_CRAWLER}; chmod +x {SHIPPED_CRAWLER};"
              ' exec systemd-analyze verify --man=no "$@"')
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "verify",
        *(str(p) for p in sorted(UNITS.iterdir())), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and not out.strip(), out.decode()


# --- a real systemd ---

LAUNCH = """\
for h in $HIERARCHIES; do
  mkdir -p "$h/$CG" && echo $$ > "$h/$CG/cgroup.procs" || exit 97
done
exec unshare --mount --propagation private --fork --kill-child sh -c \
  'mount -t tmpfs tmpfs /run/systemd && mkdir /run/systemd/system && exec "$0" --user --log-target=console' "$SYSTEMD"
"""


def cgroup_hierarchies() -> list[Path]:
    """Where systemd keeps its cgroups: the named v1 and the v2 hierarchy of a hybrid machine, else the v2 root."""
    hybrid = [p for p in (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified")) if p.is_dir()]
    return hybrid or [Path("/sys/fs/cgroup")]


class UserSystemd:
    """A private `systemd --user` and a `systemctl --user` that talks to it."""

    def __init__(self, home: Path) -> None:
        self.config = home / "config"  # XDG_CONFIG_HOME: units in systemd/user/, %S (the state root) too
        self.runtime = home / "runtime"  # XDG_RUNTIME_DIR: the manager's socket
        self.log = home / "systemd.log"  # the manager's log and the units' output (inherited)
        self.units = self.config / "systemd" / "user"
        self.cgroup = f"crawler-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.proc: asyncio.subprocess.Process | None = None

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
                "XDG_CONFIG_HOME": str(self.config), "XDG_RUNTIME_DIR": str(self.runtime)}

    async def start(self) -> None:
        binary = shutil.which("systemd") or "/lib/systemd/systemd"
        assert Path(binary).exists(), "systemd is missing: apt-get install systemd (see .ci/run)"
        self.units.mkdir(parents=True)
        self.runtime.mkdir(mode=0o700)
        (self.config / "systemd" / "user.conf").write_text(
            "[Manager]\nDefaultStandardOutput=inherit\nDefaultStandardError=inherit\n")
        env = self.env() | {"CG": self.cgroup, "SYSTEMD": binary,
                            "HIERARCHIES": " ".join(str(h) for h in cgroup_hierarchies())}
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec("sh", "-c", LAUNCH, env=env, stdout=log,
                                                             stderr=asyncio.subprocess.STDOUT)
        await self.until(self._ready, 30, "the user manager to be running")

    async def _ready(self) -> bool:
        # `is-system-running` answers "offline" outside the manager's mount namespace (no /run/systemd/system
        # there) without asking; the manager's own property does not.
        _, state = await self.systemctl("show", "-p", "SystemState", check=False)
        return state.strip() in ("SystemState=running", "SystemState=degraded")

    async def until(self, ready: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
        """Poll ``ready`` until it holds; fail after ``seconds`` or as soon as the manager is gone."""
        deadline = asyncio.get_running_loop().time() + seconds
        while not await ready():
            assert self.proc is not None and self.proc.returncode is None, f"systemd ended: {self.tail()}"
            assert asyncio.get_running_loop().time() < deadline, f"no {what} within {seconds} s: {self.tail()}"
            await asyncio.sleep(0.1)

    async def systemctl(self, *args: str, check: bool = True, seconds: float = 60) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec("systemctl", "--user", "--no-pager", *args, env=self.env(),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), seconds)
        assert proc.returncode is not None
        assert not check or proc.returncode == 0, f"systemctl {' '.join(args)}: {out.decode()}\n{self.tail()}"
        return proc.returncode, out.decode()

    async def show(self, unit: str) -> dict[str, str]:
        _, out = await self.systemctl("show", "-p", "ActiveState,Result,ExecMainStatus", unit)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    async def stop(self) -> None:
        """Stop the manager (it stops its units), then kill whatever is left in its cgroups and remove them."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.systemctl("exit", check=False, seconds=10)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()  # unshare --kill-child takes systemd with it
                await asyncio.wait_for(self.proc.wait(), 10)
        trees = [h / self.cgroup for h in Path("/sys/fs/cgroup").iterdir() if (h / self.cgroup).is_dir()]
        if Path("/sys/fs/cgroup", self.cgroup).is_dir():
            trees.append(Path("/sys/fs/cgroup", self.cgroup))
        deadline = asyncio.get_running_loop().time() + 20
        for tree in trees:
            for sub in sorted((p for p in tree.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [tree]:
                while True:
                    for pid in (sub / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                    try:
                        sub.rmdir()
                        break
                    except OSError:  # busy until the killed processes are gone
                        assert asyncio.get_running_loop().time() < deadline, f"cgroup {sub} stays busy"
                        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def user_systemd(home: Path) -> AsyncIterator[UserSystemd]:
    manager = UserSystemd(home)
    try:
        await manager.start()
        yield manager
    finally:
        await manager.stop()


def unit_for_the_test(name: str, *, etc: Path, crawler: Path) -> str:
    """The shipped unit with three mechanical rewrites and nothing else: `User=` dropped (a user manager runs its
    units as its own user and cannot switch), `/etc/crawler/` (the env file, the watch list) moved into the test's
    directory, and the installed `crawler` replaced by the test virtualenv's. Every other line, SuccessExitStatus=,
    EnvironmentFile=, StateDirectory=, WorkingDirectory=%S/... and the command's arguments, runs as shipped."""
    text = (UNITS / name).read_text(encoding="utf-8")
    assert "\nUser=crawler\n" in text and "/etc/crawler/" in text and SHIPPED_CRAWLER in text
    text = text.replace("\nUser=crawler\n", "\n")
    return text.replace("/etc/crawler/", f"{etc}/").replace(SHIPPED_CRAWLER, str(crawler))


def env_file_for(sim: Simulator) -> str:
    """The env file's lines for the test: the key and the simulator (as a user's file holds the key), this checkout
    on the path, and the run's clock at 03:00 UTC of night 0 (so the day is known)."""
    return (f"TIKLIVE_API_KEY={KEY}\nTIKLIVE_BASE_URL={sim.url}\nPYTHONPATH={ROOT}\n"
            f"{TEST_NOW_ENV}=2026-01-01T03:00:00\n")


@pytest.mark.slow
async def test_the_daily_unit_under_systemd_completes_stops_clean_and_the_next_start_finishes_the_day(
        simulator: SimFactory, tmp_path: Path) -> None:
    """crawler-daily.service as shipped (see `unit_for_the_test`) under a real systemd: `systemctl stop` mid-run
    leaves it inactive with Result=success (the run exited 143 after committing), not failed; the next start exits 0
    and the day holds every watch-list user once, each fetched once, and every post of theirs once; the summary
    JSON and the metrics file lie where the unit says."""
    etc = tmp_path / "etc" / "crawler"
    etc.mkdir(parents=True)
    async with simulator(world=WORLD, latency=(0.15, 0.15)) as sim, user_systemd(tmp_path / "sd") as sd:
        w = sim.world
        watch = public_users(w, 24, min_videos=30, max_videos=90)
        write_watch(etc / "watchlist.txt", [w.handle(i) for i in watch])
        env = etc / "env"
        env.write_text(env_file_for(sim))
        env.chmod(0o600)
        state = sd.config / "crawler"  # %S/crawler of a user manager: $XDG_CONFIG_HOME/crawler
        state.mkdir()
        (state / "config.toml").write_text(FAST_TOML + "[crawl]\nparallelism = 2\n")
        (sd.units / "crawler-daily.service").write_text(
            unit_for_the_test("crawler-daily.service", etc=etc, crawler=venv_crawler()))
        shutil.copy(UNITS / "crawler-daily.timer", sd.units)  # as shipped
        await sd.systemctl("daemon-reload")
        # The active timer keeps the service loaded between runs, so `show` reports its last run (an unreferenced
        # inactive unit is unloaded and shows a fresh unit's defaults); its next run is 02:15 UTC, not now.
        await sd.systemctl("start", "crawler-daily.timer")
        assert (await sd.show("crawler-daily.timer"))["ActiveState"] == "active"

        await sd.systemctl("start", "--no-block", "crawler-daily.service")
        profiles = "/userinfo-by-username"

        async def some_profiles_fetched() -> bool:
            unit = await sd.show("crawler-daily.service")
            assert unit["ActiveState"] != "failed", f"{unit}: {sd.tail()}"  # say why at once (e.g. Result=resources)
            return sim.stats.by_endpoint[profiles] >= 6

        await sd.until(some_profiles_fetched, 60, "six profiles fetched by the unit")
        await sd.systemctl("stop", "crawler-daily.service", seconds=90)
        assert await sd.show("crawler-daily.service") == {"ActiveState": "inactive", "Result": "success",
                                                          "ExecMainStatus": "143"}, sd.tail()
        assert sim.stats.by_endpoint[profiles] < len(watch)  # stopped mid-run
        assert json.loads((state / "last-run.json").read_text())["exit_code"] == 143
        _, failed = await sd.systemctl("list-units", "--failed", "--plain", "--no-legend")
        assert "crawler-daily" not in failed

        await sd.systemctl("start", "crawler-daily.service", seconds=180)
        assert await sd.show("crawler-daily.service") == {"ActiveState": "inactive", "Result": "success",
                                                          "ExecMainStatus": "0"}, sd.tail()
        assert sim.stats.by_endpoint[profiles] == len(watch)  # no profile fetched twice
        assert json.loads((state / "last-run.json").read_text())["exit_code"] == 0
        assert 'command="ingest"' in (state / "metrics" / "crawler.prom").read_text()
    assert_day_0_complete(w, watch, state / "daily", str(state / ".crawler" / "history.db"))
    assert (state / "daily" / f"profiles-{day(0)}.csv").exists()



@pytest.mark.slow
async def test_the_worker_unit_under_systemd_joins_the_jobs_store_and_stops_clean(simulator: SimFactory,
                                                                                 tmp_path: Path, schema: str) -> None:  # noqa: F811
    """crawler-worker.service as shipped (see `unit_for_the_test`): it reads CRAWLER_JOBS_URL from the env file and
    registers in the PostgreSQL job store as a waiting worker; `systemctl stop` leaves it inactive with
    Result=success after its exit 143 (SuccessExitStatus=130 143), not failed and not restarted."""
    etc = tmp_path / "etc" / "crawler"
    etc.mkdir(parents=True)
    async with simulator(world=WORLD) as sim, user_systemd(tmp_path / "sd") as sd:
        env = etc / "env"
        env.write_text(env_file_for(sim) + f"CRAWLER_JOBS_URL={pg_url(schema)}\n")
        env.chmod(0o600)
        (sd.config / "crawler").mkdir()
        (sd.config / "crawler" / "config.toml").write_text(FAST_TOML)
        (sd.units / "crawler-worker.service").write_text(
            unit_for_the_test("crawler-worker.service", etc=etc, crawler=venv_crawler()))
        # A target of the test's own wants the worker: it starts it and keeps it loaded after the stop, so `show`
        # reports the stopped run (an unreferenced inactive unit is unloaded and shows a fresh unit's defaults).
        (sd.units / "hold.target").write_text("[Unit]\nWants=crawler-worker.service\n")
        await sd.systemctl("daemon-reload")
        await sd.systemctl("start", "hold.target")

        async def registered() -> bool:
            unit = await sd.show("crawler-worker.service")
            assert unit["ActiveState"] != "failed", f"{unit}: {sd.tail()}"
            with contextlib.suppress(psycopg.errors.UndefinedTable):  # the worker makes the tables
                return bool(await pg_value(schema, "SELECT count(*) FROM crawler_workers WHERE job IS NULL"))
            return False

        await sd.until(registered, 60, "the worker registered in the job store")
        await sd.systemctl("stop", "crawler-worker.service", seconds=90)
        assert await sd.show("crawler-worker.service") == {"ActiveState": "inactive", "Result": "success",
                                                           "ExecMainStatus": "143"}, sd.tail()


# --- cron ---

def cron_job() -> tuple[dict[str, str], list[str], str, str]:
    """deploy/cron/crawler: its environment lines, the job's five time fields, its user and its command."""
    env: dict[str, str] = {}
    jobs = []
    for line in (DEPLOY / "cron" / "crawler").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if re.match(r"^[A-Z_]+=", line):
            name, _, value = line.partition("=")
            env[name] = value
        else:
            jobs.append(line.split(None, 6))
    assert len(jobs) == 1, jobs
    *times, user, command = jobs[0]
    return env, times, user, command


@pytest.mark.slow
async def test_the_cron_line_runs_as_printed_on_the_first_night(simulator: SimFactory, tmp_path: Path) -> None:
    """The cron job runs at a time clocks never skip or repeat (outside 01:00-03:00 local, or under CRON_TZ=UTC),
    keeps the key out of its line, and its command, run by /bin/sh with cron's environment on a fresh state
    directory (no out-dir yet), exits 0 with the day's profiles, the summary JSON and the metrics written. The only
    rewrites are paths: /etc/crawler, /var/lib and the installed `crawler` moved to the test's own."""
    env, (minute, hour, *_), user, command = cron_job()
    assert user == "crawler" and minute.isdigit() and hour.isdigit()
    assert env.get("CRON_TZ") == "UTC" or not 1 <= int(hour) <= 3, hour
    assert "TIKLIVE_API_KEY" not in command and "TIKLIVE_API_KEY" not in env
    etc, var_lib = tmp_path / "etc" / "crawler", tmp_path / "var" / "lib"
    state = var_lib / "crawler"
    for d in (etc, state / "metrics"):  # the docs' `install -d` of both
        d.mkdir(parents=True)
    async with simulator(world=WORLD) as sim:
        w = sim.world
        watch = public_users(w, 5, max_videos=40)
        write_watch(etc / "watchlist.txt", [w.handle(i) for i in watch])
        (etc / "env").write_text(env_file_for(sim))
        (etc / "env").chmod(0o600)
        (state / "config.toml").write_text(FAST_TOML)

        def moved(text: str) -> str:
            return (text.replace(SHIPPED_CRAWLER, str(venv_crawler())).replace("/etc/crawler/", f"{etc}/")
                    .replace("/var/lib", str(var_lib)))

        cron_env = {"PATH": "/usr/bin:/bin", "HOME": str(state), "LOGNAME": "crawler"}
        cron_env |= {k: moved(v) for k, v in env.items()}
        proc = await asyncio.create_subprocess_exec(env["SHELL"], "-c", moved(command), env=cron_env, cwd=tmp_path,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, out.decode()
        assert sim.stats.by_endpoint["/userinfo-by-username"] == len(watch)
    assert json.loads((state / "last-run.json").read_text())["exit_code"] == 0
    assert 'command="ingest"' in (state / "metrics" / "crawler.prom").read_text()
    assert_day_0_complete(w, watch, state / "daily", str(state / ".crawler" / "history.db"))


@pytest.mark.slow
async def test_reports_in_the_out_dir_ingest_makes_work_on_the_first_night(simulator: SimFactory,
                                                                           tmp_path: Path) -> None:
    """The line the docs printed before (issue 23, item 5): `--summary-json` and `--metrics-file` inside the out-dir
    that the first run creates exit 0 with both written; a report in any other missing directory is still exit 2
    naming it, before any request and without creating the out-dir."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        watch = public_users(w, 3, max_videos=20)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch])
        (tmp_path / "config.toml").write_text(FAST_TOML)
        env = environ(sim) | {TEST_NOW_ENV: "2026-01-01T03:00:00"}
        code, _, err = await crawler(["ingest", "watch.txt", "--out-dir", "data/other", "-q", "--summary-json",
                                      "data/typo/last-run.json"], env, tmp_path)
        assert code == 2 and "data/typo" in error_line(err), err
        assert sim.stats.requests == 0 and not (tmp_path / "data").exists()
        code, _, err = await crawler(["ingest", "watch.txt", "--out-dir", "data/daily", "-q", "--summary-json",
                                      "data/daily/last-run.json", "--metrics-file", "data/daily/crawler.prom"],
                                     env, tmp_path)
        assert code == 0, err
    assert json.loads((tmp_path / "data" / "daily" / "last-run.json").read_text())["exit_code"] == 0
    assert 'command="ingest"' in (tmp_path / "data" / "daily" / "crawler.prom").read_text()
    assert len((tmp_path / "data" / "daily" / f"profiles-{day(0)}.csv").read_text().splitlines()) == 1 + len(watch)
