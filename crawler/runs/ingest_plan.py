"""Today's work for a watch-list item, from the history store's view of it, and the store's claims: several runs
on one history store fetch each user once a day (a claim per user and day, renewed while the run works)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable

from crawler.errors import RunStopped
from crawler.runs.ingest_calls import StoreCalls, first_line
from crawler.runs.ingest_files import POSTS, PROFILES
from crawler.runs.ingest_report import Tally
from crawler.runs.ingest_walk import UserTask
from crawler.stores.local import StateStore
from crawler.stores.model import RETRIABLE, RETRIABLE_ALL

log = logging.getLogger("crawler.runs.ingest_plan")

Lookup = tuple[dict[str, str | None], dict[str, bool], dict[tuple[str, str], str]]


class DayPlan:
    """What a run does today for each watch-list item, under the store's claim of the user's day."""

    def __init__(self, calls: StoreCalls, tally: Tally, *, run_id: str, with_posts: bool,
                 retry_failed: bool | str, heartbeat_timeout: float, day_now: Callable[[], dt.date],
                 include_private: bool = False) -> None:
        self.calls = calls
        self.tally = tally
        self.run_id = run_id
        self.with_posts = with_posts
        self.include_private = include_private
        self.retry_failed = retry_failed
        self.heartbeat_timeout = heartbeat_timeout
        self.day_now = day_now

    def _retry(self, reason: str) -> bool:
        if not self.retry_failed:
            return False
        return reason in (RETRIABLE_ALL if self.retry_failed == "all" else RETRIABLE)

    def lookup(self, keys: list[str], today: dt.date) -> Lookup:
        """A chunk of the watch list in the store (its thread): each key's user, today's snapshots, failures."""
        store = self.calls.store
        bound = store.bound_ids([k for k in keys if not k.startswith("id:")])
        ids = {k: k[3:] if k.startswith("id:") else bound.get(k) for k in keys}
        snaps = store.snapshotted([u for u in ids.values() if u], today)
        return ids, snaps, store.day_failures(today, keys)

    def plan(self, key: str, uid: str | None, snaps: dict[str, bool], failed: dict[tuple[str, str], str]
             ) -> UserTask | None:
        """Today's work for a watch-list item from the store's view of it (`lookup`); None: nothing to do."""
        if (key, PROFILES) in failed and not self._retry(failed[(key, PROFILES)]):
            return None  # fetched today already (it failed): --retry-failed tries it again
        has = uid is not None and uid in snaps
        private = uid is not None and snaps.get(uid, False)
        posts = self.with_posts and not ((key, POSTS) in failed and not self._retry(failed[(key, POSTS)]))
        if has and posts and private and not self.include_private:
            self.tally.private += 1  # snapshotted today (a run without --posts): its walk is skipped, and counted
            return None
        if has and not posts:  # snapshotted today; no posts to walk
            return None
        return UserTask(key, uid, profile=not has, private=private)

    async def items(self, watch: StateStore) -> AsyncGenerator[UserTask, None]:
        """Today's work in watch-list order, a chunk at a time (the pool's feeder queues it)."""
        tally = self.tally
        after = 0
        while chunk := watch.pending(after, 500):
            after = chunk[-1][0]
            today = self.day_now()
            keys = [key for _, key, *_ in chunk]
            ids, snaps, failed = await self.calls.call(self.lookup, keys, today)
            for key in keys:
                uid = ids[key]
                work = self.plan(key, uid, snaps, failed)
                if work is None:
                    tally.skipped += 1
                    continue
                if uid is not None:
                    if uid in tally.queued_users:  # one user under two names (`name` and `id:N`): once a run
                        tally.skipped += 1
                        continue
                    tally.queued_users.add(uid)
                tally.queued += 1
                yield work

    # -- claims: several runs on one history store fetch each user once a day --

    @property
    def claim_ttl(self) -> int:
        """Seconds a claim outlives a silent run (jobs.heartbeat_timeout, as a silent job worker's items)."""
        return max(1, math.ceil(self.heartbeat_timeout))

    async def heartbeat(self) -> None:
        """Keep this run's claims alive while it works: a run that dies stops renewing them, and they expire."""
        while True:
            await asyncio.sleep(self.claim_ttl / 3)
            try:
                await self.calls.call(self.calls.store.renew_claims, self.run_id, self.claim_ttl)
            except RunStopped:
                return  # the store is given up: the run is ending, and says why
            except Exception as exc:  # a lapsed claim costs at most a fetch another run repeats: the run goes on
                log.warning("this run's claims on the history store were not renewed: %s", first_line(exc))

    async def claimed(self, task: UserTask, work: Callable[[UserTask], Awaitable[None]]) -> None:
        """``work`` under the store's claim of the user for today: skipped while another run's claim is alive, or
        if the store shows the user's day done once claimed (another run committed it); released when done."""
        day = self.day_now()
        subject = f"user:{task.user_id}" if task.user_id else f"name:{task.key}"
        claimed, mine = await self.calls.call(self._claim, task, day, subject)
        self.tally.elsewhere += not claimed
        if mine is None:
            return
        await work(mine)
        await self.calls.call(self.calls.store.release_claim, day, subject, self.run_id)

    def _claim(self, task: UserTask, day: dt.date, subject: str) -> tuple[bool, UserTask | None]:
        """Claim the user's day (the store's thread): whether it was free, and the work the store shows left once
        claimed (None: none)."""
        store = self.calls.store
        with store.transaction():
            if not store.claim(day, subject, self.run_id, self.claim_ttl):
                return False, None  # another run is on it
            ids, snaps, failed = self.lookup([task.key], day)
            mine = self.plan(task.key, ids[task.key] or task.user_id, snaps, failed)
            if mine is None:
                store.release_claim(day, subject, self.run_id)
            return True, mine
