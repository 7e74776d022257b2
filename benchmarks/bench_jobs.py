"""Issue 12: one job on PostgreSQL (jobs.url) worked by 1, 2 and 4 processes, beside the same job on one host.

1. posts rows/s into OUT.csv with no API limit (rate.enabled = false) and a zero-latency simulator in its own
   process: the starter alone, then with 1 and 3 `crawler work` processes (each in its own directory), from
   the starter's start to its exit (OUT.csv exported); the baseline is the single-host SQLite run in the
   same benchmark run. Medians of repetitions.
2. Takeover: a worker SIGKILLed while it holds an item (the simulator slowed to 0.2-0.3 s a request so items
   stay held); seconds from the kill until another worker holds the item, at jobs.heartbeat_timeout = 2 s.
"""

from __future__ import annotations

import contextlib
import csv
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
from _common import FAST, PYTHON, Figure, Sim, child_env, main_for, show, spread, workdir, write_handles

NAME = "jobs"
PG = "postgresql://postgres@127.0.0.1:5432/test"
USERS = 10_000


@contextlib.contextmanager
def schema() -> Iterator[str]:
    """A schema of the benchmark's own; its jobs URL."""
    name = f"crawler_b_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        yield f"{PG}?options=-csearch_path%3D{name}"
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")


def _config(cwd: Path, *, heartbeat: float = 30.0, rate: bool = False) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "config.toml").write_text(
        f"[rate]\nenabled = {'true' if rate else 'false'}\n[crawl]\nparallelism = 8\n"
        f"[retry]\nbase_delay = 0.05\nmax_delay = 0.5\nstall_limit = 30\n[jobs]\nheartbeat_timeout = {heartbeat}\n")


def _start(cwd: Path, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([PYTHON, "-m", "crawler", *args], cwd=cwd, env=child_env(XDG_STATE_HOME=str(cwd / "st")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _job_id(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    for line in proc.stderr:
        found = re.match(r"crawler: job ([0-9a-f]{12}) ", line)
        if found:
            return found.group(1)
    raise RuntimeError("the starter printed no job id")


def _rows(path: Path) -> int:
    with path.open(encoding="utf-8", newline="") as fh:
        return sum(1 for _ in csv.reader(fh)) - 1


def _single(tmp: Path, sim: Sim, src: Path, opts: list[str]) -> float:
    cwd = tmp / f"single-{uuid.uuid4().hex[:6]}"
    _config(cwd)
    began = time.monotonic()
    proc = _start(cwd, ["posts", str(src), "-o", "out.csv", "--base-url", sim.url, "-q", *opts])
    proc.communicate(timeout=900)
    return _rows(cwd / "out.csv") / (time.monotonic() - began)


def _distributed(tmp: Path, sim: Sim, src: Path, opts: list[str], processes: int) -> float:
    with schema() as url:
        run = tmp / f"pg{processes}-{uuid.uuid4().hex[:6]}"
        _config(run / "starter")
        began = time.monotonic()
        starter = _start(run / "starter", ["posts", str(src), "-o", "out.csv", "--base-url", sim.url,
                                           "--jobs-url", url, "-q", *opts])
        jid = _job_id(starter)
        workers = []
        for n in range(processes - 1):
            _config(run / f"w{n}")
            workers.append(_start(run / f"w{n}", ["work", "--jobs-url", url, "--job", jid, "--until-idle",
                                                  "--base-url", sim.url, "-q"]))
        starter.communicate(timeout=900)
        wall = time.monotonic() - began
        for w in workers:
            w.communicate(timeout=120)
        return _rows(run / "starter" / "out.csv") / wall


def throughput(quick: bool) -> list[Figure]:
    """Rows/s with 1, 2 and 4 processes on one PostgreSQL job, beside one host's SQLite job."""
    n, reps = (150, 1) if quick else (600, 3)
    opts = ["--max-items", "100"]
    figures = []
    with workdir("jobs") as tmp, Sim(*FAST, "--users", str(USERS)) as sim:
        src = tmp / "handles.txt"
        write_handles(src, n, users=USERS)
        single = [_single(tmp, sim, src, opts) for _ in range(reps)]
        for processes in (1, 2, 4):
            ours = [_distributed(tmp, sim, src, opts, processes) for _ in range(reps)]
            figures.append(show(Figure(NAME, f"posts rows/s, {processes} process(es) on PostgreSQL, {n} handles,"
                                       " no API limit", spread(ours, "{:.0f}"), "",
                                       f"{spread(single, '{:.0f}')} (one host, SQLite)")))
    return figures


def takeover(quick: bool) -> list[Figure]:
    """Seconds from a worker's SIGKILL to its item held by another worker (heartbeat timeout 2 s)."""
    kills = 1 if quick else 3
    heartbeat = 2.0
    delays = []
    with workdir("takeover") as tmp, Sim(*FAST, "--users", str(USERS), "--latency", "0.2,0.3") as sim, \
            schema() as url:
        src = tmp / "handles.txt"
        write_handles(src, 200, users=USERS, start=1000)
        _config(tmp / "starter", heartbeat=heartbeat)
        starter = _start(tmp / "starter", ["posts", str(src), "-o", "out.csv", "--base-url", sim.url,
                                            "--jobs-url", url, "-q", "--page-size", "5", "--max-items", "50"])
        jid = _job_id(starter)
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                for k in range(kills):
                    _config(tmp / f"w{k}", heartbeat=heartbeat)
                    worker = _start(tmp / f"w{k}", ["work", "--jobs-url", url, "--job", jid, "--base-url", sim.url,
                                                    "-q", "--until-idle"])
                    mine = f"%:{worker.pid}:%"
                    seq = None
                    deadline = time.monotonic() + 60
                    while seq is None and time.monotonic() < deadline:
                        row = conn.execute("SELECT min(seq) FROM crawler_items WHERE status = 'pending' AND"
                                           " owner LIKE %s AND pages > 0", (mine,)).fetchone()
                        seq = row[0] if row else None
                        time.sleep(0.02)
                    if seq is None:
                        break
                    worker.kill()
                    killed = time.monotonic()
                    worker.wait()
                    while time.monotonic() < killed + 60:
                        row = conn.execute("SELECT owner NOT LIKE %s OR status != 'pending' FROM crawler_items"
                                           " WHERE seq = %s", (mine, seq)).fetchone()
                        if row and row[0]:
                            delays.append(time.monotonic() - killed)
                            break
                        time.sleep(0.02)
        finally:
            starter.kill()
            starter.wait()
    return [show(Figure(NAME, f"seconds from a worker's SIGKILL to its item taken over (heartbeat {heartbeat:g} s)",
                        spread(delays, "{:.2f}"), f"<= {heartbeat:g} s + a page"))]


def run(quick: bool = False) -> list[Figure]:
    """Every figure of this benchmark."""
    return throughput(quick) + takeover(quick)


if __name__ == "__main__":
    main_for(run, __doc__)
