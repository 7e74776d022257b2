"""The parser of the whole command line: one small function per command family."""

from __future__ import annotations

import argparse
from typing import Any

from crawler import __version__
from crawler.cli.budget import cmd_budget
from crawler.cli.crawl import cmd_job, cmd_status
from crawler.cli.distributed import cmd_export, cmd_jobs, cmd_work
from crawler.cli.doctor import DEFAULT_HANDLE, cmd_doctor
from crawler.cli.download import cmd_download
from crawler.cli.estimate import RUNS, cmd_estimate
from crawler.cli.get import cmd_get, cmd_regions
from crawler.cli.history import cmd_history
from crawler.cli.ingest import cmd_ingest
from crawler.errors import UsageError
from crawler.jobs.commands import COMMANDS
from crawler.jobs.media import WHATS


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str) -> Any:
        where = self.prog.removeprefix("crawler").strip()
        raise UsageError(f"{where + ': ' if where else ''}{message} (see --help)")


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, where it has one (never "default: None")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


ROW_FLAGS = frozenset({"--page-size", "--max-pages", "--max-items", "--bom", "--raw"})  # what shapes CSV rows
# Settings flags that mean nothing to one call (`get`, `regions`) or to a job not run (`estimate`, which reads the
# input, the data directory, the walk caps and the key's rate): left out, so argparse refuses them with exit 2.
ONE_CALL_OMITS = ROW_FLAGS | {"--parallelism", "-q"}
ESTIMATE_OMITS = frozenset({"--base-url", "--burst", "--max-per-second", "--rate-shared", "--parallelism",
                            "--max-credits", "--retries", "--bom", "--raw", "-q"})


def _settings_flags(p: argparse.ArgumentParser, omit: frozenset[str] = frozenset()) -> None:
    """The settings flags; ``omit`` leaves out those that mean nothing to the command (its --help stays true)."""
    g = p.add_argument_group("settings (override config.toml; see the Settings section of docs/jobs.md)")

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
    """--metrics-file and --summary-json (job commands, ingest, download, work): what a scheduler reads."""
    g = p.add_argument_group("reports for schedulers (written at every end but exit 2)")
    g.add_argument("--metrics-file", dest="output.metrics_file", metavar="PATH.prom",
                   help="Prometheus text format for node_exporter's textfile collector (config output.metrics_file)")
    g.add_argument("--summary-json", dest="output.summary_json", metavar="PATH",
                   help="the end-of-run summary as JSON, with exit_code (config output.summary_json)")


def _format_flag(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--format", dest="output.format", choices=("csv", "parquet", "jsonl"),
                   help=f"also write {name}.parquet (needs crawler[parquet]) or {name}.jsonl from the complete CSV:"
                   " typed columns, no formula guard (config output.format; default csv: the CSV only)")


def _retry_choice(value: str) -> str:
    if value != "all":
        raise argparse.ArgumentTypeError(f"--retry-failed={value}: the only value is 'all'")
    return value


def _positive(value: str) -> int:
    """A whole number of at least 1 (`--days`, `--limit`)."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return n


def _job_parser(sub: Any, name: str, help_text: str, input_help: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("input", metavar="INPUT" if COMMANDS[name].input_kind != "keyword" else "KEYWORD",
                   help=input_help)
    default = (f"KEYWORD.{name}.csv" if COMMANDS[name].input_kind == "keyword"
               else f"LIST.{name}.csv for LIST.txt, stdin.{name}.DAY.csv for stdin")
    p.add_argument("-o", "--output", help=f"output CSV (default, in the current directory: {default})")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--restart", action="store_true", help="forget this job's progress and start over")
    if COMMANDS[name].input_kind != "keyword":
        start.add_argument("--continue", dest="continue_job", action="store_true",
                           help="add another input file's items to the job of this output, even if it shares fewer"
                           " than half of them with the job")
    p.add_argument("--retry-failed", nargs="?", const=True, default=False, type=_retry_choice, metavar="all",
                   help="try again the items that failed for a reason that can change (retries_exhausted, budget,"
                   " unexpected_shape); --retry-failed=all also not_found and private")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output this tool did not write (or the input file itself)")
    p.add_argument("--jobs-url", dest="jobs.url", metavar="URL",
                   help="postgresql://...: the job in PostgreSQL, worked by this and any `crawler work` process")
    _format_flag(p, "OUT")
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
    _job_commands(sub)
    _ingest_command(sub)
    _history_command(sub)
    _tool_commands(sub)
    _download_command(sub)
    _distributed_commands(sub)
    # Listed for --help only: main() hands `crawler sim ...` to the simulator's own parser.
    sub.add_parser("sim", help="run the local API simulator (crawler sim --help)", add_help=False)
    return parser


def parse(words: list[str]) -> argparse.Namespace:
    """The command line parsed; a flag the command does not take is one line naming it and the command."""
    args, extra = build_parser().parse_known_args(words)
    if extra:
        command = next((w for w in words if not w.startswith("-")), "")
        raise UsageError(f"{command}: {' '.join(extra)}: not an option of `crawler {command}` (nothing it would"
                         f" change; see crawler {command} --help)")
    return args


def _job_commands(sub: Any) -> None:
    """One command per kind of crawl job (see crawler.jobs.commands)."""
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


def _ingest_command(sub: Any) -> None:
    """`ingest`: the daily job."""
    i = sub.add_parser("ingest", help="the daily job: profiles of a watch list (+ new posts) and their history",
                       description="Covers today (UTC): every watch-list user without a snapshot today, plus posts"
                       " walks earlier runs cut short. Each profile goes to DIR/profiles-DAY.csv and the history"
                       " store under the UTC day it was fetched; with --posts, posts first stored on DAY go to"
                       " DIR/posts-DAY.csv. A missed night is a gap, never filled with another day's data.")
    i.add_argument("input", metavar="INPUT", help="file of handles (or id:NNN), one per line, or - for stdin")
    i.add_argument("--out-dir", required=True, metavar="DIR")
    i.add_argument("--date", metavar="YYYY-MM-DD", help="record everything under this day instead of the UTC fetch"
                   " day (tests, deliberate backfills; `history days` marks it)")
    i.add_argument("--force-date", action="store_true", help="accept a --date after today (UTC)")
    i.add_argument("--posts", action="store_true", help="also walk each user's posts down to what is stored"
                   " (--max-items N: only the newest N; --max-pages: pages per user and night)")
    i.add_argument("--include-private", action="store_true", help="with --posts, walk private users' lists too"
                   " (skipped by default: they answer an error, and each answer is billed)")
    i.add_argument("--restart", action="store_true", help="refetch today's users, replacing today's snapshots")
    i.add_argument("--retry-failed", nargs="?", const=True, default=False, type=_retry_choice, metavar="all",
                   help="try today's failed users again (retries_exhausted, budget, unexpected_shape); =all also"
                   " not_found and private")
    i.add_argument("--column")
    i.add_argument("--by-id", action="store_true")
    i.add_argument("--history-url", dest="history.url", metavar="URL", help="postgresql://... (default: SQLite)")
    _settings_flags(i)
    _report_flags(i)
    i.set_defaults(func=cmd_ingest)


def _history_command(sub: Any) -> None:
    """`history` and its queries."""
    h = sub.add_parser("history", help="follower growth and other queries over the snapshots",
                       description="Queries over the snapshots `crawler ingest` stored (read-only; `rebuild`"
                       " recomputes the per-user data they read).")
    hs = h.add_subparsers(title="queries", metavar="QUERY", parser_class=_Parser)
    fmt = _Defaults
    g1 = hs.add_parser("growth", help="day, followers and delta for one handle", formatter_class=fmt,
                       description="One handle's followers per day and the change from the day before.")
    g1.add_argument("handle", help="a handle (with or without @) or id:NNN")
    g1.add_argument("--since", metavar="YYYY-MM-DD", help="first day shown")
    g1.add_argument("--until", metavar="YYYY-MM-DD", help="last day shown")
    g2 = hs.add_parser("top", help="users ranked by what they gained", formatter_class=fmt,
                       description="Users ranked by what they gained between their first and last snapshot in the"
                       " last DAYS days.")
    g2.add_argument("--by", default="followers-gained",
                    help="followers-gained, hearts-gained, videos-gained or following-gained")
    g2.add_argument("--days", type=_positive, default=7, help="the window, in days up to the latest")
    g2.add_argument("--limit", type=_positive, default=20, help="users shown")
    g3 = hs.add_parser("as-of", help="every profile as it stood on a day", formatter_class=fmt,
                       description="Every user's latest snapshot on or before a day, as CSV on stdout.")
    g3.add_argument("date", metavar="YYYY-MM-DD", help="the day")
    g4 = hs.add_parser("export", help="every snapshot to a CSV", formatter_class=fmt,
                       description="Every snapshot of the history to one CSV (written atomically); -o - writes it"
                       " to stdout.")
    g4.add_argument("-o", "--output", required=True, metavar="FILE.csv", help="the CSV, or - for stdout")
    _format_flag(g4, "FILE")
    g5 = hs.add_parser("plot", help="follower curves of some handles to a PNG", formatter_class=fmt,
                       description="Follower curves of the handles given, to a PNG.")
    g5.add_argument("handles", nargs="+", metavar="HANDLE", help="handles (with or without @)")
    g5.add_argument("-o", "--output", required=True, metavar="FILE.png", help="the PNG")
    g5.add_argument("--since", metavar="YYYY-MM-DD", help="first day drawn")
    g5.add_argument("--until", metavar="YYYY-MM-DD", help="last day drawn")
    g5.add_argument("--style", choices=("small", "indexed"), default="small",
                    help="small: one panel per handle, each on its own scale; indexed: one panel,"
                    " every curve as 100 x followers / its first value")
    g6 = hs.add_parser("serve", help="the history as a local web page (read-only)", formatter_class=fmt,
                       description="Overview, a page per user, CSV and compare over the history store, opened"
                       " read-only. Binds to 127.0.0.1 by default: the page has no login.")
    g6.add_argument("--host", default="127.0.0.1", help="address to listen on")
    g6.add_argument("--port", type=int, default=8050, help="port (0 picks a free one)")
    g7 = hs.add_parser("days", help="per day: users snapshotted and missing, credits, how the runs ended, gaps",
                       description="Per UTC day: users snapshotted and missing, failures, credits billed, how the"
                       " runs ended; a day without a run is a gap.")
    g8 = hs.add_parser("rebuild", help="recompute the per-user data the overview and top read, from the snapshots",
                       description="Recompute each user's latest counts and 1/7/30-day gains (kept up to date by"
                       " every ingest) from the snapshots, in one transaction.")
    for q, name in ((g1, "growth"), (g2, "top"), (g3, "as-of"), (g4, "export"), (g5, "plot"), (g6, "serve"),
                    (g7, "days"), (g8, "rebuild")):
        q.add_argument("--history-url", dest="history.url", metavar="URL",
                       help="postgresql://... or a SQLite path (default: history.db in the data directory)")
        q.add_argument("--config", help="config.toml (default ./config.toml or CRAWLER_CONFIG)")
        q.add_argument("--data-dir", dest="crawl.data_dir", metavar="DIR", help="where the default history lives")
        q.set_defaults(func=cmd_history, query=name)


def _tool_commands(sub: Any) -> None:
    """`estimate`, `status`, `budget`, `get` and `regions`: what a user looks at around the jobs."""
    e = sub.add_parser("estimate", help="expected credits of a job (any job command, ingest or download) and its"
                       " time at the key's rate, before running it (sends no request)")
    e.add_argument("job", metavar="COMMAND", choices=sorted(COMMANDS) + list(RUNS))
    e.add_argument("input", metavar="INPUT")
    e.add_argument("--column")
    e.add_argument("--by-id", action="store_true")
    e.add_argument("--with-replies", action="store_true")
    e.add_argument("--posts", action="store_true", help="ingest: with its posts walks")
    e.add_argument("--history-url", dest="history.url", metavar="URL", help="ingest: the history store it reads")
    e.add_argument("--what", choices=WHATS, help="download: the kind of file (default: hd)")
    _settings_flags(e, omit=ESTIMATE_OMITS)
    e.set_defaults(func=cmd_estimate)

    s = sub.add_parser("status", help="progress, failures and credits of a job",
                       description="A job's items done, failed and pending, rows, both credit counters and runs;"
                       " read from its state, no request sent.")
    s.add_argument("output", metavar="OUT.csv", help="the job's output (or the OUT.csv.part a stopped run named),"
                   " a download directory, or an ingest out-dir")
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
    g.add_argument("--raw-params", action="store_true",
                   help="send parameter names the endpoint is not known to take (unchecked)")
    _settings_flags(g, omit=ONE_CALL_OMITS | {"--retries"})  # get tries once
    g.set_defaults(func=cmd_get)

    r = sub.add_parser("regions", help="region codes for search-videos --region (one credit, then cached)")
    _settings_flags(r, omit=ONE_CALL_OMITS)
    r.set_defaults(func=cmd_regions)

    d = sub.add_parser("doctor", help="check the live API's answers against the parsers (a stated handful of"
                       " credits)", description="One call per endpoint family (the count is printed first): per"
                       " endpoint ok, fields missing, fields new or unreadable, its latency and any rate headers."
                       " Exit 0 all ok (new fields included), 1 a shape changed, 3 an endpoint could not be checked.")
    d.add_argument("--handle", default=DEFAULT_HANDLE, help=f"the account to check with (default {DEFAULT_HANDLE})")
    d.add_argument("--video", metavar="URL", help="the post to check with (default: the account's first post)")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.add_argument("--all", action="store_true", help="check every family the crawler reads (15 credits; with --yes)")
    d.add_argument("--yes", action="store_true", help="spend more than the handful of 5 credits")
    _settings_flags(d, omit=ROW_FLAGS | {"--parallelism", "--max-pages", "--max-items", "--data-dir"})
    d.set_defaults(func=cmd_doctor)


def _download_command(sub: Any) -> None:
    """`download`: media files of posts."""

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
    _report_flags(d)
    d.set_defaults(func=cmd_download)


def _distributed_commands(sub: Any) -> None:
    """PostgreSQL jobs (jobs.url): workers, the list of jobs, a finished job's output."""
    w = sub.add_parser("work", help="join open PostgreSQL jobs as a worker (jobs.url)",
                       description="Take items of open jobs in jobs.url and work them with this host's key and"
                       " settings; without --until-idle, wait for new jobs (a service).")
    w.add_argument("--job", metavar="ID", help="only this job (its id, as the starter printed it)")
    w.add_argument("--until-idle", action="store_true", help="exit when no item of any open job is left")
    w.add_argument("--jobs-url", dest="jobs.url", metavar="URL")
    _settings_flags(w)
    _report_flags(w)
    w.set_defaults(func=cmd_work)
    j = sub.add_parser("jobs", help="PostgreSQL jobs: id, progress, failures, credits, workers",
                       description="Every job in jobs.url: id, command, progress, failures, requests_sent,"
                       " credits_billed and the workers on it.")
    j.add_argument("--jobs-url", dest="jobs.url", metavar="URL", help="postgresql://... (default: jobs.url, or"
                   " CRAWLER_JOBS_URL)")
    j.add_argument("--json", action="store_true", help="print JSON")
    j.add_argument("--config", help="config.toml (default ./config.toml or CRAWLER_CONFIG)")
    j.set_defaults(func=cmd_jobs)
    x = sub.add_parser("export", help="a finished PostgreSQL job's output (byte for byte the starter's)",
                       description="Write a finished PostgreSQL job's rows to OUT.csv, as the starter would have.")
    x.add_argument("job", metavar="JOB", help="the job's id (`crawler jobs` lists them)")
    x.add_argument("-o", "--output", required=True, metavar="OUT.csv", help="the CSV to write")
    x.add_argument("--jobs-url", dest="jobs.url", metavar="URL", help="postgresql://... (default: jobs.url, or"
                   " CRAWLER_JOBS_URL)")
    x.add_argument("--bom", dest="output.bom", action="store_const", const=True, help="start with a UTF-8 BOM")
    x.add_argument("--raw", dest="output.raw", action="store_const", const=True,
                   help="keep formula-like cells as they are")
    x.add_argument("--overwrite", action="store_true", help="replace an existing OUT.csv")
    _format_flag(x, "OUT")
    x.add_argument("--config", help="config.toml (default ./config.toml or CRAWLER_CONFIG)")
    x.set_defaults(func=cmd_export)
