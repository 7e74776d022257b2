"""A real full disk and a real read-only directory (a small tmpfs): one line naming the path and the fix, exit 2
before any request or 1 after (never "please report it"), and once space is freed the same command completes
with every row exactly once.

Mounting needs root. CI runs as root, so these tests fail (never skip) where mount is refused. A crawler that
meets a full disk mid-run is frozen at a kill point (SIGSTOP), the disk is filled, then it is let go: no timing.
A read-only remount is refused while a process holds a file open for writing (EBUSY), so a directory turned
read-only is staged before a run, never during one.

A power cut cannot be staged here: that every file renamed into place is fsynced (its bytes, then its directory)
is checked by reading the source for renames outside the one helper, `files.replace_durably` (which
`files.atomic_write` renames with), and by watching the failures file, `history export`, the learned page sizes, the
summary JSON and ingest's out-dir id go through it.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from crawler import files
from crawler.api.pagesizes import PageSizes
from crawler.engine.metrics import write_json
from crawler.history.export import export_csv
from crawler.history.store import HistoryStore
from crawler.runs.ingest_files import out_dir_id as _out_dir_id
from crawler.sim.data import WorldConfig
from crawler.sim.server import Simulator
from crawler.sinks import csv_sink as sinks
from tests.conftest import SimFactory
from tests.test_cli import FAST_TOML, crawler, environ, error_line, public_users, read_csv
from tests.test_distributed import _stopped
from tests.test_download import WORLD as MEDIA_WORLD
from tests.test_download import cover, posts_csv

WORLD = WorldConfig(seed=11, users=1_200)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the test's length (root only; CI runs as root)."""
    assert os.geteuid() == 0, "these tests mount a tmpfs: run them as root (CI does)"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path: Path, mode: str) -> None:
    """Make a mounted tmpfs read-only (``ro``) or writable again (``rw``)."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill(disk: Path) -> Path:
    """Write zeros to ``disk/filler`` until the file system says ENOSPC; the filler."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 65_536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


async def frozen(args: list[str], sim: Simulator, cwd: Path, point: str) -> asyncio.subprocess.Process:
    """`python -m crawler ARGS` stopped (SIGSTOP) at kill point ``point`` (bounded wait)."""
    env = {**environ(sim), "CRAWLER_TEST_STOP_AT": point}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=cwd, env=env,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    for _ in range(3_000):
        if _stopped(proc.pid) or proc.returncode is not None:
            break
        await asyncio.sleep(0.01)
    assert _stopped(proc.pid), f"the crawler never reached {point}"
    return proc


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """Let a frozen crawler go on (SIGCONT) and wait for its end: (exit code, stderr)."""
    proc.send_signal(signal.SIGCONT)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.slow
@pytest.mark.parametrize(("when", "code"), [("before any request", 2), ("after requests began", 1)])
async def test_a_full_disk_is_one_line_and_the_same_command_then_completes(
        simulator: SimFactory, tmp_path: Path, when: str, code: int) -> None:
    """A full tmpfs under the output: one line naming it and the fix (exit 2 before any request, 1 after); with
    space freed, the same command completes with every handle's row exactly once."""
    with tmpfs(tmp_path / "disk") as disk:
        async with simulator(world=WORLD) as sim:
            names = [sim.world.handle(i) for i in public_users(sim.world, 300, max_videos=10**9, min_videos=0)]
            (tmp_path / "in.txt").write_text("\n".join(names) + "\n")
            (tmp_path / "fast.toml").write_text(FAST_TOML)
            args = ["profiles", "in.txt", "-o", "disk/out.csv", "--config", "fast.toml", "--data-dir", "d", "-q",
                    "--parallelism", "2"]
            if when == "before any request":
                filler = fill(disk)
                got, _, err = await crawler(args, environ(sim), tmp_path)
                assert sim.stats.requests == 0
                assert {p.name for p in disk.iterdir()} == {"filler"}  # nothing left behind
            else:
                proc = await frozen(args, sim, tmp_path, "fetched:50")
                filler = fill(disk)
                got, err = await finish(proc)
                assert 50 <= sim.stats.requests < len(names)
            line = error_line(err)
            assert got == code, err
            assert f"the disk holding {disk} is full: free some space there, then run the same command" in line
            filler.unlink()
            got, _, err = await crawler(args, environ(sim), tmp_path)
            assert got == 0, err
        rows = [r["handle"] for r in read_csv(disk / "out.csv")]
    assert sorted(rows) == sorted(names)  # each once


@pytest.mark.slow
async def test_a_read_only_data_directory_is_one_line_exit_2(simulator: SimFactory, tmp_path: Path) -> None:
    """A data directory on a read-only file system: exit 2 before any request, one line naming it and the fix;
    made writable, the same command completes."""
    with tmpfs(tmp_path / "ro") as ro:
        (ro / "d").mkdir()
        remount(ro, "ro")
        async with simulator(world=WORLD) as sim:
            names = [sim.world.handle(i) for i in public_users(sim.world, 5, max_videos=10**9, min_videos=0)]
            (tmp_path / "in.txt").write_text("\n".join(names) + "\n")
            (tmp_path / "fast.toml").write_text(FAST_TOML)
            args = ["profiles", "in.txt", "-o", "out.csv", "--config", "fast.toml", "--data-dir", "ro/d", "-q"]
            code, _, err = await crawler(args, environ(sim), tmp_path)
            line = error_line(err)
            assert code == 2 and sim.stats.requests == 0, err
            assert f"cannot write to {ro / 'd'} (a read-only file system or no permission): make it writable, then" \
                   " run the same command" in line
            assert not (tmp_path / "out.csv.state.db").exists()  # nothing left behind
            remount(ro, "rw")
            code, _, err = await crawler(args, environ(sim), tmp_path)
            assert code == 0, err
    assert sorted(r["handle"] for r in read_csv(tmp_path / "out.csv")) == sorted(names)


@pytest.mark.slow
@pytest.mark.parametrize(("when", "code"), [("before any request", 2), ("after requests began", 1)])
async def test_a_full_disk_under_a_download_is_one_line_and_the_same_command_then_completes(
        simulator: SimFactory, tmp_path: Path, when: str, code: int) -> None:
    """`download` into a full tmpfs (its state lives there too): one line naming it and the fix (exit 2 before
    any request, 1 after); with space freed, the same command completes with every file's exact bytes."""
    with tmpfs(tmp_path / "disk") as disk:
        async with simulator(world=MEDIA_WORLD) as sim:
            rows = await posts_csv(sim, tmp_path, 30)
            args = ["download", "posts.csv", "-o", "disk/covers", "--what", "cover", "--config", "fast.toml", "-q",
                    "--parallelism", "2"]
            api_before = sim.stats.requests
            if when == "before any request":
                filler = fill(disk)
                got, _, err = await crawler(args, environ(sim), tmp_path)
                assert sim.stats.requests == api_before and sim.media.stats.requests == 0
            else:
                proc = await frozen(args, sim, tmp_path, "media_fsynced:3")
                filler = fill(disk)
                got, err = await finish(proc)
            line = error_line(err)
            assert got == code, err
            assert f"the disk holding {disk / 'covers'} is full: free some space there, then run the same command" \
                   in line
            filler.unlink()
            got, _, err = await crawler(args, environ(sim), tmp_path)
            assert got == 0, err
            for r in rows:
                name, data = cover(sim, r["video_id"])
                assert (disk / "covers" / name).read_bytes() == data


def renames(source: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef | None]]:
    """(call text, innermost enclosing function) of each rename in a module: os.replace/rename, shutil.move, and
    a path's .replace(x)/.rename(x) (str.replace takes two arguments, dataclasses' replace keywords)."""
    def visit(node: ast.AST, func: ast.FunctionDef | ast.AsyncFunctionDef | None) -> Iterator[
            tuple[str, ast.FunctionDef | ast.AsyncFunctionDef | None]]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name, owner = node.func.attr, node.func.value
            by_module = isinstance(owner, ast.Name) and (owner.id, name) in {
                ("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move")}
            by_path = name in ("replace", "rename") and len(node.args) == 1 and not node.keywords
            if by_module or by_path:
                yield ast.unparse(node), func
        for child in ast.iter_child_nodes(node):
            yield from visit(child, func)
    return visit(ast.parse(source), None)


def test_every_rename_into_place_goes_through_the_durable_helper() -> None:
    """The only rename in crawler/ is files.replace_durably's (fsync, rename, fsync the directory)."""
    root = Path(files.__file__).parent
    found: set[tuple[str, str]] = set()
    for path in sorted(root.rglob("*.py")):
        for _, func in renames(path.read_text(encoding="utf-8")):
            found.add((str(path.relative_to(root)), func.name if func is not None else "<module>"))
    assert found == {("files.py", "replace_durably")}


def test_failures_export_and_page_sizes_are_renamed_into_place_durably(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The failures file, `history export`, the learned page sizes, a summary JSON and ingest's out-dir id are each
    written through atomic_write (replace_durably), and no temporary file is left."""
    real = files.replace_durably
    targets: list[str] = []

    def watched(tmp: Path, target: Path) -> None:
        targets.append(target.name)
        real(tmp, target)

    monkeypatch.setattr(files, "replace_durably", watched)
    assert sinks.write_failures(tmp_path / "out.failures.csv", [("ghost", "/api/user/info/", "not_found", "")]) == 1
    store = HistoryStore(f"sqlite:///{tmp_path / 'history.db'}")
    try:
        assert export_csv(store, tmp_path / "export.csv") == 0
    finally:
        store.close()
    PageSizes(tmp_path / "data").learn("posts", 20, "a test")
    write_json(tmp_path / "summary.json", {"a": 1})
    first = _out_dir_id(tmp_path)
    assert _out_dir_id(tmp_path) == first
    assert targets == ["out.failures.csv", "export.csv", "page-sizes.json", "summary.json", ".ingest-id"]
    assert [p.name for p in sorted(tmp_path.rglob("*.tmp")) + sorted(tmp_path.rglob("*.part"))] == []


@pytest.mark.slow
async def test_a_read_only_ingest_out_dir_is_one_line_exit_2(simulator: SimFactory, tmp_path: Path) -> None:
    """`ingest` into an out-dir on a read-only file system: exit 2 before any request, one line naming it and the
    fix, as the job commands; made writable, the same command completes."""
    with tmpfs(tmp_path / "ro") as ro:
        (ro / "out").mkdir()
        remount(ro, "ro")
        async with simulator(world=WORLD) as sim:
            names = [sim.world.handle(i) for i in public_users(sim.world, 5, max_videos=10**9, min_videos=0)]
            (tmp_path / "in.txt").write_text("\n".join(names) + "\n")
            (tmp_path / "fast.toml").write_text(FAST_TOML)
            args = ["ingest", "in.txt", "--out-dir", "ro/out", "--config", "fast.toml", "-q"]
            code, _, err = await crawler(args, environ(sim), tmp_path)
            line = error_line(err)
            assert code == 2 and sim.stats.requests == 0, err
            assert "(a read-only file system or no permission): make it writable, then run the same command" in line
            assert str(ro / "out") in line, line
            remount(ro, "rw")
            code, _, err = await crawler(args, environ(sim), tmp_path)
            assert code == 0, err
