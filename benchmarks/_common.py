"""Shared pieces of the benchmarks: the simulator in its own process, child runs measured with wait4,
server-side arrival sampling, medians, and the figures table. Benchmarks print; they never assert.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
KEY = "sim-key"
FAST = ("--rate-limit", "10000000", "--burst-limit", "10000000")  # a simulator that never answers 429


@dataclass(frozen=True, slots=True)
class Figure:
    """One line of the final table."""

    bench: str
    name: str
    value: str
    goal: str = ""
    baseline: str = ""


def show(fig: Figure) -> Figure:
    """Print a figure as soon as it is known (the table at the end repeats it)."""
    base = f"   [plain: {fig.baseline}]" if fig.baseline else ""
    goal = f"   (goal {fig.goal})" if fig.goal else ""
    print(f"  {fig.name}: {fig.value}{goal}{base}", flush=True)
    return fig


def table(figures: Sequence[Figure]) -> str:
    """The compact figures table."""
    head = ("bench", "figure", "value", "goal", "baseline, same run")
    rows = [head] + [(f.bench, f.name, f.value, f.goal, f.baseline) for f in figures]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    """The median (of a few repetitions)."""
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], fmt: str = "{:.3g}") -> str:
    """`median (min-max, n=N)` for a list of repetitions."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))}, n={len(values)})"


# --- the simulator, in its own process ---

class Sim:
    """`python -m crawler.sim --port 0 ARGS` in a child process; the URL is its first stdout line."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Sim:
        self.proc = subprocess.Popen([PYTHON, "-m", "crawler.sim", "--host", "127.0.0.1", "--port", "0", *self.args],
                                     cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()  # ends at the first line or when the child exits
            if "http://127.0.0.1:" not in line:
                raise RuntimeError(f"the simulator did not start (first line {line!r})")
            self.url = line.split()[-1].strip()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Terminate the simulator (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    def stats(self) -> dict[str, Any]:
        """GET /__sim/stats (an admin path: not counted, not billed)."""
        with urllib.request.urlopen(self.url + "/__sim/stats", timeout=10) as resp:
            data: dict[str, Any] = json.loads(resp.read())
        return data


# --- server-side arrivals over time ---

@dataclass(slots=True)
class Arrivals:
    """Samples of the simulator's cumulative counters: (monotonic time, requests, 429s)."""

    samples: list[tuple[float, int, int]] = field(default_factory=list)

    def add(self, stats: dict[str, Any], when: float) -> None:
        """Record one /__sim/stats answer taken at `when`."""
        self.samples.append((when, int(stats["requests"]), int(stats["served_429"])))

    def first(self) -> float | None:
        """When the first request had arrived (the first sample that shows one)."""
        return next((t for t, n, _ in self.samples if n > 0), None)

    def accepted_at(self, t: float) -> float:
        """Requests served without a 429 by time t (linear between samples)."""
        pts = [(s, n - r) for s, n, r in self.samples]
        if not pts or t <= pts[0][0]:
            return float(pts[0][1]) if pts else 0.0
        for (t0, a0), (t1, a1) in itertools.pairwise(pts):
            if t0 <= t <= t1:
                return a0 + (a1 - a0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
        return float(pts[-1][1])

    def fraction_used(self, limit: int, window: float, windows: int) -> float:
        """Served requests after the first window, over limit * windows (the budget used)."""
        t0 = self.first()
        if t0 is None:
            return 0.0
        start, end = t0 + window, t0 + window * (1 + windows)
        return (self.accepted_at(end) - self.accepted_at(start)) / (limit * windows)


def sample_until(sim: Sim, arrivals: Arrivals, stop: Callable[[], bool], *, interval: float = 0.02,
                 deadline: float) -> None:
    """Poll the simulator's stats into `arrivals` until `stop()` or the deadline (monotonic)."""
    while not stop() and time.monotonic() < deadline:
        stats = sim.stats()
        arrivals.add(stats, time.monotonic())
        time.sleep(interval)


# --- child processes measured alone ---

@dataclass(frozen=True, slots=True)
class ChildRun:
    """How a child process ended and what it cost (this child only).

    CPU comes from os.wait4. Peak RSS is the child's VmHWM polled from /proc (the last value before it
    exits; VmHWM never decreases): ru_maxrss is no good here, because Linux starts a spawned child's
    ru_maxrss from the *parent's* high-water mark (exec keeps the larger of the two), so every child
    of a 110 MB benchmark process would report at least 110 MB.
    """

    code: int
    wall: float
    cpu: float  # user + system seconds
    maxrss_mb: float  # peak resident set: VmHWM, MiB
    stopped_after: float | None  # seconds from our SIGTERM to its exit
    killed: bool
    stdout: str
    stderr: str


def run_child(cmd: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None, cap: float | None = None,
              grace: float = 20.0, tick: Callable[[float], bool] | None = None, poll: float = 0.02) -> ChildRun:
    """Run `cmd`; SIGTERM it at `cap` seconds (SIGKILL `grace` s later). `tick(elapsed)` True sends SIGTERM too."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        start = time.monotonic()
        termed_at: float | None = None
        killed = False
        peak_kb = 0
        try:
            while True:
                peak_kb = max(peak_kb, _vm_hwm_kb(proc.pid))
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                elapsed = time.monotonic() - start
                wants_stop = tick(elapsed) if tick is not None else False
                if termed_at is None and ((cap is not None and elapsed >= cap) or wants_stop):
                    proc.send_signal(signal.SIGTERM)
                    termed_at = time.monotonic()
                elif termed_at is not None and not killed and time.monotonic() - termed_at > grace:
                    proc.kill()
                    killed = True
                time.sleep(poll)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            raise
        end = time.monotonic()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(code=proc.returncode, wall=end - start, cpu=usage.ru_utime + usage.ru_stime,
                        maxrss_mb=peak_kb / 1024, stopped_after=None if termed_at is None else end - termed_at,
                        killed=killed, stdout=out.read(), stderr=err.read())


def _vm_hwm_kb(pid: int) -> int:
    """The peak resident set of a live process (VmHWM, KiB), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def child_env(**extra: str) -> dict[str, str]:
    """The environment for crawler children: the simulator's key, nothing from a user config."""
    env = {k: v for k, v in os.environ.items() if k not in ("CRAWLER_CONFIG", "TIKLIVE_BASE_URL")}
    env.update(TIKLIVE_API_KEY=KEY, PYTHONUNBUFFERED="1", **extra)
    return env


# --- inputs ---

def write_handles(path: Path, n: int, *, users: int, seed: int = 1, start: int = 0) -> int:
    """The current handles of the first `n` existing users of the seeded world, one per line."""
    from crawler.sim.data import World, WorldConfig

    handles = World(WorldConfig(seed=seed, users=users)).sample_handles(n, start)
    with path.open("w", encoding="utf-8") as fh:
        for h in handles:
            fh.write(h + "\n")
    return len(handles)


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a file."""
    with path.open(encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A temporary directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{prefix}-") as d:
        yield Path(d)


def write_config(path: Path, *, rate_enabled: bool = True, parallelism: int | None = None,
                 data_dir: str = "data") -> Path:
    """A config.toml for a crawler child."""
    lines = ["[rate]", f"enabled = {'true' if rate_enabled else 'false'}", "[crawl]", f'data_dir = "{data_dir}"']
    if parallelism is not None:
        lines.append(f"parallelism = {parallelism}")
    path.write_text("\n".join(lines) + "\n")
    return path


def main_for(run: Callable[[bool], list[Figure]], doc: str | None) -> None:
    """The command line of one benchmark script: `--quick`, then the figures table."""
    import argparse

    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    print("\n" + table(run(p.parse_args().quick)))
