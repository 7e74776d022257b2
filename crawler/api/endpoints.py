"""The endpoint methods of `Client`: thin wrappers over `call`/`pages` and the records of `crawler.api.records`."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, NamedTuple, TypeVar

from crawler.api import records as ep
from crawler.api.lists import LISTS, items, walk
from crawler.api.pagesizes import PageSizes
from crawler.api.parse import (
    parse_challenge,
    parse_music,
    parse_post_detail,
    parse_profile,
    parse_regions,
    parse_user_id,
)
from crawler.api.records import Cursor

T = TypeVar("T")
JsonDict = dict[str, Any]


class _Walk(NamedTuple):
    """The options every list method passes on to its walk."""

    cursor: Cursor | None
    page_size: int | None
    max_pages: int | None
    max_items: int | None
    source: str | None


class Endpoints:
    """One method per API endpoint; the class that mixes this in provides `call` (one paced, retried request)."""

    async def call(self, endpoint: str, params: Mapping[str, str | int] | None, parse: Callable[[JsonDict], T]) -> T:
        raise NotImplementedError

    async def user_id(self, handle: str) -> str:
        """The numeric user id of a handle (`/userid/`)."""
        return await self.call("/userid/", {"username": handle}, parse_user_id)

    async def user_info(self, handle: str | None = None, *, user_id: str | None = None) -> ep.Profile:
        """A profile by handle (`/userinfo-by-username/`) or by id (`/userinfo-by-id/`)."""
        if user_id is not None:
            return await self.call("/userinfo-by-id/", {"userid": user_id}, parse_profile)
        if handle is None:
            raise ValueError("user_info needs a handle or user_id")
        return await self.call("/userinfo-by-username/", {"username": handle}, parse_profile)

    async def post_detail(self, video_id: str, *, source: str = "") -> ep.Post:
        """One post by numeric id (`/post-detail/`); an answer without an id is the post asked for."""
        return await self.call("/post-detail/", {"url": ep.video_url(video_id)},
                               lambda body: parse_post_detail(body, video_id, source or video_id))

    async def music_info(self, music_id: str) -> ep.Music:
        """Music metadata (`/music-info/`)."""
        return await self.call("/music-info/", {"music_id": music_id}, parse_music)

    async def challenge_info(self, challenge_id: str | None = None, *, name: str | None = None) -> ep.Challenge:
        """A hashtag by id (`/challenge-info-id/`) or name (`/challenge-info-name/`)."""
        source = challenge_id or name or ""
        if challenge_id is not None:
            return await self.call("/challenge-info-id/", {"id": challenge_id}, lambda b: parse_challenge(b, source))
        if name is not None:
            return await self.call("/challenge-info-name/", {"name": name}, lambda b: parse_challenge(b, source))
        raise ValueError("challenge_info needs an id or a name")

    async def regions(self) -> list[ep.Region]:
        """The region codes `/search-video/` accepts (`/region-list/`)."""
        return await self.call("/region-list/", None, parse_regions)

    def pages(self, kind: str, params: Mapping[str, str | int], *, cursor: Cursor | None = None,
              page_size: int | None = None, max_pages: int | None = None, max_items: int | None = None,
              source: str | None = None, sizes: PageSizes | None = None) -> AsyncGenerator[ep.Page[Any], None]:
        """The page-by-page walk of one list (the options: `lists.walk`); the crawl uses this to commit per page."""
        return walk(self, LISTS[kind], params, source=source, cursor=cursor, page_size=page_size, max_pages=max_pages,
                    max_items=max_items, sizes=sizes)

    # The list methods take the same keyword-only options: where to start (``cursor``: a page's ``next_cursor``),
    # the page size asked for (default: the most the list gives), caps on pages and rows, and the rows' source.

    def user_posts(self, user_id: str, *, cursor: Cursor | None = None, page_size: int | None = None,
                   max_pages: int | None = None, max_items: int | None = None, source: str | None = None
                   ) -> AsyncGenerator[ep.Post, None]:
        """A user's posts, newest first (`/user-posts/`)."""
        return self._rows("posts", {"userid": user_id}, _Walk(cursor, page_size, max_pages, max_items, source))

    def user_liked(self, user_id: str, *, cursor: Cursor | None = None, page_size: int | None = None,
                   max_pages: int | None = None, max_items: int | None = None, source: str | None = None
                   ) -> AsyncGenerator[ep.Post, None]:
        """Posts a user liked (`/user-liked/`)."""
        return self._rows("liked", {"userid": user_id}, _Walk(cursor, page_size, max_pages, max_items, source))

    def user_followers(self, user_id: str, *, cursor: Cursor | None = None, page_size: int | None = None,
                       max_pages: int | None = None, max_items: int | None = None, source: str | None = None
                       ) -> AsyncGenerator[ep.Follow, None]:
        """A user's followers, most recent first (`/user-followers/`; TikTok ends lists near 5,000)."""
        return self._rows("followers", {"userid": user_id}, _Walk(cursor, page_size, max_pages, max_items, source))

    def user_following(self, user_id: str, *, cursor: Cursor | None = None, page_size: int | None = None,
                       max_pages: int | None = None, max_items: int | None = None, source: str | None = None
                       ) -> AsyncGenerator[ep.Follow, None]:
        """Accounts a user follows (`/user-following/`)."""
        return self._rows("following", {"userid": user_id}, _Walk(cursor, page_size, max_pages, max_items, source))

    def post_comments(self, video_id: str, *, cursor: Cursor | None = None, page_size: int | None = None,
                      max_pages: int | None = None, max_items: int | None = None, source: str | None = None
                      ) -> AsyncGenerator[ep.Comment, None]:
        """Top-level comments of a post (`/post-comments/`)."""
        params = {"url": ep.video_url(video_id)}
        return self._rows("comments", params, _Walk(cursor, page_size, max_pages, max_items, source))

    def comment_replies(self, video_id: str, comment_id: str, *, cursor: Cursor | None = None,
                        page_size: int | None = None, max_pages: int | None = None, max_items: int | None = None,
                        source: str | None = None) -> AsyncGenerator[ep.Comment, None]:
        """Replies to one comment (`/post-comment-replies/`)."""
        params = {"video_id": video_id, "comment_id": comment_id}
        return self._rows("replies", params, _Walk(cursor, page_size, max_pages, max_items, source))

    def search_videos(self, keyword: str, *, publish_time: int = 0, sort_by: int = 0, region: str | None = None,
                      cursor: Cursor | None = None, page_size: int | None = None, max_pages: int | None = None,
                      max_items: int | None = None, source: str | None = None) -> AsyncGenerator[ep.Post, None]:
        """Videos matching a keyword (`/search-video/`)."""
        params: dict[str, str | int] = {"keyword": keyword, "publish_time": publish_time, "sort_by": sort_by}
        if region:
            params["region"] = region
        return self._rows("search_videos", params, _Walk(cursor, page_size, max_pages, max_items, source))

    def search_users(self, keyword: str, *, cursor: Cursor | None = None, page_size: int | None = None,
                     max_pages: int | None = None, max_items: int | None = None, source: str | None = None
                     ) -> AsyncGenerator[ep.UserHit, None]:
        """Users matching a keyword (`/search-user/`)."""
        return self._rows("search_users", {"keyword": keyword}, _Walk(cursor, page_size, max_pages, max_items, source))

    def search_challenges(self, keyword: str, *, cursor: Cursor | None = None, page_size: int | None = None,
                          max_pages: int | None = None, max_items: int | None = None, source: str | None = None
                          ) -> AsyncGenerator[ep.Challenge, None]:
        """Hashtags matching a keyword (`/search-challenge/`)."""
        params = {"keyword": keyword}
        return self._rows("search_challenges", params, _Walk(cursor, page_size, max_pages, max_items, source))

    def music_posts(self, music_id: str, *, cursor: Cursor | None = None, page_size: int | None = None,
                    max_pages: int | None = None, max_items: int | None = None, source: str | None = None
                    ) -> AsyncGenerator[ep.Post, None]:
        """Posts using a sound (`/music-posts/`)."""
        params = {"music_id": music_id}
        return self._rows("music_posts", params, _Walk(cursor, page_size, max_pages, max_items, source))

    def challenge_posts(self, challenge_id: str, *, cursor: Cursor | None = None, page_size: int | None = None,
                        max_pages: int | None = None, max_items: int | None = None, source: str | None = None
                        ) -> AsyncGenerator[ep.Post, None]:
        """Posts under a hashtag (`/challenge-posts/`)."""
        params = {"challenge_id": challenge_id}
        return self._rows("challenge_posts", params, _Walk(cursor, page_size, max_pages, max_items, source))

    def _rows(self, kind: str, params: Mapping[str, str | int], w: _Walk) -> AsyncGenerator[Any, None]:
        """The rows of one list's walk, one by one."""
        pages = self.pages(kind, params, cursor=w.cursor, page_size=w.page_size, max_pages=w.max_pages,
                           max_items=w.max_items, source=w.source)
        return items(pages, w.max_items)
