"""Pinned posts: a profile's list starts with up to three pinned posts, flagged by `is_top` or, as in every real
body seen, not flagged at all (api-reference §5.1). They break the list's newest-first order, which is how they are
told apart here; the paginator marks them on a list's first page and a walk to a watermark asks `unsure`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from crawler.api.records import Post

MAX_PINNED = 3  # a profile pins at most three posts


def mark_pinned(posts: Sequence[Post]) -> list[Post]:
    """The first page of a profile's posts with its pinned posts marked (`pinned`): those flagged, and those among
    the first MAX_PINNED older than a post after them on the page. A pinned post that is the newest anyway stays
    unmarked: in its place in the newest-first order it misleads nobody."""
    out = list(posts)
    newest_after: int | None = None  # the newest create_time after position i
    for i in range(len(out) - 1, -1, -1):
        t = out[i].create_time
        if t is None:
            continue
        if i < MAX_PINNED and newest_after is not None and t < newest_after and not out[i].pinned:
            out[i] = dataclasses.replace(out[i], pinned=True)
        newest_after = t if newest_after is None else max(newest_after, t)
    return out


def unsure(posts: Sequence[Post], *, more: bool) -> bool:
    """Whether a list's first page may hold nothing but pinned posts, so that none of its create_times says where
    the newest posts stand: a page of at most MAX_PINNED posts with more to come (tiny page sizes). A walk to a
    watermark must not end on it; the next page decides."""
    return more and len(posts) <= MAX_PINNED and not all(p.pinned for p in posts)
