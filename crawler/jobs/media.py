"""What a download item is: the kinds of media file, their names (digits, a kind and an extension from a fixed
table only), the extension an answer gives a file, and the input.

The input is a posts/post-details CSV (read by column) or one video URL or id per line; hostile values become
`invalid_input` entries, posts the kind does not apply to (`SKIPS`) skipped entries. `crawler.runs.download`
stores the entries and transfers the files.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from typing import IO, Literal
from urllib.parse import urlsplit

from crawler.jobs.handles import InvalidInput, normalize_post, open_input

What = Literal["video", "hd", "watermarked", "cover", "music", "images"]
WHATS: tuple[What, ...] = ("video", "hd", "watermarked", "cover", "music", "images")
VIDEO_KINDS = frozenset({"video", "hd", "watermarked"})
# The part of a file's name after the id, before its extension (`hd` and `video` never share a name); images are
# <id>/<n>. The extension comes from the answer (`extension`) once its first bytes arrive.
KIND_SUFFIX: dict[str, str] = {"video": "", "hd": ".hd", "watermarked": ".wm", "cover": ".cover", "music": ".music"}
# Content-Type -> extension: the only extensions that ever reach the file system (with SNIFFED's and ".bin").
CONTENT_TYPES: dict[str, str] = {
    "video/mp4": ".mp4", "video/quicktime": ".mov", "video/webm": ".webm", "video/x-matroska": ".mkv",
    "image/webp": ".webp", "image/jpeg": ".jpeg", "image/jpg": ".jpeg", "image/pjpeg": ".jpeg", "image/png": ".png",
    "image/gif": ".gif", "image/heic": ".heic", "image/avif": ".avif",
    "audio/mpeg": ".mp3", "audio/mp3": ".mp3", "audio/mp4": ".m4a", "audio/x-m4a": ".m4a", "audio/aac": ".aac",
    "audio/ogg": ".ogg", "audio/wav": ".wav", "audio/x-wav": ".wav",
}
GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/x-download",
                           "application/download", "application/force-download"})
VIDEO_EXTS = frozenset({".mp4", ".mov", ".webm", ".mkv"})
UNKNOWN_EXT = ".bin"  # a generic Content-Type and bytes no magic number names: kept, not renamed to a guess
SNIFF_BYTES = 16  # enough of a file's head for `sniff`
# Posts a kind does not apply to: skipped (the item is done, with this reason), never a failure of the run.
SKIPS: dict[str, str] = {
    "not_a_video": "photo posts skipped: not videos; use --what images or --what music",
    "not_watermarked": "posts skipped: no separate watermarked file (wmplay == play); use --what video",
}
MAX_ID = 25  # digits; TikTok ids are 19


# --- names and URLs: only digits and fixed extensions ever reach the file system ---

def valid_id(value: str) -> bool:
    """True for an ASCII decimal id of sane length (nothing else may become a file name)."""
    return 0 < len(value) <= MAX_ID and value.isascii() and value.isdigit()


def file_name(video_id: str, what: str, n: int = 0) -> str:
    """The path of one file under DIR without its extension: `<id>[.<kind>]`, or `<id>/<n>` for the images of a
    photo post. `extension` gives the rest once the answer is in."""
    if not valid_id(video_id):
        raise ValueError(f"not a numeric id: {video_id!r}")
    return f"{video_id}/{int(n)}" if what == "images" else f"{video_id}{KIND_SUFFIX[what]}"


def sniff(head: bytes) -> str | None:
    """The extension a file's first bytes (magic numbers) prove, or None."""
    if head[4:8] == b"ftyp":  # ISO base media: the major brand tells audio and stills from video
        brand = head[8:12]
        return ".m4a" if brand in (b"M4A ", b"M4B ") else ".heic" if brand in (b"heic", b"heix", b"mif1") else \
            ".avif" if brand == b"avif" else ".mov" if brand == b"qt  " else ".mp4"
    if head[:4] == b"RIFF" and head[8:12] in (b"WEBP", b"WAVE"):
        return ".webp" if head[8:12] == b"WEBP" else ".wav"
    if head[:3] == b"\xff\xd8\xff":
        return ".jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if head[:4] in (b"GIF8",):
        return ".gif"
    if head[:4] == b"\x1aE\xdf\xa3":
        return ".webm"
    if head[:4] == b"OggS":
        return ".ogg"
    if head[:3] == b"ID3":
        return ".mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # an MPEG audio frame sync
        return ".aac" if head[1] & 0x06 == 0 else ".mp3"  # layer bits 00: an AAC ADTS frame; else layer I-III
    return None


def extension(content_type: str | None, head: bytes) -> str | None:
    """A file's extension from its answer: the Content-Type when it names a known media type, the magic bytes when
    the type is missing or generic (``.bin`` when they name nothing). None: the answer is not a media file (a
    specific type such as text/html, with bytes no magic number names)."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind in CONTENT_TYPES:
        return CONTENT_TYPES[kind]
    found = sniff(head)
    if found is not None:
        return found
    return UNKNOWN_EXT if kind in GENERIC_TYPES else None


def known_extension(ext: str) -> bool:
    """True for an extension `extension` can give (a state file's value is checked before it names a file)."""
    return ext == UNKNOWN_EXT or ext in CONTENT_TYPES.values()


def skip_reason(what: str, row: Mapping[str, str | int | None]) -> tuple[str, str] | None:
    """(reason, detail) when this kind of file does not apply to the post (`SKIPS`), else None: a photo post (it
    has `images`; its play/wmplay are its sound) asked for as a video; `watermarked` when wmplay == play."""
    def text(key: str) -> str:
        value = row.get(key)
        return "" if value is None else str(value).strip()

    if what in VIDEO_KINDS and text("images"):
        return "not_a_video", f"a photo post of {len(text('images').split())} images; its play URL is its sound"
    if what == "watermarked" and text("wmplay") and text("wmplay") == text("play"):
        return "not_watermarked", "wmplay == play: the post has no separate watermarked file"
    return None


def http_url(value: str) -> bool:
    """True for an http(s) URL with a host and nothing unprintable in it."""
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not any(
        c.isspace() or not c.isprintable() for c in value)


def _size(value: str | int | None) -> int | None:
    if isinstance(value, int):
        return value if value > 0 else None
    text = (value or "").strip()
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


def urls_of(what: str, row: Mapping[str, str | int | None]) -> list[tuple[int, str, int | None]]:
    """(n, url, announced length) of the files a post has of this kind; `hd` falls back to `video`."""
    def text(key: str) -> str:
        value = row.get(key)
        return "" if value is None else str(value).strip()

    if what == "images":
        return [(k, u, None) for k, u in enumerate(text("images").split())]
    if what == "hd" and text("hdplay"):
        return [(0, text("hdplay"), _size(row.get("hd_size")))]
    column, length = {"video": ("play", "size"), "hd": ("play", "size"), "watermarked": ("wmplay", ""),
                      "cover": ("cover", ""), "music": ("music_url", "")}[what]
    url = text(column)
    return [(0, url, _size(row.get(length)) if length else None)] if url else []


def _printable(text: str) -> str:
    """An input value as it may appear in a message or the failures file (control characters escaped)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)[:200]


# --- input ---

Entry = tuple[str, str, str | None, str | None, list[tuple[int, str, int | None]] | None]


def read_input(path: str, what: str) -> Iterator[Entry]:
    """(key, raw, reason, detail, files) per input item; files is None when `/post-detail/` must find them. A
    reason in `SKIPS` marks a post skipped, any other a failed item.

    A CSV whose header has `video_id` and a media column is read by column; anything else is one video
    URL or id per line. Hostile values (paths, NUL bytes, non-http URLs) become `invalid_input` entries.
    """
    stream = open_input(path)
    try:
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")
        first = text.readline()
        header = next(csv.reader([first]), []) if first.strip() else []
        names = [h.strip() for h in header]
        if "video_id" in names:  # a CSV; rows without a URL of the kind asked cost one /post-detail/ call
            yield from _csv_entries(first, text, what)
        else:
            lines = [first] if first else []
            for number, line in enumerate(_chain(lines, text), start=1):
                raw = line.rstrip("\r\n")
                if not raw.strip() or raw.lstrip().startswith("#"):
                    continue
                try:
                    key = normalize_post(raw)
                except InvalidInput as exc:
                    yield f"invalid:{number}", _printable(raw.strip()), "invalid_input", f"line {number}: {exc}", None
                    continue
                if not valid_id(key):
                    yield f"invalid:{number}", _printable(raw.strip()), "invalid_input", \
                        f"line {number}: not a numeric video id", None
                    continue
                yield key, key, None, None, None
    finally:
        if path != "-":
            stream.close()


def _chain(first: list[str], rest: IO[str]) -> Iterator[str]:
    yield from first
    yield from rest


def _csv_entries(first: str, text: IO[str], what: str) -> Iterator[Entry]:
    reader = csv.DictReader(_chain([first], text))
    for row in reader:
        number = reader.line_num
        video_id = (row.get("video_id") or "").strip()
        if not valid_id(video_id):
            yield (f"invalid:{number}", _printable(video_id), "invalid_input",
                   f"line {number}: video_id must be a numeric id", None)
            continue
        fields = {k: v for k, v in row.items() if isinstance(k, str)}
        skip = skip_reason(what, fields)
        if skip is not None:
            yield video_id, video_id, *skip, None
            continue
        files = urls_of(what, fields)
        bad = [u for _, u, _ in files if not http_url(u)]
        if bad:
            yield (f"invalid:{number}", video_id, "invalid_input",
                   f"line {number}: not an http(s) URL: {_printable(bad[0])}", None)
            continue
        if what == "images" and not files:
            continue  # not a photo post: nothing to download, nothing failed
        yield video_id, video_id, None, None, files or None
