"""The parsers: the API's JSON -> records (`crawler.api.records`), field by field.

The API's quirks (api-reference.md) are absorbed here and nowhere else: cursors passed back verbatim
(string or int), `hasMore` as bool or 0/1, `stats` top-level / in `user.stats` / flattened into `user` / in a
`userInfo` wrapper (the exact `statsV2` preferred to the display-rounded `stats`), `video_id` vs `id` vs opaque
`aweme_id`, `title: null`, `followings` as the following list's key, numbers sent as strings, `search-user` items
as `{user, stats}` or `{user_info}`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from crawler.api.records import Challenge, Comment, Follow, JsonDict, Music, Post, Profile, Region, UserHit
from crawler.errors import TransientError

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


def as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes")
    return bool(v)


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def as_dict(v: Any) -> JsonDict:
    return v if isinstance(v, dict) else {}


def _first(*candidates: Any) -> Any:
    for c in candidates:
        if c is not None and c != "":
            return c
    return None


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


_POST_KEYS = ("create_time", "title", "play", "cover", "author", "duration", "play_count", "digg_count")


def parse_post_detail(body: Mapping[str, Any], video_id: str, source: str) -> Post:
    """A `/post-detail/` object -> Post; one without an id (seen in real bodies) is the post asked for, when it
    carries a post's fields at all."""
    try:
        _video_id(body)
    except ValueError:
        if not any(k in body for k in _POST_KEYS):
            raise ValueError(f"answer without a post (keys: {', '.join(sorted(body)[:8])})") from None
        body = {**body, "id": video_id}
    return parse_post(body, source)


# --- parsers (raw JSON -> record) ---

_STAT_KEYS = ("followerCount", "followingCount", "heartCount", "videoCount", "diggCount")
_STAT_ALIASES = {"heartCount": ("heartCount", "heart")}  # `heart` repeats heartCount (either may come alone)


def _stats(body: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, int | None]:
    """Profile counts, per count: the exact `statsV2` (strings; top level, in `user`, in `userInfo`) first, then
    the display-rounded `stats` (top level, `user.stats`, `userInfo.stats`, or `user` itself): all are seen."""
    wrapped = as_dict(body.get("userInfo"))
    places = (as_dict(body.get("statsV2")), as_dict(user.get("statsV2")), as_dict(wrapped.get("statsV2")),
              as_dict(body.get("stats")), as_dict(user.get("stats")), as_dict(wrapped.get("stats")), user)
    return {key: next((n for p in places for k in _STAT_ALIASES.get(key, (key,)) if (n := _int(p.get(k))) is not None),
                      None) for key in _STAT_KEYS}


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
        "verified": as_bool(user.get("verified")),
        "followers": stats["followerCount"],
        "following": stats["followingCount"],
        "videos": stats["videoCount"],
        "hearts": stats["heartCount"],
    }


def parse_profile(body: Mapping[str, Any]) -> Profile:
    """`/userinfo-by-username/` or `/userinfo-by-id/` -> Profile."""
    user = as_dict(_first(body.get("user"), as_dict(body.get("userInfo")).get("user")))
    if not user:
        raise TransientError("user info without a user object")
    stats = _stats(body, user)
    private = as_bool(user.get("privateAccount")) or as_bool(user.get("secret"))
    return Profile(
        **_profile_fields(user, stats),
        private=private,
        likes=stats["diggCount"],
        signature=_str(user.get("signature")),
    )


def parse_post(item: Mapping[str, Any], source: str) -> Post:
    """A video list item or a `/post-detail/` object -> Post."""
    author = as_dict(item.get("author"))
    music = as_dict(item.get("music_info"))
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
        pinned=as_bool(item.get("is_top")),
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


def comment_parser(parent_param: str | None) -> Callable[[Mapping[str, Any], str, Mapping[str, Any]], Comment]:
    def parse(item: Mapping[str, Any], source: str, params: Mapping[str, Any]) -> Comment:
        comment_id = _str(_first(item.get("id"), item.get("cid"), item.get("comment_id")))
        if not comment_id:
            raise ValueError("comment without an id")
        user = as_dict(item.get("user"))
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
    user = as_dict(_first(item.get("user_info"), item.get("user"))) or as_dict(item)
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
        original=as_bool(body.get("original")),
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
