"""`doctor`: spend a stated handful of credits to check the live API's answers against the parsers."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from crawler.cli.common import settings_from
from crawler.config import api_key
from crawler.errors import UsageError
from crawler.jobs.handles import InvalidInput, normalize_post, normalize_user

DEFAULT_HANDLE = "tiktok"  # a well-known account with posts, followers and comments


def cmd_doctor(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Check one answer of each endpoint family; print the count of credits first."""
    from crawler.api.shapes import CORE, FAMILIES
    from crawler.runs.doctor import HANDFUL, credits_of, render_text, run_doctor

    try:
        handle = normalize_user(args.handle)
    except InvalidInput as exc:
        raise UsageError(f"doctor: --handle {args.handle!r}: {exc}") from None
    try:
        video = normalize_post(args.video) if args.video else None
    except InvalidInput as exc:
        raise UsageError(f"doctor: --video {args.video!r}: {exc}") from None
    if handle.startswith("id:"):
        raise UsageError("doctor: --handle takes a handle, not an id (the check starts at /userinfo-by-username/)")
    settings = settings_from(args)
    key = api_key()
    count = credits_of(args.all)
    if count > HANDFUL and not args.yes:
        raise UsageError(f"doctor: --all spends {count} credits, more than the handful of {HANDFUL}: add --yes")
    names = FAMILIES if args.all else CORE
    print(f"crawler: doctor will spend at most {count} credit{'' if count == 1 else 's'} (one call per endpoint"
          " family: "
          f"{', '.join(names)})", file=sys.stderr)
    report = asyncio.run(run_doctor(settings, key, handle=handle, video_id=video, every=args.all))
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print("\n".join(render_text(report)))
    return report.exit_code
