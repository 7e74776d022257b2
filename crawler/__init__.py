"""crawler: a rate-exact, crash-safe asyncio crawler for TikLiveAPI.

The short Python API (pinned by tests/test_public_api.py)::

    async with Client() as c:            # key from TIKLIVE_API_KEY
        async for post in c.user_posts(user_id):
            ...
"""

from __future__ import annotations

from crawler.client import Client, Counters
from crawler.config import Settings, load_settings
from crawler.endpoints import Challenge, Comment, Follow, Music, Page, Post, Profile, Region, UserHit
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
