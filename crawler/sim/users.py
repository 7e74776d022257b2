"""The simulator's seeded world: users, posts, comments and lists derived lazily from hashes.

Pure and free of I/O. The server renders it; tests use it to compute the exact rows a crawl must produce.

Nothing is stored per user: every value is a function of (seed, what, index, ...), so a world of ten
million users costs no memory. Counts that change over time are a day-0 value plus one deterministic
gain per day advanced, so a lookup costs O(day).

Pathological users (`is_pathological`; never private or deleted) misbehave on the `/user-posts/` and
`/user-followers/` walks only (following, liked and comments behave normally). `pathology(index)` says
which way:
- ``"endless"``: the last real page says ``hasMore`` true; every later page is empty, says ``hasMore``
  true and returns a cursor that keeps moving (1 s older each time), so only an empty-page guard stops it.
- ``"repeat"``: the last real page returns the cursor that was sent (verbatim) with ``hasMore`` true,
  so the same page comes back forever; only a same-cursor guard stops it.

Simplifications: a post's own ``music_id`` and the lists of `music_posts` / `challenge_posts` /
`search_videos` are drawn independently (a music's post list need not contain posts that name it);
comment counts are fixed when a post appears, other post counts grow slowly with the world's day.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import re
from collections.abc import Iterator
from typing import Literal

from crawler.sim.records import Challenge, Comment, Follow, Music, Post, User, WorldConfig
from crawler.sim.seeded import (
    DAY,
    REGION_CUM,
    REGIONS,
    Timeline,
    coprime_stride,
    decode_id,
    hash64,
    make_comment_text,
    make_music_title,
    make_nickname,
    make_signature,
    make_title,
    pareto,
    pick_word,
    str_hash,
    unit,
)

__all__ = [
    "CHALLENGE_ID_BASE", "MUSIC_ID_BASE", "USER_ID_BASE", "VIDEO_ID_BASE", "VIDEO_SLOTS", "Challenge", "Comment",
    "Follow", "Music", "Post", "User", "World", "WorldConfig",
]

USER_ID_BASE = 6_800_000_000_000_000_000
VIDEO_ID_BASE = 7_000_000_000_000_000_000
VIDEO_SLOTS = 100_000  # a user's j-th video (oldest = 0) has id VIDEO_ID_BASE + index * VIDEO_SLOTS + j
MUSIC_ID_BASE = 7_100_000_000_000_000_000
CHALLENGE_ID_BASE = 1_600_000_000
MAX_COMMENTS = 600
MAX_REPLIES = 60

# Hash domains: one constant per kind of derived value, so no two values share a stream.
(_MISSING, _PRIVATE, _PATHO, _PATHO_KIND, _RENAME, _WORD, _SEP, _NICK, _SIG, _REGION, _VERIFIED,
 _FOLLOWERS, _FOLLOWING, _VIDEOS, _HEARTS, _DIGG, _POST, _COMMENT, _REPLY, _LIST, _MUSIC, _CHALLENGE,
 _SEARCH, _PICK, _DELETE, _BROKEN) = range(101, 127)
# What `broken_text_fraction` appends to a nickname and a title: a whole emoji, a NUL, half an emoji.
BROKEN_TAIL = " \U0001F600\x00 \ud83d"

_HANDLE_RE = re.compile(r"^[a-z]+[._]?(\d+)(?:v\d+)?$")
_CHALLENGE_RE = re.compile(r"^[a-z]+(\d+)$")


# Day-0 events (old videos, follows, likes) are spread over this many seconds before day 0.
_SPANS = {_FOLLOWERS: 3 * 365 * DAY, _FOLLOWING: 3 * 365 * DAY, _VIDEOS: 2 * 365 * DAY, _DIGG: 2 * 365 * DAY}
_DEFAULT_WORLD = WorldConfig()  # frozen, so one shared default is safe


class World:
    """The seeded world as of `day` (0 at creation); `advance` moves it forward."""

    def __init__(self, config: WorldConfig = _DEFAULT_WORLD) -> None:
        self.config = config
        self._day = 0
        self._seed = config.seed & ((1 << 64) - 1)
        self._n_music = max(200, config.users // 20)
        self._n_challenges = max(200, config.users // 20)
        # Lists render the same few users over and over; a small cache, emptied when the day moves.
        self._users: dict[int, User | None] = {}
        # Offset-paginated lists (comments, replies, search, music, challenge) answer as if this many new
        # entries had arrived at their head: every row moves to a later offset (the new ones are not served).
        self.list_shift = 0
        # API behaviour around `count` (tests set these): per-list caps instead of the reference's
        # (`sim.endpoints.PAGE_CAPS`), a count above the cap answered with an error instead of clamped, and
        # pages of 80-100% of the count asked (drawn per request) instead of all of it.
        self.page_caps: dict[str, int] = {}
        self.reject_oversized = False
        self.partial_pages = False
        # Nicknames are user-controlled text: tests set hostile ones here (user index -> nickname).
        self.nicknames: dict[int, str] = {}

    # ----- time and identity -------------------------------------------------------------------------

    def advance(self, days: int = 1) -> None:
        """Move the world forward: counts grow, new posts appear, some users are renamed."""
        if days < 0:
            raise ValueError("days must be >= 0")
        self.day += days

    @property
    def day(self) -> int:
        """Days advanced since creation."""
        return self._day

    @day.setter
    def day(self, value: int) -> None:
        self._day = value
        self._users.clear()

    @property
    def now(self) -> int:
        """Unix seconds at the start of the current day."""
        return self.config.start_time + self.day * DAY

    def _h(self, *parts: int) -> int:
        return hash64(self._seed, *parts)

    def _u(self, *parts: int) -> float:
        return unit(self._h(*parts))

    def _valid(self, index: int) -> bool:
        return 0 <= index < self.config.users

    def is_missing(self, index: int) -> bool:
        """True if this user index is deleted (every lookup says not found)."""
        return not self._valid(index) or self._u(_MISSING, index) < self.config.missing_fraction

    def is_private(self, index: int) -> bool:
        """True if this user's posts, followers, following and liked lists are refused."""
        return self._u(_PRIVATE, index) < self.config.private_fraction

    def is_pathological(self, index: int) -> bool:
        """True if this user's post and follower walks misbehave (see the module docstring)."""
        if self.is_missing(index) or self.is_private(index):
            return False
        return self._u(_PATHO, index) < self.config.pathological_fraction

    def has_broken_text(self, index: int) -> bool:
        """True if this user's nickname and post titles end in BROKEN_TAIL (WorldConfig.broken_text_fraction)."""
        fraction = self.config.broken_text_fraction
        return fraction > 0 and self._u(_BROKEN, index) < fraction

    def pathology(self, index: int) -> Literal["endless", "repeat"] | None:
        """Which misbehaviour a pathological user shows (module docstring), None for normal users."""
        if not self.is_pathological(index):
            return None
        return "endless" if self._h(_PATHO_KIND, index) & 1 else "repeat"

    def user_id(self, index: int) -> str:
        """The user's numeric id as a decimal string."""
        return str(USER_ID_BASE + index)

    def renames(self, index: int) -> int:
        """How many times the user has been renamed up to the current day."""
        p = self.config.rename_probability
        return sum(1 for d in range(1, self.day + 1) if self._u(_RENAME, index, d) < p)

    def handle(self, index: int) -> str:
        """The user's current handle; it carries the index, and a `v<n>` suffix after the n-th rename."""
        n = self.renames(index)
        word = pick_word(self._h(_WORD, index, n))
        sep = ("", "", "_", ".")[self._h(_SEP, index) % 4]
        return f"{word}{sep}{index}" + (f"v{n}" if n else "")

    def index_by_handle(self, handle: str) -> int | None:
        """The index of the user whose current handle this is (any case), else None."""
        h = handle.strip().lower()
        m = _HANDLE_RE.match(h)
        if m is None or len(m.group(1)) > 12:
            return None
        index = int(m.group(1))
        if self.is_missing(index) or self.handle(index) != h:
            return None
        return index

    def index_by_id(self, user_id: str) -> int | None:
        """The index of the user with this numeric id, else None (deleted users too)."""
        if not (user_id.isascii() and user_id.isdigit()) or len(user_id) > 25:
            return None
        index = int(user_id) - USER_ID_BASE
        return None if self.is_missing(index) else index

    # ----- counts ------------------------------------------------------------------------------------

    def _base(self, kind: int, index: int) -> int:
        u = self._u(kind, index)
        if kind == _FOLLOWERS:
            return pareto(u, 30, 0.75, 12_000_000)
        if kind == _FOLLOWING:
            return pareto(u, 120, 1.3, 10_000)
        if kind == _VIDEOS:
            return 0 if u < 0.08 else 1 + pareto(self._u(kind, index, 1), 12, 1.1, 2000)
        if kind == _DIGG:
            return pareto(u, 60, 0.9, 200_000)
        # hearts: likes received, roughly tied to audience and output
        f, v = self._base(_FOLLOWERS, index), self._base(_VIDEOS, index)
        return min(2_000_000_000, int(f * (1 + 20 * u) + v * 40 * self._u(kind, index, 1)))

    def _gain(self, kind: int, index: int, base: int, d: int) -> int:
        u = self._u(kind, index, -d)
        if kind == _VIDEOS:
            # Most users post on few days; a day's new videos never approach VIDEO_SLOTS.
            return (u < 0.12) + (u < 0.03) + 3 * (u < 0.005) if base or u < 0.01 else 0
        if kind == _FOLLOWERS:
            return min(80_000, int(base * 0.004 * u) + (u < 0.4))
        if kind == _FOLLOWING:
            return int(u < 0.2) + int(u < 0.05)
        if kind == _DIGG:
            return int(u * 6)
        return int(base * 0.002 * u) + int(u < 0.3)

    def _timeline(self, kind: int, index: int) -> Timeline:
        c = self._base(kind, index)
        cum = [c]
        for d in range(1, self.day + 1):
            c += self._gain(kind, index, cum[0], d)
            cum.append(c)
        return Timeline(tuple(cum), self.config.start_time, _SPANS.get(kind, DAY), self._h(kind, index, 7))

    def _count(self, kind: int, index: int) -> int:
        return self._timeline(kind, index).total

    def _region(self, index: int) -> str:
        r = self._h(_REGION, index) % REGION_CUM[-1]
        return REGIONS[bisect.bisect_right(REGION_CUM, r)][0]

    def user(self, index: int) -> User | None:
        """The user as of the current day, None if deleted."""
        if index in self._users:
            return self._users[index]
        if len(self._users) >= 8192:
            self._users.clear()
        user = self._users[index] = self._make_user(index)
        return user

    def _make_user(self, index: int) -> User | None:
        if self.is_missing(index):
            return None
        followers = self._count(_FOLLOWERS, index)
        digest = hashlib.blake2b(f"{self._seed}:{index}".encode(), digest_size=39, person=b"secuid").digest()
        sec = base64.urlsafe_b64encode(digest).decode()
        return User(
            index=index, user_id=self.user_id(index), handle=self.handle(index),
            nickname=self.nicknames.get(index) or make_nickname(self._h(_NICK, index)) + self._tail(index),
            sec_uid="MS4wLjABAAAA" + sec,
            verified=followers > 1_000_000 or self._u(_VERIFIED, index) < 0.01,
            private=self.is_private(index), followers=followers,
            following=self._count(_FOLLOWING, index),
            videos=self._count(_VIDEOS, index) - len(self.deleted_posts(index)),
            hearts=self._count(_HEARTS, index), digg_count=self._count(_DIGG, index),
            region=self._region(index), signature=make_signature(self._h(_SIG, index)),
        )

    def _tail(self, index: int) -> str:
        return BROKEN_TAIL if self.has_broken_text(index) else ""

    # ----- posts -------------------------------------------------------------------------------------

    def _post_at(self, index: int, j: int, tl: Timeline) -> Post:
        h = self._h(_POST, index, j)
        play = pareto(unit(hash64(h, 1)), 300, 0.8, 400_000_000) + self._base(_FOLLOWERS, index) // 10
        play = play * (1000 + 5 * self.day) // 1000  # counts grow with the world's day
        digg = int(play * (0.02 + 0.13 * unit(hash64(h, 2))))
        title, tail = make_title(hash64(h, 3)), self._tail(index)
        return Post(
            video_id=str(VIDEO_ID_BASE + index * VIDEO_SLOTS + j), author_index=index,
            create_time=tl.time(j), region=self._region(index), title=(title or "") + tail if tail else title,
            play_count=play, digg_count=digg,
            comment_count=pareto(unit(hash64(h, 4)), 3, 0.9, MAX_COMMENTS),
            share_count=int(digg * 0.05 * unit(hash64(h, 5))),
            collect_count=int(digg * 0.1 * unit(hash64(h, 6))),
            duration=5 + hash64(h, 7) % 176,
            music_id=str(MUSIC_ID_BASE + hash64(h, 8) % self._n_music),
        )

    def deleted_posts(self, index: int) -> frozenset[int]:
        """Positions (0 = oldest) of the user's posts deleted by the current day: on a day drawn with
        `delete_probability`, one post that existed the day before disappears for good."""
        p = self.config.delete_probability
        if p <= 0 or self.is_missing(index):
            return frozenset()
        tl = self._timeline(_VIDEOS, index)
        gone = set()
        for d in range(1, self.day + 1):
            h = self._h(_DELETE, index, d)
            if unit(h) < p and tl.cum[d - 1] > 0:
                gone.add(hash64(h, 1) % tl.cum[d - 1])
        return frozenset(gone)

    def posts(self, index: int) -> Iterator[Post]:
        """The user's posts, newest first, as of the current day (as many as `user.videos`)."""
        if self.is_missing(index):
            return
        tl = self._timeline(_VIDEOS, index)
        gone = self.deleted_posts(index)
        for j in range(tl.total - 1, -1, -1):
            if j not in gone:
                yield self._post_at(index, j, tl)

    def posts_page(self, index: int, cursor_ms: int, count: int) -> tuple[list[Post], bool]:
        """Up to `count` posts with create_time * 1000 < cursor_ms (0: from the newest); and has-more."""
        if self.is_missing(index):
            return [], False
        tl = self._timeline(_VIDEOS, index)
        gone = self.deleted_posts(index)
        hi = tl.total if cursor_ms <= 0 else tl.first_at_or_after(0, tl.total, -(-cursor_ms // 1000))
        if not gone:
            lo = max(0, hi - count)
            return [self._post_at(index, j, tl) for j in range(hi - 1, lo - 1, -1)], lo > 0
        out: list[Post] = []
        j = hi - 1
        while j >= 0 and len(out) < count:
            if j not in gone:
                out.append(self._post_at(index, j, tl))
            j -= 1
        return out, (j + 1) - sum(1 for g in gone if g <= j) > 0

    def post(self, video_id: str) -> Post | None:
        """The post with this id, None if it does not exist today."""
        if not (video_id.isascii() and video_id.isdigit()) or len(video_id) != 19:
            return None
        index, j = divmod(int(video_id) - VIDEO_ID_BASE, VIDEO_SLOTS)
        if self.is_missing(index):
            return None
        tl = self._timeline(_VIDEOS, index)
        return self._post_at(index, j, tl) if j < tl.total and j not in self.deleted_posts(index) else None

    # ----- follower, following and liked lists ---------------------------------------------------------

    def _list_user(self, kind: int, index: int, k: int) -> int | None:
        """The user in entry k of a list; None where that entry is skipped (deleted user or self)."""
        n = self.config.users
        h = self._h(_LIST, kind, index)
        other = (h + k * coprime_stride(hash64(h, 1), n)) % n
        return None if other == index or self.is_missing(other) else other

    def _follow_page(self, kind: int, index: int, before: int, count: int) -> tuple[list[Follow], bool]:
        if self.is_missing(index):
            return [], False
        tl = self._timeline(kind, index)
        # The window stays narrower than the world so its entries are distinct users.
        floor = max(0, tl.total - min(self.config.follow_cap, self.config.users - 1))
        k = tl.total if before <= 0 else tl.first_at_or_after(floor, tl.total, before)
        out: list[Follow] = []
        while k > floor:
            k -= 1
            other = self._list_user(kind, index, k)
            if other is None:
                continue
            if len(out) == count:
                return out, True
            out.append(Follow(other, tl.time(k)))
        return out, False

    def followers_page(self, index: int, before: int, count: int) -> tuple[list[Follow], bool]:
        """Up to `count` followers with follow_time < before (0: from the newest); and has-more."""
        return self._follow_page(_FOLLOWERS, index, before, count)

    def following_page(self, index: int, before: int, count: int) -> tuple[list[Follow], bool]:
        """Up to `count` followed users with follow_time < before (0: from the newest); and has-more."""
        return self._follow_page(_FOLLOWING, index, before, count)

    def followers(self, index: int) -> Iterator[Follow]:
        """The follower list, most recent first, ending near `follow_cap` entries."""
        yield from self._follow_page(_FOLLOWERS, index, 0, self.config.users)[0]

    def following(self, index: int) -> Iterator[Follow]:
        """The following list, most recent first, ending near `follow_cap` entries."""
        yield from self._follow_page(_FOLLOWING, index, 0, self.config.users)[0]

    def _usable_author(self, a: int) -> bool:
        return not self.is_missing(a) and not self.is_private(a) and self._base(_VIDEOS, a) > 0

    def _initial_post(self, author: int, salt: int) -> Post:
        v0 = self._base(_VIDEOS, author)
        tl = Timeline((v0,), self.config.start_time, _SPANS[_VIDEOS], self._h(_VIDEOS, author, 7))
        return self._post_at(author, hash64(salt, author) % v0, tl)

    def liked_page(self, index: int, before_ms: int, count: int) -> tuple[list[tuple[Post, int]], bool]:
        """Up to `count` (post, like_time) with like_time * 1000 < before_ms (0: newest); and has-more.

        One post per author (so no duplicates), from public authors only; newest like first.
        """
        if self.is_missing(index):
            return [], False
        tl = self._timeline(_DIGG, index)
        floor = max(0, tl.total - min(self.config.follow_cap, self.config.users - 1))
        k = tl.total if before_ms <= 0 else tl.first_at_or_after(floor, tl.total, -(-before_ms // 1000))
        out: list[tuple[Post, int]] = []
        while k > floor:
            k -= 1
            author = self._list_user(_DIGG, index, k)
            if author is None or not self._usable_author(author):
                continue
            if len(out) == count:
                return out, True
            out.append((self._initial_post(author, self._h(_PICK, index)), tl.time(k)))
        return out, False

    def liked(self, index: int) -> Iterator[Post]:
        """Posts the user liked, most recent like first."""
        yield from (p for p, _ in self.liked_page(index, 0, self.config.users)[0])

    # ----- comments ----------------------------------------------------------------------------------

    def _comment_at(self, post: Post, k: int, parent: Comment | None = None) -> Comment:
        base = parent.comment_id if parent else post.video_id
        h = self._h(_REPLY if parent else _COMMENT, int(base), k)
        start = parent.create_time if parent else post.create_time
        n = self.config.users
        user = h % n
        while self.is_missing(user):  # expected O(1): deleted users are a small fraction
            user = (user + 1) % n
        return Comment(
            comment_id=f"{base}{k:04d}" if parent else f"{base}{k:05d}", video_id=post.video_id,
            text=make_comment_text(hash64(h, 1)), create_time=min(self.now, start + (k + 1) * (30 + h % 90)),
            digg_count=pareto(unit(hash64(h, 2)), 2, 0.8, 500_000),
            reply_total=0 if parent else pareto(unit(hash64(h, 3)), 1, 1.0, MAX_REPLIES),
            user_index=user, parent_comment_id=parent.comment_id if parent else None,
        )

    def comments_page(self, video_id: str, offset: int, count: int) -> tuple[list[Comment], bool]:
        """Comments [offset, offset + count) in list order (oldest first), and whether more follow."""
        post = self.post(video_id)
        if post is None:
            return [], False
        end = min(post.comment_count, max(0, offset) + count)
        return [self._comment_at(post, k) for k in range(max(0, offset), end)], end < post.comment_count

    def comments(self, video_id: str) -> Iterator[Comment]:
        """All comments of a post in list order (as many as its comment_count)."""
        post = self.post(video_id)
        if post is not None:
            yield from (self._comment_at(post, k) for k in range(post.comment_count))

    def comment(self, comment_id: str) -> Comment | None:
        """The comment (24 digits) or reply (28 digits) with this id, None if it does not exist."""
        if not (comment_id.isascii() and comment_id.isdigit()) or len(comment_id) not in (24, 28):
            return None
        post = self.post(comment_id[:19])
        k = int(comment_id[19:24])
        if post is None or k >= post.comment_count:
            return None
        top = self._comment_at(post, k)
        if len(comment_id) == 24:
            return top
        r = int(comment_id[24:])
        return self._comment_at(post, r, top) if r < top.reply_total else None

    def replies_page(self, video_id: str, comment_id: str, offset: int, count: int
                     ) -> tuple[list[Comment], bool] | None:
        """Replies [offset, offset + count) and has-more; None if the comment is not on that video."""
        top = self.comment(comment_id)
        post = self.post(video_id)
        if top is None or post is None or top.parent_comment_id or top.video_id != video_id:
            return None
        end = min(top.reply_total, max(0, offset) + count)
        return [self._comment_at(post, r, top) for r in range(max(0, offset), end)], end < top.reply_total

    def replies(self, video_id: str, comment_id: str) -> Iterator[Comment]:
        """All replies to a comment (as many as its reply_total)."""
        page = self.replies_page(video_id, comment_id, 0, MAX_REPLIES)
        yield from page[0] if page else []

    # ----- search, music, challenges -------------------------------------------------------------------

    def _pick_posts(self, salt: int, n: int) -> list[Post]:
        """n distinct posts (one per author, public authors only) chosen by `salt`."""
        users = self.config.users
        stride = coprime_stride(hash64(salt, 1), users)
        out: list[Post] = []
        for k in range(users):
            if len(out) >= n:
                break
            a = (salt + k * stride) % users
            if self._usable_author(a):
                out.append(self._initial_post(a, salt))
        return out

    def search_videos(self, keyword: str, publish_time: int = 0, sort_by: int = 0,
                      region: str | None = None) -> list[Post]:
        """The full result list of a video search (0 to ~200 posts); sort_by 0 relevance, 1 likes, 2 date."""
        kh = self._h(_SEARCH, 1, str_hash(keyword.strip().lower()))
        posts = [] if kh % 13 == 0 else self._pick_posts(kh, 20 + kh % 181)
        if publish_time > 0:
            posts = [p for p in posts if p.create_time >= self.now - publish_time * DAY]
        if region:
            posts = [p for p in posts if p.region == region.upper()]
        if sort_by == 1:
            posts.sort(key=lambda p: (-p.digg_count, p.video_id))
        elif sort_by == 2:
            posts.sort(key=lambda p: (-p.create_time, p.video_id))
        return posts

    def search_users(self, keyword: str) -> list[int]:
        """The full result list of a user search: indexes, an exact handle match first (0 to ~200)."""
        kw = keyword.strip().lstrip("@").lower()
        kh = self._h(_SEARCH, 2, str_hash(kw))
        exact = self.index_by_handle(kw) if kw else None
        out = [exact] if exact is not None else []
        users = self.config.users
        stride = coprime_stride(hash64(kh, 1), users)
        for k in range(users):
            if len(out) >= kh % 201:
                break
            i = (kh + k * stride) % users
            if i != exact and not self.is_missing(i):
                out.append(i)
        return out

    def music_ids(self, n: int) -> list[str]:
        """The first n valid music ids."""
        return [str(MUSIC_ID_BASE + m) for m in range(min(n, self._n_music))]

    def music(self, music_id: str) -> Music | None:
        """The music with this id, else None."""
        m = decode_id(music_id, MUSIC_ID_BASE, self._n_music)
        if m is None:
            return None
        h = self._h(_MUSIC, m)
        original = unit(hash64(h, 1)) < 0.4
        owner = hash64(h, 2) % self.config.users
        title = f"original sound - {pick_word(h)}{owner}" if original else make_music_title(hash64(h, 3))
        return Music(music_id=music_id, title=title, author=make_nickname(hash64(h, 4)),
                     duration=5 + hash64(h, 5) % 56, original=original,
                     video_count=pareto(unit(hash64(h, 6)), 8, 0.8, 300))

    def music_posts(self, music_id: str) -> list[Post]:
        """Posts listed under a music (its video_count of them, or fewer in tiny worlds)."""
        music = self.music(music_id)
        return [] if music is None else self._pick_posts(self._h(_MUSIC, int(music_id), 9), music.video_count)

    def challenge_ids(self, n: int) -> list[str]:
        """The first n valid challenge ids."""
        return [str(CHALLENGE_ID_BASE + c) for c in range(min(n, self._n_challenges))]

    def _challenge(self, c: int) -> Challenge:
        h = self._h(_CHALLENGE, c)
        name = f"{pick_word(h)}{c}"
        views = pareto(unit(hash64(h, 1)), 20_000, 0.7, 50_000_000_000)
        return Challenge(challenge_id=str(CHALLENGE_ID_BASE + c), name=name,
                         desc=f"Show us your best #{name} moment", user_count=views // 300 + 1,
                         view_count=views)

    def challenge_by_id(self, cid: str) -> Challenge | None:
        """The challenge with this id, else None."""
        c = decode_id(cid, CHALLENGE_ID_BASE, self._n_challenges)
        return None if c is None else self._challenge(c)

    def challenge_by_name(self, name: str) -> Challenge | None:
        """The challenge with this name (any case, optional leading '#'), else None."""
        m = _CHALLENGE_RE.match(name.strip().lstrip("#").lower())
        if m is None or len(m.group(1)) > 12 or int(m.group(1)) >= self._n_challenges:
            return None
        ch = self._challenge(int(m.group(1)))
        return ch if ch.name == name.strip().lstrip("#").lower() else None

    def challenge_posts(self, cid: str, region: str | None = None) -> list[Post]:
        """Posts listed under a challenge (up to 300), optionally only those of one region."""
        c = decode_id(cid, CHALLENGE_ID_BASE, self._n_challenges)
        if c is None:
            return []
        h = self._h(_CHALLENGE, c, 9)
        posts = self._pick_posts(h, 5 + h % 296)
        return [p for p in posts if p.region == region.upper()] if region else posts

    def search_challenges(self, keyword: str) -> list[Challenge]:
        """The full result list of a hashtag search, an exact name match first (0 to ~60)."""
        kh = self._h(_SEARCH, 3, str_hash(keyword.strip().lower()))
        exact = self.challenge_by_name(keyword) if keyword.strip() else None
        out = [exact] if exact else []
        n, target = self._n_challenges, kh % 61
        stride = coprime_stride(hash64(kh, 1), n)
        for k in range(n):
            if len(out) >= target:
                break
            ch = self._challenge((kh + k * stride) % n)
            if ch != exact:
                out.append(ch)
        return out

    def regions(self) -> dict[str, str]:
        """Region codes and names, as `/region-list/` returns them."""
        return {code: name for code, name, _ in REGIONS}

    def sample_handles(self, n: int, start: int = 0) -> list[str]:
        """Current handles of the first n existing users from index `start` (private ones included)."""
        out: list[str] = []
        i = start
        while len(out) < n and i < self.config.users:
            if not self.is_missing(i):
                out.append(self.handle(i))
            i += 1
        return out
