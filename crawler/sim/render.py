"""JSON shapes of the simulator's answers (api-reference §3), and the per-response quirks.

The server picks what to answer; this module only says how it looks on the wire. Tags in comments
follow the reference: [T] tikwm shape assumed to carry over, [C] read by TikLiveAPI clients, [G] guess.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

from crawler.sim import media as m
from crawler.sim.data import Challenge, Comment, Music, Post, User, World
from crawler.sim.seeded import hash64, unit

JsonDict = dict[str, Any]
StatsPlace = Literal["top", "nested", "flat"]
IdVariant = Literal["video_id", "id", "aweme_id"]

_CDN = "https://sim.invalid"  # .invalid never resolves: nobody downloads simulator media by accident
_B32 = "abcdefghijklmnopqrstuvwxyz234567"
# Keys whose integer values quirk mode may send as strings; times, durations, cursors and totals stay ints.
_COUNT_KEYS = frozenset({
    "play_count", "digg_count", "comment_count", "share_count", "download_count", "collect_count",
    "followerCount", "followingCount", "heartCount", "heart", "videoCount", "diggCount", "friendCount",
    "follower_count", "aweme_count", "favoriting_count", "total_favorited", "user_count", "view_count",
    "video_count", "reply_total",
})


@dataclass(frozen=True, slots=True)
class Quirks:
    """How one response bends its shape, all within what the reference documents."""

    salt: int = 0
    stats_place: StatsPlace = "top"          # §3.4 placement conflict
    has_more_int: bool = False               # §4: search responses have shown hasMore: 1
    counts_as_str: bool = False              # [G] defensive: numbers as strings
    duration_as_str: bool = False            # §3.3 music_info.duration "sometimes string"
    cursor_flipped: bool = False             # §4: ms cursors as int, offset cursors as numeric strings
    total_absent: bool = False               # §2.1 `total`? is optional
    search_user_shape: Literal["user_stats", "user_info"] = "user_stats"  # §3.9 disputed
    vary_item_ids: bool = False              # §3.1 video_id / id / numeric aweme_id
    exact_counts: bool = True                # §5.1 exact `statsV2` (strings) beside the rounded `stats`

    def id_variant(self, position: int) -> IdVariant:
        """Which id fields the list item at `position` carries."""
        if not self.vary_item_ids:
            return "video_id"
        return ("video_id", "id", "aweme_id")[hash64(self.salt, position) % 3]


CANONICAL = Quirks()


def draw_quirks(h: int) -> Quirks:
    """Choose one response's quirks from its seeded hash."""
    bits = [hash64(h, i) for i in range(8)]
    return Quirks(
        salt=h, stats_place=("top", "nested", "flat")[bits[0] % 3], has_more_int=bits[1] % 2 == 1,
        counts_as_str=bits[2] % 3 == 0, duration_as_str=bits[3] % 2 == 1, cursor_flipped=bits[4] % 2 == 1,
        total_absent=bits[5] % 3 == 0, search_user_shape=("user_stats", "user_info")[bits[6] % 2],
        vary_item_ids=True,
    )


def finish(payload: JsonDict, q: Quirks) -> JsonDict:
    """Apply the response-wide quirks: hasMore as 0/1, absent total, counts as strings."""
    if "hasMore" in payload and q.has_more_int:
        payload["hasMore"] = int(bool(payload["hasMore"]))
    if q.total_absent:
        payload.pop("total", None)
    return _stringify_counts(payload) if q.counts_as_str else payload


def _stringify_counts(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: str(v) if k in _COUNT_KEYS and type(v) is int else _stringify_counts(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_stringify_counts(v) for v in value]
    return value


def ms_cursor(value: int, q: Quirks) -> int | str:
    """A /user-posts/ or /user-liked/ cursor: canonically a string of ms epoch [T]."""
    return value if q.cursor_flipped else str(value)


def offset_cursor(value: int, q: Quirks) -> int | str:
    """An offset or small cursor: canonically an int [T]."""
    return str(value) if q.cursor_flipped else value


def opaque_media_id(video_id: str) -> str:
    """A tikwm-style opaque aweme_id like "v15044gf0000d724vbfog65ugaj79100", never all digits [T]."""
    h = hash64(int(video_id), 0xA3E)
    tail = "".join(_B32[hash64(h, i) % 32] for i in range(20))
    return f"v{10000 + h % 90000}gf0000{tail}"


def _avatar(user_id: str, size: str = "100x100") -> str:
    return f"{_CDN}/avatar/{size}/{user_id}.jpeg"


def author(user: User) -> JsonDict:
    """The `author` object inside video items [T]."""
    return {"id": user.user_id, "unique_id": user.handle, "nickname": user.nickname,
            "avatar": _avatar(user.user_id)}


def music_info(music: Music | None, music_id: str, q: Quirks) -> JsonDict:
    """The `music_info` object inside video items [T]; duration sometimes a string (§3.3)."""
    title = music.title if music else "original sound"
    duration = music.duration if music else 15
    return {
        "id": music_id, "title": title, "play": f"{_CDN}/music/{hash64(int(music_id)) % 10**12}.mp3",
        "cover": f"{_CDN}/music/{music_id}.jpeg", "author": music.author if music else "",
        "original": music.original if music else True,
        "duration": str(duration) if q.duration_as_str else duration, "album": "",
    }


def _media_url(seed: int, host: m.MediaHost | None, kind: str, ident: str, n: int | None = None) -> str:
    """A signed URL on the simulator's media host, or an inert one when no host serves media."""
    if host is not None:
        return host.url(kind, ident, n)
    return f"{_CDN}/{kind}/{ident}" + ("" if n is None else f"/{n}") + m.url_suffix(seed, kind, ident)


def _media(world: World, post: Post, host: m.MediaHost | None) -> JsonDict:
    """The media fields of a post (§5.1). A photo post has `images`, `duration` 0, `size`/`wm_size` 0, `play` and
    `wmplay` at its sound's mp3 and its first image as `cover`; with `wm_same` (2026) `wmplay == play`."""
    vid, seed = post.video_id, world.config.seed
    sound = _media_url(seed, host, "music", post.music_id)
    photos = m.photo_count(seed, vid)
    if photos:
        images = [_media_url(seed, host, "image", vid, k) for k in range(photos)]
        return {"cover": images[0], "duration": 0, "play": sound, "wmplay": sound, "size": 0, "wm_size": 0,
                "music": sound, "images": images}
    play = _media_url(seed, host, "play", vid)
    same = host is not None and host.config.wm_same
    return {"cover": _media_url(seed, host, "cover", vid), "duration": post.duration, "play": play,
            "wmplay": play if same else _media_url(seed, host, "wmplay", vid), "size": m.size(seed, "play", vid),
            "wm_size": 0 if same else m.size(seed, "wmplay", vid), "music": sound}


def _video_body(world: World, post: Post, q: Quirks, host: m.MediaHost | None = None) -> JsonDict:
    user = world.user(post.author_index)
    assert user is not None  # posts only exist for existing users
    vid = post.video_id
    media = _media(world, post, host)
    body: JsonDict = {
        "region": post.region, "title": post.title, "content_desc": [],
        "cover": media["cover"], "ai_dynamic_cover": f"{_CDN}/dyn/{vid}.webp",
        "origin_cover": f"{_CDN}/origin/{vid}.jpeg", "duration": media["duration"],
        "play": media["play"], "wmplay": media["wmplay"],
        "size": media["size"], "wm_size": media["wm_size"], "music": media["music"],
        "music_info": music_info(world.music(post.music_id), post.music_id, q),
        "play_count": post.play_count, "digg_count": post.digg_count, "comment_count": post.comment_count,
        "share_count": post.share_count, "download_count": post.share_count // 3,
        "collect_count": post.collect_count, "create_time": post.create_time,
        "anchors": None, "anchors_extras": "", "is_ad": False, "commerce_info": {
            "adv_promotable": False, "auction_ad_invited": False, "branded_content_type": 0,
            "with_comment_filter_words": False},
        "commercial_video_info": "", "item_comment_settings": 0, "mentioned_users": "",
        "author": author(user), "is_top": 0,
    }
    if "images" in media:  # photo/slideshow posts carry `images` (§3.1, §5.1)
        body["images"] = media["images"]
    return body


def video_item(world: World, post: Post, q: Quirks, position: int, host: m.MediaHost | None = None) -> JsonDict:
    """One item of a video list (§3.1): canonically `video_id` plus an opaque `aweme_id`."""
    variant = q.id_variant(position)
    ids: JsonDict
    if variant == "video_id":
        ids = {"aweme_id": opaque_media_id(post.video_id), "video_id": post.video_id}
    elif variant == "id":
        ids = {"aweme_id": opaque_media_id(post.video_id), "id": post.video_id}
    else:
        ids = {"aweme_id": post.video_id}
    return ids | _video_body(world, post, q, host)


def post_detail(world: World, post: Post, q: Quirks, host: m.MediaHost | None = None) -> JsonDict:
    """The flat `/post-detail/` object (§3.2): `id` is the post id, `aweme_id` opaque [C]/[G]; adds `hdplay`."""
    body = _video_body(world, post, q, host)
    photo = "images" in body  # a photo post's hdplay is its sound too
    body["hdplay"] = body["play"] if photo else _media_url(world.config.seed, host, "hdplay", post.video_id)
    body["hd_size"] = 0 if photo else m.size(world.config.seed, "hdplay", post.video_id)
    return {"id": post.video_id, "aweme_id": opaque_media_id(post.video_id)} | body


def user_object(user: User) -> JsonDict:
    """The camelCase `user` object of the user-info endpoints (§3.4) [T]."""
    return {
        "id": user.user_id, "uniqueId": user.handle, "nickname": user.nickname,
        "avatarThumb": _avatar(user.user_id), "avatarMedium": _avatar(user.user_id, "720x720"),
        "avatarLarger": _avatar(user.user_id, "1080x1080"), "signature": user.signature,
        "verified": user.verified, "secUid": user.sec_uid, "secret": user.private, "ftc": False,
        "relation": 0, "openFavorite": False, "bioLink": {"link": "", "risk": 0}, "commentSetting": 0,
        "duetSetting": 0, "stitchSetting": 0, "privateAccount": user.private, "isADVirtual": False,
        "isUnderAge18": False, "ins_id": "", "twitter_id": "", "youtube_channel_title": "",
        "youtube_channel_id": "", "roomId": "", "ttSeller": False,
    }


def stats_object(user: User) -> JsonDict:
    """The camelCase `stats` object (§3.4) [T], exact; `heart` repeats heartCount."""
    return {"followerCount": user.followers, "followingCount": user.following, "heartCount": user.hearts,
            "heart": user.hearts, "videoCount": user.videos, "diggCount": user.digg_count, "friendCount": 0}


def display_count(n: int) -> int:
    """A count as the API's `stats` show it (§5.1: 207900, 1400000; 427700 for 427682): exact below 10,000, to
    the hundred (a tenth of a K) below a million, to the hundred thousand (a tenth of an M) above."""
    if n < 10_000:
        return n
    unit_ = 100 if n < 1_000_000 else 100_000
    return (n + unit_ // 2) // unit_ * unit_


def user_info(user: User, q: Quirks, *, wrapped: bool = False) -> JsonDict:
    """The user-info answer (§3.4, §5.1): display-rounded `stats` top level [T], or in `user.stats` [C] S5, or flat
    in `user` [C] S10; the exact counts as strings in `statsV2` beside them (top level, or in `user`), unless
    the quirk sends rounded counts only; `wrapped`: the web shape `userInfo: {user, stats, statsV2}`."""
    u, exact = user_object(user), stats_object(user)
    s = {k: display_count(v) for k, v in exact.items()}
    v2 = {k: str(v) for k, v in exact.items()} if q.exact_counts else None
    if wrapped:
        return {"userInfo": {"user": u, "stats": s} | ({"statsV2": v2} if v2 else {})}
    extra = {"statsV2": v2} if v2 else {}
    if q.stats_place == "nested":
        return {"user": u | {"stats": s} | extra}
    if q.stats_place == "flat":
        return {"user": u | s | extra}
    return {"user": u, "stats": s} | extra


def search_user_item(user: User, q: Quirks) -> JsonDict:
    """One `/search-user/` item: `{user, stats}` [T] or `{user_info: flat}` [C] S9 (§3.9)."""
    if q.search_user_shape == "user_info":
        return {"user_info": user_object(user) | stats_object(user)}
    return {"user": user_object(user), "stats": stats_object(user)}


def follower_item(user: User) -> JsonDict:
    """A follower/following item (§3.5), also a comment's `user` [T]."""
    return {
        "id": user.user_id, "region": user.region, "sec_uid": user.sec_uid, "unique_id": user.handle,
        "nickname": user.nickname, "signature": user.signature, "avatar": _avatar(user.user_id),
        "aweme_count": user.videos, "follower_count": user.followers, "favoriting_count": user.digg_count,
        "total_favorited": user.hearts, "youtube_channel_title": "", "youtube_channel_id": "",
        "twitter_name": "", "twitter_id": "",
    }


def comment_item(world: World, comment: Comment) -> JsonDict:
    """A comment (§3.6), or a reply without `reply_total` (§3.7) [T]."""
    user = world.user(comment.user_index)
    assert user is not None  # commenters are drawn from existing users
    item: JsonDict = {"id": comment.comment_id, "text": comment.text, "create_time": comment.create_time,
                      "digg_count": comment.digg_count, "status": 1, "user": follower_item(user)}
    if comment.parent_comment_id is None:
        item["reply_total"] = comment.reply_total
    return item


def music_object(music: Music) -> JsonDict:
    """The flat `/music-info/` object (§2.3) [C2]/[T]."""
    return {"id": music.music_id, "title": music.title,
            "play": f"{_CDN}/music/{hash64(int(music.music_id)) % 10**12}.mp3",
            "cover": f"{_CDN}/music/{music.music_id}.jpeg", "author": music.author,
            "original": music.original, "duration": music.duration, "album": "",
            "video_count": music.video_count}


def challenge_object(ch: Challenge) -> JsonDict:
    """A flat challenge object (§3.8) [T]; the same shape in `challenge_list` [C] S9."""
    return {"id": ch.challenge_id, "cha_name": ch.name, "desc": ch.desc, "user_count": ch.user_count,
            "view_count": ch.view_count, "is_pgcshow": False, "is_commerce": False, "is_challenge": True,
            "is_strong_music": False, "type": 1, "cover": f"{_CDN}/challenge/{ch.challenge_id}.jpeg"}


def jitter(h: int, low: float, high: float) -> float:
    """A seeded value in [low, high]."""
    return low + (high - low) * unit(h)


LIVE_LATENCY = (0.4, 9.0)  # api-reference §5.1: 0.4-9 s per answer observed


def live_latency(h: int, low: float, high: float) -> float:
    """A seeded, log-normal latency (median 1.5 s, sigma 0.7: ~1% above 9 s) clipped to [low, high]."""
    z = NormalDist().inv_cdf(min(max(unit(h), 1e-9), 1 - 1e-9))
    return min(max(1.5 * math.exp(0.7 * z), low), high)


# The objects of an answer a field is dropped from or added to: the body, its profile wrappers, list items.
_WRAPPERS = ("user", "stats", "statsV2", "userInfo")


def reshape(payload: JsonDict, drop: Iterable[str], add: Iterable[str]) -> JsonDict:
    """The answer with ``drop`` fields removed (from the body, its `user`/`stats`/`statsV2`/`userInfo` objects and
    every item of its lists, and theirs) and ``add`` fields, unknown to any client, put in the body and its items."""
    out = copy.deepcopy(payload)
    for name in drop:
        _drop(out, name)
    for name in add:
        out[name] = "sim-added"
        for items in out.values():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict):
                    item[name] = "sim-added"
    return out


def _drop(obj: Any, name: str) -> None:
    if not isinstance(obj, dict):
        return
    obj.pop(name, None)
    for key in _WRAPPERS:
        _drop(obj.get(key), name)
    for value in obj.values():
        for item in value if isinstance(value, list) else []:
            _drop(item, name)
