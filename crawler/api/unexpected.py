"""Answers of an unexpected shape: a 200 whose JSON is not the record expected.

`Client.call` reports every readable and unreadable answer here (one `ShapeWatch` per client). The first
`KEEP` bodies per endpoint and UTC day are kept under ``<data dir>/unexpected/<endpoint>/<day>/<n>.json`` (the
key's text scrubbed), and `STREAK` unreadable answers in a row from one endpoint stop the run with ShapeChanged.
"""

from __future__ import annotations

import datetime
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from crawler.errors import ShapeChanged

log = logging.getLogger("crawler.api.client")

KEEP = 20  # bodies kept per endpoint and UTC day
STREAK = 10  # unreadable answers in a row from one endpoint that mean the API changed shape
SCRUBBED = b"<api-key>"


class ShapeWatch:
    """Per endpoint: the streak of unreadable answers, and the bodies kept of them (none without a data dir)."""

    def __init__(self, data_dir: str | None, *, secret: bytes = b"", streak: int = STREAK, keep: int = KEEP,
                 today: Callable[[], datetime.date] | None = None) -> None:
        self.folder = Path(data_dir) / "unexpected" if data_dir else None
        self._secret = secret
        self._limit = streak
        self._keep = keep
        self._today = today or (lambda: datetime.datetime.now(datetime.UTC).date())
        self._streaks: Counter[str] = Counter()
        self.kept = 0  # bodies this client saved
        self.unreadable = 0  # unreadable answers this client met

    def note(self) -> str:
        """The summary's line naming the folder when this client met unreadable answers ('' when none)."""
        if not self.unreadable:
            return ""
        kept = f"; bodies kept in {self.folder}" if self.folder is not None and self.kept else ""
        return f"{self.unreadable:,} answers of an unexpected shape{kept} (`crawler doctor` checks the API's shapes)"

    def readable(self, endpoint: str) -> None:
        """An answer of this endpoint was read: its streak ends."""
        self._streaks.pop(endpoint, None)

    def unreadable_answer(self, endpoint: str, body: bytes) -> None:
        """Count one unreadable answer and keep its body; raise ShapeChanged on the `STREAK`-th in a row."""
        self.unreadable += 1
        self._streaks[endpoint] += 1
        where = self._save(endpoint, body)
        count = self._streaks[endpoint]
        if count >= self._limit:
            kept = f"; bodies kept in {where}" if where else ""
            raise ShapeChanged(f"the API's answers to {endpoint} changed shape ({count} in a row unreadable){kept}:"
                               " run `crawler doctor` and update the crawler before going on")

    def _save(self, endpoint: str, body: bytes) -> Path | None:
        """Keep the body as the next numbered file of today's folder for the endpoint (at most `KEEP`)."""
        if self.folder is None:
            return None
        name = endpoint.strip("/").replace("/", "_") or "root"
        day = self.folder / name / self._today().isoformat()
        try:
            day.mkdir(parents=True, exist_ok=True)
            n = sum(1 for _ in day.glob("*.json"))
            while n < self._keep:
                n += 1
                try:
                    with open(day / f"{n}.json", "xb") as f:  # another worker or process may take a number
                        f.write(body.replace(self._secret, SCRUBBED) if self._secret else body)
                except FileExistsError:
                    continue
                self.kept += 1
                break
        except OSError as exc:  # a diagnostic copy never fails the run; the disk's own checks do that
            log.warning("could not keep an unexpected answer of %s under %s: %s", endpoint, day, exc.strerror)
        return day
