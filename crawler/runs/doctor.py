"""`crawler doctor`: one call per endpoint family, each answer checked against what the parsers expect.

The client's request budget is the number of calls stated before the first one leaves, so retries and 429s can
never make it spend more: a call the budget cannot pay for is reported as "no answer". The checks themselves are
`crawler.api.shapes`'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from crawler.api.client import Client
from crawler.api.parse import parse_post, parse_profile
from crawler.api.records import JsonDict, video_url
from crawler.api.shapes import FAMILIES, Family, Finding, check
from crawler.config import Secret, Settings
from crawler.errors import BudgetExhausted, ItemFailed, NotFound, PrivateAccount, run_exit_code

SCHEMA_VERSION = 1
HANDFUL = len(FAMILIES)  # the credits doctor states and spends by default: one call per family
OK, NEW, MISSING, UNREADABLE = "ok", "fields new", "fields missing", "unreadable"
ERROR, NO_ANSWER, SKIPPED = "error", "no answer", "skipped"
CHANGED = frozenset({MISSING, UNREADABLE})  # a shape changed: exit 1
UNCHECKED = frozenset({ERROR, NO_ANSWER, SKIPPED})  # nothing to check: exit 3 (as items that failed)


@dataclass(frozen=True, slots=True)
class Result:
    """What doctor found for one endpoint family."""

    family: str
    endpoint: str
    status: str
    finding: Finding = field(default_factory=Finding)
    detail: str = ""  # the error, or why the family was skipped
    latency_ms: float | None = None
    rate_headers: Mapping[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        f = self.finding
        return {"family": self.family, "endpoint": self.endpoint, "status": self.status,
                "missing": list(f.missing), "missing_required": list(f.missing_required),
                "absent_optional": list(f.absent_optional), "new": list(f.new), "unreadable": f.unreadable,
                "items": f.items, "records": f.records, "notes": list(f.notes), "detail": self.detail or None,
                "latency_ms": self.latency_ms, "rate_headers": dict(self.rate_headers)}


@dataclass(frozen=True, slots=True)
class Report:
    """Every family's result and what the check spent."""

    results: tuple[Result, ...]
    credits_stated: int
    requests_sent: int
    credits_billed: int

    @property
    def exit_code(self) -> int:
        """0 every answer as expected (new fields included), 1 a shape changed, 3 a family could not be checked."""
        statuses = {r.status for r in self.results}
        if statuses & CHANGED:
            return 1
        return run_exit_code(None, failed=bool(statuses & UNCHECKED))

    def as_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "exit_code": self.exit_code, "credits_stated": self.credits_stated,
                "requests_sent": self.requests_sent, "credits_billed": self.credits_billed,
                "endpoints": [r.as_json() for r in self.results]}


def status_of(finding: Finding) -> str:
    if finding.unreadable is not None:
        return UNREADABLE
    if finding.missing:
        return MISSING
    return NEW if finding.new else OK


class _Doctor:
    """One doctor run over an open client."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.results: list[Result] = []

    async def ask(self, family: Family, params: Mapping[str, str | int]) -> JsonDict | None:
        """One call of ``family``; its result recorded; the body when it is worth reading further."""
        before = self.client.last_answer
        body: JsonDict | None = None
        spent = Result(family.name, family.path, NO_ANSWER,
                       detail="the credits stated are spent (retries took them); nothing more was sent")
        budget = self.client.request_budget
        if budget is not None and self.client.counters.requests_sent >= budget:
            self.results.append(spent)  # not even a wait for the API: nothing can be sent
            return None
        try:
            body = await self.client.get(family.path, params)
        except BudgetExhausted:
            result = spent
        except (NotFound, PrivateAccount) as exc:
            result = Result(family.name, family.path, ERROR, detail=f"{exc.reason}: {exc}")
        except ItemFailed as exc:
            result = Result(family.name, family.path, NO_ANSWER, detail=f"{exc.reason}: {exc}")
        else:
            finding = check(family, body, params)
            result = Result(family.name, family.path, status_of(finding), finding)
        answered = self.client.last_answer
        if answered is not None and answered is not before:
            result = dataclasses.replace(result, latency_ms=round(answered.seconds * 1000, 1),
                                         rate_headers=dict(answered.rate_headers))
        self.results.append(result)
        return body if result.status not in UNCHECKED else None

    def skip(self, name: str, why: str) -> None:
        family = FAMILIES[name]
        self.results.append(Result(family.name, family.path, SKIPPED, detail=why))


def _user_id(body: JsonDict | None) -> str | None:
    if body is None:
        return None
    try:
        return parse_profile(body).user_id or None
    except Exception:  # unreadable: reported with the profile
        return None


def _first_post(body: JsonDict | None) -> str | None:
    if body is None:
        return None
    items = body.get("videos")
    for item in items if isinstance(items, list) else []:
        try:
            return parse_post(item, "").video_id
        except Exception:  # an item without an id is reported with the list
            continue
    return None


async def run_doctor(settings: Settings, key: Secret, *, handle: str, video_id: str | None) -> Report:
    """Check every family in `FAMILIES` with one call each; never more requests than `HANDFUL`."""
    budget = HANDFUL if settings.max_credits is None else min(HANDFUL, settings.max_credits)
    # One retry per call at most: a flaky family should not take every other family's credit.
    settings = settings.replace(retry_attempts=min(settings.retry_attempts, 2))
    async with Client(settings, api_key=key, request_budget=budget) as client:
        d = _Doctor(client)
        user_id = _user_id(await d.ask(FAMILIES["profile"], {"username": handle}))
        posts: JsonDict | None = None
        if user_id is None:
            why = f"no user id from the profile of {handle!r}"
            d.skip("posts", why)
            d.skip("followers", why)
        else:
            posts = await d.ask(FAMILIES["posts"], {"userid": user_id, "count": 10, "cursor": 0})
            await d.ask(FAMILIES["followers"], {"userid": user_id, "count": 50, "time": 0})
        video = video_id or _first_post(posts)
        if video is None:
            why = "no post to check: the user has none readable (give --video URL)"
            d.skip("post-detail", why)
            d.skip("comments", why)
        else:
            await d.ask(FAMILIES["post-detail"], {"url": video_url(video)})
            await d.ask(FAMILIES["comments"], {"url": video_url(video), "count": 10, "cursor": 0})
        c = client.counters
        return Report(tuple(d.results), budget, c.requests_sent, c.credits_billed)


def render_text(report: Report) -> list[str]:
    """The report as lines for a terminal: one line per endpoint, then what it found."""
    lines = [f"{'endpoint':<24} {'status':<15} {'ms':>7}  detail"]
    for r in report.results:
        f = r.finding
        parts: list[str] = []
        if f.missing:
            parts.append("missing: " + ", ".join(p + (" (required)" if p in f.missing_required else "")
                                                  for p in f.missing))
        if f.unreadable:
            parts.append(f"the parser cannot read it: {f.unreadable}")
        if f.new:
            parts.append("new: " + ", ".join(f.new))
        parts += list(f.notes)
        if r.detail:
            parts.append(r.detail)
        if r.rate_headers:
            parts.append("headers: " + ", ".join(f"{k}={v}" for k, v in sorted(r.rate_headers.items())))
        ms = "-" if r.latency_ms is None else f"{r.latency_ms:.0f}"
        lines.append(f"{r.endpoint:<24} {r.status:<15} {ms:>7}  {'; '.join(parts)}".rstrip())
    if not any(r.rate_headers for r in report.results):
        lines.append("rate headers: none seen (X-RateLimit-*, Retry-After)")
    verdict = {0: "every answer reads as the parsers expect", 1: "the API's answers changed shape: see above",
               3: "some endpoints could not be checked: see above"}[report.exit_code]
    lines.append(f"{verdict} ({report.requests_sent} requests sent, {report.credits_billed} billed,"
                 f" {report.credits_stated} stated)")
    return lines
