"""`crawler ingest`: the daily job. Profiles (and, with --posts, new posts) of a watch list, one job per day.

Each day is two ordinary crawl jobs (so resume, locking and exactly-once come from crawl.py):
`DIR/profiles-DAY.csv` and, with --posts, `DIR/posts-DAY.csv`. Every profile is also stored as the
day's snapshot in the history store; users are fetched by id once their id is known, so a renamed
account stays one user. Posts stop at the newest post stored on an earlier day.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path

from crawler import endpoints as ep
from crawler.commands import CommandSpec, CrawlContext
from crawler.config import Secret, Settings
from crawler.crawl import Crawl, run_job
from crawler.errors import EXIT_PRECEDENCE
from crawler.history import HistoryStore
from crawler.job import JobOptions, Step, WorkItem
from crawler.outcome import Outcome
from crawler.state import StateStore

# CONTRACT.md's precedence when several exits apply: 2, 1, 130/143, 4, 3, 0.


def history_url(settings: Settings) -> str:
    """The configured history store, or the SQLite file in the data directory."""
    return settings.history_url or str(Path(settings.data_dir) / "history.db")


def specs(history: HistoryStore, day: dt.date) -> tuple[CommandSpec, CommandSpec]:
    """The two command specs of a day's ingest, bound to its history store and day."""

    async def profiles(crawl: CrawlContext, item: WorkItem) -> AsyncGenerator[Step, None]:
        uid = item.user_id or crawl.users.user_id(item.key)
        client = crawl.client
        profile = await client.user_info(user_id=uid) if uid else await client.user_info(item.key)
        crawl.learn(profile)
        if not item.user_id:
            crawl.users.learn(item.key, profile.user_id)  # the watch list's name keeps pointing at this user
        history.record_snapshot(day, profile, also_handle=None if item.user_id else item.key)
        yield Step([profile])

    async def posts(crawl: CrawlContext, item: WorkItem) -> AsyncGenerator[Step, None]:
        uid = await crawl.resolve_user(item)
        newest = history.newest_post_time(uid, before=day)
        async for step in crawl.walk("posts", {"userid": uid}, item):
            rows = [p for p in step.rows if isinstance(p, ep.Post)]
            fresh = [p for p in rows if newest is None or (p.create_time or 0) > newest]
            history.record_posts(day, uid, fresh)
            # A pinned old post at the top of the list does not mean the rest is known.
            reached_known = any(not p.pinned and p not in fresh for p in rows)
            yield Step(fresh, step.cursor, step.last or reached_known, None if reached_known else step.guard)
            if reached_known:
                return

    return (CommandSpec("ingest-profiles", "users", ep.Profile, "/userinfo-by-id/", profiles),
            CommandSpec("ingest-posts", "users", ep.Post, "/user-posts/", posts, "posts"))


def choose_day(out_dir: Path, date: str | None, *, restart: bool) -> dt.date:
    """--date, else the day of an unfinished ingest in DIR (a resumed run keeps its day), else today (UTC)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if date:
        from crawler.history import parse_day

        return parse_day(date)
    if not restart:
        unfinished: list[dt.date] = []
        for kind in ("profiles", "posts"):
            for state in out_dir.glob(f"{kind}-*.csv.state.db"):
                day = state.name[len(kind) + 1:len(kind) + 11]
                try:
                    parsed = dt.date.fromisoformat(day)
                except ValueError:
                    continue
                store = StateStore(state)
                try:
                    job = store.job()
                finally:
                    store.close()
                if job is not None and job.status != "done":
                    unfinished.append(parsed)
        if unfinished:
            return max(unfinished)
    return dt.datetime.now(dt.UTC).date()


@dataclass(frozen=True, slots=True)
class IngestResult:
    """The day ingested and each job's outcome."""

    day: dt.date
    outcomes: list[Outcome]

    @property
    def exit_code(self) -> int:
        """The most serious exit of the day's jobs."""
        codes = [o.exit_code for o in self.outcomes]
        return min(codes, key=EXIT_PRECEDENCE.index) if codes else 0


async def ingest(
    input_path: str,
    out_dir: Path,
    settings: Settings,
    *,
    api_key: Secret | str | None = None,
    date: str | None = None,
    with_posts: bool = False,
    restart: bool = False,
    column: str | None = None,
    by_id: bool = False,
    quiet: bool = True,
    install_signals: bool = True,
) -> IngestResult:
    """Run (or resume) one day's ingest."""
    day = choose_day(out_dir, date, restart=restart)
    history = HistoryStore(history_url(settings))
    outcomes: list[Outcome] = []
    try:
        profile_spec, posts_spec = specs(history, day)
        jobs: Sequence[tuple[CommandSpec, str]] = [(profile_spec, "profiles")]
        if with_posts:
            jobs = [*jobs, (posts_spec, "posts")]
        for spec, kind in jobs:
            # The name is built from a parsed date only: no input text ever reaches a path.
            out = out_dir / f"{kind}-{day.isoformat()}.csv"
            job = JobOptions(command=spec.name, input=input_path, output=str(out), column=column, by_id=by_id,
                             max_items=settings.max_items, max_pages=settings.max_pages, page_size=settings.page_size)
            crawl = Crawl(job, settings, api_key=api_key, restart=restart, quiet=quiet, spec=spec)
            outcome = await run_job(crawl, install_signals=install_signals)
            outcomes.append(outcome)
            if outcome.error is not None:
                break  # a stopped day resumes from here next time
    finally:
        history.close()
    return IngestResult(day, outcomes)


__all__ = ["IngestResult", "choose_day", "history_url", "ingest", "specs"]
