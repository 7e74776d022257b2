"""The simulator's seeded world, as the server and the tests import it (the world lives in users.py)."""

from __future__ import annotations

from crawler.sim.users import (
    CHALLENGE_ID_BASE,
    MUSIC_ID_BASE,
    USER_ID_BASE,
    VIDEO_ID_BASE,
    VIDEO_SLOTS,
    Challenge,
    Comment,
    Follow,
    Music,
    Post,
    User,
    World,
    WorldConfig,
)

__all__ = [
    "CHALLENGE_ID_BASE", "MUSIC_ID_BASE", "USER_ID_BASE", "VIDEO_ID_BASE", "VIDEO_SLOTS", "Challenge", "Comment",
    "Follow", "Music", "Post", "User", "World", "WorldConfig",
]
