"""HTML of `crawler history serve`: pure functions from query results to pages (every text escaped here).

Pages work without JavaScript (links and GET forms); /static/app.js only swaps the table in place
when it runs. Nothing is loaded from another origin.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from urllib.parse import quote, urlencode

from crawler.history import svg
from crawler.history.queries import OverviewRow, RenameRow, SeriesRow

PAGE_SIZE = 50
WINDOWS = (1, 7, 30)
MAX_COMPARE = 10  # users on one compare chart
# Sort keys of the overview: column name -> what it sorts by. A leading '-' means descending.
SORTS = ("handle", "followers", "gain1", "gain7", "gain30")
DEFAULT_SORT = "-gain7"


def e(value: object) -> str:
    """Text for HTML (body and attribute values)."""
    return escape(str(value), quote=True)


def num(value: int | None, *, sign: bool = False) -> str:
    """A count for a table cell; an empty cell for a missing value."""
    if value is None:
        return ""
    return f"{value:+,}" if sign else f"{value:,}"


def user_href(handle: str, **query: str) -> str:
    """The URL of a user's page (query values empty -> left out)."""
    q = urlencode({k: v for k, v in query.items() if v})
    return f"/u/{quote(handle, safe='')}" + (f"?{q}" if q else "")


def layout(title: str, body: str, *, subtitle: str = "") -> str:
    """The page around a body."""
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{e(title)} · crawler history</title><link rel=\"stylesheet\" href=\"/static/style.css\">"
        "<link rel=\"icon\" href=\"data:,\">"
        "<script src=\"/static/app.js\" defer></script></head><body>"
        "<header><a class=\"home\" href=\"/\">crawler history</a>"
        f"<span class=\"sub\">{e(subtitle)}</span></header><main>{body}</main></body></html>"
    )


@dataclass(frozen=True, slots=True)
class OverviewView:
    """What the overview shows: one page of (filtered, sorted) users."""

    rows: Sequence[OverviewRow]
    sparks: Mapping[str, Sequence[svg.Point]]
    total: int
    matching: int
    page: int
    pages: int
    sort: str
    q: str
    last_day: str | None


SORT_NAMES = {"handle": "handle", "followers": "followers", "gain1": "1 day", "gain7": "7 days",
              "gain30": "30 days"}


def _sort_button(view: OverviewView, key: str, focus: bool) -> str:
    """A column header whose button sorts (a GET form without JavaScript; Enter and Space both work)."""
    current = view.sort.lstrip("-")
    descending = view.sort.startswith("-")
    if key == current:
        target = key if descending else f"-{key}"
        arrow = ' <span aria-hidden="true">▼</span>' if descending else ' <span aria-hidden="true">▲</span>'
        aria = ' aria-sort="descending"' if descending else ' aria-sort="ascending"'
    else:
        target = key if key == "handle" else f"-{key}"  # numbers start high, names start at a
        arrow, aria = "", ""
    # After a sort without JavaScript (a page load), the sorted header takes the focus back (autofocus).
    auto = " autofocus" if focus and key == current else ""
    return (f'<th scope="col"{aria} data-sort="{e(key)}"><button class="sort" type="submit" form="sorting"'
            f' name="sort" value="{e(target)}"{auto}>{e(SORT_NAMES[key])}{arrow}</button></th>')


def sort_text(sort: str) -> str:
    """'sorted by 7 days, high to low': the order, in words (the count's live region says it after a sort)."""
    key = sort.lstrip("-")
    if key == "handle":
        return f"sorted by handle, {'z to a' if sort.startswith('-') else 'a to z'}"
    return f"sorted by {SORT_NAMES[key]}, {'high to low' if sort.startswith('-') else 'low to high'}"


def overview(view: OverviewView, *, focus_sort: bool = False) -> str:
    """The overview page (``focus_sort``: the page answers a sort button without JavaScript)."""
    head = "".join(_sort_button(view, k, focus_sort) for k in SORTS)
    rows = []
    for n, r in enumerate(view.rows, start=(view.page - 1) * PAGE_SIZE + 1):
        gains = "".join(f'<td class="num gain{w}" data-value="{e("" if r.gains[w] is None else r.gains[w])}">'
                        f"{num(r.gains[w], sign=True)}</td>" for w in WINDOWS)
        rows.append(
            f'<tr data-user-id="{e(r.user_id)}" data-handle="{e(r.handle)}"><td class="pick">'
            f'<input type="checkbox" name="u" value="{e(r.handle)}" aria-label="compare @{e(r.handle)}"></td>'
            f'<td class="rank">{n}</td><th scope="row" class="handle"><a href="{e(user_href(r.handle))}">'
            f'@{e(r.handle)}</a><div class="nick">{e(r.nickname)}</div></th>'
            f'<td class="num followers" data-value="{e("" if r.followers is None else r.followers)}"'
            f' title="on {e(r.day)}">{num(r.followers)}</td>{gains}'
            f'<td class="spark">{svg.sparkline(view.sparks.get(r.user_id, []))}</td></tr>')
    if not rows:
        rows.append('<tr class="empty"><td colspan="8">No user matches.</td></tr>')
    pager = _pager(view)
    as_of = f"Latest day: {e(view.last_day)}. " if view.last_day else ""
    found = (f"{view.matching:,} of {view.total:,} users match “{e(view.q)}”" if view.q
             else f"{view.total:,} users")
    keep_q = f'<input type="hidden" name="q" value="{e(view.q)}">' if view.q else ""
    return layout("Overview", (
        "<h1>Watched users</h1>"
        '<form class="filter" method="get" action="/" role="search">'
        f'<input type="search" name="q" value="{e(view.q)}" placeholder="filter by handle or name"'
        ' aria-label="filter by handle or name" autocomplete="off">'
        f'<input type="hidden" name="sort" value="{e(view.sort)}"><button type="submit">Filter</button></form>'
        # A live region that stays in place while the table is swapped: the script copies the new count into it.
        f'<p id="count" class="count" role="status" aria-live="polite">{found}, {sort_text(view.sort)}.</p>'
        f'<p class="note">{as_of}Gains are last minus first snapshot within the last N days (as'
        ' <code>crawler history top --days N</code>); empty where there is none.</p>'
        f'<div id="users"><form id="sorting" method="get" action="/">{keep_q}'
        '<input type="hidden" name="focus" value="sort"></form>'
        '<form method="get" action="/compare"><div class="scroll"><table class="users"><thead><tr>'
        '<th scope="col"><span class="vh">compare</span></th><th scope="col">#</th>'
        f'{head}<th scope="col">last 30 days</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
        f'{pager}<p><button type="submit">Compare selected</button></p></form></div>'),
        subtitle="followers and gains of every watched user")


def _pager(view: OverviewView) -> str:
    def link(page: int, text: str, rel: str) -> str:
        href = "/?" + urlencode({k: v for k, v in (("sort", view.sort), ("q", view.q), ("page", str(page))) if v})
        return f'<a rel="{rel}" href="{e(href)}">{text}</a>'

    parts = [link(view.page - 1, "← previous", "prev") if view.page > 1 else "<span>← previous</span>",
             f"<span class=\"where\">page {view.page} of {view.pages}</span>",
             link(view.page + 1, "next →", "next") if view.page < view.pages else "<span>next →</span>"]
    return f'<nav class="pager">{" ".join(parts)}</nav>'


@dataclass(frozen=True, slots=True)
class UserView:
    """What a user's page shows."""

    user_id: str
    handle: str
    nickname: str
    rows: Sequence[SeriesRow]
    renames: Sequence[RenameRow]
    posts: Mapping[str, int] | None
    since: str
    until: str


def _gaps(rows: Sequence[SeriesRow]) -> list[tuple[str, str, int]]:
    """(last day before, first day after, days missing) of each gap between snapshots."""

    out = []
    for a, b in itertools.pairwise(rows):
        missing = (dt.date.fromisoformat(b.day) - dt.date.fromisoformat(a.day)).days - 1
        if missing > 0:
            out.append((a.day, b.day, missing))
    return out


def daily_gains(rows: Sequence[SeriesRow]) -> list[svg.Point]:
    """Followers gained on each day whose previous day has a snapshot too (a gap has no daily gain)."""

    out: list[svg.Point] = []
    for a, b in itertools.pairwise(rows):
        consecutive = dt.date.fromisoformat(b.day) - dt.date.fromisoformat(a.day) == dt.timedelta(days=1)
        if consecutive and a.followers is not None and b.followers is not None:
            out.append((b.day, b.followers - a.followers))
    return out


def user(view: UserView) -> str:
    """One user's page."""
    rows, markers = view.rows, [svg.Marker(r.day, f"@{r.old} → @{r.new}") for r in view.renames]
    charts = []
    domain = (rows[0].day, rows[-1].day) if rows else None
    for field, title, colour in (("followers", "Followers", svg.PALETTE[0]), ("following", "Following",
                                 svg.PALETTE[1]), ("videos", "Videos", svg.PALETTE[2]),
                                 ("hearts", "Hearts", svg.PALETTE[3])):
        series = svg.Series(field, [(r.day, getattr(r, field)) for r in rows], colour)
        charts.append(f'<figure id="chart-{field}"><figcaption>{title}</figcaption>'
                      f"{svg.line_chart([series], title=title, markers=markers, kind=field)}</figure>")
    gains = svg.bar_chart(daily_gains(rows), title="Followers gained per day", domain=domain)
    charts.insert(1, '<figure id="chart-gains"><figcaption>Followers gained per day (a day after a gap has'
                  f" none)</figcaption>{gains}</figure>")
    if view.posts:
        posts = svg.bar_chart([(d, view.posts[d]) for d in sorted(view.posts)], title="Posts per day", domain=domain)
        charts.append('<figure id="chart-posts"><figcaption>Posts published per day (stored posts)</figcaption>'
                      f"{posts}</figure>")
    renames = "".join(f'<li class="rename" data-day="{e(r.day)}">{e(r.day)}: @{e(r.old)} → @{e(r.new)}</li>'
                      for r in view.renames)
    gaps = _gaps(rows)
    gap_list = "".join(f'<li class="gap" data-after="{e(a)}" data-before="{e(b)}">no snapshot for {n} day'
                       f"{'s' if n > 1 else ''} between {e(a)} and {e(b)}</li>" for a, b, n in gaps)
    table = []
    gap_after = {a: n for a, _, n in gaps}
    previous: int | None = None
    for r in rows:
        delta = None if previous is None or r.followers is None else r.followers - previous
        table.append(f'<tr data-day="{e(r.day)}"><th scope="row">{e(r.day)}</th><td>@{e(r.handle)}</td>'
                     f'<td class="num">{num(r.followers)}</td><td class="num">{num(delta, sign=True)}</td>'
                     f'<td class="num">{num(r.following)}</td><td class="num">{num(r.videos)}</td>'
                     f'<td class="num">{num(r.hearts)}</td></tr>')
        if r.day in gap_after:
            table.append(f'<tr class="gap"><td colspan="7">no snapshot for {gap_after[r.day]} day(s)</td></tr>')
        previous = r.followers
    csv_href = f"/u/{quote(view.handle, safe='')}.csv" + (
        "?" + urlencode({k: v for k, v in (("from", view.since), ("to", view.until)) if v})
        if view.since or view.until else "")
    span = f"{rows[0].day} to {rows[-1].day}, {len(rows)} snapshots" if rows else "no snapshot in this range"
    body = (
        f'<h1>@{e(view.handle)} <span class="nick">{e(view.nickname)}</span></h1>'
        f'<p class="meta">user id {e(view.user_id)} · {e(span)} · <a class="csv" href="{e(csv_href)}">CSV of what is'
        f' shown</a> · <a href="/compare?u={e(quote(view.handle, safe=""))}">compare…</a></p>'
        f'<form class="range" method="get" action="{e(user_href(view.handle))}">'
        f'<label>from <input type="date" name="from" value="{e(view.since)}"></label> '
        f'<label>to <input type="date" name="to" value="{e(view.until)}"></label> <button type="submit">Show</button>'
        "</form>"
        + (f'<h2>Renames</h2><ul class="renames">{renames}</ul>' if renames else "")
        + (f'<h2>Gaps</h2><ul class="gaps">{gap_list}</ul>' if gap_list else "")
        + f'<h2>Charts</h2><div class="charts">{"".join(charts)}</div>'
        '<h2 id="snapshots">Snapshots</h2><div class="scroll" tabindex="0" role="region"'
        ' aria-labelledby="snapshots"><table class="snapshots"><thead><tr>'
        + "".join(f'<th scope="col">{h}</th>' for h in ("day", "handle", "followers", "change", "following",
                                                        "videos", "hearts"))
        + f"</tr></thead><tbody>{''.join(table)}"
        "</tbody></table></div>")
    return layout(f"@{view.handle}", body, subtitle=view.nickname)


@dataclass(frozen=True, slots=True)
class CompareView:
    """Several users indexed to 100 at the start of the range."""

    series: Sequence[tuple[str, Sequence[SeriesRow]]]
    unknown: Sequence[str]
    since: str
    until: str
    left_out: Sequence[str] = ()  # asked for past the page's limit of users


def indexed(rows: Sequence[SeriesRow]) -> list[svg.Point]:
    """Followers as 100 x value / the first value of the range (None where a value is missing)."""
    base = next((r.followers for r in rows if r.followers), None)
    if base is None:
        return []
    return [(r.day, None if r.followers is None else r.followers * 100 / base) for r in rows]


def compare(view: CompareView) -> str:
    """The compare page."""
    lines = [svg.Series(f"@{h}", indexed(rows), svg.PALETTE[n % len(svg.PALETTE)])
             for n, (h, rows) in enumerate(view.series)]
    legend = "".join(f'<li><span class="swatch c{n % len(svg.PALETTE)}"></span>'
                     f'<a href="{e(user_href(h))}">@{e(h)}</a>'
                     + (f" {rows[0].followers or 0:,} → {rows[-1].followers or 0:,}" if rows else " no snapshot")
                     + "</li>" for n, (h, rows) in enumerate(view.series))
    unknown = (f'<p class="unknown">No history for {", ".join("@" + e(u) for u in view.unknown)}.</p>'
               if view.unknown else "")
    if view.left_out:
        unknown += (f'<p class="unknown">One chart compares at most {MAX_COMPARE} users; left out:'
                    f' {", ".join("@" + e(u) for u in view.left_out)}.</p>')
    inputs = "".join(f'<input type="hidden" name="u" value="{e(h)}">' for h, _ in view.series)
    body = (
        "<h1>Compare</h1><p>Followers indexed to 100 at each user's first snapshot in the range.</p>" + unknown
        + f'<form class="range" method="get" action="/compare">{inputs}'
        '<label>add <input type="text" name="u" placeholder="handle"></label> '
        f'<label>from <input type="date" name="from" value="{e(view.since)}"></label> '
        f'<label>to <input type="date" name="to" value="{e(view.until)}"></label> <button type="submit">Show</button>'
        f'</form><ul class="legend">{legend}</ul>'
        + (svg.line_chart(lines, title="Followers, indexed (100 = start)", height=320, kind="indexed")
           if lines else "<p>Pick users on the overview (the boxes on the left), or add a handle above.</p>"))
    return layout("Compare", body, subtitle="growth side by side")


def error(status: int, message: str) -> str:
    """A plain error page."""
    return layout(f"{status}", f'<h1>{status}</h1><p class="error">{e(message)}</p><p><a href="/">overview</a></p>')


# Text colours meet WCAG AA (4.5:1) on both backgrounds (#fff cells, #fafafa page): #666 is 5.5:1 on #fafafa.
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#222;color:#eee;padding:8px 16px}header a{color:#fff;font-weight:600;text-decoration:none}
header .sub{margin-left:12px;color:#bbb}main{padding:12px 16px;max-width:1100px}
table{border-collapse:collapse;background:#fff}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
tbody th{font-weight:normal}td.num,th[data-sort]{text-align:right}th[data-sort="handle"]{text-align:left}
td.num{font-variant-numeric:tabular-nums}.nick{color:#666;font-size:12px}h1 .nick{font-size:16px}
button.sort{font:inherit;font-weight:600;color:inherit;background:none;border:0;padding:0;cursor:pointer;
text-decoration:underline}
:focus-visible{outline:2px solid #1a5fb4;outline-offset:2px}
.vh{position:absolute;width:1px;height:1px;margin:-1px;padding:0;overflow:hidden;clip:rect(0 0 0 0);
white-space:nowrap;border:0}
.filter input[type=search]{width:260px;max-width:100%;padding:4px}.pager{margin:8px 0}
.pager span,.pager a{margin-right:10px}.pager span{color:#666}.pager .where{color:#222}
tr.gap td{color:#b00;font-style:italic}
.renames li,.gaps li{color:#b00}figure{margin:8px 0 16px}figcaption{font-weight:600}
svg.chart{display:block;width:100%;max-width:960px;height:auto}.scroll{overflow-x:auto;max-width:100%}
.legend{list-style:none;padding:0}.legend li{display:inline-block;margin-right:16px}
.swatch{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
""" + "".join(f".c{n}{{background:{c}}}" for n, c in enumerate(svg.PALETTE))

# Progressive enhancement only: typing in the filter, a sort button or a pager link fetches the same
# server-rendered page and swaps the table in place (no reload), puts the focus back on the control
# that was used and copies the new count into the live region (#count). Without JavaScript the forms
# and links do the same with a page load (and the sorted header's autofocus).
SCRIPT = """
(function () {
  "use strict";
  document.documentElement.setAttribute("data-js", "on");
  var box = document.querySelector("form.filter input[name=q]");
  var users = document.getElementById("users");
  if (!box || !users) { return; }
  var timer = null, seq = 0;
  function swap(url, push, then) {
    var mine = ++seq;
    fetch(url, {headers: {"Accept": "text/html"}}).then(function (r) { return r.text(); }).then(function (text) {
      if (mine !== seq) { return; }
      var doc = new DOMParser().parseFromString(text, "text/html");
      var fresh = doc.getElementById("users");
      if (!fresh) { return; }
      users.replaceWith(fresh);
      users = fresh;
      var sort = doc.querySelector("form.filter input[name=sort]");
      if (sort) { document.querySelector("form.filter input[name=sort]").value = sort.value; }
      var count = doc.getElementById("count"), live = document.getElementById("count");
      if (count && live && live.textContent !== count.textContent) { live.textContent = count.textContent; }
      if (then) { then(); }
      if (push) { history.pushState(null, "", url); } else { history.replaceState(null, "", url); }
      document.documentElement.setAttribute("data-swaps", String(seq));
    });
  }
  function focus(selector) {
    var el = users.querySelector(selector);
    if (el) { el.focus(); }
  }
  box.addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(function () {
      var form = box.form, params = new URLSearchParams(new FormData(form));
      if (!params.get("q")) { params.delete("q"); }
      swap("/?" + params.toString(), false);
    }, 200);
  });
  box.form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var params = new URLSearchParams(new FormData(box.form));
    if (!params.get("q")) { params.delete("q"); }
    swap("/?" + params.toString(), false);
  });
  document.addEventListener("submit", function (ev) {
    var button = ev.submitter;
    if (ev.target.id !== "sorting" || !button || !button.closest("th")) { return; }
    ev.preventDefault();
    var params = new URLSearchParams(new FormData(ev.target)), key = button.closest("th").getAttribute("data-sort");
    params.delete("focus");
    params.set("sort", button.value);
    swap("/?" + params.toString(), true, function () { focus('th[data-sort="' + key + '"] button'); });
  });
  document.addEventListener("click", function (ev) {
    var a = ev.target.closest ? ev.target.closest("#users .pager a") : null;
    if (!a) { return; }
    ev.preventDefault();
    var rel = a.getAttribute("rel");
    swap(a.getAttribute("href"), true, function () { focus('.pager a[rel="' + rel + '"], th[data-sort] button'); });
  });
  window.addEventListener("popstate", function () { swap(location.pathname + location.search, false); });
})();
"""
