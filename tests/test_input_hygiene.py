"""Silent no-ops and inputs that failed without a word (issue 23, items 6 and 8), from the user's side: a retry
with nothing to retry, `get` with a misspelt parameter, flags a command does not use, a CSV given without
--column, invisible characters in a handle, UTF-16 without a BOM.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.conftest import SimFactory
from tests.test_cli import FAST_TOML, crawler, environ, error_line, read_csv
from tests.test_download import WORLD as MEDIA_WORLD
from tests.test_download import crawler as download
from tests.test_download import posts_csv, videos
from tests.test_input import RUN, WORLD, files, handles

pytestmark = pytest.mark.slow  # every test here starts processes



async def test_retry_failed_with_nothing_to_retry_says_so_and_names_all(simulator: SimFactory,
                                                                        tmp_path: Path) -> None:
    """--retry-failed on a job whose only failure is not_found: exit 3 (the job is complete, an item failed), no
    request, one line saying there is nothing to retry and the command with --retry-failed=all, which asks again."""
    async with simulator(world=WORLD) as sim:
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        (tmp_path / "in.txt").write_text(handles(sim.world, 1)[0] + "\nghost_account_404\n")
        code, _, err = await crawler(["profiles", "in.txt", "-o", "out.csv", *RUN], environ(sim), tmp_path)
        assert code == 3 and sim.stats.requests == 2, err
        code, _, err = await crawler(["profiles", "in.txt", "-o", "out.csv", "--retry-failed", *RUN], environ(sim),
                                     tmp_path)
        line = error_line(err)
        assert code == 3 and sim.stats.requests == 2, err
        assert "--retry-failed: nothing to retry (failures: not_found: 1)" in line, line
        command = line.rsplit(": ", 1)[1]
        assert command.startswith("crawler profiles") and command.endswith(" --retry-failed=all"), line
        code, _, err = await crawler(shlex.split(command)[1:], environ(sim), tmp_path)
        assert code == 3 and sim.stats.requests == 3, err  # the printed command asks for the ghost once more


async def test_download_retry_failed_with_nothing_to_retry_says_so(simulator: SimFactory, tmp_path: Path) -> None:
    """`download` whose only failure is media_unavailable offers no --retry-failed; given anyway, it sends nothing and
    says there is nothing to retry (before: "re-run with --retry-failed", which then did nothing, silently)."""
    async with simulator(world=MEDIA_WORLD) as sim:
        rows = videos(sim, await posts_csv(sim, tmp_path, 4))
        sim.media.revoke(rows[1]["video_id"])
        args = ["download", "posts.csv", "-o", "media", "--what", "video", "--config", "fast.toml", "-q"]
        code, err = await download(args, sim, tmp_path)
        assert code == 3 and "--retry-failed" not in error_line(err), err
        requests, media_requests = sim.stats.requests, sim.media.stats.requests
        code, err = await download([*args, "--retry-failed"], sim, tmp_path)
        assert code == 3 and "--retry-failed: nothing to retry" in error_line(err), err
        assert (sim.stats.requests, sim.media.stats.requests) == (requests, media_requests)


async def test_get_refuses_an_unknown_parameter_before_any_credit(simulator: SimFactory, tmp_path: Path) -> None:
    """`get userinfo-by-username usrname=x`: exit 2 naming the parameter and the known one, no request;
    --raw-params sends it (one request)."""
    async with simulator(world=WORLD) as sim:
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        code, out, err = await crawler(["get", "userinfo-by-username", "usrname=x", "--config", "fast.toml"],
                                       environ(sim), tmp_path)
        line = error_line(err)
        assert code == 2 and not out and sim.stats.requests == 0, err
        assert "unknown parameter 'usrname' for /userinfo-by-username/" in line and "known: username" in line, line
        code, _, err = await crawler(["get", "/user-posts/", "userid=1", "count=5", "cursor=0", "--config",
                                      "fast.toml", "--raw-params"], environ(sim), tmp_path)
        assert sim.stats.requests == 1, err  # known names pass (and --raw-params is accepted)
        code, _, err = await crawler(["get", "userinfo-by-username", "usrname=x", "--raw-params", "--config",
                                      "fast.toml"], environ(sim), tmp_path)
        assert sim.stats.requests == 2, err


@pytest.mark.parametrize("args", [
    ["estimate", "profiles", "in.txt", "--parallelism", "4"],
    ["estimate", "profiles", "in.txt", "--bom"],
    ["estimate", "profiles", "in.txt", "--max-credits", "5"],
    ["get", "userinfo-by-username", "username=x", "--page-size", "5"],
    ["get", "userinfo-by-username", "username=x", "--retries", "3"],
    ["regions", "--max-items", "5"],
])
async def test_estimate_get_and_regions_refuse_flags_that_do_nothing_for_them(simulator: SimFactory, tmp_path: Path,
                                                                              args: list[str]) -> None:
    """A settings flag the command does not use: exit 2 naming it, no request, nothing left behind."""
    async with simulator(world=WORLD) as sim:
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        (tmp_path / "in.txt").write_text(handles(sim.world, 1)[0] + "\n")
        code, _, err = await crawler([*args, "--config", "fast.toml"], environ(sim), tmp_path)
        assert sim.stats.requests == 0
    line = error_line(err)
    flag = next(a for a in args if a.startswith("--"))
    assert code == 2 and f"{args[0]}: {flag}" in line and f"not an option of `crawler {args[0]}`" in line, err
    assert files(tmp_path) == {"fast.toml", "in.txt"}


async def test_estimate_and_get_help_offer_only_what_they_use(tmp_path: Path) -> None:
    """`estimate --help` keeps the walk caps and the rate, not --bom or --parallelism; `get --help` offers
    --raw-params and --max-credits, not --page-size."""
    code, out, _ = await crawler(["estimate", "--help"], environ(None), tmp_path)
    assert code == 0 and "--max-items" in out and "--rate" in out
    assert not [f for f in ("--bom", "--raw ", "--parallelism", "--retries", "--quiet") if f in out], out
    code, out, _ = await crawler(["get", "--help"], environ(None), tmp_path)
    assert code == 0 and "--raw-params" in out and "--max-credits" in out
    assert not [f for f in ("--page-size", "--max-items", "--parallelism", "--bom") if f in out], out


async def test_a_csv_given_without_column_is_refused_naming_column(simulator: SimFactory, tmp_path: Path) -> None:
    """An Excel CSV (BOM, `;`, CRLF) without --column: exit 2 before any request, naming --column and its
    columns, nothing left behind; with the named --column it runs."""
    async with simulator(world=WORLD) as sim:
        names = handles(sim.world, 3)
        text = "handle;followers;region\r\n" + "".join(f"{h};{n * 10};US\r\n" for n, h in enumerate(names))
        (tmp_path / "in.csv").write_bytes(("\ufeff" + text).encode())
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        for command in (["profiles", "in.csv", "-o", "out.csv"], ["estimate", "profiles", "in.csv"]):
            code, _, err = await crawler([*command, "--config", "fast.toml", "--data-dir", "d"], environ(sim),
                                         tmp_path)
            line = error_line(err)
            assert code == 2 and sim.stats.requests == 0, err
            assert "line 1 looks like a CSV header (handle, followers, region): use --column handle" in line, line
            assert files(tmp_path) - {"d"} == {"in.csv", "fast.toml"}  # (estimate opens the data directory)
        code, _, err = await crawler(["profiles", "in.csv", "--column", "handle", "-o", "out.csv", *RUN],
                                     environ(sim), tmp_path)
        assert code == 0 and sim.stats.requests == 3, err
    assert sorted(r["handle"] for r in read_csv(tmp_path / "out.csv")) == sorted(names)


async def test_invisible_characters_are_shown_escaped_in_the_failures_file(simulator: SimFactory,
                                                                           tmp_path: Path) -> None:
    """A zero-width space, a right-to-left mark, a BOM inside a line and a C0/C1 control in handles: each line
    fails as invalid_input with the character escaped (\\u200b) and named in the detail."""
    async with simulator(world=WORLD) as sim:
        good = handles(sim.world, 1)[0]
        bad = ["ali\u200bce", "\u200fbob_x", "car\ufeffol", "da\x07ve", "er\x85in"]
        (tmp_path / "in.txt").write_bytes(("\n".join([good, *bad]) + "\n").encode())
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        code, _, err = await crawler(["profiles", "in.txt", "-o", "out.csv", *RUN], environ(sim), tmp_path)
        assert code == 3 and sim.stats.requests == 1, err
    failures = read_csv(tmp_path / "out.failures.csv")
    assert [r["input"] for r in failures] == ["ali\\u200bce", "\\u200fbob_x", "car\\ufeffol", "da\\x07ve",
                                              "er\\x85in"]
    assert {r["reason"] for r in failures} == {"invalid_input"}
    assert "ZERO WIDTH SPACE" in failures[0]["detail"] and "RIGHT-TO-LEFT MARK" in failures[1]["detail"]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
async def test_utf16_without_a_bom_is_read(simulator: SimFactory, tmp_path: Path, encoding: str) -> None:
    """UTF-16 without a BOM (a NUL every other byte) is read as UTF-16: every handle is a row, exit 0."""
    async with simulator(world=WORLD) as sim:
        names = handles(sim.world, 3)
        (tmp_path / "in.txt").write_bytes(("\r\n".join(["# watch list", *names]) + "\r\n").encode(encoding))
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        code, _, err = await crawler(["profiles", "in.txt", "-o", "out.csv", *RUN], environ(sim), tmp_path)
        assert code == 0 and sim.stats.requests == 3, err
    assert sorted(r["handle"] for r in read_csv(tmp_path / "out.csv")) == sorted(names)
