"""The input: a job's lines (a file, stdin or a search keyword) read once, as item keys, hashed on the way.

First stage of the flow: `input_items()` feeds `job.prepare()`, which stores the items in the state store.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

from crawler.errors import UsageError
from crawler.jobs.handles import (
    MAX_LINE,
    InvalidInput,
    decode_input,
    normalize_name,
    normalize_post,
    normalize_user,
    open_input,
    read_lines,
    too_long,
    undecodable,
    visible,
)

if TYPE_CHECKING:
    from crawler.jobs.commands import CommandSpec
    from crawler.jobs.prepare import JobOptions

InputEntry = tuple[str, str, str | None, str | None]  # key, raw line, failure reason, detail


class _Hashing(io.RawIOBase):
    """A binary stream that hashes what is read through it (the job's input identity)."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha.update(data)
        return n


def normalizer(kind: str, *, by_id: bool) -> Callable[[str], str]:
    """The line -> item key function of an input kind."""
    if kind == "users":
        return lambda line: normalize_user(line, by_id=by_id)
    if kind == "posts":
        return normalize_post
    if kind == "music":
        def music(line: str) -> str:
            key = normalize_post(line) if "/" in line else line.strip()
            if not key.isdigit():
                raise InvalidInput("not a numeric music id")
            return key
        return music
    return normalize_name


def input_items(job: JobOptions, spec: CommandSpec) -> tuple[Iterator[InputEntry], Callable[[], str]]:
    """(key, raw, reason, detail) for every input line, and a function giving the input's hash once read."""
    if spec.input_kind == "keyword":
        keyword = job.input.strip()
        if not keyword:
            raise UsageError(f"{job.command}: give a non-empty KEYWORD")
        digest = hashlib.sha256(keyword.encode()).hexdigest()
        return iter([(keyword, keyword, None, None)]), lambda: digest
    stream = _Hashing(open_input(job.input))
    buffered = io.BufferedReader(stream, 1 << 16)

    def generate() -> Iterator[InputEntry]:
        try:
            if spec.input_kind == "pairs":
                yield from _pairs(buffered, job.input)
                return
            normalize = normalizer(spec.input_kind, by_id=job.by_id)
            for number, line, length in read_lines(buffered, job.column, hashtags=spec.input_kind == "names"):
                if length > MAX_LINE:  # its first characters shown, never copied whole (state, failures file)
                    shown, detail = too_long(undecodable(line) or line, length, number)
                    yield f"invalid:{number}", shown, "invalid_input", detail
                    continue
                escaped = undecodable(line)
                if escaped is not None:  # keep the bytes visible (\xfc), never replaced by U+FFFD
                    yield (f"invalid:{number}", escaped.strip(), "invalid_input",
                           f"line {number}: bytes that are not text in the input's encoding (save it as UTF-8)")
                    continue
                try:
                    yield normalize(line), line.strip(), None, None
                except InvalidInput as exc:
                    shown, note = visible(line.strip())  # a zero-width space is seen, not guessed
                    yield f"invalid:{number}", shown, "invalid_input", f"line {number}: {exc}{note}"
        finally:
            if job.input != "-":
                buffered.close()

    return generate(), lambda: stream.sha.hexdigest()


def _pairs(stream: IO[bytes], name: str) -> Iterator[InputEntry]:
    reader = csv.DictReader(decode_input(stream))
    fields = reader.fieldnames or []
    if "video_id" not in fields or "comment_id" not in fields:
        raise UsageError(f"{name}: replies needs a CSV with video_id and comment_id columns (a comments CSV works)")
    for number, row in enumerate(reader, start=2):
        video, comment = (row.get("video_id") or "").strip(), (row.get("comment_id") or "").strip()
        raw = f"{video},{comment}"
        raw = undecodable(raw) or visible(raw)[0]  # bytes that are not text and invisible characters: escaped
        if row.get("parent_comment_id") or (row.get("reply_total") or "").strip() == "0":
            continue  # a reply, or a comment without replies, in a comments CSV: nothing to fetch
        if len(raw) > MAX_LINE:
            shown, detail = too_long(raw, len(raw), number)
            yield f"invalid:{number}", shown, "invalid_input", detail
        elif video.isdigit() and comment.isdigit():
            yield f"{video}:{comment}", raw, None, None
        else:
            yield f"invalid:{number}", raw, "invalid_input", f"line {number}: video_id and comment_id must be numeric"
