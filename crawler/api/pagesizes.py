"""Page sizes learned from the API's answers, per list endpoint, kept in the data directory.

The paginators ask each list for the most the reference says it gives; when the API shows a smaller
cap (three pages in a row with more to come at one smaller count) or rejects the size, the size it
settles on is written here, so later walks and `estimate` start from it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from crawler.files import atomic_write

log = logging.getLogger("crawler.api.pagesizes")

FILE_NAME = "page-sizes.json"


class PageSizes:
    """`{list kind: count}` learned so far; written (atomically) whenever it changes."""

    def __init__(self, data_dir: str | Path | None) -> None:
        self.path = Path(data_dir) / FILE_NAME if data_dir is not None else None
        self._sizes: dict[str, int] = {}
        if self.path is not None:
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                loaded = {}
            if isinstance(loaded, dict):
                self._sizes = {k: v for k, v in loaded.items() if isinstance(k, str) and type(v) is int and v > 0}

    def get(self, kind: str) -> int | None:
        """The learned count of a list, if any."""
        return self._sizes.get(kind)

    def learn(self, kind: str, size: int, why: str) -> None:
        """Remember `size` for `kind` (and say why, once)."""
        if self._sizes.get(kind) == size:
            return
        self._sizes[kind] = size
        log.info("%s pages: asking for %d from now on (%s)", kind, size, why)
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.path) as fh:
                fh.write(json.dumps(self._sizes, sort_keys=True) + "\n")
        except OSError as exc:  # a cache: the crawl goes on without it
            log.warning("cannot write %s (%s): learned page sizes are kept for this run only", self.path, exc)
