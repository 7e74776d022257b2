"""Endpoints: typed records, their CSV columns, and one async-generator paginator for every list.

The API's quirks (api-reference.md) are absorbed here and nowhere else: cursors passed back verbatim
(string or int), `hasMore` as bool or 0/1, `stats` top-level / in `user.stats` / flattened into
`user`, `video_id` vs `id` vs opaque `aweme_id`, `title: null`, `followings` as the following list's
key, numbers sent as strings, `search-user` items as `{user, stats}` or `{user_info}`.
"""

from __future__ import annotations

import logging
import operator
import re
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from crawler.api.pagesizes import PageSizes
from crawler.errors import PageSizeRejected, TransientError

log = logging.getLogger("crawler.api.records")
JsonDict = dict[str, Any]
Cursor = str | int


# --- value helpers: the API sends numbers as ints, floats or strings, and ids as strings ---

def _int(v: Any) -> int | None:
    if type(v) is int:
        return v
    if v is None or isinstance(v, bool):
        return None if v is None else int(v)
    if isinstance(v, int):
        return v
    try:
        return int(float(v)) if isinstance(v, float | str) and str(v).strip() else None
    except ValueError:
        return None


def _str(v: Any) -> str:
    if type(v) is str:
        return v
    return "" if v is None else str(v)


def _bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes")
    return bool(v)


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _dict(v: Any) -> JsonDict:
    return v if isinstance(v, dict) else {}


def _first(*candidates: Any) -> Any:
    for c in candidates:
        if c is not None and c != "":
            return c
    return None


def video_url(video_id: str) -> str:
    """The URL form `/post-detail/` and `/post-comments/` take; only the numeric id matters."""
    return f"https://www.tiktok.com/@placeholder/video/{video_id}"


def _video_id(item: Mapping[str, Any]) -> str:
    """The numeric post id: `video_id`, else `id`, else `aweme_id` only when it is all digits."""
    for key in ("video_id", "id"):
        value = _str(item.get(key)).strip()
        if value.isdigit():
            return value
    aweme = _str(item.get("aweme_id")).strip()
    if aweme.isdigit():
        return aweme
    raise ValueError("post without a numeric id")


# --- records ---

class Record:
    """Mixin: a row's CSV columns are its dataclass fields, in order."""

    COLUMNS: ClassVar[tuple[str, ...]] = ()

    def values(self) -> tuple[Any, ...]:
        """The row's values in COLUMNS order."""
        values: tuple[Any, ...] = _GETTERS[type(self)](self)
        return values


R = TypeVar("R", bound=Record)
T = TypeVar("T")
_GETTERS: dict[type, operator.attrgetter[Any]] = {}


def _columns(cls: type[R]) -> type[R]:
    cls.COLUMNS = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
    _GETTERS[cls] = operator.attrgetter(*cls.COLUMNS)  # one C call per row instead of a getattr per cell
    return cls


@_columns
@dataclass(frozen=True, slots=True)
class Profile(Record):
    """A user profile; private accounts are rows with private=True."""

    user_id: str
    handle: str
    nickname: str
    sec_uid: str
    verified: bool
    private: bool
    followers: int | None
    following: int | None
    videos: int | None
    hearts: int | None
    likes: int | None
    signature: str


@_columns
@dataclass(frozen=True, slots=True)
class Post(Record):
    """A post from any video list or from post detail; source_handle is the input item it came from."""

    video_id: str
    source_handle: str
    create_time: int | None
    region: str
    title: str
    play_count: int | None
    digg_count: int | None
    comment_count: int | None
    share_count: int | None
    collect_count: int | None
    author_id: str
    author_handle: str
    music_id: str
    pinned: bool
    # media (api-reference §3.1-3.3); signed CDN URLs that expire, so `crawler download` refreshes them
    duration: int | None = None
    cover: str = ""
    play: str = ""
    wmplay: str = ""
    hdplay: str = ""  # only /post-detail/ gives it
    size: int | None = None
    hd_size: int | None = None
    music_url: str = ""
    images: str = ""  # photo posts: the image URLs, space-separated


@_columns
@dataclass(frozen=True, slots=True)
class Follow(Record):
    """One entry of a follower or following list."""

    user_id: str
    handle: str
    source_handle: str
    nickname: str
    sec_uid: str
    followers: int | None
    videos: int | None


@_columns
@dataclass(frozen=True, slots=True)
class Comment(Record):
    """A comment or a reply (replies carry parent_comment_id)."""

    comment_id: str
    video_id: str
    text: str
    parent_comment_id: str
    create_time: int | None
    digg_count: int | None
    reply_total: int | None
    user_id: str
    user_handle: str


@_columns
@dataclass(frozen=True, slots=True)
class UserHit(Record):
    """A user found by `/search-user/`."""

    user_id: str
    handle: str
    source_keyword: str
    nickname: str
    sec_uid: str
    verified: bool
    followers: int | None
    following: int | None
    videos: int | None
    hearts: int | None


@_columns
@dataclass(frozen=True, slots=True)
class Challenge(Record):
    """A hashtag."""

    challenge_id: str
    name: str
    source: str
    description: str
    user_count: int | None
    view_count: int | None


@_columns
@dataclass(frozen=True, slots=True)
class Music(Record):
    """A sound."""

    music_id: str
    title: str
    author: str
    duration: int | None
    original: bool
    video_count: int | None


@_columns
@dataclass(frozen=True, slots=True)
class Region(Record):
    """A region code `/search-video/` accepts."""

    code: str
    name: str


# --- parsers (raw JSON -> record) ---

_STAT_KEYS = ("followerCount", "followingCount", "heartCount", "heart", "videoCount", "diggCount")


def _stats(body: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, int | None]:
    """Profile counts from `stats`, else `user.stats`, else `user` itself (all three are seen)."""
    places = (_dict(body.get("stats")), _dict(user.get("stats")), user)
    return {key: _int(_first(*(p.get(key) for p in places))) for key in _STAT_KEYS}


def parse_user_id(body: Mapping[str, Any]) -> str:
    """`/userid/` -> the id string."""
    value = _str(_first(body.get("id"), body.get("userid"), body.get("user_id"))).strip()
    if not value.isdigit():
        raise TransientError("/userid/: answer without a numeric id")
    return value


def _profile_fields(user: Mapping[str, Any], stats: Mapping[str, int | None]) -> dict[str, Any]:
    return {
        "user_id": _str(_first(user.get("id"), user.get("uid"))),
        "handle": _str(_first(user.get("uniqueId"), user.get("unique_id"))).lower(),
        "nickname": _str(user.get("nickname")),
        "sec_uid": _str(_first(user.get("secUid"), user.get("sec_uid"))),
        "verified": _bool(user.get("verified")),
        "followers": stats["followerCount"],
        "following": stats["followingCount"],
        "videos": stats["videoCount"],
        "hearts": _first(stats["heartCount"], stats["heart"]),
    }


def parse_profile(body: Mapping[str, Any]) -> Profile:
    """`/userinfo-by-username/` or `/userinfo-by-id/` -> Profile."""
    user = _dict(_first(body.get("user"), _dict(body.get("userInfo")).get("user")))
    if not user:
        raise TransientError("user info without a user object")
    stats = _stats(body, user)
    private = _bool(user.get("privateAccount")) or _bool(user.get("secret"))
    return Profile(
        **_profile_fields(user, stats),
        private=private,
        likes=stats["diggCount"],
        signature=_str(user.get("signature")),
    )


def parse_post(item: Mapping[str, Any], source: str) -> Post:
    """A video list item or a `/post-detail/` object -> Post."""
    author = _dict(item.get("author"))
    music = _dict(item.get("music_info"))
    return Post(
        video_id=_video_id(item),
        source_handle=source,
        create_time=_int(item.get("create_time")),
        region=_str(item.get("region")),
        title=_str(item.get("title")),
        play_count=_int(item.get("play_count")),
        digg_count=_int(item.get("digg_count")),
        comment_count=_int(item.get("comment_count")),
        share_count=_int(item.get("share_count")),
        collect_count=_int(item.get("collect_count")),
        author_id=_str(author.get("id")),
        author_handle=_str(author.get("unique_id")).lower(),
        music_id=_str(music.get("id")),
        pinned=_bool(item.get("is_top")),
        duration=_int(item.get("duration")),
        cover=_str(item.get("cover")),
        play=_str(item.get("play")),
        wmplay=_str(item.get("wmplay")),
        hdplay=_str(item.get("hdplay")),
        size=_int(item.get("size")),
        hd_size=_int(item.get("hd_size")),
        music_url=_str(_first(item.get("music"), music.get("play"))),
        images=" ".join(_str(u) for u in _list(item.get("images")) if _str(u)),
    )


def parse_follow(item: Mapping[str, Any], source: str) -> Follow:
    """A follower/following item -> Follow."""
    user_id = _str(_first(item.get("id"), item.get("uid"), item.get("user_id")))
    if not user_id:
        raise ValueError("follow item without an id")
    return Follow(
        user_id=user_id,
        handle=_str(_first(item.get("unique_id"), item.get("uniqueId"))).lower(),
        source_handle=source,
        nickname=_str(item.get("nickname")),
        sec_uid=_str(_first(item.get("sec_uid"), item.get("secUid"))),
        followers=_int(_first(item.get("follower_count"), item.get("followerCount"))),
        videos=_int(_first(item.get("aweme_count"), item.get("videoCount"))),
    )


def _comment_parser(parent_param: str | None) -> Callable[[Mapping[str, Any], str, Mapping[str, Any]], Comment]:
    def parse(item: Mapping[str, Any], source: str, params: Mapping[str, Any]) -> Comment:
        comment_id = _str(_first(item.get("id"), item.get("cid"), item.get("comment_id")))
        if not comment_id:
            raise ValueError("comment without an id")
        user = _dict(item.get("user"))
        video_id = _str(_first(item.get("video_id"), params.get("video_id"), source))
        return Comment(
            comment_id=comment_id,
            video_id=video_id,
            text=_str(item.get("text")),
            parent_comment_id=_str(params.get(parent_param)) if parent_param else "",
            create_time=_int(item.get("create_time")),
            digg_count=_int(item.get("digg_count")),
            reply_total=_int(item.get("reply_total")),
            user_id=_str(user.get("id")),
            user_handle=_str(_first(user.get("unique_id"), user.get("uniqueId"))).lower(),
        )

    return parse


def parse_user_hit(item: Mapping[str, Any], source: str) -> UserHit:
    """A `/search-user/` item, in either shape seen: `{user, stats}` or `{user_info}` -> UserHit."""
    user = _dict(_first(item.get("user_info"), item.get("user"))) or _dict(item)
    stats = _stats(item, user)
    base = _profile_fields(user, stats)
    if not base["user_id"]:
        raise ValueError("search-user item without an id")
    return UserHit(**base, source_keyword=source)


def parse_challenge(item: Mapping[str, Any], source: str) -> Challenge:
    """A challenge object or `challenge_list` item -> Challenge."""
    cid = _str(_first(item.get("id"), item.get("cid"), item.get("challenge_id")))
    if not cid:
        raise ValueError("challenge without an id")
    return Challenge(
        challenge_id=cid,
        name=_str(_first(item.get("cha_name"), item.get("title"), item.get("name"))),
        source=source,
        description=_str(_first(item.get("desc"), item.get("description"))),
        user_count=_int(item.get("user_count")),
        view_count=_int(item.get("view_count")),
    )


def parse_music(body: Mapping[str, Any]) -> Music:
    """`/music-info/` -> Music."""
    music_id = _str(_first(body.get("id"), body.get("music_id")))
    if not music_id:
        raise TransientError("/music-info/: answer without an id")
    return Music(
        music_id=music_id,
        title=_str(body.get("title")),
        author=_str(body.get("author")),
        duration=_int(body.get("duration")),
        original=_bool(body.get("original")),
        video_count=_int(body.get("video_count")),
    )


def parse_regions(body: Mapping[str, Any]) -> list[Region]:
    """`/region-list/`: a flat code -> name map (tikwm's shape; a list of {code, name} also accepted)."""
    listed = _first(body.get("regions"), body.get("region_list"), body.get("list"))
    if isinstance(listed, list):
        out = [Region(_str(_first(r.get("code"), r.get("region"), r.get("id"))).upper(), _str(r.get("name")))
               for r in listed if isinstance(r, dict)]
        return sorted(out, key=lambda r: r.code)
    return sorted((Region(str(k).upper(), _str(v)) for k, v in body.items() if isinstance(v, str)),
                  key=lambda r: r.code)


# --- list specifications and the paginator ---

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


ItemParser = Callable[[Mapping[str, Any], str, Mapping[str, Any]], R]


def _ignore_params(parse: Callable[[Mapping[str, Any], str], R]) -> ItemParser[R]:
    return lambda item, source, params: parse(item, source)


_posts = _ignore_params(parse_post)
LISTS: dict[str, ListSpec[Any]] = {
    s.kind: s
    for s in (
        ListSpec("posts", "/user-posts/", ("videos",), "cursor", 10, 35, _posts, Post, "userid"),
        ListSpec("liked", "/user-liked/", ("videos",), "cursor", 2, 35, _posts, Post, "userid"),
        ListSpec("followers", "/user-followers/", ("followers",), "time", 50, 200,
                 _ignore_params(parse_follow), Follow, "userid"),
        ListSpec("following", "/user-following/", ("followings", "following"), "time", 50, 200,
                 _ignore_params(parse_follow), Follow, "userid"),
        ListSpec("comments", "/post-comments/", ("comments",), "cursor", 10, 50,
                 _comment_parser(None), Comment, "url"),
        ListSpec("replies", "/post-comment-replies/", ("comments", "replies"), "cursor", 10, 50,
                 _comment_parser("comment_id"), Comment, "comment_id"),
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

# Lists paginated by an integer offset: rows move to later offsets when the list grows at its head.
OFFSET_KINDS = frozenset({"comments", "replies", "search_videos", "search_users", "search_challenges",
                          "music_posts", "challenge_posts"})

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


@dataclass(frozen=True, slots=True)
class Page(Generic[R]):
    """One fetched page: its rows, the cursor sent, the cursor to send next, and why the walk stops."""

    items: list[R]
    cursor: Cursor
    next_cursor: Cursor | None
    has_more: bool
    stop: str | None = None  # a pagination guard's reason, when one ended the walk early
    capped: bool = False  # the walk ended at the max_pages cap (asked for, so not a failure)
    last: bool = False  # no page follows this one
    skipped: int = 0  # items dropped because they lacked an id


class Caller(Protocol):
    """What a walk needs of the client: one paced, retried, classified call whose answer is parsed."""

    async def call(self, endpoint: str, params: Mapping[str, str | int] | None,
                   parse: Callable[[JsonDict], T]) -> T: ...


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
    if source is None:
        raw_source = str(params.get(spec.source_param, ""))
        match = _VIDEO_ID_IN_URL.search(raw_source)
        source = match.group(1) if match else raw_source
    learned = sizes.get(spec.kind) if sizes is not None and page_size is None else None
    count = min(page_size or learned or spec.max_page_size, spec.max_page_size)
    fell_back = False
    short, in_a_row = 0, 0  # the count of the latest short pages that claimed more, and how many in a row
    current: Cursor = 0 if cursor is None else cursor
    sent: set[str] = set()
    seen: set[str] = set()
    pages = rows = 0
    while True:
        sent.add(str(current))
        query = {**params, "count": count, spec.cursor_param: current}
        try:
            body, raw_items = await client.call(spec.path, query, lambda b: _page_items(spec, b))
        except PageSizeRejected:
            if fell_back or count <= spec.default_size:
                raise
            fell_back, count = True, spec.default_size
            if sizes is not None:
                sizes.learn(spec.kind, count, f"the API refused a larger count at {spec.path}")
            continue
        items: list[R] = []
        skipped = repeated = 0
        for raw in raw_items:
            try:
                record = spec.parse(_dict(raw), source, params)
            except (ValueError, TypeError):
                skipped += 1
                continue
            key = str(getattr(record, record.COLUMNS[0]))
            if key in seen:
                repeated += 1
                continue
            seen.add(key)
            items.append(record)
        if max_items is not None and rows + len(items) >= max_items:
            items = items[: max_items - rows]
        rows += len(items)
        pages += 1
        nxt = body.get(spec.cursor_param)
        flag = body.get("hasMore", body.get("has_more"))
        # Without a hasMore flag, go on while pages bring rows and a new cursor; an empty page then ends it.
        has_more = _bool(flag) if flag is not None else bool(raw_items) and nxt is not None and str(nxt) != str(current)
        if has_more and 0 < len(raw_items) < count:
            in_a_row = in_a_row + 1 if len(raw_items) == short else 1
            short = len(raw_items)
            if in_a_row >= 3 and page_size is None and max(short, spec.default_size) < count:
                count = max(short, spec.default_size)
                if sizes is not None:
                    sizes.learn(spec.kind, count, f"{spec.path} gave {count} a page three times in a row")
        else:
            in_a_row = 0
        stop: str | None = None
        capped = False
        if has_more and (max_items is None or rows < max_items):
            if max_pages is not None and pages >= max_pages:
                capped = True
            elif not raw_items:
                stop = f"empty page claims more (cursor {current})"
            elif repeated and not items and not skipped:
                stop = f"page repeats rows already seen (cursor {current})"
            elif nxt is None:
                stop = "page claims more but sent no cursor"
            elif str(nxt) in sent:
                stop = f"repeated cursor {nxt}"
        if skipped:
            log.warning("%s: %d items without an id skipped", spec.path, skipped)
        enough = max_items is not None and rows >= max_items
        last = stop is not None or capped or not has_more or enough
        if stop is not None:
            log.warning("%s (%s): walk ended: %s", spec.path, source, stop)
        elif capped:
            log.info("%s (%s): walk ended at the page cap of %d", spec.path, source, max_pages)
        yield Page(items, current, nxt, has_more, stop, capped, last, skipped)
        if last or nxt is None:
            return
        current = nxt


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
