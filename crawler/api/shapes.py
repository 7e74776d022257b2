"""What each endpoint family's answer is expected to carry, and the check of one answer against it (`crawler doctor`).

Three tiers of fields, as dotted paths (``user.id``; a list's items as ``videos[].author.unique_id``):

* required: without it no record can be built (a post's id, a profile's ``user.id``/``uniqueId``);
* expected: the parsers read it into a column and every known body carries it (counts, times, handles);
* optional: every other field api-reference.md §3 and §5.1 know (read when present, or sometimes absent:
  ``hdplay``, ``images``, ``is_top``, ``statsV2``, ad noise ...).

A required or expected field that is absent is a shape change ("fields missing"); an optional one absent is only
listed. A field present but in no tier is "new" (nothing is lost: reported, not a failure). Whether an answer can
be read at all is not guessed here: the family's real parser runs on the body ("unreadable" when it cannot).
Placement variants the parsers accept (``stats`` / ``user.stats`` / flat in ``user`` / ``userInfo``; ``statsV2``;
``video_id`` / ``id`` / ``aweme_id``) are alternatives of one field, never reported as missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from crawler.api.lists import LISTS, ListSpec, _page_items
from crawler.api.parse import as_dict, parse_challenge, parse_music, parse_post, parse_profile
from crawler.api.records import JsonDict
from crawler.errors import CrawlerError

Alternatives = tuple[str, ...]  # one field: the paths it may sit at, any one of which will do


def _at(places: Iterable[str], *names: str) -> Alternatives:
    """One field that may sit in any of ``places`` ("" is the object itself) under any of ``names``."""
    return tuple(f"{p}.{n}" if p else n for p in places for n in names)


def _each(places: Iterable[str], names: Iterable[str]) -> tuple[Alternatives, ...]:
    """Several fields, each of which may sit in any of ``places``."""
    return tuple(_at(places, n) for n in names)


def _plain(*names: str) -> tuple[Alternatives, ...]:
    """Fields with one path each."""
    return tuple((n,) for n in names)


@dataclass(frozen=True, slots=True)
class Shape:
    """The fields of one JSON object (an answer's body, or one item of its list), by tier (module docstring). An
    optional path ending in ``.*`` is an object whose insides are not checked (ad noise, a bio link)."""

    required: tuple[Alternatives, ...] = ()
    expected: tuple[Alternatives, ...] = ()
    optional: tuple[Alternatives, ...] = ()

    def every_path(self) -> frozenset[str]:
        """Every path any tier names."""
        return frozenset(p for f in (*self.required, *self.expected, *self.optional) for p in f)


@dataclass(frozen=True, slots=True)
class Family:
    """One endpoint family the doctor checks: its path, its body's shape, its list's items' shape (for a list), and
    its real parser (``read``: the number of records it built from a body; raises when it cannot)."""

    name: str
    path: str
    body: Shape
    read: Callable[[JsonDict, Mapping[str, str | int]], int]
    items_keys: tuple[str, ...] = ()
    item: Shape | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    """What the check of one answer found."""

    missing: tuple[str, ...] = ()  # required or expected fields absent: the shape changed
    missing_required: tuple[str, ...] = ()  # those of ``missing`` without which no record is built
    absent_optional: tuple[str, ...] = ()
    new: tuple[str, ...] = ()  # present, known to no tier
    unreadable: str | None = None  # the real parser's complaint
    records: int = 0  # records the parser built
    items: int | None = None  # list items in the answer (None: not a list)
    notes: tuple[str, ...] = ()


# ----- the field tiers, from api-reference.md §3 and §5.1 and what crawler.api.parse reads ----------------

_USER_PLACES = ("user", "userInfo.user")  # parse_profile: `user`, else `userInfo.user`
# parse._stats: `stats`, `user.stats`, flat in `user`; exact `statsV2` and the `userInfo` wrapper (§5.1)
_STATS_PLACES = ("stats", "statsV2", "user.stats", "user.statsV2", "user", "userInfo.stats", "userInfo.statsV2",
                 "userInfo.user", "userInfo.user.stats")
_USER_KNOWN = ("nickname", "avatarThumb", "avatarMedium", "avatarLarger", "signature", "verified", "secUid",
               "secret", "ftc", "relation", "openFavorite", "bioLink.*", "commentSetting", "duetSetting",
               "stitchSetting", "privateAccount", "isADVirtual", "isUnderAge18", "ins_id", "twitter_id",
               "youtube_channel_title", "youtube_channel_id", "roomId", "ttSeller")
_STATS_KNOWN = ("followerCount", "followingCount", "heartCount", "heart", "videoCount", "diggCount", "friendCount")

PROFILE = Shape(
    required=(_at(_USER_PLACES, "id", "uid"), _at(_USER_PLACES, "uniqueId", "unique_id")),
    expected=(_at(_USER_PLACES, "nickname"), _at(_USER_PLACES, "secUid", "sec_uid"),
              _at(_USER_PLACES, "privateAccount", "secret"), _at(_STATS_PLACES, "followerCount"),
              _at(_STATS_PLACES, "followingCount"), _at(_STATS_PLACES, "heartCount", "heart"),
              _at(_STATS_PLACES, "videoCount"), _at(_STATS_PLACES, "diggCount")),
    optional=_each(_USER_PLACES, _USER_KNOWN) + _each(_STATS_PLACES, _STATS_KNOWN),
)

_AUTHOR = ("author.id", "author.unique_id", "author.nickname", "author.avatar")
_MUSIC_INFO = ("music_info.id", "music_info.title", "music_info.play", "music_info.cover", "music_info.author",
               "music_info.original", "music_info.duration", "music_info.album")
_POST_OPTIONAL = (
    "aweme_id", "content_desc", "ai_dynamic_cover", "origin_cover", "wmplay", "hdplay", "size",
    "wm_size", "hd_size", "music", "download_count", "collect_count", "anchors.*", "anchors_extras", "is_ad",
    "commerce_info.*", "commercial_video_info", "item_comment_settings", "mentioned_users", "is_top", "images",
    "is_nff_or_nr", *_AUTHOR, *_MUSIC_INFO,
)
_POST_EXPECTED = tuple((f,) for f in ("create_time", "region", "title", "play_count", "digg_count", "comment_count",
                                      "share_count", "duration", "cover", "play", "author.id", "author.unique_id",
                                      "music_info.id"))
# parse._video_id: `video_id`, else `id`, else an all-digit `aweme_id` (list items); `/post-detail/` sends `id`.
POST_ITEM = Shape(required=(("video_id", "id", "aweme_id"),), expected=_POST_EXPECTED,
                  optional=_plain(*_POST_OPTIONAL))
POST_DETAIL = Shape(required=(("id", "video_id", "aweme_id"),), expected=_POST_EXPECTED,
                    optional=_plain(*_POST_OPTIONAL))

_FOLLOW_KNOWN = ("region", "signature", "avatar", "favoriting_count", "total_favorited", "youtube_channel_title",
                 "youtube_channel_id", "twitter_name", "twitter_id")
FOLLOW_ITEM = Shape(
    required=(("id", "uid", "user_id"),),
    expected=(("unique_id", "uniqueId"), ("nickname",), ("sec_uid", "secUid"), ("follower_count", "followerCount"),
              ("aweme_count", "videoCount")),
    optional=_plain(*_FOLLOW_KNOWN),
)
COMMENT_ITEM = Shape(
    required=(("id", "cid", "comment_id"),),
    expected=(("text",), ("create_time",), ("digg_count",), ("reply_total",), ("user.id",),
              ("user.unique_id", "user.uniqueId")),
    optional=_plain("status", "video_id", "user.nickname", "user.sec_uid",
                    *(f"user.{k}" for k in (*_FOLLOW_KNOWN, "aweme_count", "follower_count"))),
)


REPLY_ITEM = Shape(required=COMMENT_ITEM.required,
                   expected=tuple(f for f in COMMENT_ITEM.expected if f != ("reply_total",)),
                   optional=(*COMMENT_ITEM.optional, ("reply_total",)))  # §3.7: a comment without reply_total

# parse_user_hit: the user in `user_info`, `user` or the item itself; its counts beside it or inside it
_HIT_USER = ("user_info", "user", "")
_HIT_STATS = ("stats", "statsV2", "user_info.stats", "user.stats", "user_info", "user", "")
SEARCH_USER_ITEM = Shape(
    required=(_at(_HIT_USER, "id", "uid"),),
    expected=(_at(_HIT_USER, "uniqueId", "unique_id"), _at(_HIT_USER, "nickname"), _at(_HIT_USER, "secUid", "sec_uid"),
              _at(_HIT_STATS, "followerCount"), _at(_HIT_STATS, "videoCount"), _at(_HIT_STATS, "heartCount", "heart")),
    optional=_each(_HIT_USER, _USER_KNOWN) + _each(_HIT_STATS, _STATS_KNOWN),
)
CHALLENGE = Shape(  # §3.8
    required=(("id", "cid", "challenge_id"),),
    expected=(("cha_name", "title", "name"), ("user_count",), ("view_count",)),
    optional=(("desc", "description"), *_plain("is_pgcshow", "is_commerce", "is_challenge", "is_strong_music",
                                                "type", "cover")),
)
MUSIC = Shape(  # §2.3
    required=(("id", "music_id"),),
    expected=_plain("title", "author", "duration"),
    optional=_plain("play", "cover", "original", "album", "video_count"),
)


def _list_body(spec: ListSpec[Any], *, optional: Iterable[str] = ("total",)) -> Shape:
    """A list answer: its items key, the cursor it hands back and hasMore (§4)."""
    return Shape(expected=(spec.items_keys, (spec.cursor_param,), ("hasMore", "has_more")),
                 optional=_plain(*optional))


def _read_list(kind: str) -> Callable[[JsonDict, Mapping[str, str | int]], int]:
    """The walk's own reading of one page (`lists._page_items`, then the list's item parser on every item)."""
    spec = LISTS[kind]

    def read(body: JsonDict, params: Mapping[str, str | int]) -> int:
        _, raw_items = _page_items(spec, body)
        source = str(params.get(spec.source_param, ""))
        failed: list[str] = []
        for raw in raw_items:
            try:
                spec.parse(as_dict(raw), source, params)
            except (ValueError, TypeError) as exc:
                failed.append(str(exc))
        if failed:
            raise ValueError(f"{len(failed)} of {len(raw_items)} items unreadable ({failed[0]})")
        return len(raw_items)

    return read


def _family(name: str, kind: str, item: Shape, *, optional: Iterable[str] = ("total",)) -> Family:
    spec = LISTS[kind]
    return Family(name, spec.path, _list_body(spec, optional=optional), _read_list(kind), spec.items_keys, item)


def _read_profile(body: JsonDict, params: Mapping[str, str | int]) -> int:
    parse_profile(body)
    return 1


def _read_post(body: JsonDict, params: Mapping[str, str | int]) -> int:
    parse_post(body, str(params.get("url", "")))
    return 1


def _read_music(body: JsonDict, params: Mapping[str, str | int]) -> int:
    parse_music(body)
    return 1


def _read_challenge(body: JsonDict, params: Mapping[str, str | int]) -> int:
    parse_challenge(body, str(params.get("id", "")))
    return 1


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("profile", "/userinfo-by-username/", PROFILE, _read_profile),
    _family("posts", "posts", POST_ITEM, optional=()),
    _family("followers", "followers", FOLLOW_ITEM),
    Family("post-detail", "/post-detail/", POST_DETAIL, _read_post),
    _family("comments", "comments", COMMENT_ITEM),
    _family("following", "following", FOLLOW_ITEM),
    _family("liked", "liked", POST_ITEM, optional=()),
    _family("replies", "replies", REPLY_ITEM),
    _family("search-videos", "search_videos", POST_ITEM, optional=()),
    _family("search-users", "search_users", SEARCH_USER_ITEM, optional=()),
    _family("search-challenges", "search_challenges", CHALLENGE, optional=()),
    Family("music-info", "/music-info/", MUSIC, _read_music),
    _family("music-posts", "music_posts", POST_ITEM, optional=()),
    Family("challenge-info", "/challenge-info-id/", CHALLENGE, _read_challenge),
    _family("challenge-posts", "challenge_posts", POST_ITEM, optional=()),
)}
"""Every family `crawler doctor` can check, one call each, in the order it makes them."""
CORE = ("profile", "posts", "followers", "post-detail", "comments")
"""The families checked by default: the ones every job command's rows come from (the stated handful)."""


# ----- the check -----------------------------------------------------------------------------------------


def paths(value: Any, prefix: str = "", *, filled: bool = False) -> set[str]:
    """Every field path in a JSON object (``user.id``; a nested list of objects as ``key[].field``, its items
    merged). ``filled``: only fields whose value is neither null nor ""."""
    found: set[str] = set()
    if not isinstance(value, dict):
        return found
    for key, inner in value.items():
        path = f"{prefix}{key}"
        if not filled or inner not in (None, ""):
            found.add(path)
        if isinstance(inner, dict):
            found |= paths(inner, path + ".", filled=filled)
        elif isinstance(inner, list):
            for item in inner:
                found |= paths(item, path + "[].", filled=filled)
    return found


def _is_known(path: str, known: frozenset[str]) -> bool:
    """A path is known when a tier names it, it holds a known path (a container), or sits in an opaque object."""
    if path in known or any(k.startswith((path + ".", path + "[].")) for k in known):
        return True
    return any(k.endswith(".*") and (path == k[:-2] or path.startswith((k[:-2] + ".", k[:-2] + "[]")))
               for k in known)


def _compare(obj: Mapping[str, Any], shape: Shape) -> tuple[list[str], list[str], list[str], set[str]]:
    """(required missing, expected missing, optional absent, new) of one object against its shape."""
    present, filled = paths(obj), paths(obj, filled=True)
    if not str(obj.get("aweme_id", "")).isdigit():
        filled.discard("aweme_id")  # an opaque media id, not a post id (parse._video_id)
    required = [f[0] for f in shape.required if not filled.intersection(f)]
    expected = [f[0] for f in shape.expected if not present.intersection(f)]
    tiered = {p for f in (*shape.required, *shape.expected) for p in f}
    optional = [f[0].removesuffix(".*") for f in shape.optional
                if not tiered.intersection(f) and not present.intersection(p.removesuffix(".*") for p in f)]
    every = shape.every_path()
    new = {p for p in present if not _is_known(p, every)}
    # only the outermost unknown path: a new object's insides are new with it
    new = {p for p in new if not any(p.startswith((q + ".", q + "[].")) for q in new)}
    return required, expected, optional, new


def check(family: Family, body: JsonDict, params: Mapping[str, str | int]) -> Finding:
    """One answer of ``family`` against what the parsers expect (see the module docstring)."""
    req, exp, opt, new = _compare(body, family.body)
    # the list's own key: items are checked one by one below, never as new fields of the body
    new = {p for p in new if not any(p == k or p.startswith(k + "[]") for k in family.items_keys)}
    notes: list[str] = []
    items: list[Any] | None = None
    if family.item is not None:
        items = next((body[k] for k in family.items_keys if isinstance(body.get(k), list)), [])
        if not items:
            notes.append("the list was empty: its items could not be checked")
        key = family.items_keys[0]
        seen_opt: set[str] = set()
        item_opt: set[str] = set()
        for raw in items:
            r, e, o, n = _compare(as_dict(raw), family.item)
            req += [f"{key}[].{p}" for p in r if f"{key}[].{p}" not in req]
            exp += [f"{key}[].{p}" for p in e if f"{key}[].{p}" not in exp]
            item_opt |= set(o)
            seen_opt |= paths(as_dict(raw))
            new |= {f"{key}[].{p}" for p in n}
        opt += sorted(f"{key}[].{p}" for p in item_opt - seen_opt)  # absent from every item
    unreadable: str | None = None
    records = 0
    try:
        records = family.read(body, params)
    except (CrawlerError, ValueError, TypeError, KeyError, AttributeError) as exc:
        unreadable = str(exc) or type(exc).__name__
    return Finding(missing=tuple(req + exp), missing_required=tuple(req), absent_optional=tuple(opt),
                   new=tuple(sorted(new)), unreadable=unreadable, records=records,
                   items=None if items is None else len(items), notes=tuple(notes))
