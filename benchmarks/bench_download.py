"""Issue 14: `crawler download` of 1 GB of media at full speed: MB/s and peak RSS (goal < 100 MB), beside a
plain aiohttp loop (same simulator, same files, same concurrency; with and without an fsync per file),
interleaved in the same run.

The posts CSV comes from a real `crawler posts` run against the simulator; rows are taken until their
`size` column (the simulator's truth) adds up to the target. Both downloaders run as child processes,
measured with wait4 and VmHWM; the files are checked by size afterwards, then removed.
"""

from __future__ import annotations

import asyncio
import csv
import os
import shutil
import sys
from pathlib import Path

from _common import FAST, PYTHON, Figure, Sim, child_env, main_for, run_child, show, spread, workdir

NAME = "download"
PARALLELISM = 8


async def _plain(csv_path: str, out: str, fsync: bool = False) -> None:
    """The baseline: a semaphore of PARALLELISM over every URL, each streamed to its file in chunks.

    With `fsync`, each file is fsynced before it is closed (what durability costs, without any state).
    """
    import aiohttp

    # Blocking file calls on purpose: what a hand-written loop does (and what the crawler's os.write does).
    with open(csv_path, newline="", encoding="utf-8") as fh:  # noqa: ASYNC230
        rows = list(csv.DictReader(fh))
    sem = asyncio.Semaphore(PARALLELISM)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async def one(row: dict[str, str]) -> None:
            async with sem, session.get(row["play"]) as resp:
                resp.raise_for_status()
                with open(Path(out) / f"{row['video_id']}.mp4", "wb") as f:  # noqa: ASYNC230
                    async for chunk in resp.content.iter_chunked(256 * 1024):
                        f.write(chunk)
                    if fsync:
                        f.flush()
                        os.fsync(f.fileno())

        await asyncio.gather(*(one(r) for r in rows))


def _posts_csv(sim: Sim, work: Path, target: int) -> tuple[Path, int, int]:
    """A posts CSV whose files add up to at least `target` bytes; (path, files, bytes)."""
    from crawler.sim.data import World, WorldConfig

    world = World(WorldConfig(seed=1, users=10_000))
    handles, videos = [], 0
    for h in world.sample_handles(3000):
        i = world.index_by_handle(h)
        u = None if i is None else world.user(i)
        if u is not None and not u.private and 0 < u.videos <= 200:
            handles.append(h)
            videos += u.videos
        if videos * 600_000 >= target * 1.5:
            break
    (work / "handles.txt").write_text("\n".join(handles) + "\n")
    (work / "fast.toml").write_text(
        f"[rate]\nenabled = false\n[download]\nparallelism = {PARALLELISM}\nper_host_rate = 100000\n")
    env = child_env(TIKLIVE_BASE_URL=sim.url)
    r = run_child([PYTHON, "-m", "crawler", "posts", "handles.txt", "-o", "all.csv", "--config", "fast.toml", "-q"],
                  cwd=work, env=env)
    if r.code != 0:
        raise RuntimeError(f"crawler posts failed: {r.stderr.strip()[-300:]}")
    total = files = 0
    with (work / "all.csv").open(newline="", encoding="utf-8") as fh, \
            (work / "posts.csv").open("w", newline="", encoding="utf-8") as out:
        reader = csv.DictReader(fh)
        writer = csv.DictWriter(out, list(reader.fieldnames or []), lineterminator="\n")
        writer.writeheader()
        for row in reader:
            if total >= target:
                break
            writer.writerow(row)
            total += int(row["size"])
            files += 1
    if total < target:
        raise RuntimeError(f"only {total:,} bytes of media in the crawled posts")
    return work / "posts.csv", files, total


def _check(out: Path, files: int, total: int) -> None:
    found = [p for p in out.glob("*.mp4")]
    size = sum(p.stat().st_size for p in found)
    if len(found) != files or size != total:
        raise RuntimeError(f"{out}: {len(found)} files, {size:,} bytes; expected {files}, {total:,}")


def run(quick: bool = False) -> list[Figure]:
    """Every figure of this benchmark."""
    target, reps = (100_000_000, 1) if quick else (1_000_000_000, 2)
    print(f"[download] {target / 1e9:g} GB of media from a posts CSV, {PARALLELISM} in flight, simulator media host"
          f" on loopback, per-host rate off; crawler download vs a plain aiohttp loop, {reps} interleaved"
          " repetitions (child processes)", flush=True)
    mbps: dict[str, list[float]] = {"ours": [], "plain": [], "plain+fsync": []}
    rss: dict[str, list[float]] = {k: [] for k in mbps}
    cpu: dict[str, list[float]] = {k: [] for k in mbps}
    with workdir(NAME) as work, Sim(*FAST) as sim:
        posts, files, total = _posts_csv(sim, work, target)
        env = child_env(TIKLIVE_BASE_URL=sim.url)
        commands = {
            "ours": [PYTHON, "-m", "crawler", "download", str(posts), "-o", str(work / "out"), "--what", "video",
                     "--config", str(work / "fast.toml"), "-q"],
            "plain": [PYTHON, str(Path(__file__)), "--plain-child", str(posts), str(work / "out")],
            "plain+fsync": [PYTHON, str(Path(__file__)), "--plain-child-fsync", str(posts), str(work / "out")],
        }
        for _ in range(reps):
            for name, cmd in commands.items():
                out = work / "out"
                out.mkdir()
                r = run_child(cmd, cwd=work, env=env)
                if r.code != 0:
                    raise RuntimeError(f"{name} exited {r.code}: {r.stderr.strip()[-300:]}")
                _check(out, files, total)
                mbps[name].append(total / r.wall / 1e6)
                rss[name].append(r.maxrss_mb)
                cpu[name].append(r.cpu / total * 1e9)
                shutil.rmtree(out)
    ours_mbps, plain_mbps = mbps["ours"], mbps["plain"]
    ratio = [a / b for a, b in zip(ours_mbps, plain_mbps, strict=True)]
    ratio_fsync = [a / b for a, b in zip(ours_mbps, mbps["plain+fsync"], strict=True)]
    return [
        show(Figure(NAME, f"MB/s, {files:,} files, {total / 1e9:.2f} GB", spread(ours_mbps, "{:,.0f}"), "",
                    spread(plain_mbps, "{:,.0f}"))),
        show(Figure(NAME, "MB/s, plain loop + fsync per file", spread(mbps["plain+fsync"], "{:,.0f}"))),
        show(Figure(NAME, "MB/s ratio, ours / plain", spread(ratio, "{:.2f}"))),
        show(Figure(NAME, "MB/s ratio, ours / plain + fsync", spread(ratio_fsync, "{:.2f}"))),
        show(Figure(NAME, "peak RSS MB (VmHWM)", spread(rss["ours"], "{:.0f}"), "< 100",
                    spread(rss["plain"], "{:.0f}"))),
        show(Figure(NAME, "CPU s per GB", spread(cpu["ours"], "{:.1f}"), "", spread(cpu["plain"], "{:.1f}"))),
    ]

if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] in ("--plain-child", "--plain-child-fsync"):
        asyncio.run(_plain(sys.argv[2], sys.argv[3], fsync=sys.argv[1].endswith("fsync")))
    else:
        main_for(run, __doc__)
