"""The simulator's comments and replies: a post's comments oldest first, each with its replies."""

from __future__ import annotations

from collections.abc import Iterator

from crawler.sim.posts import Posts
from crawler.sim.records import Comment, Post
from crawler.sim.seeded import hash64, make_comment_text, pareto, unit
from crawler.sim.users import _COMMENT, _REPLY, MAX_REPLIES


class Comments(Posts):
    """Comments (24-digit ids: the video id and a 5-digit position) and replies (4 more digits)."""

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
