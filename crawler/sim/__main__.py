"""`python -m crawler.sim`: run the simulator until SIGINT/SIGTERM (also the crawler CLI's `sim` command)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from crawler.sim.data import WorldConfig
from crawler.sim.media import EXTRA_MEDIA_FAULTS, MEDIA_FAULTS, MediaConfig
from crawler.sim.render import LIVE_LATENCY
from crawler.sim.server import EXTRA_FAULT_KINDS, FAULT_KINDS, SimConfig, Simulator


def _key(text: str) -> tuple[str, int | None]:
    """Parse KEY or KEY:BALANCE."""
    name, sep, balance = text.rpartition(":")
    if not sep:
        return text, None
    try:
        return name, int(balance)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--key {text!r}: BALANCE must be an integer") from None


def _latency(text: str) -> tuple[float, float] | str:
    """Parse MIN,MAX seconds, or "live"."""
    if text == "live":
        return text
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--latency {text!r}: expected MIN,MAX seconds or live") from None
    return low, high


def _field(text: str) -> tuple[str, str]:
    """Parse ENDPOINT:FIELD."""
    endpoint, sep, name = text.partition(":")
    if not sep or not endpoint.strip("/") or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ENDPOINT:FIELD, e.g. post-detail:id")
    return endpoint.strip("/"), name


def _faults(text: str) -> frozenset[str]:
    kinds = frozenset(k.strip() for k in text.split(",") if k.strip())
    if not kinds <= FAULT_KINDS | EXTRA_FAULT_KINDS:
        raise argparse.ArgumentTypeError(f"--faults: unknown {sorted(kinds - FAULT_KINDS - EXTRA_FAULT_KINDS)}")
    return kinds


def _paths(text: str) -> frozenset[str]:
    """Parse ENDPOINT[,ENDPOINT...] as API paths without their trailing slash ("/post-detail")."""
    return frozenset("/" + p.strip().strip("/") for p in text.split(",") if p.strip().strip("/"))


def _parser(prog: str = "python -m crawler.sim") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run the TikLiveAPI simulator (prints its URL, keys and a"
                                " few handles of its world, then serves until Ctrl-C).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--pathological", type=float, default=0.0, metavar="FRACTION")
    p.add_argument("--broken-text", type=float, default=0.0, metavar="FRACTION",
                   help="users whose nickname and titles end in half an emoji and a NUL")
    p.add_argument("--pinned", type=float, default=WorldConfig().pinned_fraction, metavar="FRACTION",
                   help="users whose posts list starts with 1-3 pinned posts (flagged or not); 0: none")
    p.add_argument("--wrapped", type=float, default=WorldConfig().wrapped_fraction, metavar="FRACTION",
                   help="users whose profile comes wrapped as userInfo: {user, stats, statsV2}")
    p.add_argument("--rounded-only", action="store_true",
                   help="profiles carry only the display-rounded stats, no exact statsV2")
    p.add_argument("--rate-limit", type=int, default=200)
    p.add_argument("--window", type=float, default=60.0, metavar="SECONDS")
    p.add_argument("--burst-limit", type=int, default=50)
    p.add_argument("--latency", type=_latency, default=(0.0, 0.0), metavar="MIN,MAX|live",
                   help="seconds per answer, uniform; live: 0.4-9 s, log-normal, median 1.5 s (seeded)")
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--faults", type=_faults, default=FAULT_KINDS, metavar="KIND,...")
    p.add_argument("--slow-seconds", type=float, default=30.0)
    p.add_argument("--quirks", action="store_true")
    p.add_argument("--always-429", action="store_true")
    p.add_argument("--retry-after", type=float, default=None, metavar="SECONDS")
    p.add_argument("--media-ttl", type=float, default=6 * 3600.0, metavar="SECONDS",
                   help="how long signed media URLs stay valid")
    p.add_argument("--media-fault-rate", type=float, default=0.0, help="share of media requests that fail")
    p.add_argument("--media-faults", default=",".join(sorted(MEDIA_FAULTS)), metavar="KIND,...",
                   help=f"of {', '.join(sorted(MEDIA_FAULTS | EXTRA_MEDIA_FAULTS))} (throttle: 429/503 with"
                   " Retry-After, only when named)")
    p.add_argument("--media-bytes-per-second", type=float, default=None, metavar="N",
                   help="throttle every media response")
    p.add_argument("--drop-field", type=_field, action="append", default=[], metavar="ENDPOINT:FIELD",
                   help="remove FIELD from every answer of ENDPOINT (body, user/stats, list items); repeatable")
    p.add_argument("--add-field", type=_field, action="append", default=[], metavar="ENDPOINT:FIELD",
                   help="add a FIELD no client knows to every answer of ENDPOINT (body, list items); repeatable")
    p.add_argument("--media-retry-after", type=float, default=1.0, metavar="SECONDS",
                   help="the Retry-After of a media throttle fault")
    p.add_argument("--media-wm-same", action="store_true",
                   help="the 2026 shape: wmplay == play, wm_size 0 (no separate watermarked file)")
    p.add_argument("--media-generic-type", action="store_true",
                   help="serve every media file as application/octet-stream")
    p.add_argument("--key", type=_key, action="append", metavar="KEY[:BALANCE]",
                   help="repeatable; default: sim-key, unlimited")
    p.add_argument("--unreadable", type=_paths, default=frozenset(), metavar="ENDPOINT[,ENDPOINT...]",
                   help="every 200 of these endpoints (e.g. /post-detail/) is readable JSON of another shape (billed)")
    p.add_argument("--daily-quota", type=int, default=None, metavar="N",
                   help="after N billed requests per key and UTC day, answer the daily-quota text (unbilled)")
    p.add_argument("--firewall", action="store_true", help="answer every request HTTP 403 with an HTML page")
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The SimConfig that parsed command-line arguments describe."""
    world = WorldConfig(seed=args.seed, users=args.users, pathological_fraction=args.pathological,
                        broken_text_fraction=args.broken_text, pinned_fraction=args.pinned,
                        wrapped_fraction=args.wrapped)
    return SimConfig(
        world=world, keys=dict(args.key or [("sim-key", None)]), rate_limit=args.rate_limit,
        rate_window=args.window, burst_limit=args.burst_limit, retry_after=args.retry_after,
        always_429=args.always_429, latency=LIVE_LATENCY if args.latency == "live" else args.latency,
        latency_live=args.latency == "live", drop_fields=tuple(args.drop_field), add_fields=tuple(args.add_field),
        fault_rate=args.fault_rate, faults=args.faults,
        slow_seconds=args.slow_seconds, quirks=args.quirks, rounded_only=args.rounded_only, seed=args.seed,
        unreadable=args.unreadable, daily_quota=args.daily_quota, firewall=args.firewall,
        media=MediaConfig(ttl=args.media_ttl, fault_rate=args.media_fault_rate,
                          faults=frozenset(k.strip() for k in args.media_faults.split(",") if k.strip()),
                          bytes_per_second=args.media_bytes_per_second, retry_after=args.media_retry_after,
                          wm_same=args.media_wm_same, generic_type=args.media_generic_type),
    )


async def _serve(config: SimConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows event loops
            loop.add_signal_handler(sig, stop.set)
    async with Simulator(config, host=host, port=port) as sim:
        print(f"Simulator listening on {sim.url}", flush=True)
        print(f"Media host listening on {sim.media_url}", flush=True)
        print(world_hint(sim), flush=True)
        await stop.wait()


def world_hint(sim: Simulator) -> str:
    """One line naming the keys and a few handles that exist in the simulator's world, to try it with."""
    w = sim.world
    public = [h for h in w.sample_handles(40) if not w.is_private(w.index_by_handle(h) or 0)][:5]
    private = next((w.handle(i) for i in range(w.config.users) if not w.is_missing(i) and w.is_private(i)), None)
    missing = next((w.handle(i) for i in range(w.config.users) if w.is_missing(i)), None)
    keys = ", ".join(sim.config.keys)
    return (f"keys: {keys}; handles that exist: {', '.join(public)}"
            + (f"; private: {private}" if private else "") + (f"; deleted (not found): {missing}" if missing else "")
            + f" (users 0..{w.config.users - 1}; seed {w.config.seed})")


def main(argv: list[str] | None = None, *, prog: str = "python -m crawler.sim") -> int:
    """Run the simulator from command-line arguments until SIGINT/SIGTERM; return the exit code."""
    parser = _parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return int(exc.code or 0)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(_serve(config, args.host, args.port))
    except OSError as exc:
        print(f"simulator: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass  # a second Ctrl-C before the handlers were installed
    return 0


if __name__ == "__main__":
    sys.exit(main())
