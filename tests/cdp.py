"""Headless Chromium driven over the DevTools protocol (CDP) with aiohttp's websocket client.

Debian's /usr/bin/chromium, launched with a fresh profile, no background networking and every host name
but loopback unresolvable, so nothing can reach the internet. CDP gives what the tests need directly:
the network log (every request the page makes), JavaScript dialogs (an XSS that ran would open one),
script execution switched off (the no-JavaScript runs), real mouse and key input, and screenshots.
No driver download, no extra package: aiohttp is already a dependency.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = os.environ.get("CRAWLER_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
         "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1", "--window-size=1280,900")
WAIT = 30.0  # seconds: the bound on every wait for the browser


class CDPError(RuntimeError):
    """The browser answered a command with an error."""


class Browser:
    """One Chromium process and one websocket to it; pages are targets attached in flat mode."""

    def __init__(self, proc: asyncio.subprocess.Process, profile: str, session: aiohttp.ClientSession,
                 ws: aiohttp.ClientWebSocketResponse) -> None:
        self.proc, self.profile, self.session, self.ws = proc, profile, session, ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._pending:
                fut = self._pending.pop(data["id"])
                if not fut.done():
                    if "error" in data:
                        fut.set_exception(CDPError(str(data["error"])))
                    else:
                        fut.set_result(data.get("result", {}))
            else:
                for listener in list(self._listeners):
                    listener(data)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("the browser closed the connection"))

    async def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        """One CDP command; its result."""
        n = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[n] = fut
        msg: dict[str, Any] = {"id": n, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send_str(json.dumps(msg))
        async with asyncio.timeout(WAIT):
            return await fut

    async def page(self, *, javascript: bool = True) -> Page:
        """A new tab, with the network log and dialog watch on (and scripts off unless ``javascript``)."""
        target = (await self.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        session = (await self.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
        page = Page(self, session)
        self._listeners.append(page._event)
        for domain in ("Page", "Network", "Runtime", "DOM"):
            await page.send(f"{domain}.enable")
        if not javascript:
            await page.send("Emulation.setScriptExecutionDisabled", {"value": True})
        return page


class Page:
    """One tab."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser, self.session = browser, session
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.console_errors: list[str] = []
        self._loaded = asyncio.Event()

    def _event(self, data: dict[str, Any]) -> None:
        if data.get("sessionId") != self.session:
            return
        method, params = data.get("method"), data.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Page.javascriptDialogOpening":
            self.dialogs.append(params.get("message", ""))
            asyncio.get_running_loop().create_task(self.send("Page.handleJavaScriptDialog", {"accept": True}))
        elif method == "Page.loadEventFired":
            self._loaded.set()
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """A command in this tab."""
        return await self.browser.send(method, params, self.session)

    async def goto(self, url: str) -> None:
        """Load a URL and wait for its load event."""
        self._loaded.clear()
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"{url}: {result['errorText']}")
        await self.wait_load()

    async def wait_load(self) -> None:
        """Wait for the current navigation's load event (bounded)."""
        async with asyncio.timeout(WAIT):
            await self._loaded.wait()

    async def js(self, expression: str) -> Any:
        """Evaluate in the page (works with the page's scripts off too: DevTools runs it, not the page)."""
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CDPError(str(result["exceptionDetails"]))
        return result["result"].get("value")

    async def wait_for(self, expression: str) -> Any:
        """Poll an expression until it is truthy (bounded): a condition in the page, never a guess at time."""
        async with asyncio.timeout(WAIT):
            while not (value := await self.js(expression)):
                await asyncio.sleep(0.05)
            return value

    async def _center(self, selector: str) -> tuple[float, float]:
        root = (await self.send("DOM.getDocument", {"depth": 0}))["root"]["nodeId"]
        node = (await self.send("DOM.querySelector", {"nodeId": root, "selector": selector}))["nodeId"]
        if not node:
            raise CDPError(f"no element matches {selector!r}")
        await self.send("DOM.scrollIntoViewIfNeeded", {"nodeId": node})
        quad = (await self.send("DOM.getBoxModel", {"nodeId": node}))["model"]["content"]
        return (quad[0] + quad[4]) / 2, (quad[1] + quad[5]) / 2

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the first element matching ``selector``."""
        x, y = await self._center(selector)
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                         "clickCount": 1})

    async def type(self, selector: str, text: str, *, enter: bool = False) -> None:
        """Click into a field, type ``text`` as key input, optionally press Enter."""
        await self.click(selector)
        await self.send("Input.insertText", {"text": text})
        if enter:
            for kind in ("keyDown", "keyUp"):
                await self.send("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                           "windowsVirtualKeyCode": 13, "text": "\r"})

    async def html(self) -> str:
        """The document's current HTML (read through DOM, so it works with scripts off)."""
        root = (await self.send("DOM.getDocument", {"depth": 0}))["root"]["nodeId"]
        return str((await self.send("DOM.getOuterHTML", {"nodeId": root}))["outerHTML"])

    async def screenshot(self, path: Path) -> None:
        """The whole page as a PNG."""
        data = (await self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}))["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Start headless Chromium with a fresh profile; stop it and remove the profile afterwards.

    A missing Chromium is an error (the tests fail, never skip): `.ci/run` installs it with apt-get.
    """
    if not Path(CHROMIUM).is_file():
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)")
    profile = tempfile.mkdtemp(prefix="crawler-chromium-")
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    port_file = Path(profile) / "DevToolsActivePort"
    session = aiohttp.ClientSession()
    try:
        async with asyncio.timeout(WAIT):
            while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
                if proc.returncode is not None:
                    raise RuntimeError(f"chromium exited with {proc.returncode} before it listened")
                await asyncio.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        ws = await session.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        browser = Browser(proc, profile, session, ws)
        try:
            yield browser
        finally:
            with contextlib.suppress(Exception):
                await browser.send("Browser.close")
            await ws.close()
            browser._reader.cancel()
    finally:
        await session.close()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
