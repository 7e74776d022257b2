"""`make demo`: start the simulator, enrich a sample handle list (profiles, then posts), print where the CSVs are.

Runs the real `crawler` command line against the simulator over loopback, with the rate window scaled
down 10x (200 requests per 6 s instead of per 60 s) so the demo takes seconds, not minutes.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from crawler.sim.data import World, WorldConfig

OUT = Path("demo-out")
HISTORY = OUT / ".crawler" / "demo-history.db"
SEED, USERS = 42, 50_000


def main() -> int:
    """Run the demo; return the exit code of the last crawl."""
    OUT.mkdir(exist_ok=True)
    world = World(WorldConfig(seed=SEED, users=USERS))
    handles = world.sample_handles(120)
    lines = [f"@{h}" if n % 3 == 0 else h for n, h in enumerate(handles)]
    lines += ["https://www.tiktok.com/@" + handles[0] + "?lang=en", "not a handle!", "ghost_account_404"]
    (OUT / "handles.txt").write_text("\n".join(lines) + "\n")
    sim = subprocess.Popen(
        [sys.executable, "-m", "crawler.sim", "--port", "0", "--seed", str(SEED), "--users", str(USERS),
         "--rate-limit", "200", "--window", "6", "--latency", "0.05,0.25", "--fault-rate", "0.02",
         "--faults", "5xx,drop,truncated,malformed", "--quirks"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert sim.stdout is not None
        url = sim.stdout.readline().strip().rsplit(" ", 1)[-1]
        print(f"simulator: {url} (200 requests per 6 s window, 50-250 ms latency, 2% faults, quirks on)")
        env = dict(os.environ, TIKLIVE_API_KEY="sim-key", TIKLIVE_BASE_URL=url)
        common = ["--rate", "200", "--window", "6", "--data-dir", str(OUT / ".crawler"), "--restart"]
        print("\n$ crawler doctor   # before a large job: do the API's answers still read as the parsers expect?")
        code = subprocess.call([sys.executable, "-m", "crawler", "doctor", *common[:4]], env=env)
        if code != 0:
            return code
        for command in ("profiles", "posts"):
            out = OUT / f"{command}.csv"
            print(f"\n$ crawler {command} {OUT / 'handles.txt'} -o {out} --rate 200 --window 6"
                  + (" --max-items 100" if command == "posts" else ""))
            extra = ["--max-items", "100"] if command == "posts" else []
            code = subprocess.call([sys.executable, "-m", "crawler", command, str(OUT / "handles.txt"), "-o",
                                    str(out), *common, *extra], env=env)
            if code not in (0, 3):
                return code
        print("\nposts reused the user ids learned by profiles: no /userid/ call was needed.")
        by_followers = sorted(handles, key=lambda h: -_followers(world, h))
        code = _daily(url, env, by_followers[:12], common)
        print(f"\nEverything is in {OUT.resolve()}: profiles.csv, posts.csv (+ *.failures.csv for the bad lines),"
              " daily/profiles-DAY.csv, growth.png")
        if code in (0, 3):
            print("\nTo look at the demo's history in a browser (http://127.0.0.1:8050/, Ctrl-C to stop):\n"
                  f"  {serve_command()}")
        return 0 if code in (0, 3) else code
    finally:
        sim.terminate()
        sim.wait(timeout=10)


def serve_command() -> str:
    """The command that serves the demo's history (this environment's `crawler` script when it has one)."""
    script = Path(sys.executable).parent / "crawler"
    shown = os.path.relpath(script) if script.is_file() else "crawler"
    return f"{shown} history serve --history-url {HISTORY}"


def _followers(world: World, handle: str) -> int:
    index = world.index_by_handle(handle)
    user = None if index is None else world.user(index)
    return 0 if user is None or user.private else user.followers


def _daily(url: str, env: dict[str, str], watch: list[str], common: list[str]) -> int:
    """Two weeks of the daily job (the simulator's world advances a day between runs), then the history."""
    (OUT / "watch.txt").write_text("\n".join(watch) + "\n")
    history = ["--history-url", str(HISTORY)]
    start = dt.date(2026, 1, 1)
    print(f"\n$ crawler ingest {OUT / 'watch.txt'} --out-dir {OUT / 'daily'} --date DAY   # 14 simulated days")
    for d in range(14):
        day = (start + dt.timedelta(days=d)).isoformat()
        code = subprocess.call([sys.executable, "-m", "crawler", "ingest", str(OUT / "watch.txt"), "--out-dir",
                                str(OUT / "daily"), "--date", day, "--quiet", *common, *history], env=env)
        if code not in (0, 3):
            return code
        urllib.request.urlopen(urllib.request.Request(url + "/__sim/advance?days=1", method="POST")).read()
    for query in (["days"], ["top", "--days", "7", "--limit", "5"], ["growth", watch[0], "--since", "2026-01-08"],
                  ["plot", *watch[:4], "-o", str(OUT / "growth.png")]):
        print(f"\n$ crawler history {' '.join(query)}")
        code = subprocess.call([sys.executable, "-m", "crawler", "history", *query, *history,
                                "--data-dir", str(OUT / ".crawler")], env=env)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
