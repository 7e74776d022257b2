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
import unicodedata
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


def _invisible(ch: str) -> bool:
    """A character a failures file would not show: controls, format characters (zero-width space, a BOM inside a
    line, bidi marks), separators other than the space, private-use and unassigned code points."""
    return ch != " " and unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cn", "Zl", "Zp", "Zs")


def visible(text: str) -> tuple[str, str]:
    """(the text with its invisible characters as \\u escapes, a note naming the first one, or "")."""
    if not any(map(_invisible, text)):
        return text, ""
    first = next(ch for ch in text if _invisible(ch))
    name = unicodedata.name(first, "a control character")
    shown = "".join(_escape(ch) if _invisible(ch) else ch for ch in text)
    return shown, f" (it holds invisible characters, shown escaped: {_escape(first)} is {name})"


def _escape(ch: str) -> str:
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


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
    """Text of the input: UTF-16 when it starts with a UTF-16 BOM or has a NUL every other byte (UTF-16 without a
    BOM), else UTF-8 (BOM optional).

    Bytes that are not UTF-8 are kept as surrogate escapes, so `undecodable` can show them, never replaced.
    """
    buffered = stream if isinstance(stream, io.BufferedReader) else io.BufferedReader(stream)  # type: ignore[type-var]
    head = buffered.peek(_SNIFF)[:_SNIFF]
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and not head.startswith(codecs.BOM_UTF32_LE):
        return io.TextIOWrapper(buffered, encoding="utf-16", errors="surrogateescape", newline="")
    bomless = _utf16_without_bom(head)
    if bomless:
        return io.TextIOWrapper(buffered, encoding=bomless, errors="surrogateescape", newline="")
    return io.TextIOWrapper(buffered, encoding="utf-8-sig", errors="surrogateescape", newline="")


_SNIFF = 64  # bytes looked at to tell UTF-16 without a BOM from UTF-8


def _utf16_without_bom(head: bytes) -> str | None:
    """"utf-16-le" or "utf-16-be" for text that is UTF-16 without a BOM (a NUL every other byte: ASCII handles, ids
    and URLs are), else None. UTF-8 text has no NUL at all, so a list of handles is never mistaken."""
    pairs = [head[i:i + 2] for i in range(0, len(head) - 1, 2)]
    if len(pairs) < 2:
        return None
    if all(p[1] == 0 and p[0] != 0 for p in pairs):
        return "utf-16-le"
    if all(p[0] == 0 and p[1] != 0 for p in pairs):
        return "utf-16-be"
    return None


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


_HEADER_LOOK = 20  # lines read ahead to tell a CSV with a header from a list of items
_HEADER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .-]{0,39}$")
# Column names that hold the items, the likeliest first (the one --column is suggested with).
_ITEM_COLUMNS = ("handle", "username", "unique_id", "uniqueid", "user", "account", "input", "url", "video_id",
                 "video", "music_id", "challenge_id", "hashtag", "name", "id")


def refuse_header(lines: list[tuple[int, str]]) -> None:
    """A CSV given without --column (its first line names columns, the next ones have as many cells): exit 2
    before any request, naming --column and the columns; read line by line, every line would be invalid."""
    if len(lines) < 2:
        return
    number, first = lines[0][0], lines[0][1].rstrip("\r\n")
    delimiter = max((",", ";", "\t"), key=first.count)
    names = [h.strip() for h in next(csv.reader([first], delimiter=delimiter), [])]
    if len(names) < 2 or not all(_HEADER_NAME.match(n) for n in names):
        return
    if any(len(next(csv.reader([line.rstrip("\r\n")], delimiter=delimiter), [])) != len(names)
           for _, line in lines[1:]):
        return
    column = next((n for want in _ITEM_COLUMNS for n in names if n.lower() == want), names[0])
    raise UsageError(f"line {number} looks like a CSV header ({', '.join(names)}): use --column {column}")


def read_lines(stream: IO[bytes], column: str | None = None, *,
               hashtags: bool = False) -> Iterator[tuple[int, str, int]]:
    """(line number, text, length) for each line that is not blank or a `#` comment, or each non-empty value of
    a column; a text longer than MAX_LINE is cut to MAX_LINE + 1 characters (``length`` is the whole one's).

    A line with bytes that are not text in the input's encoding keeps them as surrogate escapes
    (see `undecodable`); our own formula prefix is stripped from CSV cells.
    """
    text = decode_input(stream)
    if column is None:
        numbered = enumerate(_bounded(text), start=1)
        head = list(itertools.islice(numbered, _HEADER_LOOK))
        refuse_header([(n, line) for n, (line, _) in head if not skipped(line, hashtags=hashtags)])
        for number, (line, length) in itertools.chain(head, numbered):
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
