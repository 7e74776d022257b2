"""The simulator's posts: a user's videos as of the world's day, deleted ones left out, and one post by id."""

from __future__ import annotations

from collections.abc import Iterator

from crawler.sim.records import Post
from crawler.sim.seeded import Timeline, hash64, make_title, pareto, unit
from crawler.sim.users import (
    _FOLLOWERS,
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

    def _usable_author(self, a: int) -> bool:
        return not self.is_missing(a) and not self.is_private(a) and self._base(_VIDEOS, a) > 0

    def _initial_post(self, author: int, salt: int) -> Post:
        v0 = self._base(_VIDEOS, author)
        tl = Timeline((v0,), self.config.start_time, _SPANS[_VIDEOS], self._h(_VIDEOS, author, 7))
        return self._post_at(author, hash64(salt, author) % v0, tl)
