"""The paginated lists: how each is walked (`LISTS`), and one async-generator paginator for all of them."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from crawler.api.pagesizes import PageSizes
from crawler.api.parse import (
    as_bool,
    as_dict,
    comment_parser,
    parse_challenge,
    parse_follow,
    parse_post,
    parse_user_hit,
)
from crawler.api.pinned import mark_pinned
from crawler.api.records import Challenge, Comment, Cursor, Follow, JsonDict, Page, Post, R, UserHit
from crawler.errors import PageSizeRejected

log = logging.getLogger("crawler.api.records")  # the walk's log lines keep the name they had
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ListSpec(Generic[R]):
    """How one paginated endpoint is walked."""

    kind: str
    path: str
    items_keys: tuple[str, ...]
    cursor_param: str  # request parameter and response key ("cursor" or "time")
    default_size: int  # the documented default `count` (never asked below it)
    max_page_size: int  # the most the reference says one page gives: what is asked for
    parse: Callable[[Mapping[str, Any], str, Mapping[str, Any]], R]
    record: type[R]
    source_param: str  # request parameter that names the input item (row's source column)
    first_page: Callable[[list[R]], list[R]] | None = None  # what the list's first page needs (pinned posts)


ItemParser = Callable[[Mapping[str, Any], str, Mapping[str, Any]], R]


def _ignore_params(parse: Callable[[Mapping[str, Any], str], R]) -> ItemParser[R]:
    return lambda item, source, params: parse(item, source)


_posts = _ignore_params(parse_post)
LISTS: dict[str, ListSpec[Any]] = {
    s.kind: s
    for s in (
        ListSpec("posts", "/user-posts/", ("videos",), "cursor", 10, 35, _posts, Post, "userid", mark_pinned),
        ListSpec("liked", "/user-liked/", ("videos",), "cursor", 2, 35, _posts, Post, "userid"),
        ListSpec("followers", "/user-followers/", ("followers",), "time", 50, 200,
                 _ignore_params(parse_follow), Follow, "userid"),
        ListSpec("following", "/user-following/", ("followings", "following"), "time", 50, 200,
                 _ignore_params(parse_follow), Follow, "userid"),
        ListSpec("comments", "/post-comments/", ("comments",), "cursor", 10, 50,
                 comment_parser(None), Comment, "url"),
        ListSpec("replies", "/post-comment-replies/", ("comments", "replies"), "cursor", 10, 50,
                 comment_parser("comment_id"), Comment, "comment_id"),
        ListSpec("search_videos", "/search-video/", ("videos",), "cursor", 10, 30, _posts, Post, "keyword"),
        ListSpec("search_users", "/search-user/", ("user_list", "users"), "cursor", 10, 30,
                 _ignore_params(parse_user_hit), UserHit, "keyword"),
        ListSpec("search_challenges", "/search-challenge/", ("challenge_list",), "cursor", 10, 30,
                 _ignore_params(parse_challenge), Challenge, "keyword"),
        ListSpec("music_posts", "/music-posts/", ("videos",), "cursor", 10, 30, _posts, Post, "music_id"),
        ListSpec("challenge_posts", "/challenge-posts/", ("videos",), "cursor", 10, 30, _posts, Post,
                 "challenge_id"),
    )
}

_VIDEO_ID_IN_URL = re.compile(r"/video/(\d+)")


def _page_items(spec: ListSpec[Any], body: JsonDict) -> tuple[JsonDict, list[Any]]:
    """The page's raw items; an answer with no list and no pagination keys is an unexpected shape."""
    for key in spec.items_keys:
        value = body.get(key)
        if isinstance(value, list):
            return body, value
    if any(k in body for k in (*spec.items_keys, "hasMore", "has_more", spec.cursor_param)):
        return body, []  # an empty list may come as null or be left out
    raise ValueError(f"no {spec.items_keys[0]!r} list in the answer (keys: {', '.join(sorted(body)[:8])})")


Fetched = tuple[JsonDict, list[Any], list[Any]]  # the body, its raw items, each parsed (None: no id, skipped)


def _read_page(spec: ListSpec[Any], body: JsonDict, source: str, params: Mapping[str, str | int]) -> Fetched:
    """The page's items parsed; a page none of whose items can be read is an unexpected shape, not an empty page."""
    body, raw_items = _page_items(spec, body)
    parsed: list[Any] = []
    for raw in raw_items:
        try:
            parsed.append(spec.parse(as_dict(raw), source, params))
        except (ValueError, TypeError):
            parsed.append(None)
    if parsed and all(p is None for p in parsed):
        raise ValueError(f"none of the {len(parsed)} items in the answer can be read")
    return body, raw_items, parsed


class Caller(Protocol):
    """What a walk needs of the client: one paced, retried, classified call whose answer is parsed."""

    async def call(self, endpoint: str, params: Mapping[str, str | int] | None,
                   parse: Callable[[JsonDict], T]) -> T: ...


@dataclass
class _Walk:
    """What a walk carries from one page to the next."""

    count: int  # the page size asked for
    current: Cursor  # the cursor sent for this page
    fell_back: bool = False  # the API refused a larger count: the documented default since
    short: int = 0  # the count of the latest short pages that claimed more
    in_a_row: int = 0  # and how many of them came in a row
    sent: set[str] = field(default_factory=set)  # every cursor sent
    seen: set[str] = field(default_factory=set)  # the key of every row yielded
    pages: int = 0
    rows: int = 0
    head: bool = False  # the walk started at the head of the list (no cursor given)


async def walk(
    client: Caller,
    spec: ListSpec[R],
    params: Mapping[str, str | int],
    *,
    source: str | None = None,
    cursor: Cursor | None = None,
    page_size: int | None = None,
    max_pages: int | None = None,
    max_items: int | None = None,
    sizes: PageSizes | None = None,
) -> AsyncGenerator[Page[R], None]:
    """Walk one list page by page, from ``cursor`` (default: the start).

    Without ``page_size`` it asks for the most the list gives (or the size learned in ``sizes``) and
    learns from the answers: a short page alone is no cap, three pages in a row with more to come at one
    smaller count are (never below the documented default); an error about the size falls back to the
    documented default, once.

    Guards end the walk with a reason on the last page instead of burning credits: a cursor the API
    already sent, an empty page that claims more, and the ``max_pages`` cap. Rows already seen in
    this walk are dropped, so a misbehaving API cannot duplicate them.
    """
    source = _source(spec, params) if source is None else source
    learned = sizes.get(spec.kind) if sizes is not None and page_size is None else None
    w = _Walk(min(page_size or learned or spec.max_page_size, spec.max_page_size), 0 if cursor is None else cursor,
              head=cursor is None)
    while True:
        w.sent.add(str(w.current))
        fetched = await _fetch(client, spec, params, source, w, sizes)
        if fetched is None:
            continue  # the same cursor again, at the documented default
        page = _page(spec, w, fetched, source, params, page_size=page_size, max_pages=max_pages,
                     max_items=max_items, sizes=sizes)
        yield page
        if page.last or page.next_cursor is None:
            return
        w.current = page.next_cursor


def _source(spec: ListSpec[Any], params: Mapping[str, str | int]) -> str:
    """The row's source column: the parameter naming the input item (a video URL's numeric id)."""
    raw_source = str(params.get(spec.source_param, ""))
    match = _VIDEO_ID_IN_URL.search(raw_source)
    return match.group(1) if match else raw_source


async def _fetch(client: Caller, spec: ListSpec[Any], params: Mapping[str, str | int], source: str, w: _Walk,
                 sizes: PageSizes | None) -> Fetched | None:
    """The page's body, raw and parsed items; None when the API refused the count and the walk falls back to the
    documented default (once)."""
    query = {**params, "count": w.count, spec.cursor_param: w.current}
    try:
        return await client.call(spec.path, query, lambda b: _read_page(spec, b, source, params))
    except PageSizeRejected:
        if w.fell_back or w.count <= spec.default_size:
            raise
        w.fell_back, w.count = True, spec.default_size
        if sizes is not None:
            sizes.learn(spec.kind, w.count, f"the API refused a larger count at {spec.path}")
        return None


def _page(spec: ListSpec[R], w: _Walk, fetched: Fetched, source: str,
          params: Mapping[str, str | int], *, page_size: int | None, max_pages: int | None, max_items: int | None,
          sizes: PageSizes | None) -> Page[R]:
    """One fetched page as the walk yields it: its new rows (up to ``max_items``) and whether the walk ends."""
    body, raw_items, parsed = fetched
    items, skipped, repeated = _rows(parsed, w.seen)
    if spec.first_page is not None and w.head and w.pages == 0:
        items = spec.first_page(items)  # before the max_items cut: positions count on the page as it came
    if max_items is not None and w.rows + len(items) >= max_items:
        items = items[: max_items - w.rows]
    w.rows += len(items)
    w.pages += 1
    nxt = body.get(spec.cursor_param)
    has_more = _has_more(body, raw_items, nxt, w.current)
    _learn_short_pages(spec, w, len(raw_items), has_more, page_size, sizes)
    stop: str | None = None
    capped = False
    if has_more and (max_items is None or w.rows < max_items):
        capped = max_pages is not None and w.pages >= max_pages
        if not capped:
            stop = _guard(w, raw_items, items, skipped, repeated, nxt)
    if skipped:
        log.warning("%s: %d items without an id skipped", spec.path, skipped)
    enough = max_items is not None and w.rows >= max_items
    last = stop is not None or capped or not has_more or enough
    if stop is not None:
        log.warning("%s (%s): walk ended: %s", spec.path, source, stop)
    elif capped:
        log.info("%s (%s): walk ended at the page cap of %d", spec.path, source, max_pages)
    return Page(items, w.current, nxt, has_more, stop, capped, last, skipped)


def _rows(parsed: list[Any], seen: set[str]) -> tuple[list[Any], int, int]:
    """The page's records not seen before in this walk, and how many items were skipped (no id) or repeated."""
    items: list[Any] = []
    skipped = repeated = 0
    for record in parsed:
        if record is None:
            skipped += 1
            continue
        key = str(getattr(record, record.COLUMNS[0]))
        if key in seen:
            repeated += 1
            continue
        seen.add(key)
        items.append(record)
    return items, skipped, repeated


def _has_more(body: JsonDict, raw_items: list[Any], nxt: Any, current: Cursor) -> bool:
    """The page's hasMore flag; without one, go on while pages bring rows and a new cursor (an empty page ends it)."""
    flag = body.get("hasMore", body.get("has_more"))
    if flag is not None:
        return as_bool(flag)
    return bool(raw_items) and nxt is not None and str(nxt) != str(current)


def _learn_short_pages(spec: ListSpec[Any], w: _Walk, n: int, has_more: bool, page_size: int | None,
                       sizes: PageSizes | None) -> None:
    """A short page alone is no cap; three in a row at one smaller count, each claiming more, are (never below the
    documented default, and never when the caller chose the page size)."""
    if has_more and 0 < n < w.count:
        w.in_a_row = w.in_a_row + 1 if n == w.short else 1
        w.short = n
        if w.in_a_row >= 3 and page_size is None and max(w.short, spec.default_size) < w.count:
            w.count = max(w.short, spec.default_size)
            if sizes is not None:
                sizes.learn(spec.kind, w.count, f"{spec.path} gave {w.count} a page three times in a row")
    else:
        w.in_a_row = 0


def _guard(w: _Walk, raw_items: list[Any], items: list[Any], skipped: int, repeated: int, nxt: Any) -> str | None:
    """Why a page that claims more must end the walk anyway (a pagination guard), or None."""
    if not raw_items:
        return f"empty page claims more (cursor {w.current})"
    if repeated and not items and not skipped:
        return f"page repeats rows already seen (cursor {w.current})"
    if nxt is None:
        return "page claims more but sent no cursor"
    if str(nxt) in w.sent:
        return f"repeated cursor {nxt}"
    return None


async def items(pages: AsyncGenerator[Page[R], None], max_items: int | None = None) -> AsyncGenerator[R, None]:
    """The rows of a page walk, one by one (closes the walk when the consumer stops)."""
    async with aclosing(pages) as walk_:
        n = 0
        async for page in walk_:
            for record in page.items:
                yield record
                n += 1
                if max_items is not None and n >= max_items:
                    return
