"""Records of the simulator's world: its configuration and the frozen rows it hands out.

Defined apart from the World that derives them so its parts stay about derivation; data.py re-exports all.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorldConfig:
    """Shape of the seeded world."""

    seed: int = 1
    users: int = 10_000
    private_fraction: float = 0.05
    missing_fraction: float = 0.03
    pathological_fraction: float = 0.0
    # Users whose nickname and post titles carry text sinks refuse: an emoji cut in half (a lone UTF-16
    # surrogate, sent as an escaped half) and a NUL, beside a whole emoji sent as two escaped halves.
    broken_text_fraction: float = 0.0
    rename_probability: float = 0.02
    delete_probability: float = 0.0  # chance per user and day that one of the user's older posts is deleted
    follow_cap: int = 5000
    start_time: int = 1_767_225_600
    # Users (with 4+ posts on day 0) whose list starts with 1-3 pinned posts of day 0, flagged `is_top: 1` for a
    # third of them, 0 or absent for the others as in every real body seen (api-reference §5.1).
    pinned_fraction: float = 0.25
    # Users whose profile answers come wrapped as `userInfo: {user, stats, statsV2}` (web-style bodies, §5.1).
    wrapped_fraction: float = 0.2


@dataclass(frozen=True, slots=True)
class PostsPage:
    """One page of a user's posts list: the pinned posts first on the first page, then the rest newest first."""

    posts: list[Post]
    more: bool
    next_ms: int  # the cursor of the next page (ms epoch)
    pinned: int  # how many of `posts` are pinned ones (at the head)


@dataclass(frozen=True, slots=True)
class User:
    """A profile as of the world's current day."""

    index: int
    user_id: str
    handle: str
    nickname: str
    sec_uid: str
    verified: bool
    private: bool
    followers: int
    following: int
    videos: int
    hearts: int
    digg_count: int
    region: str
    signature: str


@dataclass(frozen=True, slots=True)
class Post:
    """A video as of the world's current day."""

    video_id: str
    author_index: int
    create_time: int
    region: str
    title: str | None
    play_count: int
    digg_count: int
    comment_count: int
    share_count: int
    collect_count: int
    duration: int
    music_id: str


@dataclass(frozen=True, slots=True)
class Comment:
    """A comment on a video, or a reply to one (then `parent_comment_id` is set)."""

    comment_id: str
    video_id: str
    text: str
    create_time: int
    digg_count: int
    reply_total: int
    user_index: int
    parent_comment_id: str | None


@dataclass(frozen=True, slots=True)
class Follow:
    """One entry of a follower or following list."""

    user_index: int
    follow_time: int


@dataclass(frozen=True, slots=True)
class Challenge:
    """A hashtag."""

    challenge_id: str
    name: str
    desc: str
    user_count: int
    view_count: int


@dataclass(frozen=True, slots=True)
class Music:
    """A sound."""

    music_id: str
    title: str
    author: str
    duration: int
    original: bool
    video_count: int
