"""`crawler estimate ingest|download`: the credits of the two runs that are not job commands, priced from plain
facts the caller gathers (the history's last counts; a posts CSV and its media URLs' expiry)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from crawler.jobs.estimate import at_rate, walk_pages
from crawler.jobs.media import SKIPS, read_input
from crawler.options import RateOptions

EXPIRY_PARAMS = ("x-expires", "expires", "e")  # where a signed media URL says when it expires (epoch seconds)
URL_LIFE = 6 * 3600.0  # what to assume of a URL that states no expiry: TikTok's signed URLs last hours
MARGIN = 600.0  # a URL expiring this soon counts as expired (it may be reached late in the run)


@dataclass(frozen=True, slots=True)
class Priced:
    """An estimate of a run: its lines, the expected credits, and an upper end when they are a range."""

    title: str
    lines: tuple[str, ...]
    credits: int
    upto: int | None = None  # the range's other end (unknown lengths), None when the figure is exact
    notes: tuple[str, ...] = ()

    def render(self, rate: RateOptions | None = None) -> str:
        """What to print (with the time at the key's pace when `rate` is given)."""
        figure = f"{self.credits:,}" if self.upto is None else f"{self.credits:,} to {self.upto:,}"
        out = [self.title, *self.lines, f"expected credits_billed: {figure}", *self.notes]
        if rate is not None:
            out.append(at_rate(self.credits, rate, upto=self.upto))
        return "\n".join(out)


def url_expiry(url: str) -> float | None:
    """When a signed media URL expires (epoch seconds), if it says."""
    query = parse_qs(urlsplit(url).query)
    for name in EXPIRY_PARAMS:
        value = (query.get(name) or [""])[0]
        if value.isdigit():
            return float(value)
    return None


def estimate_download(path: str, what: str, *, now: float | None = None) -> Priced:
    """Price `crawler download PATH --what WHAT` from scratch: a row with URLs of the kind costs nothing unless they
    expired (one /post-detail/ renewal per post), a row or id without them one /post-detail/ call."""
    now = time.time() if now is None else now
    try:
        age = now - os.stat(path).st_mtime if path != "-" else None
    except OSError:
        age = None
    free = find = renew = undated = skipped = invalid = 0
    for _key, _raw, reason, _detail, files in read_input(path, what):
        if reason is not None:
            skipped += reason in SKIPS
            invalid += reason not in SKIPS
        elif not files:
            find += 1
        else:
            expiries = [e for e in (url_expiry(url) for _, url, _ in files) if e is not None]
            if expiries:
                expired = min(expiries) < now + MARGIN
            else:  # no expiry in the URL: the CSV's age tells, conservatively
                undated += 1
                expired = age is None or age > URL_LIFE - MARGIN
            renew += expired
            free += not expired
    lines = [f"  rows with URLs, still valid   {free:,}  (no credit: the media host is not the API)",
             f"  rows with URLs, expired       {renew:,}  (one /post-detail/ renewal each)",
             f"  rows without URLs ({what})     {find:,}  (one /post-detail/ call each)"]
    notes = [f"assumes: a fresh download ({skipped:,} posts skipped as not of this kind, {invalid:,} invalid lines;"
             " files already in DIR cost nothing)",
             f"  expiry read from each URL's {'/'.join(EXPIRY_PARAMS)} parameter, against now + {MARGIN:.0f} s"]
    if undated:
        seen = f"{age / 3600:.1f} h old" if age is not None else "of unknown age"
        notes.append(f"  {undated:,} rows' URLs state no expiry: the CSV is {seen}; counted as expired past"
                     f" {URL_LIFE / 3600:.0f} h")
    return Priced(f"estimate for download --what {what}: {free + renew + find:,} posts", tuple(lines),
                  renew + find, notes=tuple(notes))


@dataclass(frozen=True, slots=True)
class WatchedUser:
    """What the history and the data directory know of one watch-list user, for `estimate_ingest`."""

    snapshotted_today: bool
    walked_today: bool
    watermark: bool  # a complete posts walk stands: the next walks stop at it
    private: bool | None  # None: unknown
    videos: int | None  # the last known video count
    previous: int | None  # the one before (the last two snapshots)


def estimate_ingest(users: Iterable[WatchedUser], *, invalid: int, with_posts: bool, page_size: int,
                    max_pages: int | None = None, max_items: int | None = None) -> Priced:
    """Price tonight's `crawler ingest` (see docs/history.md): a profile per user not snapshotted today; with
    --posts, each public user's walk down to the watermark (the new posts since, from the last two snapshots' video
    counts: one page when they do not tell), or a whole first walk from the last known count; each walk cut at
    --max-pages / --max-items as ingest cuts it."""
    n = profiles = known_pages = fresh_pages = unknown = private = 0
    for u in users:
        n += 1
        profiles += not u.snapshotted_today
        if not with_posts or u.walked_today:
            continue
        if u.private:
            private += 1
        elif u.watermark:
            new = max(0, u.videos - u.previous) if u.videos is not None and u.previous is not None else 0
            known_pages += walk_pages(new + 1, page_size, max_pages, max_items)  # the watermark's page ends it
        elif u.videos is not None:
            fresh_pages += walk_pages(u.videos, page_size, max_pages, max_items)
        else:
            unknown += 1
    lines = [f"  profiles (not snapshotted today)   {profiles:,}"]
    if with_posts:
        lines += [f"  posts pages down to the watermark  {known_pages:,}  (new posts since the last walk)",
                  f"  posts pages of first walks         {fresh_pages:,}  (from the last known video counts)",
                  f"  private users                      {private:,}  (their posts are not walked)"]
        if unknown:
            lines.append(f"  first walks of unknown length      {unknown:,}  (one page at least each)")
    notes = [f"assumes: {page_size} posts a page; new posts per user as between the last two snapshots"
             " (one page when only one snapshot tells)"]
    if invalid:
        notes.append(f"  {invalid:,} invalid lines: not billed")
    base = profiles + known_pages + fresh_pages + unknown
    upto = base + unknown * (math.ceil(1000 / page_size) - 1) if unknown else None
    if unknown:
        notes.append(f"  the upper end assumes up to 1,000 posts a user; `crawler profiles` on the watch list (or a"
                     f" night's ingest without --posts) learns the counts for {unknown:,} credits")
    return Priced(f"estimate for ingest{' --posts' if with_posts else ''}: {n:,} watch-list users", tuple(lines),
                  base, upto, tuple(notes))
