"""One page of the overview (`history serve`) from the maintained per-user data (ready.py): its cost grows with the
page's offset and with the older stragglers (users whose last snapshot is older than the day before the store's
newest day), not with the users; while a night's ingest runs, the day before's users are read by day, sorted.
The order is serve's: by handle, followers or a gain, missing values last, ties by handle (code points).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from crawler.history import ready
from crawler.history.queries import HistoryQueries, OverviewRow


def _key(desc: bool) -> Any:
    return lambda r: (-r[0] if desc else r[0], r[1])


def _late(n: int, end: dt.date) -> list[tuple[str, str]]:
    """Where window ``n``'s gains are kept: (last day, column) of the users of the newest day and, for n > 1, of the
    day before's stragglers (ready.LATE)."""
    out = [(end.isoformat(), f"g{n}")]
    if n in ready.LATE:
        out.append(((end - dt.timedelta(days=1)).isoformat(), f"g{ready.LATE[n]}"))
    return out


def _valued(store: HistoryQueries, field: str, desc: bool, end: dt.date, want: int
            ) -> tuple[list[tuple[int, str, str]], int, set[str]]:
    """The first ``want`` (value, handle, user id) of the users with a value, in order; how many have one; the older
    stragglers with one (whom the kept data does not place)."""
    c = ' COLLATE "C"' if store.postgres else ""
    way = " DESC" if desc else ""
    if field == "followers":
        rows = store._rows(f"SELECT followers, handle, user_id FROM users WHERE followers IS NOT NULL"
                           f" ORDER BY followers{way}, handle{c} LIMIT ?", (want,))
        count = store._rows("SELECT COUNT(*) FROM users WHERE followers IS NOT NULL")[0][0]
        return [(int(v), str(h), str(u)) for v, h, u in rows], int(count), set()
    n = int(field[4:])
    found: list[tuple[int, str, str]] = []
    count = 0
    for day, g in _late(n, end):  # each an index range (the newest day's) or one day's users sorted
        found += [(int(v), str(h), str(u)) for v, h, u in store._rows(
            f"SELECT {g}, handle, user_id FROM users WHERE s_last = ? AND {g} IS NOT NULL"
            f" ORDER BY {g}{way}, handle{c} LIMIT ?", (day, want))]
        count += int(store._rows(f"SELECT COUNT(*) FROM users WHERE s_last = ? AND {g} IS NOT NULL", (day,))[0][0])
    since, until = (end - dt.timedelta(days=n)).isoformat(), (end - dt.timedelta(days=1)).isoformat()
    late = [(r.gains[n], r.handle, r.user_id)  # the older stragglers (the day before's have no 1-day gain)
            for r in store._overview_computed((n,), end, late_since=since, late_until=until)]
    late_valued = [(int(g), h, u) for g, h, u in late if g is not None]
    merged = sorted(found + late_valued, key=_key(desc))[:want]
    return merged, count + len(late_valued), {u for _, _, u in late_valued}


def overview_page(store: HistoryQueries, sort: str, offset: int, size: int, days: Sequence[int] = ready.WINDOWS
                  ) -> tuple[list[OverviewRow], int] | None:
    """The users ``offset`` to ``offset + size`` of the overview sorted by ``sort`` (a leading '-': descending) and
    the number of users; None when the store has no maintained data (an older schema) or the windows are not kept."""
    end = store.last_day()
    if store.version < ready.VERSION or not set(days) <= set(ready.WINDOWS):
        return None
    if end is None:
        return [], 0
    c = ' COLLATE "C"' if store.postgres else ""
    total = int(store._rows("SELECT COUNT(*) FROM users WHERE s_last IS NOT NULL")[0][0])
    field, desc = sort.lstrip("-"), sort.startswith("-")
    if field == "handle":
        ids = [str(u) for (u,) in store._rows(f"SELECT user_id FROM users WHERE s_last IS NOT NULL ORDER BY"
                                              f" handle{c}{' DESC' if desc else ''} LIMIT ? OFFSET ?", (size, offset))]
    else:
        valued, count, late = _valued(store, field, desc, end, offset + size)
        ids = [u for _, _, u in valued[offset:offset + size]]
        if len(ids) < size:  # then the users without a value, by handle
            skip = max(0, offset - count)
            params: tuple[str, ...] = ()
            if field == "followers":
                where = "followers IS NULL"
            else:
                kept = _late(int(field[4:]), end)
                where = " AND ".join(f"NOT (s_last = ? AND {g} IS NOT NULL)" for _, g in kept)
                params = tuple(day for day, _ in kept)
            rest = store._rows(f"SELECT user_id FROM users WHERE s_last IS NOT NULL AND {where} ORDER BY handle{c}"
                               " LIMIT ?", (*params, skip + size + len(late)))
            ids += [u for u in (str(u) for (u,) in rest) if u not in late][skip:skip + size - len(ids)]
    rows = {r.user_id: r for r in store._overview_ready(days, end, ids)}
    return [rows[u] for u in ids], total
