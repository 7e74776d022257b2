"""Seeded building blocks of the simulator's world: stable hashes, heavy tails, event timelines, texts.

Used by the world's parts (users.py to catalog.py) and render.py (wire shapes); nothing here knows about
users or HTTP.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass

DAY = 86_400
_MASK = (1 << 64) - 1

WORDS = (
    "sun", "moon", "river", "pixel", "mango", "tiger", "nova", "lumi", "kiko", "dance", "chef", "vibe",
    "echo", "zen", "luna", "rio", "maya", "toby", "jade", "ollie", "cosmo", "berry", "noodle", "pepper",
    "ginger", "sky", "ash", "blaze", "coco", "dash", "frost", "honey", "indigo", "juno", "koala", "lemon",
    "mochi", "nacho", "otter", "panda", "quinn", "robin", "sage", "taco", "umber", "velvet", "willow", "yuzu",
)
REGIONS = (
    ("US", "United States", 30), ("GB", "United Kingdom", 8), ("DE", "Germany", 6), ("FR", "France", 5),
    ("ES", "Spain", 4), ("IT", "Italy", 4), ("BR", "Brazil", 8), ("MX", "Mexico", 6), ("JP", "Japan", 5),
    ("KR", "South Korea", 3), ("ID", "Indonesia", 7), ("PH", "Philippines", 4), ("VN", "Vietnam", 3),
    ("TH", "Thailand", 3), ("TR", "Turkey", 3), ("SA", "Saudi Arabia", 2), ("EG", "Egypt", 2),
    ("NG", "Nigeria", 2), ("CA", "Canada", 4), ("AU", "Australia", 3), ("PL", "Poland", 2),
)
REGION_CUM = tuple(sum(w for _, _, w in REGIONS[: i + 1]) for i in range(len(REGIONS)))


def mix64(x: int) -> int:
    """Return the splitmix64 finaliser of x."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def hash64(*parts: int) -> int:
    """Return a stable 64-bit hash of a sequence of integers."""
    h = 0x5851F42D4C957F2D
    for p in parts:
        h = mix64(h ^ (p & _MASK))
    return h


def str_hash(text: str) -> int:
    """Return a stable 64-bit hash of a string."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def unit(h: int) -> float:
    """Map a 64-bit hash to a float in [0, 1)."""
    return (h >> 11) * (1.0 / (1 << 53))


def pareto(u: float, scale: float, alpha: float, cap: int) -> int:
    """Return a heavy-tailed count >= 0: mostly below a few `scale`, rarely up to `cap`."""
    return min(cap, int(scale * ((1.0 - u) ** (-1.0 / alpha) - 1.0)))


def coprime_stride(h: int, n: int) -> int:
    """Return a step in [1, n) coprime with n, so (base + k * step) % n visits n distinct values."""
    if n <= 2:
        return 1
    s = 1 + h % (n - 1)
    while math.gcd(s, n) != 1:
        s = s % (n - 1) + 1
    return s


def pick_word(h: int) -> str:
    """One lower-case word of the world's small vocabulary."""
    return WORDS[h % len(WORDS)]


@dataclass(frozen=True, slots=True)
class Timeline:
    """When the k-th event (0 = oldest) of a growing count happened: strictly increasing in k.

    Day-0 events are spread over `span` seconds before the start; day d's events fall inside day d.
    """

    cum: tuple[int, ...]  # cum[d]: the count after day d
    start: int
    span: int
    salt: int

    @property
    def total(self) -> int:
        """The count as of the last day."""
        return self.cum[-1]

    def time(self, k: int) -> int:
        """Unix seconds of event k; strictly increasing in k and before the end of the last day."""
        c0 = self.cum[0]
        if k < c0:
            gap = max(1, self.span // c0)
            # Jitter below half a gap keeps times strictly increasing (spans dwarf any day-0 count).
            return self.start - self.span + k * gap + hash64(self.salt, k) % max(1, gap // 2)
        d = bisect.bisect_right(self.cum, k)
        prev = self.cum[d - 1]
        step = DAY // (self.cum[d] - prev + 1)  # >= 1 because a day's gain stays below DAY
        return self.start + (d - 1) * DAY + (k - prev + 1) * step

    def first_at_or_after(self, lo: int, hi: int, t: int) -> int:
        """Return the smallest k in [lo, hi] with time(k) >= t (hi if none)."""
        while lo < hi:
            mid = (lo + hi) // 2
            if self.time(mid) >= t:
                hi = mid
            else:
                lo = mid + 1
        return lo


def decode_id(text: str, base: int, n: int) -> int | None:
    """The offset of a numeric id from `base` if it is one of n valid ids, else None."""
    if not (text.isascii() and text.isdigit()) or len(text) > 25:
        return None
    v = int(text) - base
    return v if 0 <= v < n else None


def make_nickname(h: int) -> str:
    """A display name; some are non-ASCII or formula-like, as real ones are."""
    a, b = pick_word(h).capitalize(), pick_word(h >> 8).capitalize()
    r = (h >> 16) % 20
    if r == 0:
        return f"={a}{b}"
    if r == 1:
        return f"Zoë {a} ✨"
    if r == 2:
        return f"李{a}"
    return f"{a} {b}"


def make_signature(h: int) -> str:
    """A profile bio: often empty, sometimes two lines."""
    r = h % 10
    if r < 4:
        return ""
    if r == 4:
        return f"📍 {pick_word(h >> 8)} city\nbusiness: {pick_word(h >> 16)}@example.com"
    return f"{pick_word(h >> 8)} lover, {pick_word(h >> 16)} fan"


def make_title(h: int) -> str | None:
    """A caption: ~5% None, some formula-like, some with commas/quotes/newlines, some non-ASCII."""
    r = h % 100
    w1, w2, w3 = pick_word(h >> 8), pick_word(h >> 16), pick_word(h >> 24)
    if r < 5:
        return None
    if r < 10:
        return ("=HYPERLINK(\"http://example.com\",\"" + w1 + "\")", f"+1 if you love {w1}",
                f"-10 kg with {w1}", f"@{w1}{w2} look at this")[(h >> 32) % 4]
    if r < 18:
        return f'Day {(h >> 32) % 100}, part "{w1}"\n{w2}, {w3} tomorrow'
    if r < 28:
        return f"Café con {w1} ☕ とても美味しい 🎉 — ñandú #{w2}"
    return f"{w1} {w2} #{w3} #fyp"


def make_comment_text(h: int) -> str:
    """A comment: some formula-like, some with quotes, commas and newlines, some non-ASCII."""
    r = h % 20
    w1, w2 = pick_word(h >> 8), pick_word(h >> 16)
    if r == 0:
        return f"=1+1 {w1}"
    if r == 1:
        return f'"{w1}", she said,\nthen {w2}'
    if r == 2:
        return f"😂😂 {w1} がすき"
    return f"love the {w1} {w2}"


def make_music_title(h: int) -> str:
    """A song title for a non-original sound."""
    return f"{pick_word(h).capitalize()} {pick_word(h >> 8).capitalize()} (feat. {pick_word(h >> 16).capitalize()})"
