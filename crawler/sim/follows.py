"""The simulator's user lists: followers, following and liked posts, newest first, ending near `follow_cap`."""

from __future__ import annotations

from collections.abc import Iterator

from crawler.sim.posts import Posts
from crawler.sim.records import Follow, Post
from crawler.sim.seeded import coprime_stride, hash64
from crawler.sim.users import _DIGG, _FOLLOWERS, _FOLLOWING, _LIST, _PICK


class Follows(Posts):
    """Follower, following and liked lists: entry k of a list is a seeded user, its time on a timeline."""

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
