"""`crawler estimate`: the expected credits_billed of a job before it runs, from what the data dir knows."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from crawler.api.lists import LISTS
from crawler.api.pagesizes import PageSizes
from crawler.jobs.commands import COMMANDS
from crawler.jobs.inputs import input_items
from crawler.jobs.prepare import JobOptions
from crawler.options import DataOptions, JobLimits
from crawler.stores.local import StateStore
from crawler.stores.users import UserDirectory

FOLLOW_CAP = 5000  # TikTok ends follower/following lists near here
COUNTED = ("posts", "followers", "following")  # lists whose length a profile tells


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

    @property
    def credits(self) -> int:
        """Expected credits (a lower bound when items_unknown > 0)."""
        return self.lookups + self.pages_known + self.items_unknown + self.single_calls

    def render(self) -> str:
        """What to print."""
        lines = [f"estimate for {self.command}: {self.items:,} items ({self.invalid:,} invalid lines, not billed)"]
        if self.single_calls:
            lines.append(f"  one call per item            {self.single_calls:,}")
        if self.lookups or self.known_ids:
            lines.append(f"  /userid/ lookups             {self.lookups:,}  ({self.known_ids:,} ids already known)")
        if self.items_known:
            lines.append(f"  pages, counts known          {self.pages_known:,}  (for {self.items_known:,} items)")
        if self.items_unknown:
            lines.append(f"  pages, counts unknown        >= {self.items_unknown:,}  (one page at least per item)")
        bound = "at least " if self.items_unknown else ""
        lines.append(f"expected credits_billed: {bound}{self.credits:,}")
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
    learned = PageSizes(data.directory)
    kind = spec.list_kind
    # What the walk will ask for: --page-size, else a size learned from earlier answers, else the most it gives.
    size = min(limits.page_size or learned.get(kind) or LISTS[kind].max_page_size,
               LISTS[kind].max_page_size) if kind is not None else 0
    users = UserDirectory(Path(data.directory) / "users.db", ttl_days=data.id_ttl_days)
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
                    if spec.input_kind == "users":
                        if key.startswith("id:") or users.user_id(key):
                            known_ids += 1
                        else:
                            lookups += 1
                    pages = _pages(spec.list_kind, users.counts(key[3:] if key.startswith("id:") else key),
                                   size, limits.max_pages,
                                   limits.max_items)
                    if pages is None:
                        unknown += 1
                    else:
                        pages_known += pages
                        items_known += 1
        finally:
            seen.close()
            users.close()
    return Estimate(command, items, invalid, lookups, known_ids, pages_known, items_known, unknown, single,
                    list_kind=kind, page_size=size, max_pages=limits.max_pages, max_items=limits.max_items)


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
    if max_items is not None:
        n = min(n, max_items)
    pages = max(1, math.ceil(n / size))
    return min(pages, max_pages) if max_pages else pages
