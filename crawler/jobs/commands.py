"""The commands: one handler per command turning an input item into Steps of rows, in one table.

Handlers see the run through `CrawlContext` (client, job, user directory, walk), not the whole `Crawl`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from crawler.api import records as ep
from crawler.api.client import Client
from crawler.errors import ItemFailed
from crawler.jobs.prepare import JobOptions, Step, WorkItem
from crawler.stores.model import COMMENTS_WALKED, WalkUpdate
from crawler.stores.users import UserDirectory


class CrawlContext(Protocol):
    """What a handler may use of the run."""

    @property
    def job(self) -> JobOptions: ...

    @property
    def client(self) -> Client: ...

    @property
    def users(self) -> UserDirectory: ...

    def learn(self, profile: ep.Profile) -> None: ...

    async def resolve_user(self, item: WorkItem) -> str: ...

    def walk(self, kind: str, params: Mapping[str, str | int], item: WorkItem, *,
             count_rows: bool = True) -> AsyncGenerator[Step, None]: ...

    def reply_walks(self, item: WorkItem) -> list[tuple[str, ep.Cursor | None, int]]: ...


Handler = Callable[[CrawlContext, WorkItem], AsyncGenerator[Step, None]]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """How one command reads its input and turns an item into rows."""

    name: str
    input_kind: str  # users, posts, names, music, pairs, keyword
    record: type[ep.Record]
    endpoint: str
    handler: Handler
    list_kind: str | None = None  # the paginated list it walks, for estimate


async def _profiles(crawl: CrawlContext, item: WorkItem) -> AsyncGenerator[Step, None]:
    # By handle when given one (same price): a handle that changed owner must show its new owner.
    uid = item.user_id
    profile = await crawl.client.user_info(user_id=uid) if uid else await crawl.client.user_info(item.key)
    crawl.learn(profile)
    yield Step([profile])


def _user_list(kind: str) -> Handler:
    async def handler(crawl: CrawlContext, item: WorkItem) -> AsyncGenerator[Step, None]:
        uid = await crawl.resolve_user(item)
        async for step in crawl.walk(kind, {"userid": uid}, item):
            yield step

    return handler


async def _post_details(crawl: CrawlContext, item: WorkItem) -> AsyncGenerator[Step, None]:
    yield Step([await crawl.client.post_detail(item.key, source=item.key)])


async def _comments(crawl: CrawlContext, item: WorkItem) -> AsyncGenerator[Step, None]:
    """Comments page by page; with --with-replies each comment page registers a reply walk per comment with
    replies, in the page's commit, and those walks run (each page committed) before the next comment page."""
    params = {"url": ep.video_url(item.key)}
    if not crawl.job.with_replies:
        async for step in crawl.walk("comments", params, item):
            yield step
        return
    for comment_id, cursor, pages in crawl.reply_walks(item):  # left unfinished by an earlier run
        async for step in _reply_walk(crawl, item, comment_id, cursor, pages, item.cursor):
            yield step
    if item.cursor == COMMENTS_WALKED:
        yield Step([], item.cursor, last=True)
        return
    async for step in crawl.walk("comments", params, item):
        walks = [WalkUpdate(item.seq, c.comment_id) for c in step.rows if isinstance(c, ep.Comment) and c.reply_total]
        if not walks:
            yield step
            continue
        at = COMMENTS_WALKED if step.last else step.cursor
        yield Step(step.rows, at, last=False, walks=walks)
        for walk in walks:
            async for reply_step in _reply_walk(crawl, item, walk.comment_id, None, 0, at):
                yield reply_step
        if step.last:
            yield Step([], at, last=True, guard=step.guard, capped=step.capped)


async def _reply_walk(crawl: CrawlContext, item: WorkItem, comment_id: str, cursor: ep.Cursor | None, pages: int,
                      at: ep.Cursor | None) -> AsyncGenerator[Step, None]:
    """One comment's replies from `cursor`, each page a Step of the walk (the post stays at cursor `at`);
    a guard, the page cap or a failed request is a failure row for this comment, not for the post."""
    params = {"video_id": item.key, "comment_id": comment_id}
    sub = WorkItem(item.seq, item.key, item.raw, cursor, 0, pages)
    endpoint = "/post-comment-replies/"
    try:
        async for step in crawl.walk("replies", params, sub, count_rows=False):
            n = len(step.rows)
            if step.guard is not None or step.capped:
                detail = step.guard or "stopped at the --max-pages cap; the replies go on"
                update = WalkUpdate(item.seq, comment_id, "failed", rows=n, pages=1, reason="pagination_guard",
                                    endpoint=endpoint, detail=detail)
            else:
                update = WalkUpdate(item.seq, comment_id, "done" if step.last else "pending", step.cursor, n, 1)
            yield Step(step.rows, at, last=False, walks=[update], counted=False)
    except ItemFailed as exc:
        update = WalkUpdate(item.seq, comment_id, "failed", reason=exc.reason, endpoint=exc.endpoint or endpoint,
                            detail=str(exc))
        yield Step([], at, last=False, walks=[update], counted=False)


async def _replies(crawl: CrawlContext, item: WorkItem) -> AsyncGenerator[Step, None]:
    video_id, comment_id = item.key.split(":", 1)
    async for step in crawl.walk("replies", {"video_id": video_id, "comment_id": comment_id}, item):
        yield step


def _keyword_list(kind: str) -> Handler:
    async def handler(crawl: CrawlContext, item: WorkItem) -> AsyncGenerator[Step, None]:
        params: dict[str, str | int] = {"keyword": item.key}
        if kind == "search_videos":
            params.update(publish_time=crawl.job.publish_time, sort_by=crawl.job.sort_by)
            if crawl.job.region:
                params["region"] = crawl.job.region
        async for step in crawl.walk(kind, params, item):
            yield step

    return handler


async def _music_posts(crawl: CrawlContext, item: WorkItem) -> AsyncGenerator[Step, None]:
    async for step in crawl.walk("music_posts", {"music_id": item.key}, item):
        yield step


async def _challenge_posts(crawl: CrawlContext, item: WorkItem) -> AsyncGenerator[Step, None]:
    cid = item.key if item.key.isdigit() else (await crawl.client.challenge_info(name=item.key)).challenge_id
    async for step in crawl.walk("challenge_posts", {"challenge_id": cid}, item):
        yield step


async def _music_info(crawl: CrawlContext, item: WorkItem) -> AsyncGenerator[Step, None]:
    yield Step([await crawl.client.music_info(item.key)])


async def _challenge_info(crawl: CrawlContext, item: WorkItem) -> AsyncGenerator[Step, None]:
    if item.key.isdigit():
        yield Step([await crawl.client.challenge_info(item.key)])
    else:
        yield Step([await crawl.client.challenge_info(name=item.key)])


COMMANDS: dict[str, CommandSpec] = {
    c.name: c
    for c in (
        CommandSpec("profiles", "users", ep.Profile, "/userinfo-by-username/", _profiles),
        CommandSpec("posts", "users", ep.Post, "/user-posts/", _user_list("posts"), "posts"),
        CommandSpec("liked", "users", ep.Post, "/user-liked/", _user_list("liked"), "liked"),
        CommandSpec("followers", "users", ep.Follow, "/user-followers/", _user_list("followers"), "followers"),
        CommandSpec("following", "users", ep.Follow, "/user-following/", _user_list("following"), "following"),
        CommandSpec("post-details", "posts", ep.Post, "/post-detail/", _post_details),
        CommandSpec("comments", "posts", ep.Comment, "/post-comments/", _comments, "comments"),
        CommandSpec("replies", "pairs", ep.Comment, "/post-comment-replies/", _replies, "replies"),
        CommandSpec("search-videos", "keyword", ep.Post, "/search-video/", _keyword_list("search_videos"),
                    "search_videos"),
        CommandSpec("search-users", "keyword", ep.UserHit, "/search-user/", _keyword_list("search_users"),
                    "search_users"),
        CommandSpec("search-challenges", "keyword", ep.Challenge, "/search-challenge/",
                    _keyword_list("search_challenges"), "search_challenges"),
        CommandSpec("music-posts", "music", ep.Post, "/music-posts/", _music_posts, "music_posts"),
        CommandSpec("challenge-posts", "names", ep.Post, "/challenge-posts/", _challenge_posts, "challenge_posts"),
        CommandSpec("music-info", "music", ep.Music, "/music-info/", _music_info),
        CommandSpec("challenge-info", "names", ep.Challenge, "/challenge-info-id/", _challenge_info),
    )
}
