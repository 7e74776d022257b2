"""Messages that point the right way (issue 23, items 7 and 9): TLS errors, stale ledger limits, status of
download jobs, history commands' output and checks, summary wording."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import KEY, SimFactory
from tests.test_cli import crawler, environ, error_line
from tests.test_outage import WORLD, existing_handles

SLOW_TOML = "[rate]\nenabled = false\n[retry]\nbase_delay = 0\nmax_delay = 0\nstall_limit = 300\n"


@pytest.mark.slow
async def test_https_to_a_plain_http_simulator_is_exit_1_at_once_naming_tls(simulator: SimFactory,
                                                                            tmp_path: Path) -> None:
    """An https:// base URL on the simulator's plain-http port: exit 1 at the first request (not after the stall
    limit), one line naming TLS, the base URL and the http:// URL to use (loopback)."""
    async with simulator(world=WORLD) as sim:
        (tmp_path / "in.txt").write_text("\n".join(existing_handles(sim.world, 20)) + "\n")
        (tmp_path / "slow.toml").write_text(SLOW_TOML)
        https = sim.url.replace("http://", "https://")
        began = time.monotonic()
        code, _, err = await crawler(["profiles", "in.txt", "-o", "out.csv", "--config", "slow.toml",
                                      "--data-dir", "d", "--base-url", https, "--parallelism", "2"],
                                     environ(sim), tmp_path)
        took = time.monotonic() - began
        assert sim.stats.requests == 0  # no TLS handshake ever reached the HTTP handler
    line = error_line(err)
    assert code == 1, err
    assert took < 30, took  # never the 300 s stall limit
    assert "TLS/certificate" in line and https in line and f"--base-url {sim.url}" in line, line
    assert not (tmp_path / "out.failures.csv").exists()


HOLDER = """
import asyncio, sys
from crawler.rate.ledger import open_ledger
from crawler.rate.rules import Rules

async def main() -> None:
    led = open_ledger(sys.argv[3], sys.argv[1], sys.argv[2])
    await led.open(Rules(limit=500, window=60.0, max_per_second=40, burst=1, margin=0.3))
    print("open", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await led.aclose()

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("shared", ["local", "redis://127.0.0.1:6379/0"])
async def test_only_processes_alive_now_hold_the_keys_limits(simulator: SimFactory, tmp_path: Path,
                                                             shared: str) -> None:
    """A run that ended with other --rate never blocks the next one; a running process with other limits does, and
    once it is killed (SIGKILL: no goodbye) the next run proceeds at once."""
    import asyncio
    import sys

    async with simulator(world=WORLD) as sim:
        (tmp_path / "in.txt").write_text("\n".join(existing_handles(sim.world, 5)) + "\n")
        env = environ(sim)

        async def run(rate: int, out: str) -> tuple[int, str]:
            code, _, err = await crawler(["profiles", "in.txt", "-o", out, "--data-dir", "d", "--rate", str(rate),
                                          "--window", "60", "--rate-shared", shared], env, tmp_path)
            return code, err

        assert (await run(1000, "a.csv"))[0] == 0
        code, err = await run(900, "b.csv")  # at once, with other limits: the first run has ended
        assert code == 0, err

        holder = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLDER, KEY, sim.url, shared, env=env,
                                                      stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"open\n"
        code, err = await run(800, "c.csv")
        line = error_line(err)
        assert code == 2 and "rate.limit = 800" in line and "rate.limit = 500" in line, err
        assert f"pid {holder.pid}" in line, line
        holder.kill()
        await asyncio.wait_for(holder.wait(), 30)
        code, err = await run(700, "d.csv")
        assert code == 0, err


@pytest.mark.slow
async def test_status_reads_a_download_job_and_an_ingest_out_dir(simulator: SimFactory, tmp_path: Path) -> None:
    """`crawler status media/` after `crawler download ... -o media` shows the job's items and credits; on an
    ingest out-dir it shows the day files."""
    from tests.test_download import FAST, posts_csv

    async with simulator(world=WORLD) as sim:
        rows = await posts_csv(sim, tmp_path, 3)
        ids = [r["video_id"] for r in rows][:3]
        (tmp_path / "ids.txt").write_text("\n".join([*ids, "not-a-video"]) + "\n")
        env = environ(sim)
        billed = sim.stats.billed[KEY]
        code, _, err = await crawler(["download", "ids.txt", "-o", "media", "--what", "cover", "--config",
                                      "fast.toml", "-q", "--metrics-file", "m.prom"], env, tmp_path)
        assert code == 3, err
        assert 'crawler_last_run_exit_code{command="download"} 3' in (tmp_path / "m.prom").read_text()
        billed = sim.stats.billed[KEY] - billed
        code, out, err = await crawler(["status", "media"], env, tmp_path)
        assert code == 0, err
        assert "download --what cover -> media (complete)" in out, out
        assert f"{len(ids)} done, 1 failed, 0 pending of {len(ids) + 1}" in out, out
        assert f"credits_billed  {billed}" in out and "invalid_input: 1" in out, out

        (tmp_path / "watch.txt").write_text("\n".join(r["source_handle"] for r in rows[:2]) + "\n")
        (tmp_path / "fast.toml").write_text(FAST)
        code, _, err = await crawler(["ingest", "watch.txt", "--out-dir", "out", "-q", "--config", "fast.toml",
                                      "--history-url", str(tmp_path / "h.db")], env, tmp_path)
        assert code == 0, err
        code, out, err = await crawler(["status", "out"], env, tmp_path)
        assert code == 0, err
        assert "ingest out-dir  out" in out and "profiles files  1 days" in out, out
        code, _, err = await crawler(["status", "watch"], env, tmp_path)  # neither: the CSV job's message
        assert code == 2 and "was the job started with -o watch" in error_line(err), err


def _history(tmp: Path, users: int) -> str:
    """A SQLite history of ``users`` users on two days (followers 10 + n, then 20 + n); its path."""
    import datetime as dt

    from crawler.history.store import HistoryStore
    from tests.test_history_store import _profile

    path = tmp / "h.db"
    store = HistoryStore(str(path))
    try:
        for n in range(users):
            for d, base in ((dt.date(2026, 3, 1), 10), (dt.date(2026, 3, 2), 20)):
                store.record_snapshot(d, _profile(str(6800000000000000000 + n), f"user_{n}", base + n))
    finally:
        store.close()
    return str(path)


def test_history_queries_print_nothing_before_a_failure_and_refuse_days_below_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A query that fails prints its one line and no table header; --days 0 and -3 are exit 2 naming --days."""
    from crawler.cli import main

    url = _history(tmp_path, 3)
    for args in (["top", "--by", "bogus"], ["growth", "nosuchuser"], ["as-of", "2026-13-01"], ["top", "--days", "0"],
                 ["top", "--days", "-3"], ["top", "--limit", "0"]):
        code = main(["history", *args, "--history-url", url])
        out, err = capsys.readouterr()
        assert code == 2 and out == "", (args, out)
        line = error_line(err)
        if "--days" in args or "--limit" in args:
            assert f"argument {args[1]}" in line and "at least 1" in line, line
    assert main(["history", "top", "--days", "1", "--history-url", url]) == 0
    assert capsys.readouterr().out.startswith("handle")


@pytest.mark.slow
def test_history_output_to_a_closed_pipe_is_silent_and_export_dash_is_stdout(tmp_path: Path) -> None:
    """`history as-of D | head -1` and `history export -o - | head -1`: exit 0, nothing on stderr; `-o -` writes
    the CSV to stdout and no file named '-'."""
    import subprocess
    import sys

    url = _history(tmp_path, 3000)  # well over a pipe's buffer
    for args in (["as-of", "2026-03-02"], ["export", "-o", "-"]):
        with (tmp_path / "err").open("wb") as err_file:
            proc = subprocess.Popen([sys.executable, "-m", "crawler", "history", *args, "--history-url", url],
                                    cwd=tmp_path, env=environ(None), stdout=subprocess.PIPE, stderr=err_file)
            assert proc.stdout is not None
            first = proc.stdout.readline()
            proc.stdout.close()  # `head -1` exits
            code = proc.wait(timeout=30)
        err = (tmp_path / "err").read_text()
        assert first.startswith((b"handle,", b"user_id,")), first
        assert code == 0 and err == "", (args, code, err)
    assert not (tmp_path / "-").exists()
    done = subprocess.run([sys.executable, "-m", "crawler", "history", "export", "-o", "-", "--history-url", url],
                          cwd=tmp_path, env=environ(None), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.count("\n") == 1 + 2 * 3000, done.stderr
    assert "wrote 6,000 snapshots to stdout" in done.stderr and not (tmp_path / "-").exists()


@pytest.mark.slow
async def test_an_upper_case_csv_output_is_accepted(simulator: SimFactory, tmp_path: Path) -> None:
    """`-o OUT.CSV` is a CSV output like `-o out.csv`: the job runs and `status OUT.CSV` reads it."""
    async with simulator(world=WORLD) as sim:
        (tmp_path / "in.txt").write_text("\n".join(existing_handles(sim.world, 3)) + "\nnot a handle!\n")
        (tmp_path / "fast.toml").write_text(SLOW_TOML.replace("stall_limit = 300", "stall_limit = 5"))
        code, _, err = await crawler(["profiles", "in.txt", "-o", "OUT.CSV", "--config", "fast.toml", "--data-dir",
                                      "d", "-q"], environ(sim), tmp_path)
        assert code == 3, err
        assert len((tmp_path / "OUT.CSV").read_text().splitlines()) == 1 + 3
        assert (tmp_path / "OUT.failures.csv").is_file()
        code, out, err = await crawler(["status", "OUT.CSV"], environ(sim), tmp_path)
        assert code == 0 and "3 done, 1 failed" in out, err


async def test_a_usage_error_of_ingest_leaves_no_lock_and_no_new_out_dir(tmp_path: Path) -> None:
    """`ingest` stopped by a usage error (a missing input, an unknown --column) leaves no DIR/.ingest.lock, and an
    out-dir it made stays only if something else is in it."""
    from crawler.errors import UsageError
    from crawler.runs.ingest import ingest
    from tests.conftest import fast_settings

    (tmp_path / "w.txt").write_text("handle\nalice\n")
    (tmp_path / "kept").mkdir()
    settings = fast_settings("http://127.0.0.1:1", data_dir=str(tmp_path / "d"), history_url=str(tmp_path / "h.db"))
    with pytest.raises(UsageError, match="does not exist"):
        await ingest(str(tmp_path / "nosuch.txt"), tmp_path / "new", settings, api_key="k", install_signals=False)
    assert not (tmp_path / "new").exists()
    with pytest.raises(UsageError, match="--column x"):
        await ingest(str(tmp_path / "w.txt"), tmp_path / "kept", settings, api_key="k", column="x",
                     install_signals=False)
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / ".ingest.lock").exists()


def test_summary_wording_rates_plurals_and_caps() -> None:
    """No rate over a near-zero elapsed time; "1 credit" not "1 credits"; a --max-credits 0 stop never suggests 1;
    a lost item is said to be lost; a Retry-After without end is not "inf s"."""
    from crawler.cli.common import budget_line
    from crawler.engine.stats import Summary
    from crawler.jobs.estimate import Estimate
    from crawler.retry import retry_after_words
    from crawler.runs.distributed import _lost

    def summary(elapsed: float) -> str:
        return Summary(command="profiles", status="completed", items_total=3, items_done=3, items_failed=0,
                       items_pending=0, rows_written=3, rows_total=3, requests_sent=3, credits_billed=3,
                       run_requests=3, rate_limited=0, retries=0, elapsed=elapsed, parallelism=2, rate_used=198.0,
                       rate_window_seconds=60.0).render()

    assert "requests/s" not in summary(0.04) and "elapsed            0.0 s (paced at most" in summary(0.04)
    assert "1.50 requests/s" in summary(2.0)
    est = Estimate(command="posts", items=1, invalid=0, lookups=0, known_ids=1, pages_known=0, items_known=0,
                   items_unknown=1, single_calls=0, list_kind="posts", page_size=35).render()
    assert "for 1 credit," in est and "1 credits" not in est
    zero = budget_line(0, 0, 0, ["profiles", "in.txt", "--max-credits", "0"])
    assert "--max-credits 1" not in zero and "drop --max-credits" in zero, zero
    assert "--max-credits 20" in budget_line(10, 10, 9, ["profiles", "in.txt", "--max-credits", "10"])
    assert _lost(0) == "" and _lost(1) == "; 1 item it held went to other workers (its heartbeat lapsed)"
    assert retry_after_words(float("inf")) == "without end (Retry-After: inf)"
    assert retry_after_words(90.0) == "90 s (Retry-After)"


def test_status_jobs_export_and_history_queries_describe_themselves_in_help() -> None:
    """`--help` of status, jobs, export and every history query has a description and says each option's meaning
    (and its default where it has one)."""
    import argparse

    from crawler.cli.parser import build_parser

    def sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        found: argparse.ArgumentParser = action.choices[name]
        return found

    root = build_parser()
    history = sub(root, "history")
    parsers = {name: sub(root, name) for name in ("status", "jobs", "export")}
    parsers |= {f"history {q}": sub(history, q) for q in ("growth", "top", "as-of", "days", "export", "plot", "serve")}
    for name, p in parsers.items():
        assert p.description, name
        for action in p._actions:
            assert action.help, (name, action.option_strings or action.dest)
    top = parsers["history top"].format_help()
    assert "(default: 7)" in top and "(default: 20)" in top and "(default: followers-gained)" in top
    assert "default: None" not in parsers["history growth"].format_help()
