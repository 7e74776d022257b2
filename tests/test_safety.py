"""The API key never leaks, and the public Python API stays pinned."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import traceback
from pathlib import Path

import pytest

import crawler
from crawler.api.client import Client
from crawler.config import Secret, api_key, load_settings
from crawler.errors import CrawlerError, KeyRejected
from crawler.sim.data import World, WorldConfig
from tests.conftest import SimFactory, fast_settings

LEAK = "sk_test_LEAKCHECK_7f3a9c41d2"
FAULTS = frozenset({"5xx", "drop", "truncated", "malformed", "slow"})


def _chain(exc: BaseException) -> str:
    """Everything an exception can show: str, repr, the formatted traceback and its whole cause/context chain."""
    parts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current), repr(vars(current)) if hasattr(current, "__dict__") else ""]
        current = current.__cause__ or current.__context__
    parts.append("".join(traceback.format_exception(exc)))
    return "\n".join(parts)


@pytest.mark.slow
async def test_key_appears_in_no_log_error_repr_or_file(simulator: SimFactory, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """DEBUG logs, every exception (and its chain), reprs and every file a faulty run wrote are free of the key."""
    caplog.set_level(logging.DEBUG)
    world = WorldConfig(seed=4, users=500)
    async with simulator(world=world, keys={LEAK: None}, fault_rate=0.3, faults=FAULTS, slow_seconds=1.0) as sim:
        settings = fast_settings(sim.url, retry_attempts=2, read_timeout=0.2, data_dir=str(tmp_path / "data"))
        seen: list[str] = []
        async with Client(settings, api_key=LEAK) as client:
            seen += [repr(client), repr(client.options), repr(client._key), str(client._key)]
            w = sim.world
            for i in range(60):
                try:
                    await client.user_info(w.handle(i))
                except CrawlerError as exc:
                    seen.append(_chain(exc))
        async with Client(settings, api_key=LEAK + "x") as wrong:
            with pytest.raises(KeyRejected) as rejected:
                await wrong.get("/region-list/")
            seen.append(_chain(rejected.value))
        # A whole CLI run too: DEBUG logging, faults on, every file it writes.
        (tmp_path / "in.txt").write_text("\n".join(World(world).sample_handles(30)) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CRAWLER_", "TIKLIVE_"))}
        env.update(TIKLIVE_API_KEY=LEAK, TIKLIVE_BASE_URL=sim.url)
        config = "[http]\nread_timeout = 0.3\n[retry]\nbase_delay = 0\n[rate]\nenabled = false\n"
        (tmp_path / "c.toml").write_text(config)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "crawler", "posts", "-vv", "in.txt", "-o", "out.csv", "--data-dir", "data",
            "--retries", "3", "--config", "c.toml", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode in (0, 3), err.decode()[-2000:]
    assert b"DEBUG" in err and sum(sim.stats.faults.values()) > 0  # the run really logged and met faults
    assert len(seen) > 5
    for text in seen + [caplog.text, out.decode(), err.decode()]:
        assert LEAK not in text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "out.csv" for p in files) and any(p.suffix == ".db" for p in files)
    for path in files:
        assert LEAK.encode() not in path.read_bytes(), path


def test_secret_hides_itself_and_comes_only_from_the_environment(tmp_path: Path) -> None:
    """The key prints as a mask, is read from TIKLIVE_API_KEY only, and config.toml may not hold it."""
    secret = api_key({"TIKLIVE_API_KEY": LEAK})
    assert secret.reveal() == LEAK
    assert LEAK not in repr(secret) + str(secret) + f"{secret}" + repr([secret])
    with pytest.raises(CrawlerError, match="TIKLIVE_API_KEY"):
        api_key({})
    (tmp_path / "c.toml").write_text(f'[api]\nkey = "{LEAK}"\n')
    with pytest.raises(CrawlerError) as info:
        load_settings(config_file=str(tmp_path / "c.toml"), environ={})
    assert "TIKLIVE_API_KEY" in str(info.value) and LEAK not in str(info.value)
    # A Secret is falsy only when empty, and never equal to its text (no accidental comparisons in logs).
    assert Secret(LEAK) and not Secret("") and Secret(LEAK) != LEAK


def test_public_api_is_pinned() -> None:
    """The names `from crawler import *` offers are exactly these (a change here is an API change)."""
    assert sorted(crawler.__all__) == sorted([
        "BalanceExhausted", "BudgetExhausted", "Challenge", "Client", "Comment", "Counters", "CrawlerError",
        "Follow", "ItemFailed", "KeyRejected", "Music", "NotFound", "Page", "Post", "PrivateAccount", "Profile",
        "RateLimitStalled", "Region", "RetriesExhausted", "Settings", "UsageError", "UserHit", "__version__",
        "load_settings",
    ])
    for name in crawler.__all__:
        assert hasattr(crawler, name), name
    methods = {"user_id", "user_info", "post_detail", "music_info", "challenge_info", "regions", "pages", "get",
               "user_posts", "user_liked", "user_followers", "user_following", "post_comments", "comment_replies",
               "search_videos", "search_users", "search_challenges", "music_posts", "challenge_posts"}
    assert methods <= set(dir(crawler.Client))


def test_url_passwords_stay_out_of_settings_reprs_and_masked_text() -> None:
    """A password in history.url, jobs.url or rate.shared (even one holding a raw @) never shows in a repr or in
    masked text; a user name alone stays, so a printed command still runs."""
    from crawler.config import Settings, masked

    s = Settings(history_url="postgresql://team:s3cr@t@db.example/hist", jobs_url="postgres://u:pw@h/j?password=p4ss",
                 rate_shared="redis://:r3dis@127.0.0.1:6379/0")
    shown = repr(s)
    for secret in ("s3cr", "@t@", "pw@", "p4ss", "r3dis"):
        assert secret not in shown, shown
    assert "postgresql://***@db.example/hist" in shown and "max_credits=None" in shown
    assert masked("postgresql://team:s3cr@t@db.example/hist") == "postgresql://***@db.example/hist"
    assert masked("postgresql://team@db.example/hist") == "postgresql://team@db.example/hist"
