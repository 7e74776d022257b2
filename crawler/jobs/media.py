"""What a download item is: the kinds of media file, their names (digits and fixed extensions only), the input.

The input is a posts/post-details CSV (read by column) or one video URL or id per line; hostile values become
`invalid_input` entries. `crawler.runs.download` stores the entries and transfers the files.
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
# The fixed extension of each kind; file names are <digits><EXT> (images: <digits>/<n>.jpg).
EXT: dict[str, str] = {"video": ".mp4", "hd": ".mp4", "watermarked": ".wm.mp4", "cover": ".jpg", "music": ".mp3",
                       "images": ".jpg"}
URL_COLUMNS = ("play", "hdplay", "wmplay", "cover", "music_url", "images")
MAX_ID = 25  # digits; TikTok ids are 19


# --- names and URLs: only digits and fixed extensions ever reach the file system ---

def valid_id(value: str) -> bool:
    """True for an ASCII decimal id of sane length (nothing else may become a file name)."""
    return 0 < len(value) <= MAX_ID and value.isascii() and value.isdigit()


def file_name(video_id: str, what: str, n: int = 0) -> str:
    """The path of one file under DIR: `<id><ext>`, or `<id>/<n>.jpg` for the images of a photo post."""
    if not valid_id(video_id):
        raise ValueError(f"not a numeric id: {video_id!r}")
    return f"{video_id}/{int(n)}.jpg" if what == "images" else f"{video_id}{EXT[what]}"


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
    """(key, raw, reason, detail, files) per input item; files is None when `/post-detail/` must find them.

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
        files = urls_of(what, {k: v for k, v in row.items() if isinstance(k, str)})
        bad = [u for _, u, _ in files if not http_url(u)]
        if bad:
            yield (f"invalid:{number}", video_id, "invalid_input",
                   f"line {number}: not an http(s) URL: {_printable(bad[0])}", None)
            continue
        if what == "images" and not files:
            continue  # not a photo post: nothing to download, nothing failed
        yield video_id, video_id, None, None, files or None
