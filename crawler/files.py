"""Durable file helpers: every file this tool writes aside and renames into place goes through here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_durably(tmp: Path, target: Path) -> None:
    """Rename the complete file ``tmp`` over ``target``: a power cut leaves the old file or the whole new one.

    ``tmp``'s bytes are fsynced, then renamed, then the rename is fsynced (its directory). Every file this
    tool writes aside and renames into place goes through here (tests/test_disk.py checks it).
    """
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


def copy_durably(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary name: ``target`` appears whole, fsynced, or not at all."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    replace_durably(tmp, target)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
