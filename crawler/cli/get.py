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

# TikLiveAPI's paths and their parameters, as its vendor client and third-party clients call them
# (api-reference.md §2), for `get` to check a name before a credit is spent.
_PAGED = ("count", "cursor")
API_PARAMS: dict[str, tuple[str, ...]] = {
    "userid": ("username",), "userinfo-by-username": ("username",), "userinfo-by-id": ("userid",),
    "user-posts": ("userid", *_PAGED), "user-liked": ("userid", *_PAGED),
    "user-followers": ("userid", "count", "time"), "user-following": ("userid", "count", "time"),
    "user-stories": ("userid",), "user-playlists": ("userid", *_PAGED), "user-collections": ("userid", *_PAGED),
    "search-user": ("keyword", *_PAGED),
    "search-video": ("keyword", *_PAGED, "publish_time", "sort_by", "region"),
    "search-challenge": ("keyword", *_PAGED), "post-detail": ("url",), "post-comments": ("url", *_PAGED),
    "post-comment-replies": ("video_id", "comment_id", *_PAGED), "music-info": ("music_id",),
    "music-posts": ("music_id", *_PAGED), "challenge-info-id": ("id",), "challenge-info-name": ("name",),
    "challenge-posts": ("challenge_id", *_PAGED, "region"), "playlist-info": ("playlist_id",),
    "playlist-posts": ("playlist_id", *_PAGED), "collection-info": ("collection_id",),
    "collection-posts": ("collection_id", *_PAGED), "download-video": ("url",), "download-music": ("url",),
    "region-list": (), "ads-detail": ("url",),
}
API_PATHS = tuple(API_PARAMS)


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

    endpoint = args.endpoint.strip().strip("/")
    if endpoint not in API_PATHS:
        close = difflib.get_close_matches(endpoint, API_PATHS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"get: {args.endpoint!r} is not a known API endpoint ({hint}known: {', '.join(API_PATHS)})")
    params: dict[str, str | int] = {}
    for pair in args.params:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"get: {pair!r} is not key=value")
        params[name] = value
    if not args.raw_params:
        _check_params(endpoint, params)
    settings = settings_from(args).replace(retry_attempts=1)
    key = api_key()

    async def call() -> Any:
        async with Client(settings, api_key=key, request_budget=settings.max_credits) as client:
            return await client.get(args.endpoint, params)

    print(f"crawler: GET /{args.endpoint.strip('/')}/ (1 credit)", file=sys.stderr)
    print(json.dumps(asyncio.run(call()), indent=2, ensure_ascii=False))
    return 0


def _check_params(endpoint: str, params: dict[str, str | int]) -> None:
    """An unknown parameter name is exit 2 before any credit: the API would answer a billed "not found"."""
    known = API_PARAMS[endpoint]
    for name in params:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UsageError(f"get: unknown parameter {name!r} for /{endpoint}/ ({hint}known: "
                             f"{', '.join(known) or 'none'}; --raw-params sends it anyway)")
