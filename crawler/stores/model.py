"""The job model shared by the local (SQLite) and the PostgreSQL job stores: an item's progress as committed, the
failure reasons worth another try, and the records each store hands back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Failure reasons that may change on a later try (`--retry-failed`; `unexpected_shape` once an update reads the new
# shape); `not_found` and `private` need `--retry-failed=all`; `invalid_input` and `pagination_guard` never change
# by trying again.
RETRIABLE = ("retries_exhausted", "budget", "unexpected_shape")

# A comments item's cursor once its comment walk has ended while reply walks remain (never an API cursor:
# those are numeric offsets).
COMMENTS_WALKED = "comments-walked"
RETRIABLE_ALL = (*RETRIABLE, "not_found", "private")


@dataclass(frozen=True, slots=True)
class JobRecord:
    """The stored job row."""

    command: str
    input_sha: str
    options: dict[str, Any]
    output: str
    status: str
    csv_length: int
    failures_length: int
    requests_sent: int
    credits_billed: int
    rows: int
    runs: int


@dataclass(frozen=True, slots=True)
class Progress:
    """Counts of items by status."""

    pending: int
    done: int
    failed: int

    @property
    def total(self) -> int:
        """All items."""
        return self.pending + self.done + self.failed


@dataclass(frozen=True, slots=True)
class ItemUpdate:
    """What one committed page or item changes."""

    seq: int
    status: str  # pending (walk goes on), done, failed
    cursor: Any = None  # next cursor when pending
    rows: int = 0
    pages: int = 0
    reason: str | None = None
    endpoint: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class WalkUpdate:
    """What one committed page changes in a reply walk (`reply_walks`); the first one registers it."""

    seq: int
    comment_id: str
    status: str = "pending"  # pending, done, failed
    cursor: Any = None
    rows: int = 0
    pages: int = 0
    reason: str | None = None
    endpoint: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class MediaFile:
    """One media file of a download job, as stored."""

    seq: int
    n: int
    name: str
    url: str
    expected: int | None = None
    etag: str | None = None
    durable: int = 0
    status: str = "pending"
    refreshed: int = 0
    # The extension the answer gave (`jobs.media.extension`), recorded before any byte is written so a resume
    # publishes to the same name; None until the first answer. "" for a file named whole by an older version.
    ext: str | None = None


# --- the PostgreSQL job store's records ---

class LeaseLost(Exception):
    """Another worker took the item over (its version moved on): this worker's page is discarded."""


def job_id(command: str, options: dict[str, Any], input_sha: str) -> str:
    """A PostgreSQL job's id: the first 12 hex digits of the hash of its command, options and input."""
    text = json.dumps({"command": command, "options": options, "input": input_sha}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class PgJob:
    """A job row."""

    id: str
    command: str
    options: dict[str, Any]
    status: str
    max_credits: int | None
    requests_sent: int  # the conservative count: requests granted to workers are counted as sent
    credits_billed: int
    rows: int
    created: float
    heartbeat_timeout: float | None = None  # the starter's jobs.heartbeat_timeout (None: a job from before)
    bom: bool = False  # the starter's output.bom
    raw: bool = False  # the starter's output.raw


@dataclass(frozen=True, slots=True)
class Created:
    """A job just created; `supersedes`: the job of the same output it replaced (an edited input), now gone."""

    supersedes: str | None = None
    added: int = 0  # items new to the job it continues
    gone: int = 0  # done items of that job no longer in the input (their rows kept)


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one round of the job store's housekeeping removed."""

    sessions: int = 0  # sessions of finished jobs, folded into their job's row
    workers: int = 0  # rows of workers that ended a day ago or went silent for a week


@dataclass(frozen=True, slots=True)
class Taken:
    """An item this worker now holds at `version`, with its unfinished reply walks."""

    seq: int
    key: str
    raw: str
    cursor: Any
    rows: int
    pages: int
    version: int
    walks: list[tuple[str, Any, int]]


@dataclass(slots=True)
class PageCommit:
    """One page (or one item's end) to commit: its rows (cell texts) and the item's new state."""

    seq: int
    version: int  # the version this worker holds
    rows: Sequence[tuple[str, str]]  # (row id, JSON of the row's values)
    update: ItemUpdate
    walks: Sequence[WalkUpdate] = ()
    token: str = ""
    committed: bool = False  # set when the commit held
    new_version: int = 0  # the item's version after the commit (the one this worker holds from then on)
    inserted: int = 0  # rows new to the item (the others were committed before: ON CONFLICT DO NOTHING)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker as registered."""

    id: str
    host: str
    pid: int
    key_hash: str
    ledger: str
    job: str | None
    live: bool
