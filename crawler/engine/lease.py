"""The credit lease: a request's credit is drawn from the job's budget before the request waits for its rate slot.

The client calls `take(n)` before its n-th request asks the rate gate (`Client._admit`: credit first, then the slot,
so a slot is never held across the store's I/O). A lease draws a few credits at a time (one per worker, at most
LEASE_MAX): a kill may leave that many reserved but unsent, and they count as spent. `settle(used)` at a clean end
gives back what was reserved and never sent. Two stores hold a job's budget: the local state store and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from crawler import testing
from crawler.errors import BudgetExhausted

if TYPE_CHECKING:
    from crawler.stores.local import StateStore
    from crawler.stores.pg_jobs import PgJobStore

LEASE_MAX = 16  # requests reserved at a time (a kill may leave them unsent: they count as spent)


def lease_size(workers: int) -> int:
    """Credits drawn at a time by a pool of `workers`: one each, at least 1, at most LEASE_MAX."""
    return max(1, min(workers, LEASE_MAX))


class CreditLease(Protocol):
    """The job's credit budget as the client draws on it (the engine's CreditBudget port)."""

    size: int  # credits drawn at a time (`lease_size` of the pool)

    async def take(self, n: int) -> None:
        """Before this client's n-th request asks for its rate slot: its credit, or BudgetExhausted."""
        ...

    async def settle(self, used: int) -> None:
        """A clean end: of the credits drawn, only the `used` (sent) ones stay spent."""
        ...


class LocalLease:
    """A local job's budget: the state store records, before they leave, how many requests may have been sent.

    ``base`` is the job's requests_sent when the run began; ``cap`` its --max-credits (None: no cap).
    """

    def __init__(self, state: StateStore, *, base: int, cap: int | None, size: int = 1) -> None:
        self._state = state
        self._base = base
        self._cap = cap
        self._reserved = base
        self.size = size

    @property
    def left(self) -> int | None:
        """Requests this run may send under --max-credits (the client's ``request_budget``); None: no cap."""
        return None if self._cap is None else max(self._cap - self._base, 0)

    async def take(self, n: int) -> None:
        """Reserve the next `size` requests in the state store when the n-th of this run is beyond the reservation."""
        if self._base + n > self._reserved:
            reserved = self._base + n - 1 + self.size
            self._reserved = reserved if self._cap is None else min(reserved, self._cap)
            self._state.reserve(self._reserved)

    async def settle(self, used: int) -> None:
        """What was reserved but never sent is not spent (the store counts what was sent)."""
        self._state.release()


class PgLease:
    """A PostgreSQL job's budget, shared by its workers: each session is granted `size` credits at a time."""

    def __init__(self, store: PgJobStore, jid: str, session: str, *, size: int = 1) -> None:
        self.store = store
        self.jid = jid
        self.session = session
        self.size = size
        self.granted = 0
        self.used = 0
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        """Draw one credit of the session's grant, asking the job for more when it is used up."""
        async with self._lock:
            if self.used >= self.granted:
                await testing.held("grant")
                got = await self.store.grant(self.jid, self.session, self.granted, self.size)
                if got == 0:
                    await self.store.set_status(self.jid, "budget", when="running")
                    raise BudgetExhausted("the job's --max-credits budget is spent")
                self.granted += got
            self.used += 1

    async def settle(self, used: int) -> None:
        """Give back what this session was granted and never sent."""
        await self.store.give_back(self.jid, self.session, used)
