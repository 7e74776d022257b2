"""The simulator's posts: a user's videos as of the world's day in list order (pinned ones first), deleted ones left
out, and one post by id."""

from __future__ import annotations

from collections.abc import Iterator

from crawler.sim.records import Post, PostsPage
from crawler.sim.seeded import Timeline, hash64, make_title, pareto, unit
from crawler.sim.users import (
    _FOLLOWERS,
    _PIN,
    _POST,
    _SPANS,
    _VIDEOS,
    MAX_COMMENTS,
    MUSIC_ID_BASE,
    VIDEO_ID_BASE,
    VIDEO_SLOTS,
    Users,
)


class Posts(Users):
    """Users' posts; and one early post of an author, as liked lists and searches show them."""

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

    def pinned(self, index: int) -> tuple[int, ...]:
        """Positions (0 = oldest) of the user's pinned posts in list order, none deleted: 1-3 of the posts the user
        had on day 0 (for `pinned_fraction` of users with 4 or more), often old, sometimes the newest then."""
        base = self._base(_VIDEOS, index)
        h = self._h(_PIN, index)
        if base < 4 or unit(h) >= self.config.pinned_fraction or self.is_missing(index):
            return ()
        chosen: list[int] = []
        k = 0
        while len(chosen) < 1 + hash64(h, 1) % 3:
            j = hash64(h, 2, k) % base
            k += 1
            if j not in chosen:
                chosen.append(j)
        gone = self.deleted_posts(index)
        return tuple(j for j in chosen if j not in gone)

    def pin_flag(self, index: int) -> int | None:
        """The `is_top` the user's list items carry: 1 on pinned posts (0 on the others) for a third of the users
        with pinned posts; 0 on every item, or no `is_top` at all, for the rest (as in every real body seen)."""
        if not self.pinned(index):
            return 0
        return (1, 0, None)[hash64(self._h(_PIN, index), 3) % 3]

    def posts(self, index: int) -> Iterator[Post]:
        """The user's posts in list order as of the current day (as many as `user.videos`): the pinned ones first,
        then the others newest first."""
        if self.is_missing(index):
            return
        tl = self._timeline(_VIDEOS, index)
        pins = self.pinned(index)
        skip = self.deleted_posts(index) | frozenset(pins)
        yield from (self._post_at(index, j, tl) for j in pins)
        for j in range(tl.total - 1, -1, -1):
            if j not in skip:
                yield self._post_at(index, j, tl)

    def posts_page(self, index: int, cursor_ms: int, count: int) -> PostsPage:
        """A page of the user's list: from the head (cursor 0: the pinned posts, then the newest others up to
        `count` in all), or the others with create_time * 1000 < cursor_ms, up to `count`."""
        if self.is_missing(index):
            return PostsPage([], False, cursor_ms, 0)
        tl = self._timeline(_VIDEOS, index)
        pins = self.pinned(index) if cursor_ms <= 0 else ()
        skip = self.deleted_posts(index) | frozenset(self.pinned(index))
        head = [self._post_at(index, j, tl) for j in pins]
        hi = tl.total if cursor_ms <= 0 else tl.first_at_or_after(0, tl.total, -(-cursor_ms // 1000))
        out: list[Post] = []
        j = hi - 1
        while j >= 0 and len(head) + len(out) < count:
            if j not in skip:
                out.append(self._post_at(index, j, tl))
            j -= 1
        more = (j + 1) - sum(1 for g in skip if g <= j) > 0
        # A first page of pinned posts only: the next page starts at the newest other post.
        nxt = out[-1].create_time * 1000 if out else self.now * 1000 if pins else cursor_ms
        return PostsPage(head + out, more, nxt, len(head))

    def post(self, video_id: str) -> Post | None:
        """The post with this id, None if it does not exist today."""
        if not (video_id.isascii() and video_id.isdigit()) or len(video_id) != 19:
            return None
        index, j = divmod(int(video_id) - VIDEO_ID_BASE, VIDEO_SLOTS)
        if self.is_missing(index):
            return None
        tl = self._timeline(_VIDEOS, index)
        return self._post_at(index, j, tl) if j < tl.total and j not in self.deleted_posts(index) else None

    def _usable_author(self, a: int) -> bool:
        return not self.is_missing(a) and not self.is_private(a) and self._base(_VIDEOS, a) > 0

    def _initial_post(self, author: int, salt: int) -> Post:
        v0 = self._base(_VIDEOS, author)
        tl = Timeline((v0,), self.config.start_time, _SPANS[_VIDEOS], self._h(_VIDEOS, author, 7))
        return self._post_at(author, hash64(salt, author) % v0, tl)
