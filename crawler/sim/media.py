"""The simulator's media host: deterministic files per post and kind, signed expiring URLs, Range, faults.

Served on its own port (a CDN is not the API): no key, no credits, no rate window. The bytes of a
file are a pure function of (seed, kind, id, n), so tests compute what a download must produce
with `content()` without asking the server or the code under test. Files look like what real CDNs serve
(api-reference §5.1): videos start with an MP4 `ftyp` box, covers and photos are WebP (some JPEG), sounds
MP3 (some URLs without an extension), each served with its Content-Type; HEAD is refused with 503.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import aiohttp
from aiohttp import web

from crawler.sim.seeded import hash64, str_hash, unit

# The kinds of file. `music` is keyed by music id, every other kind by video id; `fmt` gives each file's format.
KINDS = ("play", "hdplay", "wmplay", "cover", "music", "image")
CONTENT_TYPES = {"mp4": "video/mp4", "webp": "image/webp", "jpeg": "image/jpeg", "mp3": "audio/mpeg"}
MEDIA_FAULTS = frozenset({"5xx", "cut", "slow"})  # drawn by --media-fault-rate unless --media-faults says otherwise
EXTRA_MEDIA_FAULTS = frozenset({"throttle"})  # 429 or 503 with Retry-After: only when named
_PATTERN = 1 << 20  # every file is a window onto one seeded megabyte, rotated per file
_CHUNK = 64 * 1024
_PATH = re.compile(r"^/m/(play|hdplay|wmplay|cover|music|image)/(\d{1,25})(?:/(\d{1,3}))?(?:\.(mp4|jpeg|webp|mp3))?$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_DOMAIN = 0x4D45  # hash domain of media values


def photo_count(seed: int, video_id: str) -> int:
    """How many images a post has: 2-6 for about one post in twelve (photo posts), else 0."""
    h = hash64(seed, _DOMAIN, 1, int(video_id))
    return 2 + h % 5 if unit(hash64(h, 1)) < 1 / 12 else 0


def fmt(seed: int, kind: str, ident: str) -> str:
    """The format of a file: mp4 videos, mp3 sounds, covers and a photo post's images WebP for about three posts
    in four, JPEG for the rest (as real CDNs serve them, §5.1)."""
    if kind.endswith("play"):
        return "mp4"
    if kind == "music":
        return "mp3"
    return "jpeg" if hash64(seed, _DOMAIN, 7, int(ident)) % 4 == 0 else "webp"


def url_suffix(seed: int, kind: str, ident: str) -> str:
    """The extension a URL shows: its format's, except no extension for about one sound in three (§5.1)."""
    if kind == "music" and hash64(seed, _DOMAIN, 8, int(ident)) % 3 == 0:
        return ""
    return "." + fmt(seed, kind, ident)


def _magic(form: str, total: int) -> bytes:
    """The first bytes of a file of this format: what tools (and `file`) recognise it by."""
    if form == "mp4":  # an ISO BMFF `ftyp` box: size, 'ftyp', major brand, minor version, compatible brands
        return b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41"
    if form == "webp":  # RIFF container: 'RIFF', little-endian length of the rest, 'WEBP', a VP8 chunk
        return b"RIFF" + max(0, total - 8).to_bytes(4, "little") + b"WEBPVP8 "
    if form == "jpeg":  # SOI, then a JFIF APP0 segment
        return b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00"
    return b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x64"  # mp3: an empty ID3v2 tag, an MPEG-1 layer III frame


def size(seed: int, kind: str, ident: str, n: int = 0) -> int:
    """The exact length in bytes of one file: ~50 kB to ~3 MB for videos, less for the rest."""
    u = unit(hash64(seed, _DOMAIN, 2, str_hash(kind if kind != "hdplay" else "play"), int(ident), n))
    play = 50_000 + int(2_950_000 * u**4)
    if kind == "play":
        return play
    if kind == "hdplay":
        return play * 3 // 2 + 1_000
    if kind == "wmplay":
        return play + 40_000
    if kind == "cover":
        return 20_000 + int(60_000 * u)
    if kind == "music":
        return 100_000 + int(400_000 * u)
    return 30_000 + int(150_000 * u)  # image


@lru_cache(maxsize=4)
def _pattern(seed: int) -> bytes:
    data = random.Random(seed ^ 0x5EED_3ED1A).randbytes(_PATTERN)
    return data + data  # doubled, so any window up to _PATTERN long is one slice


def _origin(seed: int, kind: str, ident: str, n: int) -> int:
    return hash64(seed, _DOMAIN, 3, str_hash(kind), int(ident), n) % _PATTERN


def content_range(seed: int, kind: str, ident: str, n: int, start: int, end: int) -> bytes:
    """Bytes [start, end) of one file (end is clipped to its size): its format's magic bytes, then seeded noise."""
    total = size(seed, kind, ident, n)
    end = min(end, total)
    head = _magic(fmt(seed, kind, ident), total)
    if start < len(head):
        return head[start:end] + content_range(seed, kind, ident, n, len(head), end) if end > len(head) else \
            head[start:end]
    pattern, origin = _pattern(seed), _origin(seed, kind, ident, n)
    parts = []
    pos = start
    while pos < end:
        take = min(end - pos, _PATTERN)
        o = (origin + pos) % _PATTERN
        parts.append(pattern[o:o + take])
        pos += take
    return b"".join(parts)


def content(seed: int, kind: str, ident: str, n: int = 0) -> bytes:
    """The whole file, as the host serves it."""
    return content_range(seed, kind, ident, n, 0, size(seed, kind, ident, n))


def etag(seed: int, kind: str, ident: str, n: int) -> str:
    """The strong validator of one file."""
    return f'"{hash64(seed, _DOMAIN, 4, str_hash(kind), int(ident), n):016x}"'


@dataclass(frozen=True, slots=True)
class MediaConfig:
    """How the media host behaves."""

    ttl: float = 6 * 3600.0  # seconds a signed URL stays valid
    fault_rate: float = 0.0
    faults: frozenset[str] = MEDIA_FAULTS
    slow_seconds: float = 2.0  # a "slow" fault spreads its body over this long
    bytes_per_second: float | None = None  # a throttle on every response (tests that kill mid-file)
    ranges: bool = True  # False: Range is ignored (a host that always sends the whole file)
    etags: bool = True
    retry_after: float = 1.0  # seconds a "throttle" fault's 429/503 asks to wait (Retry-After)
    wm_same: bool = False  # the 2026 shape: wmplay == play and wm_size 0 (no separate watermarked file)
    generic_type: bool = False  # every file served as application/octet-stream (only its bytes tell its format)

    def __post_init__(self) -> None:
        unknown = set(self.faults) - MEDIA_FAULTS - EXTRA_MEDIA_FAULTS
        if unknown:
            known = sorted(MEDIA_FAULTS | EXTRA_MEDIA_FAULTS)
            raise ValueError(f"unknown media fault kinds: {sorted(unknown)}; known: {known}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("media fault_rate must be within [0, 1]")


@dataclass(slots=True)
class MediaStats:
    """Server-side counts: what was asked and what was actually put on the wire."""

    requests: int = 0
    bytes_sent: int = 0
    ranged: int = 0  # requests that asked for a Range
    with_api_key: int = 0  # requests that carried X-Api-Key (must stay 0: the key never leaves for a CDN)
    by_status: Counter[int] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    by_file: Counter[str] = field(default_factory=Counter)  # bytes sent per path
    arrivals: list[float] = field(default_factory=list)  # monotonic arrival time of every request
    log: list[tuple[float, str, int]] = field(default_factory=list)  # (arrival, path, status) of every request
    in_flight: int = 0
    max_in_flight: int = 0  # the most requests being answered at once

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return {"requests": self.requests, "bytes_sent": self.bytes_sent, "ranged": self.ranged,
                "with_api_key": self.with_api_key, "by_status": dict(self.by_status), "faults": dict(self.faults)}


class MediaHost:
    """Signs media URLs for the API answers and serves them (`app()`), with its own clock for expiry."""

    def __init__(self, seed: int, config: MediaConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.seed = seed
        self.config = config
        self.stats = MediaStats()
        self.base = "http://media.invalid"  # replaced by the real address once the host listens
        self._clock = clock
        self._shift = 0.0
        self._seen: Counter[int] = Counter()
        self._revoked: set[str] = set()

    def revoke(self, ident: str) -> None:
        """Every file of this post (or music) is gone for good: 410, whatever the URL's signature."""
        self._revoked.add(ident)

    def now(self) -> float:
        """The host's clock (wall time plus any `shift`)."""
        return self._clock() + self._shift

    def shift(self, seconds: float) -> None:
        """Move the host's clock forward: URLs signed before may now be expired."""
        self._shift += seconds

    def _sig(self, path: str, expires: int) -> str:
        return f"{hash64(self.seed, _DOMAIN, 5, str_hash(path), expires):016x}"

    def url(self, kind: str, ident: str, n: int | None = None) -> str:
        """A signed URL for one file, valid for `ttl` seconds from now."""
        path = f"/m/{kind}/{ident}" + ("" if n is None else f"/{n}") + url_suffix(self.seed, kind, ident)
        expires = int(self.now() + self.config.ttl)
        return f"{self.base}{path}?e={expires}&s={self._sig(path, expires)}"

    def app(self) -> web.Application:
        """The aiohttp application of the host."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one media request: signature and expiry, Range / If-Range, faults, throttled body."""
        st = self.stats
        st.requests += 1
        st.arrivals.append(time.monotonic())
        if "X-Api-Key" in request.headers:
            st.with_api_key += 1
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        arrival = st.arrivals[-1]
        status = 0
        try:
            response = await self._answer(request)
            status = response.status
            return response
        finally:
            st.in_flight -= 1
            st.log.append((arrival, request.path, status))

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        st = self.stats
        status, response = self._check(request)
        if response is not None:
            st.by_status[status] += 1
            return response
        m = _PATH.match(request.path)
        assert m is not None
        kind, ident, n = m.group(1), m.group(2), int(m.group(3) or 0)
        total = size(self.seed, kind, ident, n)
        tag = etag(self.seed, kind, ident, n)
        start, end = 0, total
        ranged = False
        header = request.headers.get("Range")
        if header is not None:
            st.ranged += 1
        if header is not None and self.config.ranges:
            if_range = request.headers.get("If-Range")
            if if_range is None or if_range == tag:
                rm = _RANGE.match(header.strip())
                first = int(rm.group(1)) if rm and rm.group(1) else None
                last = int(rm.group(2)) if rm and rm.group(2) else None
                if rm is None or (first is None and last is None):
                    first = None  # malformed: RFC 9110 says ignore the header
                elif first is None:  # suffix range
                    assert last is not None
                    start, ranged = max(0, total - last), True
                elif first >= total:
                    st.by_status[416] += 1
                    return web.Response(status=416, headers={"Content-Range": f"bytes */{total}"})
                else:
                    start, end, ranged = first, min(total, (last + 1) if last is not None else total), True
        h = hash64(self.seed, _DOMAIN, 6, str_hash(request.path), start, self._seen[str_hash(request.path) ^ start])
        self._seen[str_hash(request.path) ^ start] += 1
        cfg = self.config
        fault = self._fault(h)
        refusal = self._refusal(fault, h)
        if refusal is not None:
            st.by_status[refusal.status] += 1
            return refusal
        status = 206 if ranged else 200
        st.by_status[status] += 1
        resp = web.StreamResponse(status=status)
        form = fmt(self.seed, kind, ident)
        resp.content_type = "application/octet-stream" if cfg.generic_type else CONTENT_TYPES[form]
        resp.content_length = end - start
        resp.headers["Accept-Ranges"] = "bytes" if cfg.ranges else "none"
        if cfg.etags:
            resp.headers["ETag"] = tag
        if ranged:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
        try:
            await resp.prepare(request)
            await self._body(request, resp, kind, ident, n, start, end, fault, h)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass  # the client went away (a killed downloader): nothing to finish
        return resp

    def _fault(self, h: int) -> str | None:
        """The fault this answer meets (drawn from its seeded hash at `fault_rate`), counted; None most often."""
        if not self.config.faults or unit(hash64(h, 1)) >= self.config.fault_rate:
            return None
        kinds = sorted(self.config.faults)
        fault = kinds[hash64(h, 2) % len(kinds)]
        self.stats.faults[fault] += 1
        return fault

    def _refusal(self, fault: str | None, h: int) -> web.Response | None:
        """The answer of a "5xx" or "throttle" fault (429/503 with Retry-After), else None."""
        if fault == "5xx":
            return web.Response(status=(500, 502, 503)[hash64(h, 3) % 3], text="upstream error")
        if fault == "throttle":
            return web.Response(status=(429, 503)[hash64(h, 3) % 2], text="slow down",
                                headers={"Retry-After": f"{self.config.retry_after:g}"})
        return None

    async def _body(self, request: web.Request, resp: web.StreamResponse, kind: str, ident: str, n: int,
                    start: int, end: int, fault: str | None, h: int) -> None:
        cfg = self.config
        cut_at = start + int((end - start) * unit(hash64(h, 4))) if fault == "cut" else None
        delay = 0.0
        if fault == "slow":
            delay = cfg.slow_seconds * _CHUNK / max(1, end - start)
        elif cfg.bytes_per_second:
            delay = _CHUNK / cfg.bytes_per_second
        pos = start
        while pos < end:
            stop = min(end, pos + _CHUNK)
            if cut_at is not None and stop >= cut_at:
                chunk = content_range(self.seed, kind, ident, n, pos, cut_at)
                await resp.write(chunk)
                self._count(request.path, len(chunk))
                if request.transport is not None:
                    request.transport.abort()  # the client sees the body end short
                return
            chunk = content_range(self.seed, kind, ident, n, pos, stop)
            await resp.write(chunk)
            self._count(request.path, len(chunk))
            pos = stop
            if delay:
                await asyncio.sleep(delay)
        await resp.write_eof()

    def _count(self, path: str, n: int) -> None:
        self.stats.bytes_sent += n
        self.stats.by_file[path] += n

    def _check(self, request: web.Request) -> tuple[int, web.Response | None]:
        """(status, an error response) for a request that must be refused, else (0, None)."""
        if request.method == "HEAD":
            return 503, web.Response(status=503)  # the real media CDN refuses HEAD (§5.1); GET with Range works
        if request.method != "GET":
            return 405, web.Response(status=405)
        m = _PATH.match(request.path)
        if m is None or (m.group(4) or "") != url_suffix(self.seed, m.group(1), m.group(2)).lstrip("."):
            return 404, web.Response(status=404, text="no such object")
        try:
            expires = int(request.query.get("e", ""))
        except ValueError:
            return 403, web.Response(status=403, text="missing signature")
        if request.query.get("s") != self._sig(request.path, expires):
            return 403, web.Response(status=403, text="bad signature")
        if expires < self.now():
            return 403, web.Response(status=403, text="URL expired")  # what CDNs answer to a stale signed URL
        if m.group(2) in self._revoked:
            return 410, web.Response(status=410, text="gone")
        if m.group(1) == "image" and int(m.group(3) or 0) >= photo_count(self.seed, m.group(2)):
            return 404, web.Response(status=404, text="no such object")
        return 0, None
