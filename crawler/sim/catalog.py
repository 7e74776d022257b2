"""The simulator's catalog: video, user and hashtag searches, sounds, hashtags and regions."""

from __future__ import annotations

import re

from crawler.sim.posts import Posts
from crawler.sim.records import Challenge, Music, Post
from crawler.sim.seeded import (
    DAY,
    REGIONS,
    coprime_stride,
    decode_id,
    hash64,
    make_music_title,
    make_nickname,
    pareto,
    pick_word,
    str_hash,
    unit,
)
from crawler.sim.users import _CHALLENGE, _MUSIC, _SEARCH, CHALLENGE_ID_BASE, MUSIC_ID_BASE

_CHALLENGE_RE = re.compile(r"^[a-z]+(\d+)$")


class Catalog(Posts):
    """Searches, sounds, hashtags and regions; every result list is drawn from a seeded salt."""

    def _pick_posts(self, salt: int, n: int) -> list[Post]:
        """n distinct posts (one per author, public authors only) chosen by `salt`."""
        users = self.config.users
        stride = coprime_stride(hash64(salt, 1), users)
        out: list[Post] = []
        for k in range(users):
            if len(out) >= n:
                break
            a = (salt + k * stride) % users
            if self._usable_author(a):
                out.append(self._initial_post(a, salt))
        return out

    def search_videos(self, keyword: str, publish_time: int = 0, sort_by: int = 0,
                      region: str | None = None) -> list[Post]:
        """The full result list of a video search (0 to ~200 posts); sort_by 0 relevance, 1 likes, 2 date."""
        kh = self._h(_SEARCH, 1, str_hash(keyword.strip().lower()))
        posts = [] if kh % 13 == 0 else self._pick_posts(kh, 20 + kh % 181)
        if publish_time > 0:
            posts = [p for p in posts if p.create_time >= self.now - publish_time * DAY]
        if region:
            posts = [p for p in posts if p.region == region.upper()]
        if sort_by == 1:
            posts.sort(key=lambda p: (-p.digg_count, p.video_id))
        elif sort_by == 2:
            posts.sort(key=lambda p: (-p.create_time, p.video_id))
        return posts

    def search_users(self, keyword: str) -> list[int]:
        """The full result list of a user search: indexes, an exact handle match first (0 to ~200)."""
        kw = keyword.strip().lstrip("@").lower()
        kh = self._h(_SEARCH, 2, str_hash(kw))
        exact = self.index_by_handle(kw) if kw else None
        out = [exact] if exact is not None else []
        users = self.config.users
        stride = coprime_stride(hash64(kh, 1), users)
        for k in range(users):
            if len(out) >= kh % 201:
                break
            i = (kh + k * stride) % users
            if i != exact and not self.is_missing(i):
                out.append(i)
        return out

    def music_ids(self, n: int) -> list[str]:
        """The first n valid music ids."""
        return [str(MUSIC_ID_BASE + m) for m in range(min(n, self._n_music))]

    def music(self, music_id: str) -> Music | None:
        """The music with this id, else None."""
        m = decode_id(music_id, MUSIC_ID_BASE, self._n_music)
        if m is None:
            return None
        h = self._h(_MUSIC, m)
        original = unit(hash64(h, 1)) < 0.4
        owner = hash64(h, 2) % self.config.users
        title = f"original sound - {pick_word(h)}{owner}" if original else make_music_title(hash64(h, 3))
        return Music(music_id=music_id, title=title, author=make_nickname(hash64(h, 4)),
                     duration=5 + hash64(h, 5) % 56, original=original,
                     video_count=pareto(unit(hash64(h, 6)), 8, 0.8, 300))

    def music_posts(self, music_id: str) -> list[Post]:
        """Posts listed under a music (its video_count of them, or fewer in tiny worlds)."""
        music = self.music(music_id)
        return [] if music is None else self._pick_posts(self._h(_MUSIC, int(music_id), 9), music.video_count)

    def challenge_ids(self, n: int) -> list[str]:
        """The first n valid challenge ids."""
        return [str(CHALLENGE_ID_BASE + c) for c in range(min(n, self._n_challenges))]

    def _challenge(self, c: int) -> Challenge:
        h = self._h(_CHALLENGE, c)
        name = f"{pick_word(h)}{c}"
        views = pareto(unit(hash64(h, 1)), 20_000, 0.7, 50_000_000_000)
        return Challenge(challenge_id=str(CHALLENGE_ID_BASE + c), name=name,
                         desc=f"Show us your best #{name} moment", user_count=views // 300 + 1,
                         view_count=views)

    def challenge_by_id(self, cid: str) -> Challenge | None:
        """The challenge with this id, else None."""
        c = decode_id(cid, CHALLENGE_ID_BASE, self._n_challenges)
        return None if c is None else self._challenge(c)

    def challenge_by_name(self, name: str) -> Challenge | None:
        """The challenge with this name (any case, optional leading '#'), else None."""
        m = _CHALLENGE_RE.match(name.strip().lstrip("#").lower())
        if m is None or len(m.group(1)) > 12 or int(m.group(1)) >= self._n_challenges:
            return None
        ch = self._challenge(int(m.group(1)))
        return ch if ch.name == name.strip().lstrip("#").lower() else None

    def challenge_posts(self, cid: str, region: str | None = None) -> list[Post]:
        """Posts listed under a challenge (up to 300), optionally only those of one region."""
        c = decode_id(cid, CHALLENGE_ID_BASE, self._n_challenges)
        if c is None:
            return []
        h = self._h(_CHALLENGE, c, 9)
        posts = self._pick_posts(h, 5 + h % 296)
        return [p for p in posts if p.region == region.upper()] if region else posts

    def search_challenges(self, keyword: str) -> list[Challenge]:
        """The full result list of a hashtag search, an exact name match first (0 to ~60)."""
        kh = self._h(_SEARCH, 3, str_hash(keyword.strip().lower()))
        exact = self.challenge_by_name(keyword) if keyword.strip() else None
        out = [exact] if exact else []
        n, target = self._n_challenges, kh % 61
        stride = coprime_stride(hash64(kh, 1), n)
        for k in range(n):
            if len(out) >= target:
                break
            ch = self._challenge((kh + k * stride) % n)
            if ch != exact:
                out.append(ch)
        return out

    def regions(self) -> dict[str, str]:
        """Region codes and names, as `/region-list/` returns them."""
        return {code: name for code, name, _ in REGIONS}
