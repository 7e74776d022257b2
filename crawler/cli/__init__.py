"""The command line: one command per job; errors become one line and CONTRACT.md's exit code.

`main` is the `crawler` console script (pyproject.toml) and what ``python -m crawler`` runs.
"""

from __future__ import annotations

from crawler.cli.entry import main

__all__ = ["main"]
