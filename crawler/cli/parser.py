"""The command line: one command per job; errors become one line and CONTRACT.md's exit code."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crawler import __version__
from crawler.api.client import Counters
from crawler.config import FLAG_NAMES, Secret, Settings, api_key, load_settings, masked
from crawler.engine.outcome import Outcome
from crawler.errors import BudgetExhausted, CrawlerError, Interrupted, UsageError, disk_error
from crawler.jobs.commands import COMMANDS
from crawler.jobs.prepare import JobOptions, failures_path, finished, state_path
from crawler.runs.local import Crawl, run_job
from crawler.sinks.csv_sink import part_path

log = logging.getLogger("crawler")

PUBLISH_TIME = (0, 1, 7, 30, 90, 180)
# TikLiveAPI's paths as its vendor client and third-party clients call them, for `get` to check a name.
API_PATHS = (
    "userid", "userinfo-by-username", "userinfo-by-id", "user-posts", "user-liked", "user-followers",
    "user-following", "user-stories", "user-playlists", "user-collections", "search-user", "search-video",
    "search-challenge", "post-detail", "post-comments", "post-comment-replies", "music-info", "music-posts",
    "challenge-info-id", "challenge-info-name", "challenge-posts", "playlist-info", "playlist-posts",
    "collection-info", "collection-posts", "download-video", "download-music", "region-list", "ads-detail",
)
SORT_BY = {"relevance": 0, "likes": 1, "date": 2, "0": 0, "1": 1, "2": 2}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str) -> Any:
        where = self.prog.removeprefix("crawler").strip()
        raise UsageError(f"{where + ': ' if where else ''}{message} (see --help)")


ROW_FLAGS = frozenset({"--page-size", "--max-pages", "--max-items", "--bom", "--raw"})  # what shapes CSV rows


def _settings_flags(p: argparse.ArgumentParser, omit: frozenset[str] = frozenset()) -> None:
    """The settings flags; ``omit`` leaves out those that mean nothing to the command (its --help stays true)."""
    g = p.add_argument_group("settings (override config.toml; see the Settings section of README.md)")

    def add(*names: str, **kw: Any) -> None:
        if not omit.intersection(names):
            g.add_argument(*names, **kw)

    add("--config", help="config file (default: $CRAWLER_CONFIG or ./config.toml)")
    add("--base-url", dest="api.base_url", metavar="URL")
    add("--rate", dest="rate.limit", metavar="N", help="requests per rolling window (default 200)")
    add("--window", dest="rate.window", metavar="SECONDS", help="rolling window (default 60)")
    add("--burst", dest="rate.burst", metavar="N")
    add("--max-per-second", dest="rate.max_per_second", metavar="N")
    add("--rate-shared", dest="rate.shared", metavar="local|off|redis://HOST:PORT/DB",
        help="where the key's rate budget is shared (default local: every process of this user)")
    add("--parallelism", dest="crawl.parallelism", metavar="N|auto")
    add("--page-size", dest="crawl.page_size", metavar="N")
    add("--max-pages", dest="crawl.max_pages", metavar="N", help="pages per item walk")
    add("--max-items", dest="crawl.max_items", metavar="N", help="rows per input item")
    add("--max-credits", dest="crawl.max_credits", metavar="N", help="requests for the whole job")
    add("--data-dir", dest="crawl.data_dir", metavar="DIR")
    add("--retries", dest="retry.attempts", metavar="N")
    add("--bom", dest="output.bom", action="store_const", const=True, help="write a UTF-8 BOM")
    add("--raw", dest="output.raw", action="store_const", const=True,
        help="keep formula-like cells as they are")
    add("-q", "--quiet", action="store_true", help="no progress and no summary")
    add("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")


def _report_flags(p: argparse.ArgumentParser) -> None:
    """--metrics-file and --summary-json (job commands and ingest): what a scheduler reads after the run."""
    g = p.add_argument_group("reports for schedulers (written at every end but exit 2)")
    g.add_argument("--metrics-file", dest="output.metrics_file", metavar="PATH.prom",
                   help="Prometheus text format for node_exporter's textfile collector (config output.metrics_file)")
    g.add_argument("--summary-json", dest="output.summary_json", metavar="PATH",
                   help="the end-of-run summary as JSON, with exit_code (config output.summary_json)")


def _reports(settings: Settings, command: str) -> Any:
    """The metrics file and summary JSON of this run (see crawler.engine.metrics.run_reports); their directories are
    checked now, before anything (a region lookup) is spent."""
    from crawler.engine.metrics import check_report_paths, run_reports

    check_report_paths(settings.metrics_file, settings.summary_json)
    return run_reports(command, metrics_file=settings.metrics_file, summary_json=settings.summary_json)


def _retry_choice(value: str) -> str:
    if value != "all":
        raise argparse.ArgumentTypeError(f"--retry-failed={value}: the only value is 'all'")
    return value


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from config.toml, the environment and this command's flags."""
    flags = {key: getattr(args, key) for key in FLAG_NAMES if hasattr(args, key)}
    return load_settings(config_file=getattr(args, "config", None), flags=flags)


def _job_parser(sub: Any, name: str, help_text: str, input_help: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("input", metavar="INPUT" if COMMANDS[name].input_kind != "keyword" else "KEYWORD",
                   help=input_help)
    p.add_argument("-o", "--output", help=f"output CSV (default: {name}.csv)")
    p.add_argument("--restart", action="store_true", help="forget this job's progress and start over")
    p.add_argument("--retry-failed", nargs="?", const=True, default=False, type=_retry_choice, metavar="all",
                   help="try again the items that failed for a reason that can change (retries_exhausted, budget);"
                   " --retry-failed=all also not_found and private")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output this tool did not write (or the input file itself)")
    p.add_argument("--jobs-url", dest="jobs.url", metavar="URL",
                   help="postgresql://...: the job in PostgreSQL, worked by this and any `crawler work` process")
    if COMMANDS[name].input_kind != "keyword":
        p.add_argument("--column", help="read the input as CSV and take this column")
    if COMMANDS[name].input_kind == "users":
        p.add_argument("--by-id", action="store_true", help="input lines are numeric user ids")
    _settings_flags(p)
    _report_flags(p)
    p.set_defaults(func=cmd_job, command=name)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = _Parser(prog="crawler", description="Crawl TikLiveAPI into CSV at the full paid rate, resumably.")
    parser.add_argument("--version", action="version", version=f"crawler {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    users = "file of handles (@name, name, profile URL, id:NNN), one per line, or - for stdin"
    posts = "file of video URLs or numeric video ids, or - for stdin"
    _job_parser(sub, "profiles", "profile of each handle", users)
    _job_parser(sub, "posts", "every post of each handle", users)
    _job_parser(sub, "liked", "posts each handle liked", users)
    _job_parser(sub, "followers", "followers of each handle (TikTok ends lists near 5,000)", users)
    _job_parser(sub, "following", "accounts each handle follows", users)
    _job_parser(sub, "post-details", "details of each post", posts)
    c = _job_parser(sub, "comments", "comments of each post", posts)
    c.add_argument("--with-replies", action="store_true", help="also fetch the replies of every comment")
    _job_parser(sub, "replies", "replies to comments", "CSV with video_id and comment_id columns (a comments CSV)")
    v = _job_parser(sub, "search-videos", "videos matching a keyword", "the search keyword")
    v.add_argument("--publish-time", type=int, default=0, help="0 all, 1 day, 7 week, 30, 90, 180 days")
    v.add_argument("--sort-by", default="relevance", help="relevance, likes or date")
    v.add_argument("--region", help="two-letter region code (checked against `crawler regions`)")
    _job_parser(sub, "search-users", "users matching a keyword", "the search keyword")
    _job_parser(sub, "search-challenges", "hashtags matching a keyword", "the search keyword")
    _job_parser(sub, "music-posts", "posts using each sound", "file of numeric music ids")
    _job_parser(sub, "challenge-posts", "posts under each hashtag", "file of challenge ids or hashtag names")
    _job_parser(sub, "music-info", "metadata of each sound", "file of numeric music ids")
    _job_parser(sub, "challenge-info", "metadata of each hashtag", "file of challenge ids or hashtag names")

    i = sub.add_parser("ingest", help="the daily job: profiles of a watch list (+ new posts) and their history",
                       description="Covers today (UTC): every watch-list user without a snapshot today, plus posts"
                       " walks earlier runs cut short. Each profile goes to DIR/profiles-DAY.csv and the history"
                       " store under the UTC day it was fetched; with --posts, posts first stored on DAY go to"
                       " DIR/posts-DAY.csv. A missed night is a gap, never filled with another day's data.")
    i.add_argument("input", metavar="INPUT", help="file of handles (or id:NNN), one per line, or - for stdin")
    i.add_argument("--out-dir", required=True, metavar="DIR")
    i.add_argument("--date", metavar="YYYY-MM-DD", help="record everything under this day instead of the UTC fetch"
                   " day (tests, deliberate backfills; `history days` marks it)")
    i.add_argument("--posts", action="store_true", help="also walk each user's posts down to what is stored"
                   " (--max-items N: only the newest N; --max-pages: pages per user and night)")
    i.add_argument("--restart", action="store_true", help="refetch today's users, replacing today's snapshots")
    i.add_argument("--retry-failed", nargs="?", const=True, default=False, type=_retry_choice, metavar="all",
                   help="try today's failed users again (retries_exhausted, budget); =all also not_found and"
                   " private")
    i.add_argument("--column")
    i.add_argument("--by-id", action="store_true")
    i.add_argument("--history-url", dest="history.url", metavar="URL", help="postgresql://... (default: SQLite)")
    _settings_flags(i)
    _report_flags(i)
    i.set_defaults(func=cmd_ingest)

    h = sub.add_parser("history", help="follower growth and other queries over the snapshots")
    hs = h.add_subparsers(title="queries", metavar="QUERY", parser_class=_Parser)
    g1 = hs.add_parser("growth", help="day, followers and delta for one handle")
    g1.add_argument("handle")
    g1.add_argument("--since", metavar="YYYY-MM-DD")
    g1.add_argument("--until", metavar="YYYY-MM-DD")
    g2 = hs.add_parser("top", help="users ranked by what they gained")
    g2.add_argument("--by", default="followers-gained",
                    help="followers-gained (default), hearts-gained, videos-gained, following-gained")
    g2.add_argument("--days", type=int, default=7)
    g2.add_argument("--limit", type=int, default=20)
    g3 = hs.add_parser("as-of", help="every profile as it stood on a day")
    g3.add_argument("date", metavar="YYYY-MM-DD")
    g4 = hs.add_parser("export", help="every snapshot to a CSV")
    g4.add_argument("-o", "--output", required=True, metavar="FILE.csv")
    g5 = hs.add_parser("plot", help="follower curves of some handles to a PNG")
    g5.add_argument("handles", nargs="+", metavar="HANDLE")
    g5.add_argument("-o", "--output", required=True, metavar="FILE.png")
    g5.add_argument("--since", metavar="YYYY-MM-DD")
    g5.add_argument("--until", metavar="YYYY-MM-DD")
    g5.add_argument("--style", choices=("small", "indexed"), default="small",
                    help="small: one panel per handle, each on its own scale (default); indexed: one panel,"
                    " every curve as 100 x followers / its first value")
    g6 = hs.add_parser("serve", help="the history as a local web page (read-only)",
                       description="Overview, a page per user, CSV and compare over the history store, opened"
                       " read-only. Binds to 127.0.0.1 by default: the page has no login.")
    g6.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g6.add_argument("--port", type=int, default=8050, help="port (default 8050; 0 picks a free one)")
    g7 = hs.add_parser("days", help="per day: users snapshotted and missing, credits, how the runs ended, gaps")
    for q, name in ((g1, "growth"), (g2, "top"), (g3, "as-of"), (g4, "export"), (g5, "plot"), (g6, "serve"),
                    (g7, "days")):
        q.add_argument("--history-url", dest="history.url", metavar="URL")
        q.add_argument("--config")
        q.add_argument("--data-dir", dest="crawl.data_dir", metavar="DIR")
        q.set_defaults(func=cmd_history, query=name)

    e = sub.add_parser("estimate", help="expected credits of a job, before running it")
    e.add_argument("job", metavar="COMMAND", choices=sorted(COMMANDS))
    e.add_argument("input", metavar="INPUT")
    e.add_argument("--column")
    e.add_argument("--by-id", action="store_true")
    e.add_argument("--with-replies", action="store_true")
    _settings_flags(e)
    e.set_defaults(func=cmd_estimate)

    s = sub.add_parser("status", help="progress, failures and credits of a job")
    s.add_argument("output", metavar="OUT.csv")
    s.set_defaults(func=cmd_status)

    b = sub.add_parser("budget", help="the key's rate budget: starts in the last window, processes, cooldown"
                       " (sends no request)")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.add_argument("--config")
    b.add_argument("--base-url", dest="api.base_url", metavar="URL")
    b.add_argument("--rate-shared", dest="rate.shared", metavar="local|off|redis://HOST:PORT/DB")
    b.add_argument("--window", dest="rate.window", metavar="SECONDS")
    b.add_argument("--rate", dest="rate.limit", metavar="N")
    b.set_defaults(func=cmd_budget)

    g = sub.add_parser("get", help="print the raw JSON of one API call (costs one credit)")
    g.add_argument("endpoint", help="e.g. userinfo-by-username")
    g.add_argument("params", nargs="*", metavar="key=value")
    _settings_flags(g)
    g.set_defaults(func=cmd_get)

    r = sub.add_parser("regions", help="region codes for search-videos --region (one credit, then cached)")
    _settings_flags(r)
    r.set_defaults(func=cmd_regions)

    from crawler.runs.download import WHATS

    d = sub.add_parser("download", help="media files of posts into a directory, resumably (no credits from a CSV)",
                       description="Files DIR/<video_id>.<ext> (photo posts: DIR/<video_id>/<n>.jpg) from a posts or"
                       " post-details CSV (its URL columns; no credits) or from video URLs/ids (one /post-detail/"
                       " credit each). Expired URLs are renewed once through /post-detail/ (one credit each).")
    d.add_argument("input", metavar="INPUT", help="a posts/post-details CSV, or video URLs or ids one per line, or -")
    d.add_argument("-o", "--output", required=True, metavar="DIR")
    d.add_argument("--what", choices=WHATS, default="hd",
                   help="hd (default; falls back to video), video, watermarked, cover, music or images")
    d.add_argument("--restart", action="store_true", help="forget this job's progress (complete files are kept)")
    d.add_argument("--retry-failed", action="store_true", help="try the failed posts again")
    _settings_flags(d, omit=ROW_FLAGS)
    d.set_defaults(func=cmd_download)

    # PostgreSQL jobs (jobs.url): workers, the list of jobs, a finished job's output.
    w = sub.add_parser("work", help="join open PostgreSQL jobs as a worker (jobs.url)",
                       description="Take items of open jobs in jobs.url and work them with this host's key and"
                       " settings; without --until-idle, wait for new jobs (a service).")
    w.add_argument("--job", metavar="ID", help="only this job (its id, as the starter printed it)")
    w.add_argument("--until-idle", action="store_true", help="exit when no item of any open job is left")
    w.add_argument("--jobs-url", dest="jobs.url", metavar="URL")
    _settings_flags(w)
    w.set_defaults(func=cmd_work)
    j = sub.add_parser("jobs", help="PostgreSQL jobs: id, progress, failures, credits, workers")
    j.add_argument("--jobs-url", dest="jobs.url", metavar="URL")
    j.add_argument("--json", action="store_true", help="print JSON")
    j.add_argument("--config")
    j.set_defaults(func=cmd_jobs)
    x = sub.add_parser("export", help="a finished PostgreSQL job's output (byte for byte the starter's)")
    x.add_argument("job", metavar="JOB")
    x.add_argument("-o", "--output", required=True, metavar="OUT.csv")
    x.add_argument("--jobs-url", dest="jobs.url", metavar="URL")
    x.add_argument("--bom", dest="output.bom", action="store_const", const=True)
    x.add_argument("--raw", dest="output.raw", action="store_const", const=True)
    x.add_argument("--overwrite", action="store_true", help="replace an existing OUT.csv")
    x.add_argument("--config")
    x.set_defaults(func=cmd_export)

    # Listed for --help only: main() hands `crawler sim ...` to the simulator's own parser.
    sub.add_parser("sim", help="run the local API simulator (crawler sim --help)", add_help=False)
    return parser


def _logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _resume_hint(argv: Sequence[str], *, max_credits: int | None = None, retry_failed: bool = False) -> str:
    """The command that goes on from here: the same one without --restart/--retry-failed, with a new
    --max-credits (replacing the flag, or added when the cap came from config.toml), or with --retry-failed."""
    words: list[str] = []
    pending: str | None = None  # the flag just dropped, whose value may follow
    for w in argv:
        flag, pending = pending, None
        if flag == "--max-credits" or (flag == "--retry-failed" and w == "all"):
            continue  # the dropped flag's value
        if w in ("--retry-failed", "--restart") or (max_credits is not None and w == "--max-credits"):
            pending = w
        elif not w.startswith("--retry-failed=") and (max_credits is None or not w.startswith("--max-credits=")):
            words.append(w)
    if max_credits is not None:
        words += ["--max-credits", str(max_credits)]
    if retry_failed:
        words.append("--retry-failed")
    # A database URL may carry a password: never echo it into logs.
    return "crawler " + masked(shlex.join(words))


def check_ledger(settings: Settings, key: Secret) -> None:
    """Open and close the key's rate ledger once: unreachable or disagreeing is exit 2 before anything starts."""
    from crawler.api.client import check_base_url
    from crawler.rate.ledger import open_ledger
    from crawler.rate.pacing import Pace

    if not settings.rate_enabled:
        return
    base = check_base_url(settings.base_url, allow_insecure_http=settings.allow_insecure_http)
    ledger = open_ledger(settings.rate_shared, key.reveal(), base)
    rules = Pace.from_settings(settings).rules

    async def check() -> None:
        await ledger.open(rules)
        await ledger.aclose()

    asyncio.run(check())


def cmd_job(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run (or resume) one crawl job."""
    settings = settings_from(args)
    reports = _reports(settings, args.command)
    key = api_key()
    check_ledger(settings, key)
    name = args.command
    search, lookup = _search_options(args, settings, key)
    job = JobOptions(
        command=name,
        input=args.input,
        output=args.output or f"{name}.csv",
        column=getattr(args, "column", None),
        by_id=getattr(args, "by_id", False),
        with_replies=getattr(args, "with_replies", False),
        max_items=settings.max_items,
        max_pages=settings.max_pages,
        page_size=settings.page_size,
        **search,
    )
    if not job.output.endswith(".csv"):
        raise UsageError(f"--output {job.output}: the output must be a .csv file")
    if settings.jobs_url:
        from crawler.runs.distributed import start_job

        with reports as report:  # the job-level figures from PostgreSQL
            outcome = asyncio.run(start_job(job, settings, api_key=key, url=settings.jobs_url,
                                            restart=args.restart, retry_failed=args.retry_failed,
                                            overwrite=args.overwrite, quiet=args.quiet, earlier=lookup))
            report.done(outcome.exit_code, [outcome.summary])
        _report(outcome, args.quiet, argv, max_credits=settings.max_credits)
        return outcome.exit_code
    crawl = Crawl(job, settings, api_key=key, restart=args.restart, retry_failed=args.retry_failed,
                  overwrite=args.overwrite, quiet=args.quiet, earlier=lookup)
    with reports as report:
        outcome = asyncio.run(run_job(crawl))
        report.done(outcome.exit_code, [outcome.summary])
    _report(outcome, args.quiet, argv, max_credits=settings.max_credits)
    return outcome.exit_code


def _search_options(args: argparse.Namespace, settings: Settings, key: Any
                    ) -> tuple[dict[str, Any], Counters | None]:
    """The job options of `search-videos`, and the counters of the region lookup made to check --region (None
    when the region list was cached): the job counts that request as its own, under --max-credits."""
    if args.command != "search-videos":
        return {}, None
    if args.publish_time not in PUBLISH_TIME:
        raise UsageError(f"--publish-time {args.publish_time}: use one of {', '.join(map(str, PUBLISH_TIME))}")
    sort = SORT_BY.get(str(args.sort_by).lower())
    if sort is None:
        raise UsageError(f"--sort-by {args.sort_by}: use relevance, likes or date")
    region = args.region.upper() if args.region else None
    lookup = None
    if region:
        found, lookup = _fetch_regions(settings, key)
        if region not in {r[0] for r in found}:
            raise UsageError(f"--region {args.region}: not a region the API knows (see `crawler regions`)")
    return {"publish_time": args.publish_time, "sort_by": sort, "region": region}, lookup


def _report(outcome: Outcome, quiet: bool, argv: Sequence[str], *, max_credits: int | None = None) -> None:
    """The summary, then one line saying why the run ended that way and the command that goes on.

    ``max_credits``: the job's cap (job commands only), so a budget stop prints a command with a higher one
    (the same command would stop again at once).
    """
    if not quiet:
        print(outcome.summary.render(), file=sys.stderr)
    err = outcome.error
    if err is None:
        if outcome.summary.items_failed:
            print(f"crawler: {outcome.summary.items_failed:,} items failed; see {outcome.summary.failures_file}"
                  f"{_failure_hint(outcome.summary.failures, argv)}", file=sys.stderr)
        return
    if isinstance(err, BudgetExhausted) and max_credits is not None:
        print(_budget_line(max_credits, outcome.summary.requests_sent, outcome.summary.credits_billed, argv),
              file=sys.stderr)
        return
    resumable = isinstance(err, Interrupted) or err.exit_code == 4 or getattr(err, "resumable", False)
    hint = f"; resume with: {_resume_hint(argv)}" if resumable else ""
    print(f"crawler: {err}{hint}", file=sys.stderr)


def _budget_line(max_credits: int, spent: int, billed: int, argv: Sequence[str]) -> str:
    """A job's --max-credits stop: the same command would stop again at once, so print one with a higher cap."""
    raised = max(spent, max_credits) + max(max_credits, 1)
    return (f"crawler: --max-credits {max_credits:,} reached (the job has sent {spent:,} requests, {billed:,}"
            f" billed); to go on, raise the cap: {_resume_hint(argv, max_credits=raised)}")


def _failure_hint(failures: dict[str, int], argv: Sequence[str]) -> str:
    """What can be done about these failures, only what applies (a command to run comes last)."""
    from crawler.stores.local import RETRIABLE

    hints = []
    if failures.get("invalid_input"):
        hints.append("fix the invalid lines in the input and run the same command: only they are fetched")
    if any(failures.get(r) for r in RETRIABLE):
        hints.append(f"to try the {'/'.join(r for r in RETRIABLE if failures.get(r))} ones again: "
                     f"{_resume_hint(argv, retry_failed=True)}")
    return f"; {'; '.join(hints)}" if hints else ""


def _regions(settings: Settings, key: Any) -> list[tuple[str, str]]:
    """Region codes, cached in the data directory after the first (one-credit) call."""
    return _fetch_regions(settings, key)[0]


def _fetch_regions(settings: Settings, key: Any) -> tuple[list[tuple[str, str]], Counters | None]:
    """Region codes (cached in the data directory after the first, one-credit, call) and the counters of the client
    that fetched them (None when cached)."""
    cache = Path(settings.data_dir) / "regions.json"
    if cache.is_file():
        return [(str(r[0]), str(r[1])) for r in json.loads(cache.read_text())], None
    from crawler.api.client import Client

    async def fetch() -> tuple[list[tuple[str, str]], Counters]:
        async with Client(settings, api_key=key, request_budget=settings.max_credits) as client:
            return [(r.code, r.name) for r in await client.regions()], client.counters

    print("crawler: fetching the region list (1 credit, cached afterwards)", file=sys.stderr)
    found, counters = asyncio.run(fetch())
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(found))
    return found, counters


def cmd_regions(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Print the region codes."""
    for code, name in _regions(settings_from(args), api_key()):
        print(f"{code}\t{name}")
    return 0


def cmd_get(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Print the raw JSON of one call."""
    from crawler.api.client import Client

    name = args.endpoint.strip().strip("/")
    if name not in API_PATHS:
        close = difflib.get_close_matches(name, API_PATHS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"get: {args.endpoint!r} is not a known API endpoint ({hint}known: {', '.join(API_PATHS)})")
    params: dict[str, str | int] = {}
    for pair in args.params:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"get: {pair!r} is not key=value")
        params[name] = value
    settings = settings_from(args).replace(retry_attempts=1)
    key = api_key()

    async def call() -> Any:
        async with Client(settings, api_key=key, request_budget=settings.max_credits) as client:
            return await client.get(args.endpoint, params)

    print(f"crawler: GET /{args.endpoint.strip('/')}/ (1 credit)", file=sys.stderr)
    print(json.dumps(asyncio.run(call()), indent=2, ensure_ascii=False))
    return 0


def cmd_status(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Show a job's progress, failures and credits."""
    from crawler.stores.local import StateStore

    out = Path(args.output)
    if out.name.endswith(".csv.part"):  # the path a stopped run's summary printed
        out = out.with_name(out.name.removesuffix(".part"))
    path = state_path(out)
    if not path.is_file():
        raise UsageError(f"no job state for {out} (expected {path}); was the job started with -o {out}?")
    store = StateStore(path)
    try:
        job = store.job()
        if job is None:
            raise UsageError(f"{path} holds no job")
        p = store.progress()
        fails = store.failure_counts()
        complete = finished(store, out)
    finally:
        store.close()
    where = out if complete else part_path(out)
    print(f"job             {job.command} -> {where} ({'complete' if complete else 'unfinished'})")
    print(f"items           {p.done:,} done, {p.failed:,} failed, {p.pending:,} pending of {p.total:,}")
    print(f"rows            {job.rows:,}")
    print(f"requests_sent   {job.requests_sent:,}")
    print(f"credits_billed  {job.credits_billed:,}")
    print(f"runs            {job.runs}")
    if fails:
        print("failures        " + ", ".join(f"{k}: {v:,}" for k, v in sorted(fails.items()))
              + f" (see {failures_path(out)})")
    return 0


def _jobs_url(settings: Settings, command: str) -> str:
    if not settings.jobs_url:
        raise UsageError(f"{command}: say where the jobs are: --jobs-url postgresql://... (or CRAWLER_JOBS_URL,"
                         " or jobs.url in config.toml)")
    return settings.jobs_url


# Settings flags `crawler work` takes (shared with the job commands) that a job's own options override.
_JOB_OPTION_FLAGS = (("--max-credits", "crawl.max_credits"), ("--max-pages", "crawl.max_pages"),
                     ("--page-size", "crawl.page_size"), ("--max-items", "crawl.max_items"),
                     ("--bom", "output.bom"), ("--raw", "output.raw"))


def cmd_work(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Work open PostgreSQL jobs."""
    from crawler.runs.distributed import work

    settings = settings_from(args)
    url = _jobs_url(settings, "work")
    key = api_key()
    check_ledger(settings, key)
    ignored = [flag for flag, dest in _JOB_OPTION_FLAGS if getattr(args, dest, None) is not None]
    if ignored:
        print(f"crawler: warning: work ignores {', '.join(ignored)}: each job is worked with the options its starter"
              " gave (caps, page size, output cells); set them on the job's starting command", file=sys.stderr)
    return asyncio.run(work(settings, api_key=key, url=url, job=args.job, until_idle=args.until_idle,
                            quiet=args.quiet))


def cmd_jobs(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """List PostgreSQL jobs."""
    from crawler.runs.distributed import jobs_report

    settings = settings_from(args)
    print(asyncio.run(jobs_report(settings, url=_jobs_url(settings, "jobs"), as_json=args.json)))
    return 0


def cmd_export(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Write a finished PostgreSQL job's output."""
    from crawler.runs.distributed import export_job

    settings = settings_from(args)
    if not args.output.endswith(".csv"):
        raise UsageError(f"--output {args.output}: the output must be a .csv file")
    out = Path(args.output)
    if out.is_dir():
        raise UsageError(f"--output {out} is a directory: give a file name such as {out / 'export.csv'}")
    if out.exists() and not args.overwrite:  # never a file this tool did not write (a re-export too: say so)
        raise UsageError(f"--output {out} exists: choose another output, or add --overwrite to replace it")
    # The job's own output.bom/output.raw (its starter's) unless --bom/--raw are given here.
    n = asyncio.run(export_job(settings, url=_jobs_url(settings, "export"), jid=args.job, out=Path(args.output),
                               bom=getattr(args, "output.bom", None), raw=getattr(args, "output.raw", None)))
    print(f"crawler: wrote {n:,} rows to {args.output}", file=sys.stderr)
    return 0


def cmd_budget(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Show the key's rate ledger; sends no API request."""
    from crawler.api.client import check_base_url
    from crawler.rate.ledger import open_ledger
    from crawler.rate.pacing import Pace

    settings = settings_from(args)
    if settings.rate_shared == "off":
        raise UsageError("rate.shared is off: each process keeps its own rate budget, so there is no shared"
                         " ledger to show (set rate.shared = \"local\" or a redis:// URL)")
    base = check_base_url(settings.base_url, allow_insecure_http=settings.allow_insecure_http)
    ledger = open_ledger(settings.rate_shared, api_key().reveal(), base)

    async def read() -> Any:
        await ledger.open(None)
        try:
            return await ledger.status(Pace.from_settings(settings).rules)
        finally:
            await ledger.aclose()

    st = asyncio.run(read())
    limit = st.limit or settings.rate_limit
    window = st.window or settings.rate_window
    processes = [{"host": who.rpartition(":")[0], "pid": int(who.rpartition(":")[2] or 0), "started": n}
                 for who, n in sorted(st.processes.items())]
    if args.json:
        print(json.dumps({"started": st.started, "limit": limit, "window": window, "processes": processes,
                          "cooldown_until": st.cooldown_until, "rate_limited_last_hour": st.rate_limited_last_hour,
                          "at": st.at, "ledger": ledger.where,
                          "dated_ahead": {"starts": st.ahead, "cooldown": st.ahead_cooldown}}))
        return 0
    print("the key's rate budget (requests per rolling window; --max-credits is about credits: see crawler status)")
    print(f"ledger          {ledger.where} ({base})")
    print(f"started         {st.started:,} of {limit:,} in the last {window:g} s")
    who = ", ".join(f"{p['host']} pid {p['pid']} ({p['started']})" for p in processes) or "none"
    print(f"processes       {who}")
    cool = "none" if st.cooldown_until is None else f"{st.cooldown_until - st.at:.1f} s left"
    print(f"cooldown        {cool}")
    print(f"429s last hour  {st.rate_limited_last_hour:,}")
    if st.ahead or st.ahead_cooldown:
        what = " and ".join([f"{st.ahead:,} starts"] * bool(st.ahead) + ["a cooldown"] * st.ahead_cooldown)
        print(f"dated ahead     {what} dated more than a window in the future (a clock that ran ahead was set back):"
              " not counted; the next request drops them and the key pauses one window")
    return 0


def cmd_estimate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Print the expected credits of a job."""
    from crawler.jobs.estimate import estimate

    settings = settings_from(args)
    print(estimate(args.job, args.input, settings, column=args.column, by_id=args.by_id,
                   with_replies=args.with_replies).render())
    return 0


def cmd_ingest(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run (or resume) one day's ingest."""
    from crawler.engine.metrics import ingest_record
    from crawler.runs.ingest import ingest

    settings = settings_from(args)
    key = api_key()
    check_ledger(settings, key)
    url = settings.history_url or ""
    if url.startswith(("postgresql://", "postgres://")):  # unreachable: exit 2 before the out-dir is created
        from crawler.history.store import HistoryStore

        HistoryStore(url, stall_limit=settings.retry_stall_limit, connect_timeout=settings.connect_timeout).close()
    with _reports(settings, "ingest") as reports:
        result = asyncio.run(ingest(args.input, Path(args.out_dir), settings, api_key=key, date=args.date,
                                    with_posts=args.posts, restart=args.restart, retry_failed=args.retry_failed,
                                    column=args.column, by_id=args.by_id, quiet=args.quiet))
        reports.done(result.exit_code, [o.summary for o in result.outcomes], ingest_record(result),
                     completed=result.held_by is None)
    if not args.quiet:
        for outcome in result.outcomes:
            print(outcome.summary.render(), file=sys.stderr)
    line = ingest_line(result, argv)
    if line:
        print(line, file=sys.stderr)
    return result.exit_code


def ingest_line(result: Any, argv: Sequence[str]) -> str:
    """The one line an ingest run ends with: why it stopped or what failed, and what to run next."""
    from crawler.errors import BalanceExhausted, BudgetExhausted
    from crawler.stores.local import RETRIABLE

    if result.held_by is not None:
        return (f"crawler: the out-dir is held by a running ingest ({result.held_by}); it covers today's users,"
                " so this run has nothing to do")
    err = result.error
    again = _resume_hint(argv)
    if isinstance(err, BudgetExhausted):
        if not result.budget:
            return "crawler: --max-credits is 0, so nothing can be fetched: raise it (or drop it) and run again"
        return (f"crawler: {err}; each run has its own budget and goes on where this one stopped: {again}")
    if isinstance(err, BalanceExhausted):
        return f"crawler: {err}; top up the account, then go on with: {again}"
    if err is not None:
        resumable = isinstance(err, Interrupted) or getattr(err, "resumable", False)
        return f"crawler: {err}" + (f"; go on with: {again}" if resumable else "")
    failures: dict[str, int] = {}
    for o in result.outcomes:
        for reason, n in o.summary.failures.items():
            failures[reason] = failures.get(reason, 0) + n
    if not failures:
        return ""
    files = ", ".join(result.failures_files) or "the failures files"
    counts = ", ".join(f"{k}: {v:,}" for k, v in sorted(failures.items()))
    hints = [f"crawler: some items failed on {result.day.isoformat()} ({counts}); see {files}"]
    if failures.get("invalid_input"):
        hints.append("fix the invalid lines in the watch list")
    if failures.get("pagination_guard"):
        hints.append("walks a pagination guard ended go on in the next run")
    if failures.get("not_found") or failures.get("private"):
        hints.append("not_found users are tried again on the next day (--retry-failed=all tries them now)")
    if any(failures.get(r) for r in RETRIABLE):  # the command goes last, so the line ends with it
        hints.append(f"try them again today with: {again} --retry-failed")
    return "; ".join(hints)


def cmd_history(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Answer one history query."""
    from crawler.history.store import HistoryStore, export_csv, parse_day, plot_growth
    from crawler.runs.ingest import history_url

    settings = settings_from(args)
    url = history_url(settings)
    bounds = {"stall_limit": settings.retry_stall_limit, "connect_timeout": settings.connect_timeout}
    if not url.startswith(("postgresql://", "postgres://")) and not Path(url.removeprefix("sqlite:///")).is_file():
        # A query never creates a store: an empty one would only hide a wrong --data-dir or --history-url.
        raise UsageError(f"no history at {url.removeprefix('sqlite:///')}: run `crawler ingest` first, or point"
                         " --data-dir / --history-url at the store it wrote")
    if args.query == "serve":
        from crawler.history.serve import serve

        if not 0 <= args.port <= 65535:
            raise UsageError(f"--port {args.port}: use a port from 0 to 65535")
        return asyncio.run(serve(url, args.host, args.port, **bounds))
    store = HistoryStore(url, **bounds)
    try:
        if args.query == "growth":
            rows = store.growth(args.handle, args.since and parse_day(args.since, "--since"),
                                args.until and parse_day(args.until, "--until"))
            renamed = {r.day: r for r in store.renames(store.resolve(args.handle)[0])}
            print(f"{'day':<10}  {'followers':>12}  {'delta':>9}")
            for r in rows:
                delta = "" if r.delta is None else f"{r.delta:+,}"
                followers = "" if r.followers is None else f"{r.followers:,}"
                note = f"  renamed @{renamed[r.day].old} -> @{renamed[r.day].new}" if r.day in renamed else ""
                print(f"{r.day:<10}  {followers:>12}  {delta:>9}{note}")
        elif args.query == "top":
            print(f"{'handle':<26}  {'start':>12}  {'end':>12}  {'gained':>10}")
            for t in store.top(args.by, args.days, args.limit):
                # An unknown count (the API left it out) is a blank, not a 0, as on `history serve`'s page.
                start, end = ("" if v is None else f"{v:,}" for v in (t.start, t.end))
                gained = "" if t.gained is None else f"{t.gained:+,}"
                print(f"@{t.handle:<25}  {start:>12}  {end:>12}  {gained:>10}".rstrip())
        elif args.query == "as-of":
            import csv

            out = csv.writer(sys.stdout, lineterminator="\n")
            out.writerow(["handle", "user_id", "day", "followers", "following", "hearts", "videos"])
            for row in store.as_of(parse_day(args.date, "as-of")):
                out.writerow([row[3], row[0], row[1], row[4], row[5], row[6], row[7]])
        elif args.query == "days":
            print(f"{'day':<10}  {'snapshotted':>11}  {'missing':>7}  {'failed':>6}  {'credits':>8}  runs")
            for d in store.days():
                if d.gap:
                    print(f"{d.day:<10}  {'':>11}  {'':>7}  {'':>6}  {'':>8}  gap: no run")
                    continue
                missing = "" if d.missing is None else f"{d.missing:,}"
                runs = ", ".join(d.runs) or "no run recorded"
                notes = [" (--date: a backfill)" if d.by_date else ""]
                notes += [f"; renamed @{r.old} -> @{r.new}" for r in d.renames]
                print(f"{d.day:<10}  {d.snapshotted:>11,}  {missing:>7}  {d.failures:>6,}  {d.credits_billed:>8,}"
                      f"  {runs}{''.join(notes)}")
        elif args.query == "export":
            n = export_csv(store, Path(args.output))
            print(f"crawler: wrote {n:,} snapshots to {args.output}", file=sys.stderr)
        elif args.query == "plot":
            known, unknown = [], []
            for handle in args.handles:
                try:
                    store.resolve(handle)
                    known.append(handle)
                except UsageError:
                    unknown.append("@" + handle.strip().lstrip("@").lower())
            if not known:
                raise UsageError(f"plot: no history for {', '.join(unknown)} (run `crawler ingest` first, or check"
                                 " the spelling)")
            if unknown:
                print(f"crawler: no history for {', '.join(unknown)}: drawing the others", file=sys.stderr)
            labels = plot_growth(store, known, Path(args.output), style=args.style,
                                 since=args.since and parse_day(args.since, "--since"),
                                 until=args.until and parse_day(args.until, "--until"))
            print(f"crawler: wrote {args.output} ({', '.join(labels)})", file=sys.stderr)
    finally:
        store.close()
    return 0


def cmd_download(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run (or resume) a media download."""
    from crawler.runs.download import Download, DownloadOptions, run_download

    settings = settings_from(args)
    if getattr(args, "crawl.parallelism", None) is not None and settings.parallelism is not None:
        settings = settings.replace(download_parallelism=settings.parallelism)  # --parallelism N: files in flight
    # A CSV input needs no key; ids and expired URLs do (then the API says so, or the item fails).
    key = api_key() if os.environ.get("TIKLIVE_API_KEY", "").strip() else None
    download = Download(DownloadOptions(args.input, args.output, args.what), settings, api_key=key,
                        restart=args.restart, retry_failed=args.retry_failed, quiet=args.quiet)
    outcome = asyncio.run(run_download(download))
    if not args.quiet:
        print(outcome.summary.render(), file=sys.stderr)
    err = outcome.error
    if err is None:
        if outcome.summary.failed:
            print(f"crawler: {outcome.summary.failed:,} posts failed; see {outcome.summary.failures_file}"
                  " (re-run with --retry-failed to try them again)", file=sys.stderr)
    elif isinstance(err, BudgetExhausted) and settings.max_credits is not None:  # the cap spans the job's runs
        print(_budget_line(settings.max_credits, outcome.summary.requests_sent, outcome.summary.credits_billed,
                           argv), file=sys.stderr)
    else:
        resumable = isinstance(err, Interrupted) or err.exit_code == 4
        hint = f"; resume with: {_resume_hint(argv)}" if resumable else ""
        print(f"crawler: {err}{hint}", file=sys.stderr)
    return outcome.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `crawler` console script."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["sim"]:  # every option (--help, --port ...) belongs to the simulator's own parser
        from crawler.sim.__main__ import main as sim_main

        return sim_main(words[1:], prog="crawler sim")
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(words)
        if not hasattr(args, "func"):
            raise UsageError("say which command (or query) to run: see crawler --help")
        _logging(getattr(args, "verbose", 0))
        func: Callable[[argparse.Namespace, Sequence[str]], int] = args.func
        return func(args, words)
    except Interrupted as exc:  # stopped before the run proper began (e.g. while reading the input)
        print(f"crawler: {exc}; resume with: {_resume_hint(words)}", file=sys.stderr)
        return exc.code
    except CrawlerError as exc:
        print(f"crawler: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("crawler: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return _failed(exc, args)


def _failed(exc: Exception, args: argparse.Namespace | None) -> int:
    """The one line of a run that ended by an exception the run did not name: a full disk or a read-only
    directory (the path and the fix), another OS error, else a bug (exit 1)."""
    where = getattr(args, "output", None) or getattr(args, "out_dir", None) or os.getcwd()
    problem = disk_error(exc, where)
    if problem is not None:
        print(f"crawler: {problem}", file=sys.stderr)
        return problem.exit_code
    if isinstance(exc, OSError):
        print(f"crawler: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    # a bug, not a user mistake: one line, the traceback only with -v
    leaf: BaseException = exc
    while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
        leaf = leaf.exceptions[0]
    log.debug("unexpected error", exc_info=exc)
    print(f"crawler: unexpected error: {type(leaf).__name__}: {leaf} (what was committed is kept; the same"
          " command resumes; -v shows the traceback; please report it)", file=sys.stderr)
    return 1
