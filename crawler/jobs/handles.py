"""Input: stream lines (file, stdin or a CSV column), normalise handles, user ids and post ids.

Nothing here holds the whole input: lines are streamed; exact de-duplication happens in the state
store (a disk-backed UNIQUE index), so 1M lines cost no memory.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from crawler.errors import UsageError
from crawler.sinks.csv_sink import unguard

HANDLE = re.compile(r"^[a-z0-9_.]{2,24}$")
_PROFILE_URL = re.compile(r"tiktok\.com/@([^/?#\s]+)", re.IGNORECASE)
_VIDEO_URL = re.compile(r"/(?:video|photo)/(\d{5,25})")
_DIGITS = re.compile(r"^\d{5,25}$")

MAX_LINE = 2_048  # characters: more than any handle, id or URL a user pastes; a longer line is invalid_input
SHOWN = 64  # characters of a too-long line kept in the failures file (never the whole line)
_SKIP = 1 << 16  # characters read at a time while passing the rest of a too-long line

# Every CSV this tool reads must take any field it wrote (a failures file, an output fed back): the default
# limit (128 KiB) made a long cell "unexpected error: field larger than field limit" on every run.
csv.field_size_limit(2**31 - 1)


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
    if p.is_dir():
        raise UsageError(f"input {path} is a directory: give a file of handles, one per line (or - for stdin)")
    if not p.is_file():
        raise UsageError(f"input file {path} does not exist (give a file of handles, one per line, or - for stdin)")
    return p.open("rb")


def undecodable(text: str) -> str | None:
    """The line with its undecodable bytes and NULs shown as \\xNN escapes, or None when it decoded cleanly.

    A NUL is no text either (a UTF-16 file read as UTF-8 is full of them), and PostgreSQL text refuses it.
    """
    if "\x00" not in text and not any("\udc80" <= ch <= "\udcff" for ch in text):
        return None
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


def too_long(text: str, length: int, number: int) -> tuple[str, str]:
    """(input, detail) of the failures file for a line of ``length`` characters beginning with ``text``."""
    return (text.strip()[:SHOWN] + "…",
            f"line {number}: {length:,} characters, longer than any handle, id or URL (at most {MAX_LINE:,})")


def _bounded(text: IO[str]) -> Iterator[tuple[str, int]]:
    """(line, its length without the line end) of each line, the line cut to MAX_LINE + 1 characters: a line
    of any length costs no more memory than that (the rest is read in pieces and passed)."""
    while line := text.readline(MAX_LINE + 1):
        length, last = len(line), line
        while length > MAX_LINE and not last.endswith(("\n", "\r")) and (last := text.readline(_SKIP)):
            length += len(last)
        yield line, length - (len(last) - len(last.rstrip("\r\n")))


def decode_input(stream: IO[bytes]) -> io.TextIOWrapper:
    """Text of the input: UTF-16 when it starts with a UTF-16 BOM, else UTF-8 (BOM optional).

    Bytes that are not UTF-8 are kept as surrogate escapes, so `undecodable` can show them, never replaced.
    """
    buffered = stream if isinstance(stream, io.BufferedReader) else io.BufferedReader(stream)  # type: ignore[type-var]
    head = buffered.peek(4)[:4]
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and not head.startswith(codecs.BOM_UTF32_LE):
        return io.TextIOWrapper(buffered, encoding="utf-16", errors="surrogateescape", newline="")
    return io.TextIOWrapper(buffered, encoding="utf-8-sig", errors="surrogateescape", newline="")


def skipped(line: str, *, hashtags: bool = False) -> bool:
    """Blank lines and `#` comment lines are not items (CONTRACT.md: never failures).

    In a list of hashtags, `#dance` is a hashtag: only `#` alone or followed by a space or `#` is a comment.
    """
    s = line.strip().lstrip("\ufeff").strip()
    if not s:
        return True
    if hashtags:
        return s.startswith("#") and (len(s) == 1 or s[1].isspace() or s[1] == "#")
    return s.startswith("#")


def sniff_delimiter(header: str, column: str) -> str:
    """The delimiter (`,`, `;` or tab) that makes ``column`` one of the header's names."""
    for delimiter in (",", ";", "\t"):
        names = [h.strip() for h in next(csv.reader([header], delimiter=delimiter), [])]
        if column in names:
            return delimiter
    return max((",", ";", "\t"), key=header.count)


def read_lines(stream: IO[bytes], column: str | None = None, *,
               hashtags: bool = False) -> Iterator[tuple[int, str, int]]:
    """(line number, text, length) for each line that is not blank or a `#` comment, or each non-empty value of
    a column; a text longer than MAX_LINE is cut to MAX_LINE + 1 characters (``length`` is the whole one's).

    A line with bytes that are not text in the input's encoding keeps them as surrogate escapes
    (see `undecodable`); our own formula prefix is stripped from CSV cells.
    """
    text = decode_input(stream)
    if column is None:
        for number, (line, length) in enumerate(_bounded(text), start=1):
            if not skipped(line, hashtags=hashtags):
                yield number, line.rstrip("\r\n"), length
        return
    first = text.readline()
    if not first:
        return
    delimiter = sniff_delimiter(first.lstrip("\ufeff"), column)
    reader = csv.reader(itertools.chain([first], text), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    names = [h.strip().lstrip("\ufeff") for h in header]
    if column not in names:
        raise UsageError(f"--column {column}: no such column in the input (columns: {', '.join(names)})")
    index = names.index(column)
    for number, row in enumerate(reader, start=2):
        if index < len(row) and row[index].strip():  # a cell is a value: "#tag" is a hashtag, not a comment
            value = unguard(row[index].strip())  # our own CSV's guard undone: "'@name" is "@name"
            yield number, value[:MAX_LINE + 1], len(value)
