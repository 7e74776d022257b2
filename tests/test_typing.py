"""The package as a downstream user installs it is typed: mypy reads `Client`'s annotations (PEP 561 `py.typed`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

GOOD = '''\
import asyncio
from crawler import Client, Post


async def newest(user_id: str) -> list[str]:
    async with Client(base_url="http://127.0.0.1:1") as c:
        posts: list[Post] = [p async for p in c.user_posts(user_id, max_items=50, page_size=35, max_pages=2)]
        return [p.video_id for p in posts]


asyncio.run(newest("1"))
'''

WRONG = '''\
from crawler import Client


def wrong(c: Client) -> None:
    reveal_type(c.user_posts)
    c.user_posts("1", max_items="50")
    c.user_followers("1", max_page=3)
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package installed the way a user installs it (pip, not editable) into a directory of its own."""
    work = tmp_path_factory.mktemp("install")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "crawler", src / "crawler", ignore=shutil.ignore_patterns("__pycache__"))
    target = work / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return target


def _mypy(script: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """mypy --strict on ``script`` from its own directory (outside the repository), seeing only the installed copy."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    env["PYTHONPATH"] = str(site)  # what mypy's search path takes from the interpreter, as site-packages would be
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", os.devnull,
                           script.name], cwd=script.parent, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_installed_package_ships_py_typed(installed: Path) -> None:
    """The installed package carries the PEP 561 marker (the package data in pyproject.toml)."""
    assert (installed / "crawler" / "py.typed").is_file()


@pytest.mark.slow
def test_downstream_mypy_sees_client_types(installed: Path, tmp_path: Path) -> None:
    """A correct downstream script passes mypy --strict; a wrong one is reported: mypy sees the types, not Any."""
    good = tmp_path / "good" / "use_crawler.py"
    good.parent.mkdir()
    good.write_text(GOOD)
    ok = _mypy(good, installed)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    wrong = tmp_path / "wrong" / "use_crawler.py"
    wrong.parent.mkdir()
    wrong.write_text(WRONG)
    bad = _mypy(wrong, installed)
    out = bad.stdout
    assert bad.returncode == 1, out + bad.stderr
    assert 'Revealed type is "def (user_id: str, *, cursor: str | int | None =, page_size: int | None =' in out, out
    assert "AsyncGenerator[crawler.api.records.Post, None]" in out, out
    assert 'Argument "max_items" to "user_posts" of "Endpoints" has incompatible type "str"' in out, out
    assert 'Unexpected keyword argument "max_page" for "user_followers"' in out, out
