"""`crawler estimate COMMAND INPUT`: the credits and the time at the key's rate of a job command, `ingest` or
`download`, before it runs (nothing is sent)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from crawler.api.pagesizes import PageSizes
from crawler.cli.common import settings_from
from crawler.config import Settings
from crawler.history.store import HistoryStore
from crawler.jobs.commands import COMMANDS
from crawler.jobs.estimate import estimate, walk_size
from crawler.jobs.estimate_runs import Priced, WatchedUser, estimate_download, estimate_ingest
from crawler.jobs.inputs import input_items
from crawler.jobs.prepare import JobOptions
from crawler.runs.ingest import history_url, utc_now
from crawler.stores.users import UserDirectory

RUNS = ("ingest", "download")  # estimated besides the job commands


def cmd_estimate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Print the expected credits of a job and how long it takes at the key's rate."""
    settings = settings_from(args)
    rate = settings.rate_options()
    if args.job == "download":
        print(estimate_download(args.input, args.what or "hd").render(rate))
    elif args.job == "ingest":
        print(_ingest(args, settings).render(rate))
    else:
        print(estimate(args.job, args.input, settings.job_limits(), settings.data_options(), column=args.column,
                       by_id=args.by_id, with_replies=args.with_replies).render(rate))
    return 0


def _ingest(args: argparse.Namespace, settings: Settings) -> Priced:
    """Price tonight's ingest of the watch list from the history store and the data directory's counts."""
    job = JobOptions(command="profiles", input=args.input, output="estimate.csv", column=args.column,
                     by_id=args.by_id)
    entries, _ = input_items(job, COMMANDS["profiles"])
    keys: dict[str, None] = {}
    invalid = 0
    for key, _raw, reason, _detail in entries:
        if reason is not None:
            invalid += 1
        else:
            keys.setdefault(key, None)
    data = settings.data_options()
    limits = settings.job_limits()
    size = walk_size("posts", limits, PageSizes(data.directory))
    url = history_url(settings)
    if "://" not in url and not Path(url).exists():
        store = None  # the first night: no history yet
    else:
        store = HistoryStore.open_readonly(url, stall_limit=settings.retry_stall_limit)
    users = UserDirectory.reading(Path(data.directory) / "users.db", ttl_days=data.id_ttl_days)
    try:
        watched = _watched(list(keys), store, users, with_posts=args.posts)
    finally:
        users.close()
        if store is not None:
            store.close()
    return estimate_ingest(watched, invalid=invalid, with_posts=args.posts, page_size=size,
                           max_pages=limits.max_pages, max_items=limits.max_items)


def _watched(keys: list[str], store: HistoryStore | None, users: UserDirectory, *, with_posts: bool
             ) -> list[WatchedUser]:
    """What is known of each watch-list key: the history's snapshots and walk (with --posts), else the data
    directory's counts."""
    today = utc_now().date()
    bound = store.bound_ids([k for k in keys if not k.startswith("id:")]) if store is not None else {}
    ids = {k: k[3:] if k.startswith("id:") else bound.get(k) or users.user_id(k) for k in keys}
    known = [u for u in ids.values() if u]
    snaps = store.snapshotted(known, today) if store is not None else {}
    counts = store.last_videos(known) if store is not None else {}
    out = []
    for key in keys:
        uid = ids[key]
        walk = store.walk_state(uid) if store is not None and uid and with_posts else None
        last, previous, private = counts.get(uid or "", (None, None, False))
        if uid not in counts:  # never snapshotted: what earlier jobs learned of the user
            cached = users.counts(uid or key)
            last, private = (cached[0], cached[3]) if cached is not None else (None, False)
        out.append(WatchedUser(
            snapshotted_today=uid in snaps, walked_today=walk is not None and walk.walked == today.isoformat(),
            watermark=walk is not None and walk.through is not None, private=private, videos=last,
            previous=previous))
    return out

