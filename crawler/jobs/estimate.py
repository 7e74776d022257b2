"""`crawler estimate`: the expected credits_billed of a job before it runs, from what the data dir knows."""

from __future__ import annotations

import csv
import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from crawler.api.lists import LISTS
from crawler.api.pagesizes import PageSizes
from crawler.jobs.commands import COMMANDS, CommandSpec
from crawler.jobs.handles import decode_input, open_input
from crawler.jobs.inputs import input_items
from crawler.jobs.prepare import JobOptions
from crawler.options import DataOptions, JobLimits, RateOptions
from crawler.stores.local import StateStore
from crawler.stores.users import UserDirectory

FOLLOW_CAP = 5000  # TikTok ends follower/following lists near here
COUNTED = ("posts", "followers", "following")  # lists whose length a profile tells


def at_rate(requests: int, rate: RateOptions, *, upto: int | None = None, bound: bool = False) -> str:
    """The time line: how long `requests` (up to `upto`) take at the key's pace, "time: ≈ 10 min at 200 per 60 s"
    (rate.limit per rate.window; a first burst aside). `bound`: the requests are a lower bound."""
    if not rate.enabled:
        return "time: no rate limit (rate.enabled = false): as fast as the API answers"
    span = duration(requests * rate.window / rate.limit)
    if upto is not None and upto > requests:
        span += f" to {duration(upto * rate.window / rate.limit)}"
    return f"time: {'at least ' if bound else '≈ '}{span} at {rate.limit:,} per {rate.window:g} s"


def duration(seconds: float) -> str:
    """A rounded duration in words: "40 s", "10 min", "2 h 5 min"."""
    if seconds < 90:
        return f"{max(seconds, 0):.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60} min"


@dataclass(frozen=True, slots=True)
class Estimate:
    """Expected credits of a job, split into what is known and what is a lower bound."""

    command: str
    items: int
    invalid: int
    lookups: int  # /userid/ calls for handles whose id is unknown
    known_ids: int
    pages_known: int  # pages of walks whose length the data directory knows
    items_known: int
    items_unknown: int  # walks of unknown length: at least one page each
    single_calls: int  # one-call commands
    list_kind: str | None = None  # the paginated list the command walks
    page_size: int = 0  # rows asked per page
    max_pages: int | None = None
    max_items: int | None = None
    replies_upto: int | None = None  # --with-replies without reply counts: reply walks cost 0 .. this many more
    reply_pages: int = 0  # --with-replies given a comments CSV: the reply walks' pages by each reply_total

    @property
    def credits(self) -> int:
        """Expected credits (a lower bound when items_unknown > 0)."""
        return self.lookups + self.pages_known + self.items_unknown + self.single_calls + self.reply_pages

    def render(self, rate: RateOptions | None = None) -> str:
        """What to print, with the time at the key's pace when `rate` is given."""
        text = self._render()
        if rate is None:
            return text
        upto = None if self.replies_upto is None else self.credits + self.replies_upto
        return f"{text}\n{at_rate(self.credits, rate, upto=upto, bound=bool(self.items_unknown) and upto is None)}"

    def _render(self) -> str:
        """What to print."""
        lines = [f"estimate for {self.command}: {self.items:,} items ({self.invalid:,} invalid lines, not billed)"]
        if self.single_calls:
            lines.append(f"  one call per item            {self.single_calls:,}")
        if self.lookups or self.known_ids:
            lines.append(f"  /userid/ lookups             {self.lookups:,}  ({self.known_ids:,} ids already known)")
        if self.items_known:
            lines.append(f"  pages, counts known          {self.pages_known:,}  (for {self.items_known:,} items)")
        if self.reply_pages:
            lines.append(f"  reply pages (reply_total)    {self.reply_pages:,}  (from the comments CSV)")
        if self.items_unknown:
            lines.append(f"  pages, counts unknown        >= {self.items_unknown:,}  (one page at least per item)")
        bound = "at least " if self.items_unknown else ""
        lines.append(f"expected credits_billed: {bound}{self.credits:,}")
        if self.replies_upto is not None:
            lines.append(f"  replies (--with-replies)     unknown: 0 to about {self.replies_upto:,} more (one request"
                         f" per {LISTS['replies'].max_page_size} replies of each comment that has any); a comments"
                         " CSV tells: `crawler estimate replies comments.csv`")
        lines.extend(self._assumptions())
        return "\n".join(lines)

    def _assumptions(self) -> list[str]:
        """What the figure rests on, and advice that applies to this command."""
        kind = self.list_kind
        if kind is None:
            return ["assumes: one request per item; a missing item is billed too (the API answers it with 200)"]
        out = [f"assumes: {self.page_size} rows per page (--page-size; the most {kind.replace('_', ' ')} pages give)"]
        if kind in COUNTED:
            out.append("  lengths come from profiles fetched before (the data directory); they grow daily")
        if kind in ("followers", "following"):
            out.append(f"  {kind} lists end near {FOLLOW_CAP:,} rows as TikTok's do; a list that goes on costs more")
        if kind in ("posts", "liked", "followers", "following"):
            out.append("  a private account costs one request (the answer saying it is private)")
        if self.max_pages is not None or self.max_items is not None:
            caps = ", ".join(f"{flag} {v}" for flag, v in (("--max-pages", self.max_pages),
                                                            ("--max-items", self.max_items)) if v is not None)
            out.append(f"  each walk stops at {caps}")
        if self.items_unknown:
            if kind in COUNTED:
                credits = f"{self.items_unknown:,} credit{'' if self.items_unknown == 1 else 's'}"
                out.append(f"advice: `crawler profiles` on this input learns the lengths of {kind} lists for"
                           f" {credits}, then this estimate is exact")
            else:
                out.append(f"advice: the API tells no length of {kind.replace('_', ' ')} lists in advance;"
                           " cap them with --max-pages or --max-items to bound the cost")
        return out


def estimate(command: str, input_path: str, limits: JobLimits, data: DataOptions, *, column: str | None = None,
             by_id: bool = False, with_replies: bool = False) -> Estimate:
    """Price a job: de-duplicate its input (on disk) and add up the calls it will make (under `limits`, from what
    `data` knows)."""
    spec = COMMANDS[command]
    job = JobOptions(command=command, input=input_path, output="estimate.csv", column=column, by_id=by_id,
                     with_replies=with_replies)
    lookups = known_ids = pages_known = items_known = unknown = single = invalid = items = 0
    kind = spec.list_kind
    size = walk_size(kind, limits, PageSizes(data.directory))
    users = UserDirectory.reading(Path(data.directory) / "users.db", ttl_days=data.id_ttl_days)
    # A CSV input may tell the lengths itself: a comments CSV each comment's reply_total (replies), a posts CSV
    # each post's comment_count (comments).
    told = _csv_counts(input_path, "reply_total") if kind == "replies" else \
        _csv_counts(input_path, "comment_count") if kind == "comments" else {}
    threads = _threads(input_path, walk_size("replies", limits, PageSizes(data.directory)), limits) \
        if kind == "comments" and with_replies else {}
    told.update((video, n) for video, (n, _) in threads.items())
    reply_pages = untold = 0
    with tempfile.TemporaryDirectory() as tmp:
        seen = StateStore(Path(tmp) / "dedupe.db")
        try:
            entries, _ = input_items(job, spec)
            batch: list[tuple[str, str, str | None, str | None]] = []
            for entry in entries:
                batch.append(entry)
                if len(batch) >= 5000:
                    seen.add_items(batch)
                    batch.clear()
            seen.add_items(batch)
            after = 0
            invalid = seen.progress().failed
            while chunk := seen.pending(after, 5000):
                for seq, key, _raw, _cursor, _rows, _done in chunk:
                    after = seq
                    items += 1
                    if spec.list_kind is None:
                        single += 1
                        continue
                    lookup, pages = item_calls(spec, key, users, size, limits, told)
                    reply_pages += threads[key][1] if key in threads else 0
                    untold += key not in threads
                    lookups += lookup
                    known_ids += spec.input_kind == "users" and not lookup
                    if pages is None:
                        unknown += 1
                    else:
                        pages_known += pages
                        items_known += 1
        finally:
            seen.close()
            users.close()
    # Replies without their counts: each comment with any costs a page; a comments page holds up to `size`.
    upto = (pages_known + unknown) * size if kind == "comments" and with_replies and untold else None
    return Estimate(command, items, invalid, lookups, known_ids, pages_known, items_known, unknown, single,
                    list_kind=kind, page_size=size, max_pages=limits.max_pages, max_items=limits.max_items,
                    replies_upto=upto, reply_pages=reply_pages)


def _threads(path: str, size: int, limits: JobLimits) -> dict[str, tuple[int, int]]:
    """video_id -> (its comments, the pages of their reply walks) from a comments CSV input (comment_id and
    reply_total columns; replies' rows skipped); empty for any other input."""
    if path == "-":
        return {}
    out: dict[str, tuple[int, int]] = {}
    try:
        with open_input(path) as raw:
            reader = csv.DictReader(decode_input(raw))
            if not {"video_id", "comment_id", "reply_total"} <= set(reader.fieldnames or []):
                return {}
            for row in reader:
                if row.get("parent_comment_id"):
                    continue
                video, total = (row.get("video_id") or "").strip(), (row.get("reply_total") or "").strip()
                n, pages = out.get(video, (0, 0))
                walk = walk_pages(int(total), size, limits.max_pages, None) if total.isdigit() and total != "0" else 0
                out[video] = (n + 1, pages + walk)
    except (OSError, UnicodeError, csv.Error):
        return {}
    return out


def item_calls(spec: CommandSpec, key: str, users: UserDirectory, size: int, limits: JobLimits,
               told: dict[str, int] | None = None) -> tuple[int, int | None]:
    """(/userid/ lookups, pages) one item of a walking command costs; pages None: unknown (one at least)."""
    assert spec.list_kind is not None
    lookup = int(spec.input_kind == "users" and not key.startswith("id:") and not users.user_id(key))
    if told and key in told:
        return lookup, walk_pages(told[key], size, limits.max_pages, limits.max_items)
    return lookup, _pages(spec.list_kind, users.counts(key[3:] if key.startswith("id:") else key), size,
                          limits.max_pages, limits.max_items)


def requests_left(spec: CommandSpec, pending: Iterable[tuple[str, int]], users: UserDirectory, size: int,
                  limits: JobLimits) -> int:
    """Requests the pending items of a job still need, as (key, pages walked so far): a walk of known length its
    pages left, any other item one request at least (the live ETA counts from this)."""
    total = 0
    for key, walked in pending:
        if spec.list_kind is None:
            total += 1
            continue
        lookup, pages = item_calls(spec, key, users, size, limits)
        total += max(1, (pages or 1) - walked) + (lookup if not walked else 0)
    return total


def walk_size(kind: str | None, limits: JobLimits, learned: PageSizes | None) -> int:
    """The rows a walk asks per page: --page-size, else a size learned from earlier answers, else the most."""
    if kind is None:
        return 0
    known = learned.get(kind) if learned is not None else None
    return min(limits.page_size or known or LISTS[kind].max_page_size, LISTS[kind].max_page_size)


def _csv_counts(path: str, field: str) -> dict[str, int]:
    """item key -> `field` (a count) from a CSV input with video_id (and comment_id for reply_total); empty for
    anything else (a list of ids, stdin, a CSV without the column)."""
    if path == "-":
        return {}
    try:
        with open_input(path) as raw:
            reader = csv.DictReader(decode_input(raw))
            if "video_id" not in (reader.fieldnames or []) or field not in (reader.fieldnames or []):
                return {}
            out: dict[str, int] = {}
            for row in reader:
                value, video = (row.get(field) or "").strip(), (row.get("video_id") or "").strip()
                if not value.isdigit() or row.get("parent_comment_id"):
                    continue
                key = f"{video}:{(row.get('comment_id') or '').strip()}" if field == "reply_total" else video
                out[key] = int(value)
            return out
    except (OSError, UnicodeError, csv.Error):
        return {}


def walk_pages(n: int, size: int, max_pages: int | None, max_items: int | None) -> int:
    """Pages a walk of `n` rows costs at `size` a page (one at least: the answer that says it is empty)."""
    if max_items is not None:
        n = min(n, max_items)
    pages = max(1, math.ceil(n / size))
    return min(pages, max_pages) if max_pages else pages


def _pages(kind: str, counts: tuple[int | None, int | None, int | None, bool] | None, size: int,
           max_pages: int | None, max_items: int | None) -> int | None:
    """Pages a walk costs, from the counts the data directory knows (None: unknown)."""
    if counts is None:
        return None
    videos, followers, following, private = counts
    if private and kind in ("posts", "liked", "followers", "following"):
        return 1  # one answer saying the account is private
    n = {"posts": videos, "followers": followers, "following": following}.get(kind)
    if n is None:
        return None
    if kind in ("followers", "following"):
        n = min(n, FOLLOW_CAP)
    return walk_pages(n, size, max_pages, max_items)
