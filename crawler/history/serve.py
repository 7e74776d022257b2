"""`crawler history serve`: the history store as a local web page (aiohttp), read-only.

The store is opened read-only (no migration; the database refuses writes) and every query runs in one
worker thread, off the event loop. Routes: `/` (sort, q, page), `/u/HANDLE` (from, to),
`/u/HANDLE.csv`, `/compare?u=A&u=B`, and the page's own `/static/` files. Pages are rendered by
crawler/history/pages.py, charts by crawler/history/svg.py.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import ipaddress
import math
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

from aiohttp import web

from crawler.engine.stop import install_signals, remove_signals
from crawler.errors import UsageError
from crawler.history import pages, paging
from crawler.history.db import StoreThread, connection_lost
from crawler.history.queries import HistoryQueries, OverviewRow, SeriesRow, parse_day
from crawler.stores.postgres import deadline

T = TypeVar("T")
SECURITY_HEADERS = {
    # Nothing from another origin, no inline script: a nickname that slipped through escaping could not run.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
                               " connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class History:
    """The read-only store behind one thread: every query of a request runs there, one at a time."""

    def __init__(self, url: str, *, stall_limit: float = 300.0, connect_timeout: float = 5.0) -> None:
        self._url = url
        self._bounds = {"stall_limit": stall_limit, "connect_timeout": connect_timeout}
        self._thread = StoreThread("history")  # the store-thread mechanism ingest uses too
        self.store = HistoryQueries.open_readonly(url, **self._bounds)

    async def run(self, fn: Callable[[HistoryQueries], T]) -> T:
        """Run ``fn(store)`` in the store's thread; a PostgreSQL server that accepts it but never answers has the
        connection ended after ``retry.stall_limit`` (then a new session is tried, as for any lost one)."""
        with deadline(self._bounds["stall_limit"], lambda: self.store.shut_down()):
            return await self._thread.run(self._call, fn)

    def _call(self, fn: Callable[[HistoryQueries], T]) -> T:
        # A PostgreSQL session can end under a long-lived page (a server restart): open a new one and ask
        # again once (every query only reads, so asking twice is safe) instead of failing every later request.
        if self._lost():
            self._reopen()
        try:
            return fn(self.store)
        except Exception as exc:
            # psycopg's "connection socket closed" on an ended session can come while the connection still says it
            # is open: any connection error counts as a lost session.
            if not (self._lost() or connection_lost(exc)):
                raise
        self._reopen()
        return fn(self.store)

    def _lost(self) -> bool:
        db = self.store._db
        return db is None or (self.store.postgres and bool(db.closed))

    def _reopen(self) -> None:
        self.store.close()
        try:
            self.store = HistoryQueries.open_readonly(self._url, **self._bounds)
        except UsageError as exc:
            raise _error(503, f"{exc}; the page answers again once the database is back") from None

    def close(self) -> None:
        """Close the store (in its thread) and the thread (idempotent)."""
        if self.store._db is not None:
            self._thread.submit(self.store.close).result()
        self._thread.close()


HISTORY = web.AppKey("history", History)
LOOPBACK = web.AppKey("loopback", bool)


def _sort_key(sort: str) -> Callable[[OverviewRow], tuple[Any, ...]]:
    """The overview's ordering; missing values always last, ties by handle."""
    field = sort.lstrip("-")
    descending = sort.startswith("-")
    if field == "handle":
        return lambda r: (r.handle,)

    def key(r: OverviewRow) -> tuple[Any, ...]:
        value = r.followers if field == "followers" else r.gains.get(int(field[4:]))
        if value is None:
            return (1, 0, r.handle)
        return (0, -value if descending else value, r.handle)

    return key


def _query_day(request: web.Request, name: str) -> dt.date | None:
    text = request.query.get(name, "").strip()
    if not text:
        return None
    try:
        return parse_day(text, name)
    except UsageError as exc:
        raise _error(400, str(exc)) from None


def _error(status: int, message: str) -> web.HTTPException:
    kinds: dict[int, type[web.HTTPException]] = {400: web.HTTPBadRequest, 404: web.HTTPNotFound,
                                                  421: web.HTTPMisdirectedRequest, 503: web.HTTPServiceUnavailable}
    return kinds[status](text=pages.error(status, message), content_type="text/html")


def _html(body: str) -> web.Response:
    return web.Response(text=body, content_type="text/html", charset="utf-8")


async def overview(request: web.Request) -> web.Response:
    """`/`: every user, sorted, filtered and paged."""
    sort = request.query.get("sort", pages.DEFAULT_SORT)
    if sort.removeprefix("-") not in pages.SORTS:
        raise _error(400, f"sort {sort!r}: use one of {', '.join(pages.SORTS)} (a leading - reverses the order)")
    q = request.query.get("q", "").strip()
    text = request.query.get("page", "1")
    if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < 1:
        raise _error(400, f"page {text!r}: expected a page number (1, 2, ...)")
    page = int(text)  # past the last page: the last page

    def load(store: HistoryQueries) -> pages.OverviewView:
        end = store.last_day()
        ready = None if q else _ready_page(store, sort, page)
        if ready is not None:
            return ready
        rows = store.overview(pages.WINDOWS, until=end)
        total = len(rows)
        if q:
            needle = q.lower().lstrip("@")
            rows = [r for r in rows if needle in r.handle.lower() or needle in r.nickname.lower()]
        rows.sort(key=_sort_key(sort), reverse=sort == "-handle")  # names: the key cannot be negated
        count = max(1, math.ceil(len(rows) / pages.PAGE_SIZE))
        shown = rows[(min(page, count) - 1) * pages.PAGE_SIZE:][:pages.PAGE_SIZE]
        sparks = {} if end is None else store.followers_since([r.user_id for r in shown],
                                                              end - dt.timedelta(days=30))
        return pages.OverviewView(shown, sparks, total, len(rows), min(page, count), count, sort, q,
                                  None if end is None else end.isoformat())

    view = await request.app[HISTORY].run(load)
    return _html(pages.overview(view, focus_sort=request.query.get("focus") == "sort"))


def _ready_page(store: HistoryQueries, sort: str, page: int) -> pages.OverviewView | None:
    """The overview's page from the maintained data (paging.py); None on a store without it."""
    end = store.last_day()
    first = paging.overview_page(store, sort, (page - 1) * pages.PAGE_SIZE, pages.PAGE_SIZE, pages.WINDOWS)
    if first is None:
        return None
    shown, total = first
    count = max(1, math.ceil(total / pages.PAGE_SIZE))
    if page > count:  # past the last page: the last page
        page = count
        shown, total = paging.overview_page(store, sort, (page - 1) * pages.PAGE_SIZE, pages.PAGE_SIZE,
                                            pages.WINDOWS) or ([], 0)
    sparks = {} if end is None else store.followers_since([r.user_id for r in shown], end - dt.timedelta(days=30))
    return pages.OverviewView(shown, sparks, total, total, page, count, sort, "",
                              None if end is None else end.isoformat())


def _resolve(store: HistoryQueries, handle: str) -> tuple[str, str, str]:
    """(user id, current handle, nickname) of any handle the user has had."""
    user_id, current = store.resolve(handle)
    known = store.user(user_id)
    return user_id, current, known[1] if known else ""


async def user_or_csv(request: web.Request) -> web.StreamResponse:
    """`/u/HANDLE` (the user's page) or `/u/HANDLE.csv` (what the page shows, as CSV)."""
    name = request.match_info["handle"]
    since, until = _query_day(request, "from"), _query_day(request, "to")
    history = request.app[HISTORY]

    def find(store: HistoryQueries) -> tuple[bool, str, str, str] | None:
        # A handle may itself end in ".csv": the CSV is meant only when the name without it is known.
        for as_csv, handle in ((True, name[:-4]), (False, name)) if name.endswith(".csv") else ((False, name),):
            try:
                return (as_csv, *_resolve(store, handle))
            except UsageError:
                continue
        return None

    found = await history.run(find)
    if found is None:
        raise _error(404, f"no history for @{name.removesuffix('.csv').lstrip('@').lower()}")
    as_csv, user_id, current, nickname = found
    asked = (name[:-4] if as_csv else name).lstrip("@").lower()
    if asked != current:  # an old handle (or other spelling) of a renamed user: the page lives at the current one
        raise web.HTTPFound(pages.user_href(current) + (".csv" if as_csv else "")
                            + (f"?{request.query_string}" if request.query_string else ""))

    def load(store: HistoryQueries) -> pages.UserView:
        rows = store.series(user_id, since, until)
        renames = [r for r in store.safe_renames(user_id)
                   if (since is None or r.day >= since.isoformat()) and (until is None or r.day <= until.isoformat())]
        posts = store.posts_per_day(user_id, since or (dt.date.fromisoformat(rows[0].day) if rows else None),
                                    until or (dt.date.fromisoformat(rows[-1].day) if rows else None))
        return pages.UserView(user_id, current, nickname, rows, renames, posts,
                              since.isoformat() if since else "", until.isoformat() if until else "")

    view = await history.run(load)
    if as_csv:
        return _csv(view)
    return _html(pages.user(view))


def _csv(view: pages.UserView) -> web.Response:
    """The snapshots shown on a user's page, with the export's cell rules."""
    from crawler.sinks.csv_sink import cell

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["day", "user_id", "handle", "followers", "following", "videos", "hearts"])
    for r in view.rows:
        writer.writerow([cell(v) for v in (r.day, view.user_id, r.handle, r.followers, r.following, r.videos,
                                           r.hearts)])
    span = "-".join(x for x in (view.since, view.until) if x)
    filename = f"{view.handle}{'-' + span if span else ''}.csv"
    # A handle is the API's text: the quoted name only in safe ASCII, the exact one as RFC 6266's filename*.
    plain = re.sub(r"[^A-Za-z0-9._-]", "_", filename)
    return web.Response(text=out.getvalue(), content_type="text/csv", charset="utf-8", headers={
        "Content-Disposition": f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(filename, safe='')}"})


async def compare(request: web.Request) -> web.Response:
    """`/compare?u=A&u=B`: several users indexed to 100 at the start of the range."""
    since, until = _query_day(request, "from"), _query_day(request, "to")
    wanted: list[str] = []
    for u in request.query.getall("u", []):
        h = u.strip().lstrip("@").lower()
        if h and h not in wanted:
            wanted.append(h)
    wanted, left_out = wanted[:pages.MAX_COMPARE], wanted[pages.MAX_COMPARE:]

    def load(store: HistoryQueries) -> pages.CompareView:
        series: list[tuple[str, list[SeriesRow]]] = []
        unknown: list[str] = []
        for h in wanted:
            try:
                user_id, current = store.resolve(h)
            except UsageError:
                unknown.append(h)
                continue
            if all(current != c for c, _ in series):
                series.append((current, store.series(user_id, since, until)))
        return pages.CompareView(series, unknown, since.isoformat() if since else "",
                                 until.isoformat() if until else "", left_out)

    return _html(pages.compare(await request.app[HISTORY].run(load)))


async def static(request: web.Request) -> web.Response:
    """The page's own style sheet and script (shipped in the package: the page works offline)."""
    name = request.match_info["name"]
    if name == "style.css":
        return web.Response(text=pages.STYLE, content_type="text/css", charset="utf-8")
    if name == "app.js":
        return web.Response(text=pages.SCRIPT, content_type="text/javascript", charset="utf-8")
    raise _error(404, "no such file")


_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def _is_loopback_ip(host: str) -> bool:
    """127.0.0.2 and the like: a loopback address literal (a name never is, so DNS rebinding stays out)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@web.middleware
async def guard(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Security headers on every answer; on a loopback bind, only loopback Host names (no DNS rebinding)."""
    try:
        if request.app[LOOPBACK]:
            try:
                host = (request.url.host or "").lower()
            except ValueError:  # yarl refuses the Host header (a port that is no number, or out of range)
                raise _error(400, f"malformed Host header {request.host!r}") from None
            if host not in _LOCAL_NAMES and not _is_loopback_ip(host):
                raise _error(421, f"this page answers only to localhost, not to {host!r}")
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_app(url: str, *, host: str = "127.0.0.1", stall_limit: float = 300.0, connect_timeout: float = 5.0
             ) -> web.Application:
    """The web application over the store at ``url`` (opened read-only now, closed with the app); a PostgreSQL
    connection is found dead after ``stall_limit`` seconds of silence (retry.stall_limit)."""
    history = History(url, stall_limit=stall_limit, connect_timeout=connect_timeout)
    app = web.Application(middlewares=[guard])
    app[HISTORY] = history
    app[LOOPBACK] = is_loopback(host)

    async def close(_: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, history.close)

    app.on_cleanup.append(close)
    app.router.add_get("/", overview)
    app.router.add_get("/compare", compare)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/u/{handle}", user_or_csv)
    return app


async def serve(url: str, host: str, port: int, *, out: Any = sys.stderr, stall_limit: float = 300.0,
                connect_timeout: float = 5.0) -> int:
    """Serve until SIGINT/SIGTERM; print where (and a warning when other hosts can reach the page)."""
    app = make_app(url, host=host, stall_limit=stall_limit, connect_timeout=connect_timeout)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port"
                             ) from None
        bound = runner.addresses[0][1] if runner.addresses else port  # --port 0: the one the system picked
        shown = f"[{host}]" if ":" in host else host
        if not is_loopback(host):
            print(f"crawler: warning: serving on {host}, reachable from other machines; the page has no login:"
                  " anyone who can reach it can read the whole history (use --host 127.0.0.1 to keep it local)",
                  file=out, flush=True)
        print(f"crawler: history at http://{shown}:{bound}/ (read-only; Ctrl-C to stop)", file=out, flush=True)
        stop = asyncio.Event()
        installed = install_signals(lambda _: stop.set())
        try:
            await stop.wait()
        finally:
            remove_signals(installed)
    finally:
        await runner.cleanup()
    return 0
