"""Test-only crash points: `CRAWLER_TEST_KILL_AT=point:n` SIGKILLs the process the n-th time `point` is reached.

Points: `fetched` (a page is in memory, not yet handed to the sink), `written` (rows are in the
`.part` file, not yet fsynced), `fsynced` (the file is durable, the state not yet updated),
`committing` (inside the state transaction, before COMMIT). Unset, a call costs one comparison.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("CRAWLER_TEST_KILL_AT", "")
_POINT, _, _N = _SPEC.partition(":")
_TARGET = int(_N) if _N.isdigit() else 0
_seen = 0


def reached(point: str) -> None:
    """Die here (SIGKILL, no cleanup) if this is the configured point's n-th arrival."""
    global _seen
    if point != _POINT:
        return
    _seen += 1
    if _seen == _TARGET:
        os.kill(os.getpid(), signal.SIGKILL)
