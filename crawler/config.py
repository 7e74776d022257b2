"""Settings: every default in one place, overlaid by config.toml, the environment and CLI flags.

Precedence (CONTRACT.md): flag > environment > config.toml > built-in default. The API key comes only
from TIKLIVE_API_KEY and is held in a `Secret` that never prints.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crawler.errors import UsageError
from crawler.options import ClientOptions, DataOptions, JobLimits, OutputOptions, RateOptions, Retries, Timeouts

DEFAULT_BASE_URL = "https://api.tikliveapi.com"
KEY_ENV = "TIKLIVE_API_KEY"


class Secret:
    """A string that is never shown: repr/str print a mask; only `reveal()` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that must send it (the request header)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every tunable of a run; field comments give the config key."""

    base_url: str = DEFAULT_BASE_URL  # api.base_url
    allow_insecure_http: bool = False  # api.allow_insecure_http
    rate_limit: int = 200  # rate.limit
    rate_window: float = 60.0  # rate.window
    rate_burst: int = 1  # rate.burst
    rate_max_per_second: int = 40  # rate.max_per_second
    rate_margin: float | None = None  # rate.margin (None: max(0.05 s, 0.5% of the window))
    rate_enabled: bool = True  # rate.enabled (false only for benchmarks against the simulator)
    rate_shared: str = "local"  # rate.shared: "local", "off" or redis[s]://host:port/db
    parallelism: int | None = None  # crawl.parallelism ("auto" -> None)
    page_size: int | None = None  # crawl.page_size (None: per endpoint)
    max_pages: int | None = None  # crawl.max_pages
    max_items: int | None = None  # crawl.max_items
    max_credits: int | None = None  # crawl.max_credits
    data_dir: str = ".crawler"  # crawl.data_dir
    id_ttl_days: float = 7.0  # crawl.id_ttl_days: days a handle -> id mapping from a profile is trusted
    retry_attempts: int = 5  # retry.attempts
    retry_base_delay: float = 0.5  # retry.base_delay
    retry_max_delay: float = 30.0  # retry.max_delay
    retry_stall_limit: float = 300.0  # retry.stall_limit
    connect_timeout: float = 5.0  # http.connect_timeout
    read_timeout: float = 15.0  # http.read_timeout
    output_bom: bool = False  # output.bom
    output_raw: bool = False  # output.raw
    output_format: str = "csv"  # output.format: csv, or also OUT.parquet / OUT.jsonl when the job completes
    history_url: str | None = None  # history.url (None: SQLite file in the data directory)
    metrics_file: str | None = None  # output.metrics_file: a .prom file for node_exporter's textfile collector
    summary_json: str | None = None  # output.summary_json: the end-of-run summary as JSON
    jobs_url: str | None = None  # jobs.url: postgresql://... (None: the job's state in SQLite beside its output)
    jobs_heartbeat_timeout: float = 30.0  # jobs.heartbeat_timeout: seconds before a silent worker's items move
    download_parallelism: int = 8  # download.parallelism: files in flight at once (media hosts, not the API)
    download_per_host_rate: float = 10.0  # download.per_host_rate: media requests started per second per host

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # The typed option groups the layers below the edge take (crawler.options).

    def rate_options(self) -> RateOptions:
        """rate.*: the key's pace and the ledger it is shared through."""
        return RateOptions(limit=self.rate_limit, window=self.rate_window, burst=self.rate_burst,
                           max_per_second=self.rate_max_per_second, margin=self.rate_margin,
                           enabled=self.rate_enabled, shared=self.rate_shared)

    def client_options(self) -> ClientOptions:
        """What the API client needs of these settings."""
        return ClientOptions(
            base_url=self.base_url, allow_insecure_http=self.allow_insecure_http, rate=self.rate_options(),
            timeout=Timeouts(connect=self.connect_timeout, read=self.read_timeout),
            retry=Retries(attempts=self.retry_attempts, base_delay=self.retry_base_delay,
                          max_delay=self.retry_max_delay, stall_limit=self.retry_stall_limit),
            data_dir=self.data_dir)

    def output_options(self) -> OutputOptions:
        """output.bom and output.raw."""
        return OutputOptions(bom=self.output_bom, raw=self.output_raw)

    def data_options(self) -> DataOptions:
        """crawl.data_dir and crawl.id_ttl_days."""
        return DataOptions(directory=self.data_dir, id_ttl_days=self.id_ttl_days)

    def job_limits(self) -> JobLimits:
        """crawl.max_pages, page_size, max_items, max_credits."""
        return JobLimits(max_pages=self.max_pages, page_size=self.page_size, max_items=self.max_items,
                         max_credits=self.max_credits)

    def __repr__(self) -> str:
        # URLs may carry a password (history.url, jobs.url, rate.shared): a repr shows them masked.
        def show(value: object) -> str:
            return repr(masked(value)) if isinstance(value, str) else repr(value)

        return f"Settings({', '.join(f'{f.name}={show(getattr(self, f.name))}' for f in dataclasses.fields(self))})"


def masked(text: str) -> str:
    """Text with the credentials of any URL in it (``scheme://user:password@``) replaced by ***, and the value of
    any ``password=`` parameter (``?password=...``, which libpq and redis accept, or a ``key=value`` conninfo);
    a user name alone (``scheme://user@``, ``user=``) is no secret and stays, so a printed command still runs."""
    # Up to the last @ before the path: a password may hold a raw @ (libpq and redis-py split there too).
    text = re.sub(r"://[^/\s]*:[^/\s]*@", "://***@", text)
    return re.sub(r"(?i)(?<![\w.-])(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)", r"\1***", text)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return v.lower() in ("true", "1", "yes", "on")
    raise ValueError("expected true or false")


def _number(kind: Callable[[Any], Any], *, low: float, allow_none: bool = False) -> Callable[[Any], Any]:
    def parse(v: Any) -> Any:
        if allow_none and (v is None or (isinstance(v, str) and v.lower() in ("none", ""))):
            return None
        if isinstance(v, bool):
            raise ValueError("expected a number")
        n = kind(v)
        if isinstance(n, float) and not math.isfinite(n):
            raise ValueError("must be a finite number")
        if n < low:
            raise ValueError(f"must be at least {low:g}")
        return n

    return parse


def _parallelism(v: Any) -> int | None:
    if isinstance(v, str) and v.lower() == "auto":
        return None
    n: int = _number(int, low=1)(v)
    return n


def _url(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("expected a URL such as https://api.tikliveapi.com")
    return v.strip().rstrip("/")


def _shared(v: Any) -> str:
    if isinstance(v, str) and (v.strip().lower() in ("local", "off") or v.strip().startswith(("redis://", "rediss://"))):
        return v.strip().lower() if v.strip().lower() in ("local", "off") else v.strip()
    raise ValueError('expected "local", "off" or a redis://host:port/db URL')


def _jobs_url(v: Any) -> str | None:
    if v in (None, ""):
        return None
    if isinstance(v, str) and v.strip().startswith(("postgresql://", "postgres://")):
        return check_postgres_url(v.strip())
    raise ValueError("expected a postgresql:// URL")


def check_postgres_url(url: str) -> str:
    """The URL if libpq can parse it, else ValueError without libpq's words: they quote the URL or the token it
    stopped at (`invalid percent-encoded token: "PASSWORD%zz"`), which may be the password."""
    try:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # without psycopg the store says so when it opens
        return url
    try:
        conninfo_to_dict(url)
    except ProgrammingError:
        raise ValueError("not a PostgreSQL URL libpq can read: check the %-escapes in the user name and password"
                         " (a literal % is %25) and the [] around an IPv6 host") from None
    return url


def _text(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("expected a non-empty string")
    return v


def _optional_text(v: Any) -> str | None:
    return None if v in (None, "") else _text(v)


HISTORY_SCHEMES = ("postgresql://", "postgres://", "sqlite:///")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def check_history_url(url: str) -> str:
    """The history store's URL if it is one we open (postgresql://, postgres://, sqlite:///PATH or a plain
    path), else ValueError naming only the scheme (the rest may hold a password).

    Anything that starts like ``scheme://`` is a URL, so ``postgresql+psycopg://...`` or a typo such as
    ``postgresq://`` is refused rather than taken for a directory name; ``./a:b.db`` stays a path.
    """
    match = _SCHEME.match(url)
    if match is None:
        return url
    if url.startswith(("postgresql://", "postgres://")):
        return check_postgres_url(url)
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return url
    if match.group(1) == "sqlite":
        raise ValueError("a SQLite URL is sqlite:///PATH (three slashes, then the path)")
    raise ValueError(f"{match.group(0)!r} is not supported: use postgresql://, postgres://, sqlite:///PATH"
                     " or a plain path")


def _history_url(v: Any) -> str | None:
    text = _optional_text(v)
    return None if text is None else check_history_url(text.strip())


def _format(v: Any) -> str:
    if isinstance(v, str) and v.strip().lower() in ("csv", "parquet", "jsonl"):
        return v.strip().lower()
    raise ValueError("expected csv, parquet or jsonl")


def _metrics_file(v: Any) -> str | None:
    text = _optional_text(v)
    if text is not None and not text.endswith(".prom"):
        raise ValueError("must end in .prom (node_exporter's textfile collector reads only *.prom files)")
    return text


# config key -> (Settings field, parser)
KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "api.base_url": ("base_url", _url),
    "api.allow_insecure_http": ("allow_insecure_http", _bool),
    "rate.limit": ("rate_limit", _number(int, low=1)),
    "rate.window": ("rate_window", _number(float, low=0.001)),
    "rate.burst": ("rate_burst", _number(int, low=1)),
    "rate.max_per_second": ("rate_max_per_second", _number(int, low=1)),
    "rate.margin": ("rate_margin", _number(float, low=0, allow_none=True)),
    "rate.enabled": ("rate_enabled", _bool),
    "rate.shared": ("rate_shared", _shared),
    "crawl.parallelism": ("parallelism", _parallelism),
    "crawl.page_size": ("page_size", _number(int, low=1, allow_none=True)),
    "crawl.max_pages": ("max_pages", _number(int, low=1, allow_none=True)),
    "crawl.max_items": ("max_items", _number(int, low=1, allow_none=True)),
    "crawl.max_credits": ("max_credits", _number(int, low=0, allow_none=True)),
    "crawl.data_dir": ("data_dir", _text),
    "crawl.id_ttl_days": ("id_ttl_days", _number(float, low=0)),
    "retry.attempts": ("retry_attempts", _number(int, low=1)),
    "retry.base_delay": ("retry_base_delay", _number(float, low=0)),
    "retry.max_delay": ("retry_max_delay", _number(float, low=0)),
    "retry.stall_limit": ("retry_stall_limit", _number(float, low=0)),
    "http.connect_timeout": ("connect_timeout", _number(float, low=0.001)),
    "http.read_timeout": ("read_timeout", _number(float, low=0.001)),
    "output.bom": ("output_bom", _bool),
    "output.raw": ("output_raw", _bool),
    "output.format": ("output_format", _format),
    "output.metrics_file": ("metrics_file", _metrics_file),
    "output.summary_json": ("summary_json", _optional_text),
    "history.url": ("history_url", _history_url),
    "jobs.url": ("jobs_url", _jobs_url),
    "jobs.heartbeat_timeout": ("jobs_heartbeat_timeout", _number(float, low=0.1)),
    "download.parallelism": ("download_parallelism", _number(int, low=1)),
    "download.per_host_rate": ("download_per_host_rate", _number(float, low=0.01)),
}

ENV_KEYS = {"TIKLIVE_BASE_URL": "api.base_url", "CRAWLER_RATE_SHARED": "rate.shared", "CRAWLER_JOBS_URL": "jobs.url"}
# Values that may carry a password: an error about them never repeats them.
HIDDEN_VALUES = frozenset({"history.url"})


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, key + "."))
        else:
            out[key] = value
    return out


def _apply(values: dict[str, Any], layer: Mapping[str, Any], source: Callable[[str], str]) -> None:
    for key, raw in layer.items():
        if key == "api.key":
            raise UsageError(f"{source(key)}: the API key is read only from the {KEY_ENV} environment variable")
        if key not in KEYS:
            raise UsageError(f"{source(key)}: unknown setting '{key}' (see config.toml for the known keys)")
        field, parse = KEYS[key]
        try:
            values[field] = parse(raw)
        except (ValueError, TypeError, OverflowError) as exc:
            if key in HIDDEN_VALUES:
                raise UsageError(f"{source(key)}: invalid value for '{key}': {exc}") from None
            shown = masked(raw) if isinstance(raw, str) else raw
            raise UsageError(f"{source(key)}: invalid value {shown!r} for '{key}': {exc}") from None


def config_path(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """The config file to read: --config, else CRAWLER_CONFIG, else ./config.toml if present."""
    if explicit:
        return Path(explicit)
    if environ.get("CRAWLER_CONFIG"):
        return Path(environ["CRAWLER_CONFIG"])
    default = Path("config.toml")
    return default if default.is_file() else None


def read_toml(path: Path) -> dict[str, Any]:
    """The flattened keys of a config file, or a UsageError naming the file."""
    try:
        with path.open("rb") as fh:
            return _flatten(tomllib.load(fh))
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist (check --config / CRAWLER_CONFIG)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: malformed TOML: {exc}") from None


# Flags are given by their config key; this names the flag in error messages.
FLAG_NAMES = {
    "api.base_url": "--base-url",
    "rate.limit": "--rate",
    "rate.window": "--window",
    "rate.burst": "--burst",
    "rate.max_per_second": "--max-per-second",
    "rate.shared": "--rate-shared",
    "crawl.parallelism": "--parallelism",
    "crawl.page_size": "--page-size",
    "crawl.max_pages": "--max-pages",
    "crawl.max_items": "--max-items",
    "crawl.max_credits": "--max-credits",
    "crawl.data_dir": "--data-dir",
    "retry.attempts": "--retries",
    "output.bom": "--bom",
    "output.raw": "--raw",
    "output.format": "--format",
    "history.url": "--history-url",
    "output.metrics_file": "--metrics-file",
    "output.summary_json": "--summary-json",
    "jobs.url": "--jobs-url",
}


def load_settings(
    *,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve settings: built-in defaults < config.toml < environment < flags (given by config key)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_path(config_file, env)
    if path is not None:
        _apply(values, read_toml(path), lambda key: str(path))
    env_layer = {ENV_KEYS[name]: env[name] for name in ENV_KEYS if env.get(name)}
    _apply(values, env_layer, lambda key: next(n for n, k in ENV_KEYS.items() if k == key))
    _apply(values, {k: v for k, v in (flags or {}).items() if v is not None}, lambda key: FLAG_NAMES.get(key, key))
    return Settings(**values)


def api_key(environ: Mapping[str, str] | None = None) -> Secret:
    """The API key from TIKLIVE_API_KEY, or a UsageError saying how to set it."""
    env = os.environ if environ is None else environ
    value = env.get(KEY_ENV, "").strip()
    if not value:
        raise UsageError(f"no API key: set {KEY_ENV} (for the simulator: export {KEY_ENV}=sim-key)")
    return Secret(value)
