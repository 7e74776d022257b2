"""The simulator's API endpoints: request parameters in, answer payload out (no HTTP here).

Paths, parameter names and defaults follow api-reference §2 (vendor PHP client [D]); page-size caps
and cursor kinds follow §4. Error texts marked [G] are guesses: the vendor documents none.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Mapping

from crawler.sim import render
from crawler.sim.data import Post, User, World
from crawler.sim.media import MediaHost
from crawler.sim.render import JsonDict, Quirks

MSG_NOT_FOUND_USER = "Not found user"  # [G] by analogy with the post message
MSG_NOT_FOUND_POST = "Not found post"  # [C] S6
MSG_NOT_FOUND_COMMENT = "Not found comment"  # [G]
MSG_NOT_FOUND_MUSIC = "Not found music"  # [G]
MSG_NOT_FOUND_CHALLENGE = "Not found challenge"  # [G]
MSG_PRIVATE = "This account is private"  # [G]
MSG_BAD_URL = "Url parsing is failed! Please check url."  # [T] tikwm's text (T4)
_VIDEO_URL = re.compile(r"/video/(\d+)")
POSTS_CAP, FOLLOWS_CAP, COMMENTS_CAP, SEARCH_CAP = 35, 200, 50, 30
# The most `count` each list gives (api-reference §2 and §4: tikwm's maxima; music and challenge lists 30).
PAGE_CAPS = {"posts": POSTS_CAP, "liked": POSTS_CAP, "followers": FOLLOWS_CAP, "following": FOLLOWS_CAP,
             "comments": COMMENTS_CAP, "replies": COMMENTS_CAP, "search_videos": SEARCH_CAP,
             "search_users": SEARCH_CAP, "search_challenges": SEARCH_CAP, "music_posts": SEARCH_CAP,
             "challenge_posts": SEARCH_CAP}


class ErrorAnswer(Exception):
    """An answer of the form {"status": "error", "message": ...} (HTTP 200, billed)."""


class _Call:
    """One request's parameters, with the lookups every endpoint shares."""

    __slots__ = ("media", "params", "q", "world")

    def __init__(self, world: World, params: Mapping[str, str], q: Quirks, media: MediaHost | None = None) -> None:
        self.world, self.params, self.q, self.media = world, params, q, media

    def need(self, name: str) -> str:
        value = self.params.get(name, "").strip()
        if not value:
            raise ErrorAnswer(f"Missing parameter: {name}")  # [G]
        return value

    def integer(self, name: str, default: int) -> int:
        raw = self.params.get(name, "").strip()
        if not raw:
            return default
        try:
            return int(raw)
        except ValueError:
            raise ErrorAnswer(f"Invalid parameter: {name}") from None  # [G]

    def count(self, default: int, kind: str) -> int:
        """The page size served: non-positive means the default; larger than the list's cap is clamped (or
        rejected, with the world's `reject_oversized`); 80-100% of it with the world's `partial_pages`."""
        cap = self.world.page_caps.get(kind, PAGE_CAPS[kind])
        n = self.integer("count", default)
        if n > cap and self.world.reject_oversized:
            raise ErrorAnswer(f"Invalid parameter: count (at most {cap})")  # [G]
        n = default if n <= 0 else min(n, cap)
        if self.world.partial_pages:
            draw = zlib.crc32(repr(sorted(self.params.items())).encode()) % 21  # 0..20, fixed per request
            n = max(1, n * (80 + draw) // 100)
        return n

    def offset(self) -> int:
        """Where in the list the page starts (the cursor less the world's `list_shift`)."""
        return max(0, self.integer("cursor", 0) - self.world.list_shift)

    def next_cursor(self, end: int) -> str | int:
        """The cursor after a page ending at list position `end`, in the shifted offsets the client sees."""
        return render.offset_cursor(end + self.world.list_shift, self.q)

    def user(self, index: int | None) -> User:
        user = None if index is None else self.world.user(index)
        if user is None:
            raise ErrorAnswer(MSG_NOT_FOUND_USER)
        return user

    def user_by_id(self, *, public: bool = False) -> User:
        user = self.user(self.world.index_by_id(self.need("userid")))
        if public and user.private:
            raise ErrorAnswer(MSG_PRIVATE)
        return user

    def post_from_url(self, name: str) -> Post:
        raw = self.need(name)
        m = _VIDEO_URL.search(raw)
        video_id = m.group(1) if m else raw if raw.isascii() and raw.isdigit() else None
        if video_id is None:
            raise ErrorAnswer(MSG_BAD_URL)
        post = self.world.post(video_id)
        # A private account's posts are not visible to the API: the reference's "deleted/private post".
        if post is None or self.world.is_private(post.author_index):
            raise ErrorAnswer(MSG_NOT_FOUND_POST)
        return post

    def videos(self, posts: list[Post]) -> list[JsonDict]:
        return [render.video_item(self.world, p, self.q, i, self.media) for i, p in enumerate(posts)]

    def video_page(self, posts: list[Post], kind: str) -> JsonDict:
        """An offset-paginated video list (music, challenge, search): small int cursor [T]."""
        start, count = self.offset(), self.count(10, kind)
        page = posts[start:start + count]
        return {"videos": self.videos(page), "cursor": self.next_cursor(start + len(page)),
                "hasMore": start + len(page) < len(posts)}


def _walk_end(pathology: str | None, sent: int, nxt: int, more: bool, got_items: bool,
              origin: int, step: int) -> tuple[int, bool]:
    """The (cursor, hasMore) of a page, bent for pathological users once the real list is exhausted."""
    if more or pathology is None:
        return nxt, more
    if pathology == "repeat":
        return sent, True
    # "endless": the last real page claims more; empty pages after it keep moving the cursor.
    return (nxt if got_items else (sent if sent > 0 else origin) - step), True


def _userid(c: _Call) -> JsonDict:
    user = c.user(c.world.index_by_handle(c.need("username").lstrip("@")))
    return {"id": user.user_id}


def _userinfo_by_username(c: _Call) -> JsonDict:
    user = c.user(c.world.index_by_handle(c.need("username").lstrip("@")))
    return render.user_info(user, c.q, wrapped=c.world.profile_wrapped(user.index))


def _userinfo_by_id(c: _Call) -> JsonDict:
    user = c.user_by_id()
    return render.user_info(user, c.q, wrapped=c.world.profile_wrapped(user.index))


def _user_posts(c: _Call) -> JsonDict:
    user = c.user_by_id(public=True)
    sent = c.integer("cursor", 0)
    page = c.world.posts_page(user.index, sent, c.count(10, "posts"))
    nxt, more = _walk_end(c.world.pathology(user.index), sent, page.next_ms, page.more, bool(page.posts),
                          c.world.now * 1000, 1000)
    items = c.videos(page.posts)
    flag = c.world.pin_flag(user.index)
    for k, item in enumerate(items):  # `is_top`: 1 on pinned posts for some users, 0 or absent for the others
        if flag is None:
            item.pop("is_top", None)
        else:
            item["is_top"] = flag if k < page.pinned else 0
    return {"videos": items, "cursor": render.ms_cursor(nxt, c.q), "hasMore": more}


def _user_liked(c: _Call) -> JsonDict:
    # The cursor is the ms epoch of the oldest *like* returned (the order of the list), not a create_time.
    user = c.user_by_id(public=True)
    sent = c.integer("cursor", 0)
    liked, more = c.world.liked_page(user.index, sent, c.count(2, "liked"))
    nxt = liked[-1][1] * 1000 if liked else sent
    return {"videos": c.videos([p for p, _ in liked]), "cursor": render.ms_cursor(nxt, c.q),
            "hasMore": more}


def _follow_list(c: _Call, key: str) -> JsonDict:
    user = c.user_by_id(public=True)
    sent = c.integer("time", 0)
    page = c.world.followers_page if key == "followers" else c.world.following_page
    follows, more = page(user.index, sent, c.count(50, "followers" if key == "followers" else "following"))
    nxt = follows[-1].follow_time if follows else sent
    if key == "followers":
        nxt, more = _walk_end(c.world.pathology(user.index), sent, nxt, more, bool(follows),
                              c.world.now, 1)
    items = [render.follower_item(c.user(f.user_index)) for f in follows]
    # `total` is the profile's count [T]; the list itself ends near follow_cap, as TikTok's does.
    return {key: items, "total": user.followers if key == "followers" else user.following,
            "time": render.offset_cursor(nxt, c.q), "hasMore": more}


def _search_user(c: _Call) -> JsonDict:
    found = c.world.search_users(c.need("keyword"))
    start, count = c.offset(), c.count(10, "search_users")
    page = found[start:start + count]
    return {"user_list": [render.search_user_item(c.user(i), c.q) for i in page],
            "cursor": c.next_cursor(start + len(page)), "hasMore": start + len(page) < len(found)}


def _post_detail(c: _Call) -> JsonDict:
    return render.post_detail(c.world, c.post_from_url("url"), c.q, c.media)


def _post_comments(c: _Call) -> JsonDict:
    post = c.post_from_url("url")
    start = c.offset()
    comments, more = c.world.comments_page(post.video_id, start, c.count(10, "comments"))
    return {"comments": [render.comment_item(c.world, x) for x in comments], "total": post.comment_count,
            "cursor": c.next_cursor(start + len(comments)), "hasMore": more}


def _post_comment_replies(c: _Call) -> JsonDict:
    video_id, comment_id = c.need("video_id"), c.need("comment_id")
    post = c.world.post(video_id)
    if post is None or c.world.is_private(post.author_index):
        raise ErrorAnswer(MSG_NOT_FOUND_POST)
    start = c.offset()
    page = c.world.replies_page(video_id, comment_id, start, c.count(10, "replies"))
    top = c.world.comment(comment_id)
    if page is None or top is None:
        raise ErrorAnswer(MSG_NOT_FOUND_COMMENT)
    replies, more = page
    return {"comments": [render.comment_item(c.world, x) for x in replies], "total": top.reply_total,
            "cursor": c.next_cursor(start + len(replies)), "hasMore": more}


def _search_video(c: _Call) -> JsonDict:
    days = c.integer("publish_time", 0)
    posts = c.world.search_videos(c.need("keyword"), days, c.integer("sort_by", 0),
                                  c.params.get("region", "").strip() or None)
    return c.video_page(posts, "search_videos")


def _music_info(c: _Call) -> JsonDict:
    music = c.world.music(c.need("music_id"))
    if music is None:
        raise ErrorAnswer(MSG_NOT_FOUND_MUSIC)
    return render.music_object(music)


def _music_posts(c: _Call) -> JsonDict:
    music_id = c.need("music_id")
    if c.world.music(music_id) is None:
        raise ErrorAnswer(MSG_NOT_FOUND_MUSIC)
    return c.video_page(c.world.music_posts(music_id), "music_posts")


def _challenge_info_id(c: _Call) -> JsonDict:
    ch = c.world.challenge_by_id(c.need("id"))
    if ch is None:
        raise ErrorAnswer(MSG_NOT_FOUND_CHALLENGE)
    return render.challenge_object(ch)


def _challenge_info_name(c: _Call) -> JsonDict:
    ch = c.world.challenge_by_name(c.need("name"))
    if ch is None:
        raise ErrorAnswer(MSG_NOT_FOUND_CHALLENGE)
    return render.challenge_object(ch)


def _challenge_posts(c: _Call) -> JsonDict:
    cid = c.need("challenge_id")
    if c.world.challenge_by_id(cid) is None:
        raise ErrorAnswer(MSG_NOT_FOUND_CHALLENGE)
    return c.video_page(c.world.challenge_posts(cid, c.params.get("region", "").strip() or None),
                        "challenge_posts")


def _search_challenge(c: _Call) -> JsonDict:
    found = c.world.search_challenges(c.need("keyword"))
    start, count = c.offset(), c.count(10, "search_challenges")
    page = found[start:start + count]
    return {"challenge_list": [render.challenge_object(ch) for ch in page],
            "cursor": c.next_cursor(start + len(page)), "hasMore": start + len(page) < len(found)}


def _region_list(c: _Call) -> JsonDict:
    return dict(c.world.regions())  # flat code -> name map, as tikwm's /api/region [T]/[G]


ENDPOINTS: dict[str, Callable[[_Call], JsonDict]] = {
    "/userid": _userid,
    "/userinfo-by-username": _userinfo_by_username,
    "/userinfo-by-id": _userinfo_by_id,
    "/user-posts": _user_posts,
    "/user-liked": _user_liked,
    "/user-followers": lambda c: _follow_list(c, "followers"),
    "/user-following": lambda c: _follow_list(c, "followings"),
    "/search-user": _search_user,
    "/post-detail": _post_detail,
    "/post-comments": _post_comments,
    "/post-comment-replies": _post_comment_replies,
    "/search-video": _search_video,
    "/music-info": _music_info,
    "/music-posts": _music_posts,
    "/challenge-info-id": _challenge_info_id,
    "/challenge-info-name": _challenge_info_name,
    "/challenge-posts": _challenge_posts,
    "/search-challenge": _search_challenge,
    "/region-list": _region_list,
}
"""API paths without their trailing slash -> endpoint."""

def call_endpoint(path: str, world: World, params: Mapping[str, str], q: Quirks,
                  media: MediaHost | None = None) -> JsonDict:
    """The payload `path` answers with: the endpoint's object, or {"status": "error", "message": ...}.

    Media URLs are signed by `media` (the simulator's media host) when given.
    """
    try:
        payload = ENDPOINTS[path](_Call(world, params, q, media))
    except ErrorAnswer as err:
        return {"status": "error", "message": str(err)}
    return render.finish(payload, q)
