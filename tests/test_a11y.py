"""The history page against WCAG 2.1 AA, in headless Chromium (tests/cdp.py) over a history the simulator built.

axe-core runs in the page: its script comes from the `axe-core-python` package (a `dev` dependency that ships
`axe.min.js`, axe-core 4.4.3, MPL-2.0, and nothing else), read from the installed package and evaluated
through the DevTools protocol, so nothing is fetched at test time. What axe cannot judge (keyboard focus
after a sort, a label cut at the chart's edge, a chart's width) is measured in the page.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import itertools
from typing import Any

import pytest

from tests.cdp import Page, chromium
from tests.serve_history import Built, build, served

# Rules behind the findings (contrast, an empty <th>, no <h1>, headings out of order, header cells).
NAMED_RULES = {"color-contrast", "empty-table-header", "page-has-heading-one", "heading-order", "th-has-data-cells",
               "td-has-header", "scope-attr-valid", "svg-img-alt", "label", "button-name", "link-name"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The simulator's twelve days in a SQLite store (built once for the module)."""
    tmp = tmp_path_factory.mktemp("a11y")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_STATE_HOME", str(tmp / "state"))
        return asyncio.run(build(str(tmp / "history.db"), tmp))


def _axe_script() -> str:
    return importlib.resources.files("axe_core_python").joinpath("axe.min.js").read_text(encoding="utf-8")


async def _axe(page: Page, script: str) -> list[dict[str, Any]]:
    """axe-core's violations on the loaded page: rule id, impact and the first few failing elements."""
    await page.js(script + "\n;0")
    return await page.js(  # type: ignore[no-any-return]
        "axe.run(document, {resultTypes: ['violations']}).then(r => r.violations.map(v => ({id: v.id,"
        " impact: v.impact, nodes: v.nodes.slice(0, 3).map(n => n.target.join(' ') + ': ' + n.failureSummary)})))")


def _pages(b: Built) -> dict[str, str]:
    """The overview, a renamed user's page, the page of a user with gaps, a comparison, an empty filter, a 404."""
    renamed = b.renames[0][0]
    return {"overview": "/", "renamed user": f"/u/{b.handle(renamed)}", "user with gaps": f"/u/{b.handle(b.gap_user)}",
            "compare": "/compare?" + "&".join(f"u={b.handle(u)}" for u in sorted(b.truth)[:3]) + "&u=nobody_here",
            "no match": "/?q=zzzzzz", "not found": "/u/nobody_here"}


@pytest.mark.slow
async def test_axe_finds_no_serious_or_critical_violation(store: Built) -> None:
    """axe-core: no serious or critical violation on the overview, user pages and a comparison, and none of the
    rules behind the issue's findings fails at any impact; every header cell has text and a scope."""
    script = _axe_script()
    assert script.startswith("/*! axe v4.")
    found: dict[str, list[dict[str, Any]]] = {}
    async with served(store.url) as base, chromium() as browser:
        page = await browser.page()
        for name, path in _pages(store).items():
            await page.goto(base + path)
            found[name] = await _axe(page, script)
            assert await page.js("document.querySelectorAll('h1').length") == 1, name
            levels = await page.js("[...document.querySelectorAll('h1,h2,h3,h4,h5,h6')].map(h => +h.tagName[1])")
            assert levels[0] == 1 and all(b - a <= 1 for a, b in itertools.pairwise(levels)), (name, levels)
            bare = await page.js("[...document.querySelectorAll('th')].filter(th => !th.textContent.trim()"
                                 " || !['col', 'row'].includes(th.getAttribute('scope'))).map(th => th.outerHTML)")
            assert bare == [], (name, bare)
        assert page.dialogs == [] and page.console_errors == []
    serious = {n: [v for v in vs if v["impact"] in ("serious", "critical")] for n, vs in found.items()}
    assert serious == {n: [] for n in found}, serious
    named = {n: [v for v in vs if v["id"] in NAMED_RULES] for n, vs in found.items()}
    assert named == {n: [] for n in found}, named


async def _key(page: Page, key: str) -> None:
    """Press and release one key (Enter, Space or Tab) as keyboard input."""
    code, vk, text = {"Enter": ("Enter", 13, "\r"), " ": ("Space", 32, " "), "Tab": ("Tab", 9, "")}[key]
    down: dict[str, Any] = {"type": "keyDown", "key": key, "code": code, "windowsVirtualKeyCode": vk}
    if text:
        down["text"] = text
    await page.send("Input.dispatchKeyEvent", down)
    await page.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": key, "code": code, "windowsVirtualKeyCode": vk})


FOCUSED = "document.activeElement.closest('th') ? document.activeElement.closest('th').dataset.sort : " \
          "document.activeElement.tagName"
ORDER = "[...document.querySelectorAll('#users tr[data-user-id]')].map(tr => tr.dataset.handle)"


@pytest.mark.slow
async def test_a_keyboard_sort_keeps_the_focus_on_the_sorted_header(store: Built) -> None:
    """Tab to a sort header, press Enter (then Space): the table is sorted, the focus is still on that header,
    and the live region that stayed in place says the new order; without JavaScript (a page load) as well."""
    handles = sorted(store.handle(u) for u in store.truth)
    async with served(store.url) as base, chromium() as browser:
        page = await browser.page()
        await page.goto(base + "/")
        await page.wait_for("document.documentElement.getAttribute('data-js') === 'on'")
        await page.js("document.getElementById('count').dataset.kept = 'yes'")
        await page.click("form.filter input[name=q]")
        for _ in range(2):  # the filter box -> its button -> the first sort header (handle)
            await _key(page, "Tab")
        assert await page.js(FOCUSED) == "handle"
        for n, (key, order) in enumerate(((" ", "ascending"), ("Enter", "descending")), start=1):
            await _key(page, key)
            await page.wait_for(f"document.documentElement.getAttribute('data-swaps') === '{n}'")
            assert await page.js(FOCUSED) == "handle", key
            assert await page.js("document.activeElement === document.querySelector('th[data-sort=handle] button')")
            assert await page.js("document.querySelector('th[data-sort=handle]').getAttribute('aria-sort')") == order
            assert await page.js(ORDER) == (handles[::-1] if order == "descending" else handles)[:50]
            live = await page.js("[document.getElementById('count').dataset.kept,"
                                 " document.getElementById('count').getAttribute('aria-live'),"
                                 " document.getElementById('count').textContent]")
            assert live[:2] == ["yes", "polite"]
            assert live[2] == f"{len(handles)} users, sorted by handle, {'a to z' if n == 1 else 'z to a'}."
        assert "focus=" not in await page.js("location.search")
        # Scripts off: the header is a button of a GET form; after the page load the sorted header has the focus.
        plain = await browser.page(javascript=False)
        await plain.goto(base + "/?q=" + handles[0][:2])
        await plain.js("document.querySelector('th[data-sort=followers] button').focus()")
        plain._loaded.clear()
        await _key(plain, "Enter")
        await plain.wait_load()
        assert "sort=-followers" in await plain.js("location.search")
        assert f"q={handles[0][:2]}" in await plain.js("location.search")  # the sort keeps the filter
        assert await plain.js(FOCUSED) == "followers"
        assert page.console_errors == [] and page.dialogs == []


VIEWBOX_OVERFLOW = """[...document.querySelectorAll('svg.chart')].flatMap(svg => {
  const box = svg.viewBox.baseVal;
  return [...svg.querySelectorAll('text')].map(t => t.getBBox()).filter(r => r.x < box.x
    || r.x + r.width > box.x + box.width || r.y < box.y || r.y + r.height > box.y + box.height)
    .map(r => [svg.getAttribute('aria-label'), r.x, r.width]);
})"""


async def _window(page: Page, width: int) -> None:
    await page.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1,
                                                           "mobile": False})


@pytest.mark.slow
async def test_charts_scale_with_the_window_and_rename_labels_stay_inside(store: Built) -> None:
    """A rename on the last day of the range (the line at the right edge): its label stays inside the chart's
    viewBox; every chart fits a 400 px window and grows past 720 px in a wide one."""
    uid, old, new, day = store.renames[0]
    async with served(store.url) as base, chromium() as browser:
        page = await browser.page()
        for query in (f"?to={day}", f"?from={day}", ""):
            await page.goto(f"{base}/u/{store.handle(uid)}{query}")
            labels = await page.js("[...document.querySelectorAll('#chart-followers g.rename text')]"
                                   ".map(t => t.textContent)")
            assert labels == [f"@{o} → @{n}" for u, o, n, d in store.renames if u == uid and (
                not query or (d <= day if "to" in query else d >= day))]
            assert f"@{old} → @{new}" in labels
            assert await page.js(VIEWBOX_OVERFLOW) == [], query
        await page.goto(f"{base}/u/{store.handle(uid)}?to={day}")
        x, width = await page.js("(() => { const s = document.querySelector('#chart-followers svg'); return"
                                 " [+s.querySelector('g.rename line').getAttribute('x1'), s.viewBox.baseVal.width];"
                                 " })()")
        assert x > width - 40, (x, width)  # the case that was clipped: the rename's line at the right edge
        for path in (f"/u/{store.handle(uid)}", f"/compare?u={store.handle(uid)}&u={store.handle(store.gap_user)}"):
            for window in (400, 1280):
                await _window(page, window)
                await page.goto(base + path)
                sizes = await page.js("[...document.querySelectorAll('svg.chart')].map(s => {"
                                      " const r = s.getBoundingClientRect(); return [r.right, r.width]; })")
                assert len(sizes) == (5 if path.startswith("/u/") else 1), (path, sizes)
                if window == 400:  # inside the page's padding, and the page does not scroll sideways
                    assert max(r for r, _ in sizes) <= 400 - 16, (path, sizes)
                    assert await page.js("document.documentElement.scrollWidth") <= 400, path
                else:
                    assert min(w for _, w in sizes) > 720, (path, sizes)
        assert page.console_errors == [] and page.dialogs == []
