"""Test-only crash points: `CRAWLER_TEST_KILL_AT=point:n` SIGKILLs the process the n-th time `point` is reached.

Points: `fetched` (a page is in memory, not yet handed to the sink), `written` (rows are in the
`.part` file, not yet fsynced), `fsynced` (the file is durable, the state not yet updated),
`committing` (inside the state transaction, before COMMIT), `granting` (inside a PostgreSQL job's budget
transaction, holding the job row's lock), `job_printed` (a PostgreSQL job's id just printed), `restarted`
(ingest --restart: the day's snapshots dropped, the day file not yet replaced by the rows it keeps),
`enqueuing` (a PostgreSQL job's starter about to put its items on the queue, or a worker's session about to
put back the items it leaves), `exporting` (a row of a PostgreSQL job written to the export's temporary file),
`input_read` (a batch of `download`'s input committed, the next not yet read), `registering` (a PostgreSQL
worker checked the key's other workers, its own row not yet committed), `merged` (an edited input merged into
a local job's items, before the run starts), `job_commit` (a PostgreSQL job worker's group of pages about to be
committed), `grant` (a PostgreSQL job worker about to ask the job for credits).
`CRAWLER_TEST_STOP_AT=point:n` SIGSTOPs the process there instead (a frozen worker: it holds what it holds
until someone ends it). `CRAWLER_TEST_FAIL_AT=point:n` raises `RuntimeError` there (an error no rule expects: a bug,
a string the database refuses). `CRAWLER_TEST_HOLD_AT=point:seconds` makes every arrival at an awaited point
(`held`) wait that long: a slow step (a grant behind a row lock, an outage) that holds up only what waits on it.
Unset, a call costs one comparison.

Clock and identity seams, read where the program asks for them: `CRAWLER_TEST_NOW` (an ISO time that "now" is, for
tests that run ingest as a process: `fixed_now`), `CRAWLER_TEST_CLOCK_SKEW` (seconds added to this host's wall
clock, a host whose clock runs fast: `CLOCK_SKEW`; Redis never reads it), `CRAWLER_TEST_HOSTNAME` (the host name a
worker registers under: `host_name`, a test posing as another host), `CRAWLER_TEST_PROGRESS_INTERVAL` (seconds
between progress lines, a terminal's or a log's: `PROGRESS_INTERVAL`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

_SPEC = os.environ.get("CRAWLER_TEST_KILL_AT", "")
_POINT, _, _N = _SPEC.partition(":")
_TARGET = int(_N) if _N.isdigit() else 0
_seen = 0
_STOP_POINT, _, _STOP_N = os.environ.get("CRAWLER_TEST_STOP_AT", "").partition(":")
_STOP_TARGET = int(_STOP_N) if _STOP_N.isdigit() else 0
_stop_seen = 0
_FAIL_POINT, _, _FAIL_N = os.environ.get("CRAWLER_TEST_FAIL_AT", "").partition(":")
_FAIL_TARGET = int(_FAIL_N) if _FAIL_N.isdigit() else 0
_fail_seen = 0
_HOLD_POINT, _, _HOLD_S = os.environ.get("CRAWLER_TEST_HOLD_AT", "").partition(":")
NOW_ENV = "CRAWLER_TEST_NOW"
CLOCK_SKEW = float(os.environ.get("CRAWLER_TEST_CLOCK_SKEW", "0") or 0)
PROGRESS_INTERVAL = float(os.environ.get("CRAWLER_TEST_PROGRESS_INTERVAL", "0") or 0)


def fixed_now() -> str:
    """The ISO time `CRAWLER_TEST_NOW` says "now" is, or "" (the real clock)."""
    return os.environ.get(NOW_ENV, "").strip()


def host_name() -> str:
    """The host name workers register under: `CRAWLER_TEST_HOSTNAME`, or this host's."""
    return os.environ.get("CRAWLER_TEST_HOSTNAME") or socket.gethostname()


def reached(point: str) -> None:
    """Die here (SIGKILL, no cleanup) if this is the configured point's n-th arrival (or freeze: SIGSTOP; or fail:
    RuntimeError)."""
    global _seen, _stop_seen, _fail_seen
    if point == _FAIL_POINT:
        _fail_seen += 1
        if _fail_seen == _FAIL_TARGET:
            raise RuntimeError(f"test failure at {point}:{_fail_seen} (CRAWLER_TEST_FAIL_AT)")
    if point == _STOP_POINT:
        _stop_seen += 1
        if _stop_seen == _STOP_TARGET:
            os.kill(os.getpid(), signal.SIGSTOP)
    if point != _POINT:
        return
    _seen += 1
    if _seen == _TARGET:
        os.kill(os.getpid(), signal.SIGKILL)


async def held(point: str) -> None:
    """Wait here (asyncio) the seconds `CRAWLER_TEST_HOLD_AT` gives if it names this point."""
    if point == _HOLD_POINT:
        await asyncio.sleep(float(_HOLD_S))
