"""`budget`: the key's rate ledger as it stands (sends no API request)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from typing import Any

from crawler.cli.common import settings_from
from crawler.config import api_key
from crawler.errors import UsageError


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
            return await ledger.status(Pace.of(settings.rate_options()).rules)
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
