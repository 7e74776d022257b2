"""The API's records: typed rows with their CSV columns, and the page a list walk yields.

The parsers that build them from the API's JSON are in `crawler.api.parse`; the lists and their paginator in
`crawler.api.lists`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Generic, TypeVar

JsonDict = dict[str, Any]
Cursor = str | int


def video_url(video_id: str) -> str:
    """The URL form `/post-detail/` and `/post-comments/` take; only the numeric id matters."""
    return f"https://www.tiktok.com/@placeholder/video/{video_id}"


# --- records ---

class Record:
    """Mixin: a row's CSV columns are its dataclass fields, in order."""

    COLUMNS: ClassVar[tuple[str, ...]] = ()

    def values(self) -> tuple[Any, ...]:
        """The row's values in COLUMNS order."""
        values: tuple[Any, ...] = _GETTERS[type(self)](self)
        return values


R = TypeVar("R", bound=Record)
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


# Lists paginated by an integer offset: rows move to later offsets when the list grows at its head.
OFFSET_KINDS = frozenset({"comments", "replies", "search_videos", "search_users", "search_challenges",
                          "music_posts", "challenge_posts"})


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
