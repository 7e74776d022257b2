"""`make demo`: start the simulator, enrich a sample handle list (profiles, then posts), print where the CSVs are.

Runs the real `crawler` command line against the simulator over loopback, with the rate window scaled
down 10x (200 requests per 6 s instead of per 60 s) so the demo takes seconds, not minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from crawler.sim.data import World, WorldConfig

OUT = Path("demo-out")
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
        code = 0
        for command in ("profiles", "posts"):
            out = OUT / f"{command}.csv"
            print(f"\n$ crawler {command} {OUT / 'handles.txt'} -o {out} --rate 200 --window 6"
                  + (" --max-items 100" if command == "posts" else ""))
            extra = ["--max-items", "100"] if command == "posts" else []
            code = subprocess.call([sys.executable, "-m", "crawler", command, str(OUT / "handles.txt"), "-o",
                                    str(out), *common, *extra], env=env)
            if code not in (0, 3):
                return code
        print(f"\nCSVs are in {OUT.resolve()}: profiles.csv, posts.csv (+ *.failures.csv for the bad lines).")
        print("posts reused the user ids learned by profiles: no /userid/ call was needed.")
        return 0 if code in (0, 3) else code
    finally:
        sim.terminate()
        sim.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
