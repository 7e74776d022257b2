"""`crawler doctor`: one call per endpoint family, each answer checked against what the parsers expect.

The client's request budget is the number of calls stated before the first one leaves, so retries and 429s can
never make it spend more: a call the budget cannot pay for is reported as "no answer". The checks themselves are
`crawler.api.shapes`'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from crawler.api.client import Client
from crawler.api.parse import as_bool, as_dict, comment_parser, parse_challenge, parse_post, parse_profile
from crawler.api.records import JsonDict, video_url
from crawler.api.shapes import CORE, FAMILIES, Family, Finding, check
from crawler.config import Secret, Settings
from crawler.errors import BudgetExhausted, ItemFailed, NotFound, PrivateAccount, run_exit_code

SCHEMA_VERSION = 1
HANDFUL = len(CORE)  # the credits doctor spends without --yes: one call per core family
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


def _read(body: JsonDict | None, parse: Callable[[JsonDict], str]) -> str | None:
    """An id the next family needs, read from an answer with the real parser (None: no answer, or unreadable)."""
    if body is None:
        return None
    try:
        return parse(body) or None
    except Exception:  # unreadable: reported with the family that answered it
        return None


def _first(body: JsonDict | None, keys: tuple[str, ...], parse: Callable[[JsonDict], str]) -> str | None:
    """The id of the first readable item of a list answer."""
    items: list[Any] = next((body[k] for k in keys if isinstance(body.get(k), list)), []) if body else []
    return next((i for i in (_read(as_dict(item), parse) for item in items) if i), None)


def _comment_with_replies(body: JsonDict | None) -> str | None:
    """A comment id whose replies to ask for: the first with replies, else the first."""
    items = [as_dict(i) for i in (body or {}).get("comments") or [] if isinstance(i, dict)]
    ordered = sorted(items, key=lambda i: not as_bool(i.get("reply_total")))
    return _first({"comments": ordered}, ("comments",), lambda i: comment_parser(None)(i, "", {}).comment_id)


class _Doctor:
    """One doctor run over an open client: the order of the calls, the ids each takes from an earlier answer, and
    each call's result."""

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
        except ItemFailed as exc:  # retries_exhausted; unexpected_shape (CONTRACT.md's reason) is a changed shape
            shape = exc.reason == "unexpected_shape"
            result = Result(family.name, family.path, UNREADABLE if shape else NO_ANSWER,
                            Finding(unreadable=str(exc) if shape else None),
                            detail="" if shape else f"{exc.reason}: {exc}")
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

    async def step(self, name: str, need: str | None, why: str,
                   params: Callable[[str], Mapping[str, str | int]]) -> JsonDict | None:
        """Ask ``name`` with the id it needs, or record it as skipped (``why``) when an earlier answer gave none."""
        if need is None:
            self.skip(name, why)
            return None
        return await self.ask(FAMILIES[name], params(need))

    async def core(self, handle: str, video_id: str | None) -> tuple[str | None, str | None, JsonDict | None,
                                                                       JsonDict | None]:
        """profile, posts, followers, post-detail, comments: (user id, video id, detail, comments)."""
        user_id = _read(await self.ask(FAMILIES["profile"], {"username": handle}), lambda b: parse_profile(b).user_id)
        no_user = f"no user id from the profile of {handle!r} (give a public --handle)"
        posts = await self.step("posts", user_id, no_user, lambda u: {"userid": u, "count": 10, "cursor": 0})
        await self.step("followers", user_id, no_user, lambda u: {"userid": u, "count": 50, "time": 0})
        video = video_id or _first(posts, ("videos",), lambda i: parse_post(i, "").video_id)
        no_post = "no post to check: the user has none readable (give --video URL)"
        detail = await self.step("post-detail", video, no_post, lambda v: {"url": video_url(v)})
        comments = await self.step("comments", video, no_post,
                                   lambda v: {"url": video_url(v), "count": 10, "cursor": 0})
        return user_id, video, detail, comments

    async def more(self, handle: str, user_id: str | None, video: str | None, detail: JsonDict | None,
                   comments: JsonDict | None) -> None:
        """The other families (``--all``): lists of the user, replies, searches for the handle, music, challenge."""
        no_user = f"no user id from the profile of {handle!r} (give a public --handle)"
        await self.step("following", user_id, no_user, lambda u: {"userid": u, "count": 50, "time": 0})
        await self.step("liked", user_id, no_user, lambda u: {"userid": u, "count": 10, "cursor": 0})
        comment = _comment_with_replies(comments) if video else None
        await self.step("replies", comment, "no comment to ask the replies of",
                        lambda c: {"video_id": video or "", "comment_id": c, "count": 10, "cursor": 0})
        search: dict[str, str | int] = {"keyword": handle, "count": 10, "cursor": 0}
        await self.step("search-videos", handle, "", lambda k: {**search, "publish_time": 0, "sort_by": 0})
        await self.step("search-users", handle, "", lambda k: search)
        found = await self.step("search-challenges", handle, "", lambda k: search)
        music = _read(detail, lambda b: parse_post(b, "").music_id)
        no_music = "no sound id from the post's detail"
        await self.step("music-info", music, no_music, lambda m: {"music_id": m})
        await self.step("music-posts", music, no_music, lambda m: {"music_id": m, "count": 10, "cursor": 0})
        challenge = _first(found, ("challenge_list",), lambda i: parse_challenge(i, "").challenge_id)
        no_challenge = f"no hashtag found searching {handle!r}"
        await self.step("challenge-info", challenge, no_challenge, lambda c: {"id": c})
        await self.step("challenge-posts", challenge, no_challenge,
                        lambda c: {"challenge_id": c, "count": 10, "cursor": 0})


def credits_of(every: bool) -> int:
    """The credits a doctor run states and never exceeds: one per family it checks."""
    return len(FAMILIES) if every else len(CORE)


async def run_doctor(settings: Settings, key: Secret, *, handle: str, video_id: str | None,
                     every: bool = False) -> Report:
    """Check the `CORE` families (``every``: all `FAMILIES`) with one call each; never more requests than stated."""
    budget = credits_of(every)
    if settings.max_credits is not None:
        budget = min(budget, settings.max_credits)
    # One retry per call at most: a flaky family should not take every other family's credit.
    settings = settings.replace(retry_attempts=min(settings.retry_attempts, 2))
    async with Client(settings, api_key=key, request_budget=budget) as client:
        plan = _Doctor(client)
        found = await plan.core(handle, video_id)
        if every:
            await plan.more(handle, *found)
        c = client.counters
        return Report(tuple(plan.results), budget, c.requests_sent, c.credits_billed)


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
