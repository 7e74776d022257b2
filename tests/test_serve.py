"""`crawler history serve`: the pages over a history the simulator built, over HTTP and in headless Chromium.

Expected values come from the simulator's world (tests/serve_history.py), never from the page's code.
The browser tests fail, never skip, when Chromium is missing (`.ci/run` installs it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
import os
import re
import signal
import sqlite3
import sys
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from crawler.cli import main
from crawler.history.plot import with_gaps
from crawler.history.serve import History
from crawler.history.store import HistoryStore
from crawler.sim.data import World
from tests.cdp import Page, chromium
from tests.serve_history import DAY0, HOSTILE, WORLD, Built, build, pg_schema, served

ARTIFACTS = Path(os.environ.get("CRAWLER_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
ROWS_JS = """[...document.querySelectorAll('#users tr[data-user-id]')].map(tr => [tr.dataset.userId,
  tr.dataset.handle, tr.querySelector('.nick').textContent, tr.querySelector('td.followers').dataset.value,
  tr.querySelector('td.gain1').dataset.value, tr.querySelector('td.gain7').dataset.value,
  tr.querySelector('td.gain30').dataset.value])"""


def _build(url: str, tmp: Path) -> Built:
    with pytest.MonkeyPatch.context() as mp:  # module scope: its own state home, like every test
        mp.setenv("XDG_STATE_HOME", str(tmp / "state"))
        return asyncio.run(build(url, tmp))


@pytest.fixture(scope="module")
def sqlite_built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The simulator's twelve days in a SQLite store (built once for the module)."""
    tmp = tmp_path_factory.mktemp("serve")
    return _build(str(tmp / "history.db"), tmp)


@pytest.fixture(scope="module")
def pg_built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """The same days in a private PostgreSQL schema."""
    tmp = tmp_path_factory.mktemp("serve-pg")
    with pg_schema() as url:
        yield _build(url, tmp)


@pytest.fixture(params=["sqlite", "postgresql"])
def built(request: pytest.FixtureRequest) -> Built:
    """Each store in turn."""
    return request.getfixturevalue(f"{'sqlite' if request.param == 'sqlite' else 'pg'}_built")  # type: ignore[no-any-return]


def _int(text: str | None) -> int | None:
    return None if text in (None, "") else int(text)


class _Rows(HTMLParser):
    """The overview's rows as (user id, handle, nickname, followers, gain1, gain7, gain30), from data-* attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[Any]] = []
        self._in_nick = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and "data-user-id" in a:
            self.rows.append([a["data-user-id"], a["data-handle"], ""])
        elif self.rows and tag == "div" and a.get("class") == "nick":
            self._in_nick = True
        elif self.rows and tag == "td" and (a.get("class") or "").split()[-1:] in (["followers"], ["gain1"],
                                                                                   ["gain7"], ["gain30"]):
            self.rows[-1].append(_int(a.get("data-value")))

    def handle_data(self, data: str) -> None:
        if self._in_nick:
            self.rows[-1][2] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self._in_nick = False


def _parse(html: str) -> list[tuple[Any, ...]]:
    p = _Rows()
    p.feed(html)
    return [tuple(r) for r in p.rows]


def _expected(b: Built) -> dict[str, tuple[Any, ...]]:
    """The overview's row of every user, from the world."""
    out = {}
    for uid in b.truth:
        _, latest = b.latest(uid)
        out[uid] = (uid, b.handle(uid), b.nicknames[uid], latest["followers"], b.gain(uid, 1), b.gain(uid, 7),
                    b.gain(uid, 30))
    return out


def _order(rows: list[tuple[Any, ...]], column: int) -> list[str]:
    """User ids in the page's order for a numeric column sorted high to low (missing last, ties by handle)."""
    return [r[0] for r in sorted(rows, key=lambda r: (r[column] is None, -(r[column] or 0), r[1]))]


async def _get(url: str, **kw: Any) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.get(url, allow_redirects=False, **kw) as r:
        return r.status, await r.text(), dict(r.headers)


# --- HTTP, both stores ---

async def test_overview_lists_every_user_with_the_worlds_latest_count_and_gains(built: Built,
                                                                                 capsys: pytest.CaptureFixture[str]
                                                                                 ) -> None:
    """Every user once, latest followers and 1/7/30-day gains as the world says, equal to `history top --days N`."""
    async with served(built.url) as base:
        status, html, headers = await _get(base + "/")
    assert status == 200 and "default-src 'none'" in headers["Content-Security-Policy"]
    rows = _parse(html)
    want = _expected(built)
    assert sorted(rows) == sorted(want.values())
    assert [r[0] for r in rows] == _order(list(want.values()), 5)  # default: 7-day gain, high to low
    assert any(r[4] != r[5] for r in rows) and any(r[5] != r[6] for r in rows)  # the windows differ here
    store = HistoryStore(built.url)
    try:
        for n, column in ((1, 4), (7, 5), (30, 6)):
            top = {t.user_id: t.gained for t in store.top("followers-gained", days=n, limit=1000)}
            assert {r[0]: r[column] for r in rows if r[column] is not None} == top
    finally:
        store.close()
    assert main(["history", "top", "--days", "7", "--limit", "1000", "--history-url", built.url]) == 0
    printed = {m[0]: int(m[1].replace(",", "")) for m in re.findall(r"^@(\S+)\s+\S+\s+\S+\s+(\S+)$",
                                                                     capsys.readouterr().out, re.M)}
    assert printed == {r[1]: r[5] for r in rows}


async def test_the_store_is_opened_read_only(built: Built) -> None:
    """The page's store refuses writes (the database says so), and serving pages changes nothing stored."""
    store = HistoryStore.open_readonly(built.url)
    try:
        with pytest.raises(Exception, match=r"(?i)read.?only"):
            store.record_rename("1", "a", "b", DAY0)
    finally:
        store.close()
    before = _fingerprint(built.url)
    uid = next(iter(built.truth))
    async with served(built.url) as base:
        for path in ("/", f"/u/{built.handle(uid)}", f"/u/{built.handle(uid)}.csv", f"/compare?u={built.handle(uid)}"):
            assert (await _get(base + path))[0] == 200
    assert _fingerprint(built.url) == before


def _fingerprint(url: str) -> str:
    """Every row of every table (PostgreSQL) or the file's bytes (SQLite)."""
    if not url.startswith("postgresql"):
        return hashlib.sha256(Path(url).read_bytes()).hexdigest()
    store = HistoryStore.open_readonly(url)
    try:
        parts = [repr(sorted(store._rows(f"SELECT * FROM {t}"), key=repr)) for t in
                 ("users", "handles", "snapshots", "posts", "renames", "schema_version")]
    finally:
        store.close()
    return hashlib.sha256("".join(parts).encode()).hexdigest()


# --- HTTP, SQLite ---

async def test_a_version_1_store_is_served_without_migrating_it(sqlite_built: Built, tmp_path: Path) -> None:
    """A store from before the renames table is shown (no renames) and stays at version 1."""
    old = tmp_path / "v1.db"
    old.write_bytes(Path(sqlite_built.url).read_bytes())
    db = sqlite3.connect(old)
    db.execute("DROP TABLE renames")
    db.execute("DROP TABLE claims")
    db.execute("DELETE FROM schema_version WHERE version >= 2")
    db.commit()
    db.close()
    uid = sqlite_built.renames[0][0]
    async with served(str(old)) as base:
        assert len(_parse((await _get(base + "/"))[1])) == len(sqlite_built.truth)
        status, html, _ = await _get(f"{base}/u/{sqlite_built.handle(uid)}")
        assert status == 200 and 'class="rename"' not in html
    db = sqlite3.connect(old)
    assert db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 1
    assert db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'renames'").fetchone()[0] == 0
    db.close()


async def test_queries_run_in_the_stores_thread_not_the_event_loop(sqlite_built: Built) -> None:
    """Every query runs in the store's own thread, never on the thread of the event loop."""
    history = History(sqlite_built.url)
    try:
        thread = await history.run(lambda store: (threading.get_ident(), store.count()))
    finally:
        history.close()
    assert thread[0] != threading.get_ident() and thread[1] == sum(len(d) for d in sqlite_built.truth.values())


async def test_user_csv_holds_the_worlds_snapshots_of_the_range(sqlite_built: Built) -> None:
    """/u/HANDLE.csv is what the page shows: the world's values for each snapshot day of the range."""
    b = sqlite_built
    uid = b.gap_user
    async with served(b.url) as base:
        status, text, headers = await _get(f"{base}/u/{b.handle(uid)}.csv?from=2026-01-03&to=2026-01-10")
        old_status, _, old_headers = await _get(f"{base}/u/{b.renames[0][1]}?from=2026-01-03")
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    lines = text.splitlines()
    assert lines[0] == "day,user_id,handle,followers,following,videos,hearts"
    want = [f"{d},{uid},{v['handle']},{v['followers']},{v['following']},{v['videos']},{v['hearts']}"
            for d, v in sorted(b.truth[uid].items()) if "2026-01-03" <= d <= "2026-01-10"]
    assert lines[1:] == want
    # An old handle of a renamed user leads to the current one's page, keeping the query.
    assert old_status == 302
    assert old_headers["Location"] == f"/u/{b.handle(b.renames[0][0])}?from=2026-01-03"


async def test_paging_covers_every_user_once_in_order(tmp_path: Path) -> None:
    """120 users: three pages of at most 50, together every user once, in the sort order across pages."""
    world = World(WORLD)
    url = str(tmp_path / "h.db")
    store = HistoryStore(url)
    expected = {}
    try:
        from crawler.api.records import Profile

        for i in range(1, 400):
            u = world.user(i)
            if u is None or len(expected) == 120:
                continue
            store.record_snapshot(DAY0, Profile(u.user_id, u.handle, u.nickname, u.sec_uid, u.verified, u.private,
                                                u.followers, u.following, u.videos, u.hearts, u.digg_count,
                                                u.signature))
            expected[u.user_id] = (u.followers, u.handle)
    finally:
        store.close()
    seen: list[tuple[Any, ...]] = []
    async with served(url) as base:
        for page in (1, 2, 3):
            html = (await _get(f"{base}/?sort=-followers&page={page}"))[1]
            rows = _parse(html)
            assert len(rows) == (50 if page < 3 else 20) and f"page {page} of 3" in html
            seen += rows
    assert [r[0] for r in seen] == [u for u, _ in sorted(expected.items(), key=lambda kv: (-kv[1][0], kv[1][1]))]
    assert {r[0]: (r[3], r[1]) for r in seen} == expected and len(seen) == 120


async def test_unknown_handles_are_escaped_and_foreign_hosts_refused(sqlite_built: Built) -> None:
    """A hostile name in the URL comes back as text in a 404; a Host that is not loopback gets 421."""
    async with served(sqlite_built.url) as base:
        status, html, _ = await _get(base + "/u/%3Cscript%3Ealert(3)%3C%2Fscript%3E")
        assert status == 404 and "<script>alert" not in html and "&lt;script&gt;alert(3)" in html
        status, _, _ = await _get(base + "/", headers={"Host": "evil.example:8050"})
        assert status == 421
        for host in ("localhost:8050", "[::1]:8050", "127.0.0.1"):
            assert (await _get(base + "/", headers={"Host": host}))[0] == 200
        status, html, _ = await _get(f"{base}/u/{sqlite_built.handle(sqlite_built.gap_user)}?from=2026-13-01")
        assert status == 400 and "from '2026-13-01': expected a date as YYYY-MM-DD" in html.replace("&#x27;", "'")
        status, html, _ = await _get(base + "/compare?u=%22%3E%3Cimg%20src=x%3E&u=" + sqlite_built.handle(
            sqlite_built.gap_user))
        assert status == 200 and "<img" not in html and "&quot;&gt;&lt;img src=x&gt;" in html


async def test_compare_says_which_users_past_its_limit_it_left_out(sqlite_built: Built) -> None:
    """Twelve users asked for: the chart holds the first ten, and the page names the two it left out."""
    b = sqlite_built
    users = sorted(b.truth)[:12]
    assert len(users) == 12
    async with served(b.url) as base:
        status, html, _ = await _get(base + "/compare?" + "&".join(f"u={b.handle(u)}" for u in users))
    assert status == 200
    shown = re.findall(r'<g class="series" data-series="@([^"]+)"', html)
    assert shown == [b.handle(u) for u in users[:10]], shown
    note = re.search(r"left out: ([^<]*)\.</p>", html)
    assert note is not None and note.group(1) == ", ".join(f"@{b.handle(u)}" for u in users[10:]), html[:2000]


# --- the command line ---

@pytest.mark.slow
async def test_serve_command_prints_its_address_warns_off_loopback_and_stops_on_sigterm(sqlite_built: Built,
                                                                                       tmp_path: Path) -> None:
    """`history serve --port 0` prints its URL; another host adds the no-login warning; SIGTERM ends it."""
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "crawler", "history", "serve", "--port", "0", "--host", host,
            "--history-url", sqlite_built.url, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        lines = []
        async with asyncio.timeout(30):
            while not lines or "history at" not in lines[-1]:
                line = (await proc.stderr.readline()).decode()
                assert line, f"serve ended early: {lines}"
                lines.append(line)
        port = re.search(r":(\d+)/", lines[-1]).group(1)  # type: ignore[union-attr]
        status, html, _ = await _get(f"http://127.0.0.1:{port}/")
        assert status == 200 and len(_parse(html)) == len(sqlite_built.truth)
        assert any("no login" in line for line in lines) == warned
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    missing = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler", "history", "serve", "--port", "0", "--history-url", str(tmp_path / "no.db"),
        stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        _, err = await missing.communicate()
    assert missing.returncode == 2 and err.decode().count("\n") == 1 and "no history at" in err.decode()


def test_plot_styles_draw_small_multiples_and_indexed_curves(sqlite_built: Built, tmp_path: Path) -> None:
    """Both styles draw one visible curve per handle; small multiples is the default; a bad style is exit 2."""
    from PIL import Image

    from tests.test_history import _series_pixels

    handles = [sqlite_built.handle(u) for u in list(sqlite_built.truth)[:3]]
    for style in ("small", "indexed"):
        out = tmp_path / f"{style}.png"
        assert main(["history", "plot", *handles, "-o", str(out), "--style", style, "--history-url",
                     sqlite_built.url]) == 0
        counts = _series_pixels(out)
        assert min(counts["C0"], counts["C1"], counts["C2"]) > 100 and counts["C3"] < 20, (style, counts)
    default = tmp_path / "default.png"
    assert main(["history", "plot", *handles, "-o", str(default), "--history-url", sqlite_built.url]) == 0
    assert Image.open(default).size == Image.open(tmp_path / "small.png").size
    assert Image.open(default).size != Image.open(tmp_path / "indexed.png").size
    assert main(["history", "plot", *handles, "-o", str(default), "--style", "flat", "--history-url",
                 sqlite_built.url]) == 2
    # A missing day is a break in the curve (NaN), never a line drawn across it.
    store = HistoryStore(sqlite_built.url)
    try:
        days, values = with_gaps(store.growth(sqlite_built.handle(sqlite_built.gap_user)))
    finally:
        store.close()
    truth = sqlite_built.truth[sqlite_built.gap_user]
    first = dt.date.fromisoformat(min(truth))
    assert [d.isoformat() for d, v in zip(days, values, strict=True) if v == v] == sorted(truth)
    assert all(v != v for d, v in zip(days, values, strict=True) if d.isoformat() not in truth)
    assert len(days) >= len(truth) + 2 and days[0] == first  # a NaN in each of the two gaps


# --- headless Chromium ---

async def _rows(page: Page) -> list[tuple[Any, ...]]:
    return [(u, h, n, _int(f), _int(a), _int(b), _int(c)) for u, h, n, f, a, b, c in await page.js(ROWS_JS)]


async def _navigate(page: Page, action: Any) -> None:
    """Run an action that loads a new page (a click, Enter) and wait for that load."""
    page._loaded.clear()
    await action
    await page.wait_load()


@pytest.mark.slow
async def test_browser_overview_sorts_and_filters_without_javascript(sqlite_built: Built) -> None:
    """Scripts off: header links sort, the filter form filters (page loads), values are the world's."""
    b = sqlite_built
    want = _expected(b)
    needle = re.sub(r"[\d._v]+$", "", b.handle(b.gap_user))
    async with served(b.url) as base, chromium() as browser:
        page = await browser.page(javascript=False)
        await page.goto(base + "/")
        assert await page.js("document.documentElement.getAttribute('data-js')") is None  # the script did not run
        assert sorted(await _rows(page)) == sorted(want.values())
        await _navigate(page, page.click('th[data-sort="followers"] button'))
        assert "sort=-followers" in await page.js("location.search")
        assert [r[0] for r in await _rows(page)] == _order(list(want.values()), 3)
        await _navigate(page, page.type("form.filter input[name=q]", needle, enter=True))
        assert f"q={needle}" in await page.js("location.search")
        assert "sort=-followers" in await page.js("location.search")  # the filter keeps the sort
        matching = [r for r in want.values() if needle in r[1] or needle in r[2].lower()]
        assert len(matching) < len(want)
        assert [r[0] for r in await _rows(page)] == _order(matching, 3)  # still by followers
        await page.screenshot(ARTIFACTS / "overview-no-js.png")
        assert page.dialogs == []


@pytest.mark.slow
async def test_browser_overview_sorts_and_filters_with_javascript_in_place(sqlite_built: Built) -> None:
    """Scripts on: typing filters and a header click sorts by swapping the table, with no page load."""
    b = sqlite_built
    want = _expected(b)
    async with served(b.url) as base, chromium() as browser:
        page = await browser.page()
        await page.goto(base + "/")
        await page.wait_for("document.documentElement.getAttribute('data-js') === 'on'")
        await page.js("window.stayed = 'yes'")
        await page.type("form.filter input[name=q]", "alert")  # matches the nickname only
        await page.wait_for("document.documentElement.getAttribute('data-swaps') === '1'")
        rows = await _rows(page)
        assert sorted(r[0] for r in rows) == sorted(b.hostile)
        assert [r[2] for r in rows] == [want[r[0]][2] for r in rows]
        await page.js("document.querySelector('form.filter input[name=q]').value = ''")  # every user again
        await page.js("document.querySelector('form.filter input[name=q]').dispatchEvent(new Event('input'))")
        await page.wait_for("document.documentElement.getAttribute('data-swaps') === '2'")
        await page.click('th[data-sort="gain30"] button')
        await page.wait_for("document.documentElement.getAttribute('data-swaps') === '3'")
        assert [r[0] for r in await _rows(page)] == _order(list(want.values()), 6)
        assert await page.js("window.stayed") == "yes"  # no page load happened
        assert "sort=-gain30" in await page.js("location.search")
        await page.screenshot(ARTIFACTS / "overview-js.png")
        assert page.dialogs == [] and page.console_errors == []


@pytest.mark.slow
async def test_browser_user_page_shows_a_point_per_snapshot_day_renames_and_gaps(sqlite_built: Built) -> None:
    """A user's charts: one point per snapshot day with the world's value, a rename marker, gaps not bridged."""
    b = sqlite_built
    renamed = {uid for uid, *_ in b.renames}
    async with served(b.url) as base, chromium() as browser:
        page = await browser.page()
        for uid in sorted(renamed | {b.gap_user}):
            await page.goto(f"{base}/u/{b.handle(uid)}")
            days = sorted(b.truth[uid])
            for field in ("followers", "following", "videos", "hearts"):
                points = await page.js(f"[...document.querySelectorAll('#chart-{field} circle.pt')]"
                                       ".map(c => [c.dataset.day, c.dataset.value])")
                assert points == [[d, str(b.truth[uid][d][field])] for d in days]
            runs = 1 + sum(1 for x, y in itertools.pairwise(days)
                           if dt.date.fromisoformat(y) - dt.date.fromisoformat(x) > dt.timedelta(days=1))
            lines = await page.js("[...document.querySelectorAll('#chart-followers g.series path')]"
                                  ".map(p => p.getAttribute('d').split('M').length - 1)")
            assert sum(lines) == runs and runs >= 2  # one stroke per stretch of consecutive days
            bars = await page.js("[...document.querySelectorAll('#chart-gains rect.bar')]"
                                 ".map(r => [r.dataset.day, Number(r.dataset.value)])")
            assert bars == [[y, int(b.truth[uid][y]["followers"]) - int(b.truth[uid][x]["followers"])]  # type: ignore[call-overload]
                            for x, y in itertools.pairwise(days)
                            if dt.date.fromisoformat(y) - dt.date.fromisoformat(x) == dt.timedelta(days=1)]
            marks = await page.js("[...document.querySelectorAll('#chart-followers g.rename')].map(g => g.dataset.day)")
            assert marks == [d for u, _, _, d in b.renames if u == uid]
            listed = await page.js("[...document.querySelectorAll('li.rename')].map(li => li.textContent)")
            assert listed == [f"{d}: @{o} → @{n}" for u, o, n, d in b.renames if u == uid]
            gaps = await page.js("[...document.querySelectorAll('li.gap')].map(li => [li.dataset.after,"
                                 " li.dataset.before])")
            assert gaps == [[x, y] for x, y in itertools.pairwise(days)
                            if dt.date.fromisoformat(y) - dt.date.fromisoformat(x) > dt.timedelta(days=1)]
            await page.screenshot(ARTIFACTS / f"user-{uid}.png")
        # A date range shows only its days (and links the CSV of the same range).
        await page.goto(f"{base}/u/{b.handle(b.gap_user)}?from=2026-01-06&to=2026-01-10")
        days = await page.js("[...document.querySelectorAll('#chart-followers circle.pt')].map(c => c.dataset.day)")
        assert days == [d for d in sorted(b.truth[b.gap_user]) if "2026-01-06" <= d <= "2026-01-10"]
        assert await page.js("document.querySelector('a.csv').getAttribute('href')") == \
            f"/u/{b.handle(b.gap_user)}.csv?from=2026-01-06&to=2026-01-10"
        assert page.dialogs == []


@pytest.mark.slow
async def test_browser_compare_indexes_each_user_to_100_at_the_start(sqlite_built: Built) -> None:
    """Compare: one series per known user, each point 100 x followers / the user's first value in the range."""
    b = sqlite_built
    users = sorted(b.truth)[:3]
    query = "&".join(f"u={b.handle(u)}" for u in users) + "&u=nobody_here&from=2026-01-03"
    async with served(b.url) as base, chromium() as browser:
        page = await browser.page()
        await page.goto(f"{base}/compare?{query}")
        series = await page.js("Object.fromEntries([...document.querySelectorAll('svg.indexed g.series')].map(g =>"
                               " [g.dataset.series, [...g.querySelectorAll('circle.pt')].map(c =>"
                               " [c.dataset.day, Number(c.dataset.value)])]))")
        assert "nobody_here" in await page.js("document.querySelector('p.unknown').textContent")
        await page.screenshot(ARTIFACTS / "compare.png")
    assert list(series) == [f"@{b.handle(u)}" for u in users]
    for u in users:
        days = [d for d in sorted(b.truth[u]) if d >= "2026-01-03"]
        first = int(b.truth[u][days[0]]["followers"])  # type: ignore[call-overload]
        assert [d for d, _ in series[f"@{b.handle(u)}"]] == days
        for (_, got), d in zip(series[f"@{b.handle(u)}"], days, strict=True):
            assert got == pytest.approx(int(b.truth[u][d]["followers"]) * 100 / first, abs=0.006)  # type: ignore[call-overload]
        assert series[f"@{b.handle(u)}"][0][1] == 100


@pytest.mark.slow
async def test_browser_pages_stay_on_their_origin_and_hostile_nicknames_stay_text(sqlite_built: Built) -> None:
    """Every page, scripts on and off: requests only to the server's origin, no dialog, nicknames shown as text."""
    b = sqlite_built
    hostile = sorted(b.hostile)
    async with served(b.url) as base, chromium() as browser:
        for javascript in (True, False):
            page = await browser.page(javascript=javascript)
            paths = ["/", "/?q=alert", f"/u/{b.handle(hostile[0])}", f"/u/{b.handle(hostile[1])}",
                     "/compare?" + "&".join(f"u={b.handle(u)}" for u in hostile),
                     "/u/%3Cscript%3Ealert(4)%3C%2Fscript%3E"]
            for n, path in enumerate(paths):
                await page.goto(base + path)
                assert await page.js("document.querySelectorAll('img, iframe, object, embed').length") == 0
                assert await page.js("[...document.scripts].map(s => s.src)") == [f"{base}/static/app.js"]
                if javascript:
                    await page.screenshot(ARTIFACTS / f"page-{n}.png")
            nicks = await _nick_texts(page, base, hostile, b)
            assert nicks == [b.hostile[u] for u in hostile]
            assert page.dialogs == []
            outside = [u for u in page.requests if not (u.startswith(base + "/") or u.startswith("data:"))]
            assert outside == [] and len(page.requests) >= len(paths)
    assert set(b.hostile.values()) == set(HOSTILE)


async def _nick_texts(page: Page, base: str, hostile: list[str], b: Built) -> list[str]:
    await page.goto(base + "/")
    return [await page.js(f"document.querySelector('tr[data-user-id=\"{u}\"] .nick').textContent") for u in hostile]


# --- HTTP: odd requests, both stores (a few of the world's users over a few days, no simulator run) ---

SMALL_DAYS = (0, 1, 2, 4, 5)  # day 3 is a gap


def _small_store(url: str) -> dict[str, tuple[str, int]]:
    """Six of the world's users snapshotted on SMALL_DAYS; returns user id -> (handle, latest followers)."""
    from crawler.api.records import Profile

    world = World(WORLD)
    store = HistoryStore(url)
    users = [u for i in range(1, 40) if (u := world.user(i)) is not None][:6]
    try:
        for d in SMALL_DAYS:
            for u in users:
                store.record_snapshot(DAY0 + dt.timedelta(days=d), Profile(
                    u.user_id, u.handle, u.nickname, u.sec_uid, u.verified, u.private, u.followers + d, u.following,
                    u.videos, u.hearts, u.digg_count, u.signature))
    finally:
        store.close()
    return {u.user_id: (u.handle, u.followers + SMALL_DAYS[-1]) for u in users}


@pytest.fixture
def pg_small() -> Iterator[tuple[str, dict[str, tuple[str, int]]]]:
    """A small store in PostgreSQL, its sessions named by an application_name of their own."""
    with pg_schema() as url:
        url += f"&application_name=serve_{os.getpid()}_{id(url)}"
        yield url, _small_store(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def small(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, tuple[str, int]]]:
    """A small store (SQLite, then PostgreSQL) and its users."""
    if request.param == "sqlite":
        url = str(tmp_path / "small.db")
        return url, _small_store(url)
    return request.getfixturevalue("pg_small")  # type: ignore[no-any-return]


async def test_odd_dates_and_handles_are_answered_never_a_500(small: tuple[str, dict[str, tuple[str, int]]]) -> None:
    """The widest date range answers; a handle with a NUL byte (PostgreSQL refuses it in a query) is a 404."""
    url, users = small
    handle = next(iter(users.values()))[0]
    async with served(url) as base:
        for path in (f"/u/{handle}?to=9999-12-31", f"/u/{handle}.csv?from=0001-01-01&to=9999-12-31",
                     f"/u/{handle}?from=0001-01-01"):
            status, text, _ = await _get(base + path)
            assert status == 200, (path, text[-300:])
        for path in ("/u/a%00b", f"/u/{handle}%00.csv", f"/u/{handle}.csv%00"):
            status, text, _ = await _get(base + path)
            assert status == 404 and "no history for" in text, (path, status)
        status, text, _ = await _get(f"{base}/compare?u=%00&u={handle}")
        assert status == 200 and f'data-series="@{handle}"' in text


async def test_handle_sorts_both_ways(small: tuple[str, dict[str, tuple[str, int]]]) -> None:
    """sort=handle lists a..z, sort=-handle (the header's second click) z..a."""
    url, users = small
    handles = sorted(h for h, _ in users.values())
    async with served(url) as base:
        up = [r[1] for r in _parse((await _get(base + "/?sort=handle"))[1])]
        down = [r[1] for r in _parse((await _get(base + "/?sort=-handle"))[1])]
    assert up == handles and down == handles[::-1]


async def test_a_lost_postgresql_connection_is_opened_again(pg_small: tuple[str, dict[str, tuple[str, int]]]) -> None:
    """The server's database session ends (a PostgreSQL restart, an admin): the next request opens a new one."""
    url, users = pg_small
    import psycopg

    from tests.serve_history import PG_URL

    name = url.rsplit("application_name=", 1)[1]
    schema = re.search(r"search_path%3D(\w+)", url).group(1)  # type: ignore[union-attr]

    def end_session(admin: Any) -> None:
        ended = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                              (name,)).fetchall()
        assert ended == [(True,)]

    async with served(url) as base:
        assert len(_parse((await _get(base + "/"))[1])) == len(users)
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            end_session(admin)
            for path in ("/", f"/u/{next(iter(users.values()))[0]}"):
                status, _, _ = await _get(base + path)
                assert status == 200, (path, status)
            assert {r[0]: (r[1], r[3]) for r in _parse((await _get(base + "/"))[1])} == users
            # While the store cannot be reached the page says so (503), and answers again once it can.
            end_session(admin)
            admin.execute(f"ALTER SCHEMA {schema} RENAME TO {schema}_away")
            try:
                status, html, _ = await _get(base + "/")
            finally:
                admin.execute(f"ALTER SCHEMA {schema}_away RENAME TO {schema}")
            assert status == 503 and "holds no history" in html and "once the database is back" in html
            assert {r[0]: (r[1], r[3]) for r in _parse((await _get(base + "/"))[1])} == users


async def test_a_connection_error_on_a_session_that_still_looks_open_gets_a_new_session(
        pg_small: tuple[str, dict[str, tuple[str, int]]]) -> None:
    """psycopg can raise "connection socket closed" for a session the server ended while the connection still says
    it is open (seen once in CI as a 500): the page asks again on a new session instead of failing."""
    import psycopg

    url, users = pg_small
    history = History(url)
    first = history.store._db
    calls: list[int] = []

    def overview(store: HistoryStore) -> int:
        calls.append(1)
        if len(calls) == 1:  # what psycopg's wait raised on the ended session
            raise psycopg.OperationalError("connection socket closed")
        return len(store.overview((1, 7, 30), until=store.last_day()))

    try:
        assert await history.run(overview) == len(users)
        assert len(calls) == 2 and history.store._db is not first
    finally:
        history.close()


async def test_bad_page_sort_and_host_values_are_a_400_naming_them(small: tuple[str, dict[str, tuple[str, int]]]
                                                                   ) -> None:
    """page/sort values the overview cannot use, and a Host header that is no host, get a 400 saying which."""
    url, _ = small
    async with served(url) as base:
        for query, says in (("page=abc", "page 'abc'"), ("page=0", "page '0'"), ("page=2.5", "page '2.5'"),
                            ("sort=zzz", "sort 'zzz'"), ("sort=--gain7", "sort '--gain7'"),
                            ("sort=gain7&page=-1", "page '-1'")):
            status, html, _ = await _get(f"{base}/?{query}")
            assert status == 400 and says in html.replace("&#x27;", "'"), (query, status)
        assert "use one of handle, followers, gain1, gain7, gain30" in (await _get(f"{base}/?sort=x"))[1]
        host, port = base.removeprefix("http://").split(":")
        for bad in ("127.0.0.1:abc", "127.0.0.1:99999"):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET / HTTP/1.1\r\nHost: {bad}\r\nConnection: close\r\n\r\n".encode())
            async with asyncio.timeout(10):
                answer = await reader.read()
            writer.close()
            assert answer.split(b"\r\n", 1)[0] == b"HTTP/1.1 400 Bad Request", (bad, answer[:200])
            assert b"Host header" in answer and b"\r\nContent-Security-Policy: default-src 'none'" in answer
        status, _, headers = await _get(base + "/", headers={"Host": "evil.example"})
        assert status == 421 and "default-src 'none'" in headers.get("Content-Security-Policy", "")


async def test_csv_file_name_survives_odd_handles(tmp_path: Path) -> None:
    """A handle with a quote or a non-ASCII letter (the API's text) still names the CSV whole, in a valid header."""
    from urllib.parse import quote, unquote

    from crawler.api.records import Profile

    url = str(tmp_path / "odd.db")
    store = HistoryStore(url)
    odd = ['a"b', "tëst", "a;b=c"]
    try:
        for n, h in enumerate(odd):
            store.record_snapshot(DAY0, Profile(str(900 + n), h, "", "s", False, False, 1, 2, 3, 4, 5, ""))
    finally:
        store.close()
    async with served(url) as base:
        for h in odd:
            status, text, headers = await _get(f"{base}/u/{quote(h, safe='')}.csv?from=2026-01-01")
            assert status == 200 and text.splitlines()[1].startswith("2026-01-01,")
            value = headers["Content-Disposition"]
            m = re.fullmatch(r'attachment; filename="([^"\\]*)"; filename\*=UTF-8\'\'([!-~]+)', value)
            assert m is not None, value
            assert unquote(m.group(2)) == f"{h}-2026-01-01.csv" and m.group(1).isascii()


async def test_an_unknown_gain_is_empty_on_the_page_and_in_history_top(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A snapshot without a follower count (the API left it out): no gain on the page, none printed by `top` (not 0)."""
    from crawler.api.records import Profile

    url = str(tmp_path / "none.db")
    store = HistoryStore(url)
    try:
        for d, (known, hidden) in enumerate(((100, 50), (130, None))):
            for uid, handle, followers in (("1", "known", known), ("2", "hidden", hidden)):
                store.record_snapshot(DAY0 + dt.timedelta(days=d),
                                      Profile(uid, handle, "", "s", False, False, followers, 1, 2, 3, 4, ""))
    finally:
        store.close()
    async with served(url) as base:
        rows = {r[1]: r[4:] for r in _parse((await _get(base + "/"))[1])}
    assert rows == {"known": (30, 30, 30), "hidden": (None, None, None)}
    assert main(["history", "top", "--days", "7", "--history-url", url]) == 0
    printed = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert printed == {"@known": ["100", "130", "+30"], "@hidden": ["50"]}
