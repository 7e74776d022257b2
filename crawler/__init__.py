"""crawler: a rate-exact, crash-safe asyncio crawler for TikLiveAPI."""

from __future__ import annotations

__version__ = "0.1.0"
