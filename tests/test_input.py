"""What a new user's inputs and outputs meet, from the user's side: the command, its exit code, the files
afterwards and the one line printed. Outputs that would destroy a file, commented and encoded inputs, the
failures file fed back, --retry-failed, and an edited input that continues its job.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from crawler.sim.data import World, WorldConfig
from tests.conftest import KEY, SimFactory
from tests.test_cli import FAST_TOML, crawler, environ, error_line, public_users, read_csv

pytestmark = pytest.mark.slow  # every test here starts processes

WORLD = WorldConfig(seed=11, users=1_200)
RUN = ["--config", "fast.toml", "--data-dir", "d", "-q"]


def handles(w: World, n: int) -> list[str]:
    """n handles of public users (each is one profile row, one credit)."""
    return [w.handle(i) for i in public_users(w, n, max_videos=10**9, min_videos=0)]


def files(tmp: Path) -> set[str]:
    """Every file name in the directory."""
    return {p.name for p in tmp.iterdir()}


async def test_the_output_may_not_be_the_input(simulator: SimFactory, tmp_path: Path) -> None:
    """`-o in.csv` with `in.csv` as input: exit 2 naming the file and --overwrite; the input is untouched."""
    async with simulator(world=WORLD) as sim:
        text = "handle\n" + "\n".join(handles(sim.world, 3)) + "\n"
        (tmp_path / "in.csv").write_text(text)
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        code, _, err = await crawler(["profiles", "in.csv", "--column", "handle", "-o", "in.csv", *RUN],
                                     environ(sim), tmp_path)
        assert sim.stats.requests == 0
    line = error_line(err)
    assert code == 2 and "in.csv is the input file" in line and "--overwrite" in line
    assert (tmp_path / "in.csv").read_text() == text
    assert files(tmp_path) == {"in.csv", "fast.toml"}  # no lock, state or data directory left behind


async def test_an_existing_file_not_written_by_crawler_is_not_replaced_without_overwrite(
        simulator: SimFactory, tmp_path: Path) -> None:
    """`-o mine.csv` over a file the tool did not write: exit 2 and the file kept; with --overwrite it is replaced."""
    async with simulator(world=WORLD) as sim:
        names = handles(sim.world, 3)
        (tmp_path / "h.txt").write_text("\n".join(names) + "\n")
        (tmp_path / "mine.csv").write_text("precious,data\n")
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        code, _, err = await crawler(["profiles", "h.txt", "-o", "mine.csv", *RUN], environ(sim), tmp_path)
        line = error_line(err)
        assert code == 2 and "mine.csv exists and was not written by crawler" in line and "--overwrite" in line
        assert (tmp_path / "mine.csv").read_text() == "precious,data\n"
        assert sim.stats.requests == 0 and files(tmp_path) == {"h.txt", "mine.csv", "fast.toml"}
        code, _, err = await crawler(["profiles", "h.txt", "-o", "mine.csv", "--overwrite", *RUN], environ(sim),
                                     tmp_path)
        assert code == 0, err
        assert sorted(r["handle"] for r in read_csv(tmp_path / "mine.csv")) == sorted(names)
        # Our own finished output is ours: re-running the job says so and spends nothing.
        code, _, err = await crawler(["profiles", "h.txt", "-o", "mine.csv", *RUN], environ(sim), tmp_path)
        assert code == 0 and sim.stats.requests == 3, err


async def test_the_failures_file_fed_back_yields_the_same_items(simulator: SimFactory, tmp_path: Path) -> None:
    """`--column input` over OUT.failures.csv reads '@name back as @name: the same items fail the same way."""
    async with simulator(world=WORLD) as sim:
        good = handles(sim.world, 2)
        lines = ["@" + good[0], "@ghost_account_404", "=ghost_account_405", "-ghost.account", good[1]]
        (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        code, _, err = await crawler(["profiles", "in.txt", "-o", "out.csv", *RUN], environ(sim), tmp_path)
        assert code == 3, err
        first = read_csv(tmp_path / "out.failures.csv")
        assert [r["input"] for r in first] == ["'@ghost_account_404", "'=ghost_account_405", "'-ghost.account"]
        code, _, err = await crawler(["profiles", "out.failures.csv", "--column", "input", "-o", "again.csv", *RUN],
                                     environ(sim), tmp_path)
        assert code == 3, err
    again = read_csv(tmp_path / "again.failures.csv")
    assert [(r["input"], r["reason"]) for r in again] == [(r["input"], r["reason"]) for r in first]
    assert [r["reason"] for r in again] == ["not_found", "invalid_input", "invalid_input"]


async def test_comments_and_blank_lines_are_skipped_not_failures(simulator: SimFactory, tmp_path: Path) -> None:
    """A commented watch list with blank lines: exit 0, no failures file, one row per handle."""
    async with simulator(world=WORLD) as sim:
        names = handles(sim.world, 3)
        text = f"# my watch list\n\n{names[0]}\n   # indented comment\n{names[1]}\n\n#{names[2]}\n{names[2]}\n"
        (tmp_path / "in.txt").write_text(text)
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        code, _, err = await crawler(["profiles", "in.txt", "-o", "out.csv", *RUN], environ(sim), tmp_path)
        assert code == 0, err
        assert sim.stats.requests == 3
    assert not (tmp_path / "out.failures.csv").exists()
    assert sorted(r["handle"] for r in read_csv(tmp_path / "out.csv")) == sorted(names)


async def test_utf16_latin1_and_semicolon_inputs(simulator: SimFactory, tmp_path: Path) -> None:
    """UTF-16 with a BOM is read; a Latin-1 byte stays visible as \\xfc in the failures file; `;` CSV is sniffed."""
    async with simulator(world=WORLD) as sim:
        names = handles(sim.world, 4)
        (tmp_path / "u16.txt").write_bytes(("\n".join(names[:2]) + "\n").encode("utf-16"))
        (tmp_path / "latin.txt").write_bytes(names[2].encode() + b"\nm\xfcller\n")
        (tmp_path / "semi.csv").write_text(f"id;handle;note\n1;{names[3]};x\n2;@{names[0]};y\n")
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        code, _, err = await crawler(["profiles", "u16.txt", "-o", "u16.csv", *RUN], environ(sim), tmp_path)
        assert code == 0, err
        assert sorted(r["handle"] for r in read_csv(tmp_path / "u16.csv")) == sorted(names[:2])
        code, _, err = await crawler(["profiles", "latin.txt", "-o", "latin.csv", *RUN], environ(sim), tmp_path)
        assert code == 3, err
        code, _, err = await crawler(["profiles", "semi.csv", "--column", "handle", "-o", "semi_out.csv", *RUN],
                                     environ(sim), tmp_path)
        assert code == 0, err
    assert [r["handle"] for r in read_csv(tmp_path / "latin.csv")] == [names[2]]
    failure = read_csv(tmp_path / "latin.failures.csv")
    assert [(r["input"], r["reason"]) for r in failure] == [("m\\xfcller", "invalid_input")]
    assert "\ufffd" not in (tmp_path / "latin.failures.csv").read_text(encoding="utf-8")
    assert sorted(r["handle"] for r in read_csv(tmp_path / "semi_out.csv")) == sorted([names[3], names[0]])


async def test_retry_failed_retries_only_what_can_change(simulator: SimFactory, tmp_path: Path) -> None:
    """not_found is not billed again by --retry-failed (only by =all); the hint shows only when it applies;
    --retry-failed on a job that does not exist is exit 2 and leaves nothing behind."""
    async with simulator(world=WORLD) as sim:
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        (tmp_path / "in.txt").write_text(handles(sim.world, 2)[0] + "\nghost_account_404\nnot a handle!\n")
        code, _, err = await crawler(["profiles", "in.txt", "-o", "new.csv", "--retry-failed", *RUN], environ(sim),
                                     tmp_path)
        line = error_line(err)
        assert code == 2 and "no job for new.csv" in line and sim.stats.requests == 0
        assert files(tmp_path) == {"fast.toml", "in.txt"}

        code, _, err = await crawler(["profiles", "in.txt", "-o", "out.csv", *RUN], environ(sim), tmp_path)
        assert code == 3 and sim.stats.requests == 2
        line = error_line(err)
        assert "--retry-failed" not in line and "fix the invalid lines" in line  # nothing it could change
        code, _, err = await crawler(["profiles", "in.txt", "-o", "out.csv", "--retry-failed", *RUN], environ(sim),
                                     tmp_path)
        assert code == 3 and sim.stats.requests == 2, err  # not_found is not billed again
        code, _, err = await crawler(["profiles", "in.txt", "-o", "out.csv", "--retry-failed=all", *RUN],
                                     environ(sim), tmp_path)
        assert code == 3 and sim.stats.requests == 3, err  # =all asks once more
    assert {r["input"]: r["reason"] for r in read_csv(tmp_path / "out.failures.csv")} == {
        "ghost_account_404": "not_found", "not a handle!": "invalid_input"}


async def test_fixing_bad_lines_spends_exactly_the_fixed_items(simulator: SimFactory, tmp_path: Path) -> None:
    """1,000 handles with 10 bad lines; after fixing them the same command bills exactly 10 credits."""
    async with simulator(world=WORLD) as sim:
        names = handles(sim.world, 1_000)
        broken = {i * 97 + 3 for i in range(10)}
        lines = [f"{h}!" if n in broken else h for n, h in enumerate(names)]
        (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        args = ["profiles", "in.txt", "-o", "out.csv", "--config", "fast.toml", "--data-dir", "d"]
        code, _, err = await crawler(args, environ(sim), tmp_path)
        assert code == 3, err
        assert len(read_csv(tmp_path / "out.failures.csv")) == 10
        billed = sim.stats.billed[KEY]
        assert billed == 990
        (tmp_path / "in.txt").write_text("\n".join(names) + "\n")  # the 10 lines fixed
        code, _, err = await crawler(args, environ(sim), tmp_path)
        assert code == 0, err
        assert sim.stats.billed[KEY] - billed == 10
        assert "10 new items added, 0 done items no longer in it" in err
    assert sorted(r["handle"] for r in read_csv(tmp_path / "out.csv")) == sorted(names)
    assert not (tmp_path / "out.failures.csv").exists()


async def test_another_keyword_on_the_same_output_is_refused(simulator: SimFactory, tmp_path: Path) -> None:
    """A keyword is the whole input of a search: a different one on the same output is exit 2, not a merge."""
    async with simulator(world=WORLD) as sim:
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        args = ["-o", "s.csv", "--max-pages", "1", *RUN]
        code, _, err = await crawler(["search-users", "cosmo", *args], environ(sim), tmp_path)
        assert code in (0, 3), err
        before = sim.stats.requests
        code, _, err = await crawler(["search-users", "vibe", *args], environ(sim), tmp_path)
        assert sim.stats.requests == before
    line = error_line(err)
    assert code == 2 and "another keyword" in line and "--restart" in line


async def test_a_20_mb_line_round_trips_through_the_failures_file(simulator: SimFactory, tmp_path: Path) -> None:
    """A 20 MB line is invalid_input with its first characters shown; the failures file stays small and, fed
    back with --column input (as is a CSV with 20 MB cells), fails the same items the same way."""
    huge = "x" * 20_000_000
    async with simulator(world=WORLD) as sim:
        good = handles(sim.world, 2)
        (tmp_path / "in.txt").write_text(f"{good[0]}\n{huge}\nghost_account_404\n")
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        code, _, err = await crawler(["profiles", "in.txt", "-o", "out.csv", *RUN], environ(sim), tmp_path)
        assert code == 3, err
        assert (tmp_path / "out.failures.csv").stat().st_size < 4_000
        first = read_csv(tmp_path / "out.failures.csv")
        assert [r["reason"] for r in first] == ["invalid_input", "not_found"]
        assert first[0]["input"].startswith("xxxxxxxx") and "20,000,000 characters" in first[0]["detail"]
        code, _, err = await crawler(["profiles", "out.failures.csv", "--column", "input", "-o", "again.csv", *RUN],
                                     environ(sim), tmp_path)
        assert code == 3, err
        again = read_csv(tmp_path / "again.failures.csv")
        assert [(r["input"], r["reason"]) for r in again] == [(r["input"], r["reason"]) for r in first]
        # A CSV with 20 MB cells (one in another column, one in the column read) is read too.
        (tmp_path / "big.csv").write_text(f"handle,note\n{good[1]},{huge}\n{huge},note\n")
        code, _, err = await crawler(["profiles", "big.csv", "--column", "handle", "-o", "big_out.csv", *RUN],
                                     environ(sim), tmp_path)
        assert code == 3, err
    assert [r["handle"] for r in read_csv(tmp_path / "big_out.csv")] == [good[1]]
    big = read_csv(tmp_path / "big_out.failures.csv")
    assert [r["reason"] for r in big] == ["invalid_input"] and len(big[0]["input"]) < 200
