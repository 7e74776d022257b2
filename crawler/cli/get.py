"""`get` (the raw JSON of one call) and `regions` (the region codes, cached after the first call)."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crawler.api.client import Counters
from crawler.cli.common import settings_from
from crawler.config import Settings, api_key
from crawler.errors import UsageError

# TikLiveAPI's paths as its vendor client and third-party clients call them, for `get` to check a name.
API_PATHS = (
    "userid", "userinfo-by-username", "userinfo-by-id", "user-posts", "user-liked", "user-followers",
    "user-following", "user-stories", "user-playlists", "user-collections", "search-user", "search-video",
    "search-challenge", "post-detail", "post-comments", "post-comment-replies", "music-info", "music-posts",
    "challenge-info-id", "challenge-info-name", "challenge-posts", "playlist-info", "playlist-posts",
    "collection-info", "collection-posts", "download-video", "download-music", "region-list", "ads-detail",
)


def _regions(settings: Settings, key: Any) -> list[tuple[str, str]]:
    """Region codes, cached in the data directory after the first (one-credit) call."""
    return fetch_regions(settings, key)[0]


def fetch_regions(settings: Settings, key: Any) -> tuple[list[tuple[str, str]], Counters | None]:
    """Region codes (cached in the data directory after the first, one-credit, call) and the counters of the client
    that fetched them (None when cached)."""
    cache = Path(settings.data_dir) / "regions.json"
    if cache.is_file():
        return [(str(r[0]), str(r[1])) for r in json.loads(cache.read_text())], None
    from crawler.api.client import Client

    async def fetch() -> tuple[list[tuple[str, str]], Counters]:
        async with Client(settings, api_key=key, request_budget=settings.max_credits) as client:
            return [(r.code, r.name) for r in await client.regions()], client.counters

    print("crawler: fetching the region list (1 credit, cached afterwards)", file=sys.stderr)
    found, counters = asyncio.run(fetch())
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(found))
    return found, counters


def cmd_regions(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Print the region codes."""
    for code, name in _regions(settings_from(args), api_key()):
        print(f"{code}\t{name}")
    return 0


def cmd_get(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Print the raw JSON of one call."""
    from crawler.api.client import Client

    name = args.endpoint.strip().strip("/")
    if name not in API_PATHS:
        close = difflib.get_close_matches(name, API_PATHS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"get: {args.endpoint!r} is not a known API endpoint ({hint}known: {', '.join(API_PATHS)})")
    params: dict[str, str | int] = {}
    for pair in args.params:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"get: {pair!r} is not key=value")
        params[name] = value
    settings = settings_from(args).replace(retry_attempts=1)
    key = api_key()

    async def call() -> Any:
        async with Client(settings, api_key=key, request_budget=settings.max_credits) as client:
            return await client.get(args.endpoint, params)

    print(f"crawler: GET /{args.endpoint.strip('/')}/ (1 credit)", file=sys.stderr)
    print(json.dumps(asyncio.run(call()), indent=2, ensure_ascii=False))
    return 0
