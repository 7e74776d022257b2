"""The base of the simulator's world: configuration, day and seeded hashes; who the users are, their profiles.

posts.py, follows.py, comments.py and catalog.py build on it; data.py joins them into `World`.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import re
from typing import Literal

from crawler.sim.records import User, WorldConfig
from crawler.sim.seeded import (
    DAY,
    REGION_CUM,
    REGIONS,
    Timeline,
    hash64,
    make_nickname,
    make_signature,
    pareto,
    pick_word,
    unit,
)

USER_ID_BASE = 6_800_000_000_000_000_000
VIDEO_ID_BASE = 7_000_000_000_000_000_000
VIDEO_SLOTS = 100_000  # a user's j-th video (oldest = 0) has id VIDEO_ID_BASE + index * VIDEO_SLOTS + j
MUSIC_ID_BASE = 7_100_000_000_000_000_000
CHALLENGE_ID_BASE = 1_600_000_000
MAX_COMMENTS = 600
MAX_REPLIES = 60

# Hash domains: one constant per kind of derived value, so no two values share a stream. Defined together
# here (the other parts of the world import theirs) so a new one cannot reuse a number.
(_MISSING, _PRIVATE, _PATHO, _PATHO_KIND, _RENAME, _WORD, _SEP, _NICK, _SIG, _REGION, _VERIFIED,
 _FOLLOWERS, _FOLLOWING, _VIDEOS, _HEARTS, _DIGG, _POST, _COMMENT, _REPLY, _LIST, _MUSIC, _CHALLENGE,
 _SEARCH, _PICK, _DELETE, _BROKEN, _PIN, _WRAP) = range(101, 129)
# What `broken_text_fraction` appends to a nickname and a title: a whole emoji, a NUL, half an emoji.
BROKEN_TAIL = " \U0001F600\x00 \ud83d"

_HANDLE_RE = re.compile(r"^[a-z]+[._]?(\d+)(?:v\d+)?$")
# The handle `crawler doctor` checks by default; the world answers it with its stand-in (`Users.official`).
OFFICIAL = "tiktok"
# Day-0 events (old videos, follows, likes) are spread over this many seconds before day 0.
_SPANS = {_FOLLOWERS: 3 * 365 * DAY, _FOLLOWING: 3 * 365 * DAY, _VIDEOS: 2 * 365 * DAY, _DIGG: 2 * 365 * DAY}
_DEFAULT_WORLD = WorldConfig()  # frozen, so one shared default is safe


class Users:
    """The base of the world: its configuration, day and seeded hashes; its users, their counts and profiles."""

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

    def profile_wrapped(self, index: int) -> bool:
        """True if this user's profile answers come as `userInfo: {user, stats, statsV2}` (wrapped_fraction)."""
        fraction = self.config.wrapped_fraction
        return fraction > 0 and self._u(_WRAP, index) < fraction

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
        if h == OFFICIAL:
            return self.official()
        m = _HANDLE_RE.match(h)
        if m is None or len(m.group(1)) > 12:
            return None
        index = int(m.group(1))
        if self.is_missing(index) or self.handle(index) != h:
            return None
        return index

    def official(self) -> int | None:
        """The world's stand-in for @tiktok: its most followed public user with posts among the first 1,000."""
        best: tuple[int, int] | None = None
        for i in range(min(self.config.users, 1_000)):
            user = self.user(i)
            if user is None or user.private or user.videos < 2:
                continue
            if best is None or user.followers > best[0]:
                best = (user.followers, i)
        return None if best is None else best[1]

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

    def sample_handles(self, n: int, start: int = 0) -> list[str]:
        """Current handles of the first n existing users from index `start` (private ones included)."""
        out: list[str] = []
        i = start
        while len(out) < n and i < self.config.users:
            if not self.is_missing(i):
                out.append(self.handle(i))
            i += 1
        return out

