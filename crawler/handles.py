"""Input: stream lines (file, stdin or a CSV column), normalise handles, user ids and post ids.

Nothing here holds the whole input: lines are streamed; exact de-duplication happens in the state
store (a disk-backed UNIQUE index), so 1M lines cost no memory.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from crawler.errors import UsageError

HANDLE = re.compile(r"^[a-z0-9_.]{2,24}$")
_PROFILE_URL = re.compile(r"tiktok\.com/@([^/?#\s]+)", re.IGNORECASE)
_VIDEO_URL = re.compile(r"/(?:video|photo)/(\d{5,25})")
_DIGITS = re.compile(r"^\d{5,25}$")


@dataclass(frozen=True, slots=True)
class Item:
    """One normalised input item: `key` is what the job stores and de-duplicates on."""

    key: str
    raw: str

    @property
    def user_id(self) -> str | None:
        """The numeric user id for an `id:` item, else None."""
        return self.key[3:] if self.key.startswith("id:") else None


class InvalidInput(ValueError):
    """A line that is not a valid item; its text says why."""


def normalize_user(line: str, *, by_id: bool = False) -> str:
    """A handle (lower-case, no @) or `id:<digits>` from any form users paste."""
    s = line.strip().lstrip("\ufeff").strip()
    if s.lower().startswith("id:"):
        digits = s[3:].strip()
        if _DIGITS.match(digits):
            return "id:" + digits
        raise InvalidInput("id: must be followed by a numeric user id")
    if by_id:
        if _DIGITS.match(s):
            return "id:" + s
        raise InvalidInput("not a numeric user id (--by-id)")
    url = _PROFILE_URL.search(s)
    if url:
        s = url.group(1)
    elif "/" in s or " " in s:
        raise InvalidInput("not a handle or profile URL")
    handle = s.lstrip("@").lower()
    if not HANDLE.match(handle) or not handle.strip("."):
        raise InvalidInput("a handle is 2-24 letters, digits, '_' or '.'")
    return handle


def normalize_post(line: str) -> str:
    """A numeric video id from a video URL or a bare id."""
    s = line.strip().lstrip("\ufeff").strip()
    url = _VIDEO_URL.search(s)
    if url:
        return url.group(1)
    if _DIGITS.match(s):
        return s
    raise InvalidInput("not a video URL or numeric video id")


def normalize_name(line: str) -> str:
    """A music/challenge id or a hashtag name (leading # dropped, lower-cased)."""
    s = line.strip().lstrip("\ufeff").strip().lstrip("#").strip()
    if not s or len(s) > 200 or any(c in s for c in "\r\n\t"):
        raise InvalidInput("empty or not an id/name")
    return s if s.isdigit() else s.lower()


def open_input(path: str) -> IO[bytes]:
    """The input as a binary stream: a file, or stdin for `-`."""
    if path == "-":
        return sys.stdin.buffer
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"input file {path} does not exist (give a file of handles, one per line, or - for stdin)")
    return p.open("rb")


def read_lines(stream: IO[bytes], column: str | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-empty input line, or each value of a CSV column."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")
    if column is None:
        for number, line in enumerate(text, start=1):
            if line.strip():
                yield number, line.rstrip("\r\n")
        return
    reader = csv.reader(text)
    header = next(reader, None)
    if header is None:
        return
    names = [h.strip() for h in header]
    if column not in names:
        raise UsageError(f"--column {column}: no such column in the input (columns: {', '.join(names)})")
    index = names.index(column)
    for number, row in enumerate(reader, start=2):
        if index < len(row) and row[index].strip():
            yield number, row[index]
