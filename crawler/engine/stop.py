"""Stopping a run on SIGINT/SIGTERM: the first signal drains the requests under way, a second stops at once.

The policy lives here; the API client only offers its hook (`crawler.api.client.SendHook`), which this module reads
(the tasks inside a call, the requests on the wire) and sets (the refusal every later try raises).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import Any

from crawler.api.client import Client
from crawler.engine.stats import LIVE
from crawler.errors import CrawlerError, Interrupted, RunStopped

SIGNALS = ((signal.SIGINT, 130), (signal.SIGTERM, 143))  # and the exit code each stop ends with


def stop_sending(client: Client, error: RunStopped) -> tuple[set[asyncio.Task[Any]], int]:
    """From now on every call of ``client`` raises a copy of ``error`` before anything more is sent (a retry, a page,
    a 429's next try). Returns the tasks inside a call whose request is not under way (waiting for the rate gate, an
    outage or a retry's backoff: a graceful stop cancels them) and how many requests are under way (their answers
    are paid for: a graceful stop lets them come and be committed)."""
    hook = client.hook
    hook.refusal = error
    return hook.calling - hook.on_wire, len(hook.on_wire)


class GracefulStop:
    """SIGINT/SIGTERM for a worker pool (crawl, ingest, a PostgreSQL job's worker), over its `request_stop`.

    The first signal lets the requests under way be answered and committed: they are paid for. Nothing else is
    sent: the pool's `request_stop` (soft while ``_draining``) stops taking items; whatever waits inside a call
    with nothing under way (the rate gate, an outage, a retry's backoff) is cancelled; a worker committing a page
    is refused at its next request. A second signal stops at once.
    """

    _draining = False  # a first signal: the requests under way are being answered and committed
    _signals = 0
    quiet = True  # False: the first signal says how many answers it waits for
    client: Client

    def request_stop(self, error: CrawlerError) -> None:
        raise NotImplementedError

    def signalled(self, error: Interrupted) -> int:
        """Handle one signal; the number of answers the stop waits for."""
        self._signals += 1
        if self._signals > 1 or not hasattr(self, "client"):
            self._draining = False
            self.request_stop(error)
            return 0
        self._draining = True
        waiting, in_flight = stop_sending(self.client, error)
        self.request_stop(error)
        for task in waiting:
            task.cancel()
        if in_flight and not self.quiet:
            with LIVE.above(sys.stderr):
                print(f"crawler: {error}: waiting for the {in_flight} requests already sent (paid for) to be answered"
                      " and written; send it again to stop at once", file=sys.stderr)
        return in_flight


def install_signals(handler: Callable[[Interrupted], object]) -> list[signal.Signals]:
    """Call ``handler(Interrupted("stopped by SIGINT", 130))`` (143 for SIGTERM) on each signal; the signals installed
    (none where the loop cannot: not the main thread, or Windows). Undo with `remove_signals`."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig, code in SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, handler, Interrupted(f"stopped by {sig.name}", code))
            installed.append(sig)
    return installed


def remove_signals(installed: list[signal.Signals]) -> None:
    """Remove the handlers `install_signals` installed."""
    loop = asyncio.get_running_loop()
    for sig in installed:
        loop.remove_signal_handler(sig)
