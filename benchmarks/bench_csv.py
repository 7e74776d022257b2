"""The event loop while the CSV sink writes a large file: its longest stall, beside the same loop idle.

Eight producer tasks hand the sink pages of 100 post rows (about 330 bytes each), as workers do, until the
file reaches the size asked (1 GB by default); a ticker task sleeps 1 ms at a time and records how late it
wakes. The longest and the 99.9th-percentile lateness are the loop's stalls: a request whose answer arrives
during a stall waits that long. The baseline is the ticker alone in the same run (the machine's noise).

    python benchmarks/bench_csv.py [--mb 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import Figure, show

from crawler.api.records import Post
from crawler.engine.writer import GroupWriter
from crawler.sinks.csv_sink import Batch, CsvSink

NAME = "csv"
PAGE = 100


def page(start: int) -> list[Post]:
    """One page of post rows with realistic widths (a title of ~120 characters, four media URLs)."""
    url = "https://v16m.tiktokcdn.com/" + "x" * 40
    return [Post(video_id=str(7_300_000_000_000_000_000 + start + i), source_handle="someone", create_time=1,
                 region="US", title="A title with words " * 6, play_count=123_456, digg_count=7_890,
                 comment_count=321, share_count=45, collect_count=67, author_id="6812345678901234567",
                 author_handle="someone", music_id="7012345678901234567", pinned=False, duration=15,
                 cover=url, play=url, wmplay=url, hdplay="", size=1_234_567, hd_size=None, music_url=url)
            for i in range(PAGE)]


async def ticker(stop: asyncio.Event, late: list[float]) -> None:
    """Sleep 1 ms at a time until stopped; record how late each wake-up came."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(0.001)
        late.append(loop.time() - before - 0.001)


async def write(path: Path, size: int, late: list[float]) -> tuple[float, int]:
    """Write pages through the sink until the file holds `size` bytes; (seconds, bytes)."""
    sink = CsvSink(path, Post.COLUMNS, state=None, counters=lambda: (0, 0))
    await sink.open(0)
    group: GroupWriter[Batch] = GroupWriter(sink.commit, interval=sink.commit_interval)
    writer = asyncio.create_task(group.run())
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(stop, late))
    start = time.perf_counter()
    sample = page(0)

    async def produce() -> None:
        while sink.part.stat().st_size < size:
            await group.submit(Batch(rows=sample))

    await asyncio.gather(*(produce() for _ in range(8)))
    group.close()
    await writer
    took = time.perf_counter() - start
    stop.set()
    await tick
    written = sink.part.stat().st_size
    sink.close()
    return took, written


async def idle(seconds: float, late: list[float]) -> None:
    """The ticker alone for `seconds`: the machine's own noise."""
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(stop, late))
    await asyncio.sleep(seconds)
    stop.set()
    await tick


def p999(values: list[float]) -> float:
    """The 99.9th percentile."""
    return statistics.quantiles(values, n=1000)[-1] if len(values) > 1000 else max(values)


def run(quick: bool = False, mb: int | None = None) -> list[Figure]:
    """Figures: the loop's longest and 99.9th-percentile stall while writing, beside the idle ticker."""
    size = (mb or (64 if quick else 1024)) * 1024 * 1024
    busy: list[float] = []
    calm: list[float] = []
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        took, written = asyncio.run(write(Path(tmp) / "posts.csv", size, busy))
    asyncio.run(idle(min(took, 10.0), calm))
    print(f"[csv] wrote {written / 1e9:.2f} GB in {took:.1f} s ({written / took / 1e6:.0f} MB/s)", flush=True)
    return [
        show(Figure(NAME, f"loop's longest stall while writing {written / 1e9:.2f} GB, ms", f"{max(busy) * 1000:.1f}",
                    "", f"idle loop: {max(calm) * 1000:.1f}")),
        show(Figure(NAME, "loop's 99.9th-percentile stall while writing, ms", f"{p999(busy) * 1000:.2f}", "",
                    f"idle loop: {p999(calm) * 1000:.2f}")),
        show(Figure(NAME, "CSV write rate, MB/s", f"{written / took / 1e6:.0f}")),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    args = parser.parse_args()
    run(mb=args.mb)
    sys.exit(0)
