"""Typed option groups: what the client, the engine, the output and a job's limits are told, below the edge.

`Settings` (crawler.config) holds every default and stops at `cli/` and `runs/`: they turn it into these small,
frozen, keyword-only objects (``settings.client_options()`` ...), as httpx takes a `Timeout` and `Limits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True, kw_only=True)
class RateOptions:
    """The key's pace (rate.*): requests per rolling window, burst, per-second cap, margin; the ledger to share."""

    limit: int
    window: float
    burst: int
    max_per_second: int
    margin: float | None  # None: max(0.05 s, 0.5% of the window)
    enabled: bool
    shared: str = field(repr=False)  # "local", "off" or a redis[s]:// URL (may hold a password: never shown)


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Seconds to connect and between reads of one request (http.*)."""

    connect: float
    read: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Retries:
    """Tries per request, the backoff between them, and how long a stall may last (retry.*)."""

    attempts: int
    base_delay: float
    max_delay: float
    stall_limit: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    """Everything the API client needs: where, how fast, how patient."""

    base_url: str
    allow_insecure_http: bool
    rate: RateOptions
    timeout: Timeouts
    retry: Retries
    data_dir: str | None = None  # crawl.data_dir: answers of an unexpected shape are kept under it (None: not kept)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineOptions:
    """The engine's pool: ``workers`` fixed, or None for "auto" (grown by `pacing.auto_workers` from ``start``)."""

    workers: int | None = None
    start: int = 4  # workers an "auto" pool starts with


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputOptions:
    """How output files are written (output.*)."""

    bom: bool
    raw: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class JobLimits:
    """A job's guards (crawl.*): pages per walk, page size, items per walk, credits for the job."""

    max_pages: int | None
    page_size: int | None
    max_items: int | None
    max_credits: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DataOptions:
    """What this host has learned (crawl.data_dir): user ids and counts, page sizes; how long an id is trusted."""

    directory: str
    id_ttl_days: float
