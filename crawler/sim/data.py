"""The simulator's seeded world: users, posts, comments and lists derived lazily from hashes.

Pure and free of I/O. The server renders it; tests use it to compute the exact rows a crawl must produce.
Its parts, in reading order: users.py (configuration, day, seeded hashes, users and profiles), posts.py,
follows.py (followers, following, liked), comments.py (and replies), catalog.py (searches, music,
challenges); records.py holds the rows they hand out. `World` joins the parts.

Nothing is stored per user: every value is a function of (seed, what, index, ...), so a world of ten
million users costs no memory. Counts that change over time are a day-0 value plus one deterministic
gain per day advanced, so a lookup costs O(day).

Pathological users (`is_pathological`; never private or deleted) misbehave on the `/user-posts/` and
`/user-followers/` walks only (following, liked and comments behave normally). `pathology(index)` says
which way:
- ``"endless"``: the last real page says ``hasMore`` true; every later page is empty, says ``hasMore``
  true and returns a cursor that keeps moving (1 s older each time), so only an empty-page guard stops it.
- ``"repeat"``: the last real page returns the cursor that was sent (verbatim) with ``hasMore`` true,
  so the same page comes back forever; only a same-cursor guard stops it.

Pinned posts (`pinned_fraction` of users with 4+ posts on day 0): 1-3 of the user's day-0 posts head the
posts list (`pinned`, `pin_flag`); `posts()` gives the list in that order, the set of posts is unchanged.

Simplifications: a post's own ``music_id`` and the lists of `music_posts` / `challenge_posts` /
`search_videos` are drawn independently (a music's post list need not contain posts that name it);
comment counts are fixed when a post appears, other post counts grow slowly with the world's day.
"""

from __future__ import annotations

from crawler.sim.catalog import Catalog
from crawler.sim.comments import Comments
from crawler.sim.follows import Follows
from crawler.sim.records import Challenge, Comment, Follow, Music, Post, User, WorldConfig
from crawler.sim.users import CHALLENGE_ID_BASE, MUSIC_ID_BASE, USER_ID_BASE, VIDEO_ID_BASE, VIDEO_SLOTS

__all__ = [
    "CHALLENGE_ID_BASE", "MUSIC_ID_BASE", "USER_ID_BASE", "VIDEO_ID_BASE", "VIDEO_SLOTS", "Challenge", "Comment",
    "Follow", "Music", "Post", "User", "World", "WorldConfig",
]


class World(Catalog, Comments, Follows):
    """The seeded world as of `day` (0 at creation); `advance` moves it forward."""
