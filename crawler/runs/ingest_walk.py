"""One watch-list user's work in an ingest run: the profile (unless snapshotted today), then the walk of the
user's posts down to the watermark, a commit per page.

A walk is complete when it reaches a post at or below the watermark (pinned posts heading the list aside), the
end of the list or the --max-items horizon; only then does the watermark move (to the newest post the walk
started from). --max-pages bounds the pages of one day per user; a cut walk keeps its cursor for the next run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from crawler import testing
from crawler.api import pinned
from crawler.api import records as ep
from crawler.api.client import Client
from crawler.api.pagesizes import PageSizes
from crawler.config import Settings
from crawler.errors import ItemFailed
from crawler.history.store import WalkState
from crawler.runs.ingest_calls import StoreCalls
from crawler.runs.ingest_commit import Commit
from crawler.runs.ingest_files import POSTS, PROFILES
from crawler.runs.ingest_report import Tally
from crawler.stores.users import UserDirectory


@dataclass(frozen=True, slots=True)
class UserTask:
    """One watch-list item to work on in this run."""

    key: str  # the watch-list item: a handle or id:NNN
    user_id: str | None  # bound in the history store (or given)
    profile: bool  # fetch the profile (no snapshot today yet)
    private: bool = False  # today's snapshot says private (no posts walk)


@dataclass(slots=True)
class _Leg:
    """One pass of a walk: from the newest post (a head walk) or a cut walk's cursor, down to the watermark."""

    st: WalkState  # the walk as the store had it when the pass began
    head: bool
    spent: int  # pages of the day so far
    cursor: Any
    stop_at: int | None
    top: int | None
    rows: int
    first: bool = True

    @classmethod
    def of(cls, st: WalkState, spent: int) -> _Leg:
        if st.cursor is None:
            return cls(st, True, spent, None, st.through, None, 0)
        return cls(st, False, spent, st.cursor, st.stop_at, st.top, st.rows)

    def step(self, page: ep.Page[Any], day: dt.date, key: str, uid: str) -> tuple[Commit, bool]:
        """One page: its commit (the new posts and where the walk stands after it) and whether the walk is complete."""
        st, stop_at = self.st, self.stop_at
        posts = [p for p in page.items if isinstance(p, ep.Post)]
        # The newest post of a head walk is the watermark once it is complete. Pinned posts count too: every post
        # listed now is older than any post to come; and a first page may hold pinned posts only.
        times = [p.create_time for p in posts if p.create_time is not None]
        if (self.head or self.top is None) and times:
            self.top = max(times) if self.top is None else max(self.top, *times)
        # Pinned posts head the list's first page, old ones too: the paginator marked them (flagged or out of
        # order); a first page too short to tell them from the newest posts cannot end the walk.
        unsure = self.head and self.first and pinned.unsure(posts, more=not page.last)
        reached = stop_at is not None and not unsure and any(
            not p.pinned and (p.create_time or 0) <= stop_at for p in posts)
        fresh = [p for p in posts if stop_at is None or p.pinned or (p.create_time or 0) > stop_at]
        self.rows += len(fresh)
        self.spent += 1
        # A continued walk whose first page trips the guard again (an empty page claiming more, the cursor sent
        # back) has reached the end of the list, as the reference reads those answers: finish it rather than ask
        # the same dead page every night.
        dead_end = page.stop is not None and not self.head and self.first
        self.first = False
        complete = reached or dead_end or (page.last and page.stop is None and not page.capped)
        failure = None
        if complete:
            state = WalkState(self.top if self.top is not None else st.through, None, None, None, 0,
                              day.isoformat(), self.spent, day.isoformat() if self.head else st.walked)
        else:
            nxt = page.next_cursor if page.next_cursor is not None else page.cursor
            if page.stop is not None:
                nxt = page.cursor  # the guard's page is asked again next run
                failure = ("/user-posts/", "pagination_guard", f"{page.stop}; the walk goes on in the next run")
            state = WalkState(st.through, nxt, stop_at, self.top, self.rows, day.isoformat(), self.spent, st.walked)
        return Commit(day, key, POSTS, user_id=uid, posts=fresh, walk=state, failure=failure), complete


class UserWork:
    """A user's profile and posts walk; every row goes to ``submit`` (the run's writer)."""

    def __init__(self, *, client: Client, users: UserDirectory, sizes: PageSizes | None, calls: StoreCalls,
                 submit: Callable[[Commit], Awaitable[None]], tally: Tally, settings: Settings, with_posts: bool,
                 clock: Callable[[], dt.datetime], override: dt.date | None, include_private: bool = False) -> None:
        self.client = client
        self.users = users
        self.sizes = sizes
        self.calls = calls
        self.submit = submit
        self.tally = tally
        self.settings = settings
        self.with_posts = with_posts
        self.clock = clock
        self.override = override
        self.include_private = include_private  # walk private users' lists too (each answer billed)

    def day_now(self) -> dt.date:
        """The day a profile or post fetched now belongs to: --date, else today in UTC."""
        return self.override or self.clock().astimezone(dt.UTC).date()

    async def user(self, task: UserTask) -> None:
        """One watch-list user: the profile (unless snapshotted today), then the posts walk."""
        uid, private, source = task.user_id, task.private, task.key
        if task.profile:
            profile = await self._profile(task)
            if profile is None:
                return
            uid, private, source = profile.user_id, profile.private, profile.handle
        elif uid is not None:
            handle = await self.calls.call(self.calls.store.handle_of, uid)
            source = handle or task.key
        if not self.with_posts or uid is None:
            return
        if private and not self.include_private:
            self.tally.private += 1  # their lists answer an error: the summary counts them
            return
        await self.walk(task.key, uid, source)

    async def _profile(self, task: UserTask) -> ep.Profile | None:
        """Fetch and commit the user's profile; None if it failed (the failure is committed)."""
        uid = task.user_id
        endpoint = "/userinfo-by-id/" if uid else "/userinfo-by-username/"
        try:
            profile = await (self.client.user_info(user_id=uid) if uid else self.client.user_info(task.key))
        except ItemFailed as exc:
            await self.submit(Commit(self.day_now(), task.key, PROFILES, user_id=uid or "",
                                     failure=(exc.endpoint or endpoint, exc.reason, str(exc))))
            return None
        testing.reached("fetched")
        now = self.clock()  # read once: the snapshot's day is its fetch time's UTC day, even at midnight
        day = self.override or now.astimezone(dt.UTC).date()
        await self.submit(Commit(day, task.key, PROFILES, profile=profile, fetched_at=now,
                                 bind=uid is None, user_id=profile.user_id))
        counts = dict(videos=profile.videos, followers=profile.followers, following=profile.following,
                      private=profile.private)
        if uid is None:  # fetched by handle: the shared cache may learn this handle's id
            self.users.learn(task.key, profile.user_id, **counts)  # type: ignore[arg-type]
        else:
            self.users.update_counts(profile.user_id, **counts)  # type: ignore[arg-type]
        return profile

    async def walk(self, key: str, uid: str, source: str) -> None:
        """Continue a walk cut short, then walk from the newest post down to the watermark."""
        cap = self.settings.max_pages
        while True:
            day = self.day_now()
            st = await self.calls.call(self.calls.store.walk_state, uid)
            spent = st.day_pages if st.day == day.isoformat() else 0
            leg = _Leg.of(st, spent)
            if leg.head and st.walked == day.isoformat():
                return  # walked today already
            if cap is not None and spent >= cap:
                self.tally.walks["cut"] += 1
                return
            if not await self._leg(key, uid, source, leg):
                return  # failed, or cut short (it goes on next run)
            if leg.head:
                self.tally.walks["done"] += 1
                return
            # a walk from an earlier run is complete: today's head walk follows

    async def _leg(self, key: str, uid: str, source: str, leg: _Leg) -> bool:
        """One pass of the walk, a commit per page: whether it completed (False: cut short, or failed)."""
        cap, horizon = self.settings.max_pages, self.settings.max_items
        pages = self.client.pages("posts", {"userid": uid}, source=source, cursor=leg.cursor,
                                  page_size=self.settings.page_size, sizes=self.sizes,
                                  max_pages=None if cap is None else cap - leg.spent,
                                  max_items=None if horizon is None else max(horizon - leg.rows, 1))
        complete = False
        try:
            async with aclosing(pages) as walk:
                async for page in walk:
                    testing.reached("fetched")
                    commit, complete = leg.step(page, self.day_now(), key, uid)
                    await self.submit(commit)
                    if page.capped and not complete:
                        self.tally.walks["cut"] += 1
                    if complete or page.last:
                        break
        except ItemFailed as exc:
            self.tally.walks["failed"] += 1
            await self.submit(Commit(self.day_now(), key, POSTS, user_id=uid,
                                     failure=(exc.endpoint or "/user-posts/", exc.reason, str(exc))))
            return False
        return complete
