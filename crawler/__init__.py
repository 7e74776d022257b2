"""crawler: a rate-exact, crash-safe asyncio crawler for TikLiveAPI.

The short Python API (pinned by tests/test_public_api.py)::

    async with Client() as c:            # key from TIKLIVE_API_KEY
        async for post in c.user_posts(user_id):
            ...

Layers. A package may import its own modules and the packages listed below it, never one above
(tests/test_layering.py reads this table and checks every import)::

    cli       the command line: the parser, the commands, the demo
    runs      the wiring of each kind of run: local, distributed, ingest, download
    history   the snapshot history: its store, queries, the web page, charts
    engine    what every run shares: pool, writer, stop, lease, progress, summary, metrics
    jobs      what an item is: the command table, inputs, handles, prepare, the walker, estimates
    sinks     output files: the CSV with a committed length, the failures file
    stores    state: the local job store, the PostgreSQL job store and its queue
    api       the API client (knows nothing of jobs, stores or signals), its records, page sizes
    rate      the key's rate rules, ledgers and gate
    core      the top-level modules: errors, config, retry, files, sqlite, testing (every test-only seam)

``sim`` (the simulator) imports only core modules and is imported only by ``cli``; this file re-exports
the public API, ``__main__`` runs ``cli``.
"""

from __future__ import annotations

from crawler.api.client import Client, Counters
from crawler.api.records import Challenge, Comment, Follow, Music, Page, Post, Profile, Region, UserHit
from crawler.config import Settings, load_settings
from crawler.errors import (
    BalanceExhausted,
    BudgetExhausted,
    CrawlerError,
    ItemFailed,
    KeyRejected,
    NotFound,
    PrivateAccount,
    RateLimitStalled,
    RetriesExhausted,
    UsageError,
)

__version__ = "0.1.0"

__all__ = [
    "BalanceExhausted",
    "BudgetExhausted",
    "Challenge",
    "Client",
    "Comment",
    "Counters",
    "CrawlerError",
    "Follow",
    "ItemFailed",
    "KeyRejected",
    "Music",
    "NotFound",
    "Page",
    "Post",
    "PrivateAccount",
    "Profile",
    "RateLimitStalled",
    "Region",
    "RetriesExhausted",
    "Settings",
    "UsageError",
    "UserHit",
    "__version__",
    "load_settings",
]
