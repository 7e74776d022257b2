"""The plain baseline every benchmark compares against: what a user writes by hand in an afternoon.

`asyncio.gather` over the whole input list (loaded into memory), an optional `aiolimiter.AsyncLimiter`,
one `aiohttp.ClientSession`, and the standard `csv` writer. For `posts` it makes the same requests the
crawler makes (`/userid/`, then `/user-posts/` pages) and writes the same 13 columns. A 429 is retried
after the limiter admits it again; nothing else is retried. Usable in-process (`crawl_posts`) or as a
script (`python benchmarks/plain.py --url URL --input FILE --out FILE`), which prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
from aiolimiter import AsyncLimiter

COLUMNS = ["video_id", "source_handle", "create_time", "region", "title", "play_count", "digg_count",
           "comment_count", "share_count", "collect_count", "author_id", "author_handle", "music_id"]
MAX_TRIES = 10  # 429s per request before the plain script gives the request up
MAX_PAGES = 1000  # per handle (bounded loop)


@dataclass(slots=True)
class PlainResult:
    """What one plain run did."""

    requests: int = 0
    rows: int = 0
    rate_limited: int = 0
    failed: int = 0


async def crawl_posts(
    url: str,
    handles: list[str],
    out: str,
    *,
    concurrency: int | None,
    limit: int | None = None,
    window: float = 60.0,
    key: str = "sim-key",
    page_size: int = 30,
) -> PlainResult:
    """Posts of every handle into `out` (CSV); `concurrency` None means every handle at once (pure gather)."""
    result = PlainResult()
    limiter = AsyncLimiter(limit, window) if limit else None
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    headers = {"X-Api-Key": key}
    connector = aiohttp.TCPConnector(limit=max(100, concurrency or 0))
    with open(out, "w", newline="", encoding="utf-8") as fh:  # noqa: ASYNC230 - the plain way
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def get(path: str, params: dict[str, str]) -> dict[str, Any] | None:
                for _ in range(MAX_TRIES):
                    if limiter is not None:
                        await limiter.acquire()
                    result.requests += 1
                    async with session.get(url + path, params=params, headers=headers) as resp:
                        body = await resp.read()
                        if resp.status == 429:
                            result.rate_limited += 1
                            continue
                    data: dict[str, Any] = json.loads(body)
                    return data
                return None

            async def one(handle: str) -> None:
                found = await get("/userid/", {"username": handle})
                uid = found.get("id") if found else None
                if not uid:
                    result.failed += 1
                    return
                cursor: Any = 0
                for _ in range(MAX_PAGES):
                    body = await get("/user-posts/", {"userid": str(uid), "count": str(page_size),
                                                      "cursor": str(cursor)})
                    if body is None or body.get("status") == "error":
                        result.failed += 1
                        return
                    for v in body.get("videos", []):
                        author, music = v.get("author") or {}, v.get("music_info") or {}
                        writer.writerow([v.get("video_id"), handle, v.get("create_time"), v.get("region"),
                                         v.get("title"), v.get("play_count"), v.get("digg_count"),
                                         v.get("comment_count"), v.get("share_count"), v.get("collect_count"),
                                         author.get("id"), author.get("unique_id"), music.get("id")])
                        result.rows += 1
                    if not body.get("hasMore"):
                        return
                    cursor = body.get("cursor")

            async def guarded(handle: str) -> None:
                if sem is None:
                    await one(handle)
                    return
                async with sem:
                    await one(handle)

            await asyncio.gather(*(guarded(h) for h in handles))
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the plain script on a file of handles and print its result as one JSON line."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--concurrency", type=int, default=0, help="0: every handle at once")
    p.add_argument("--rate", type=int, default=0, help="AsyncLimiter max_rate; 0: no limiter")
    p.add_argument("--window", type=float, default=60.0)
    args = p.parse_args(argv)
    with open(args.input, encoding="utf-8") as fh:
        handles = [line.strip().lstrip("@").lower() for line in fh if line.strip()]  # the whole list in memory
    with contextlib.suppress(KeyboardInterrupt):
        result = asyncio.run(crawl_posts(args.url, handles, args.out, concurrency=args.concurrency or None,
                                         limit=args.rate or None, window=args.window))
        print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
