"""What the commands share: their settings, reports, the rate-ledger check and the command that goes on."""

from __future__ import annotations

import argparse
import asyncio
import shlex
from collections.abc import Sequence
from typing import Any

from crawler.config import FLAG_NAMES, Secret, Settings, load_settings, masked


def open_reports(settings: Settings, command: str, *, out_dir: str | None = None) -> Any:
    """The metrics file and summary JSON of this run (see crawler.engine.metrics.run_reports); their directories are
    checked now, before anything (a region lookup) is spent. ``out_dir``: a directory the run makes (ingest's)."""
    from crawler.engine.metrics import check_report_paths, run_reports

    check_report_paths(settings.metrics_file, settings.summary_json, out_dir=out_dir)
    return run_reports(command, metrics_file=settings.metrics_file, summary_json=settings.summary_json,
                       out_dir=out_dir)


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from config.toml, the environment and this command's flags."""
    flags = {key: getattr(args, key) for key in FLAG_NAMES if hasattr(args, key)}
    return load_settings(config_file=getattr(args, "config", None), flags=flags)


def resume_hint(argv: Sequence[str], *, max_credits: int | None = None, retry_failed: bool = False) -> str:
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
    rules = Pace.of(settings.rate_options()).rules

    async def check() -> None:
        await ledger.open(rules)
        await ledger.aclose()

    asyncio.run(check())


def budget_line(max_credits: int, spent: int, billed: int, argv: Sequence[str]) -> str:
    """A job's --max-credits stop: the same command would stop again at once, so print one with a higher cap."""
    if max_credits == 0:  # a cap of 0 allows no request: "raise it to 1" would fetch one item and stop again
        return (f"crawler: --max-credits 0 allows no request (the job has sent {spent:,}): drop --max-credits, or"
                " give the credits the job may spend (`crawler estimate` says how many it needs)")
    raised = max(spent, max_credits) + max_credits
    return (f"crawler: --max-credits {max_credits:,} reached (the job has sent {spent:,} requests, {billed:,}"
            f" billed); to go on, raise the cap: {resume_hint(argv, max_credits=raised)}")

