"""Run inside a network namespace of its own (`unshare -n`): a PgJobStore call sent into a network gone silent.

PostgreSQL is reached over TCP on this namespace's loopback through a forwarder to the server's Unix socket; once
the store answers, the loopback is taken down, so every packet is lost (a cut cable, a frozen host) and nothing
is refused. Prints one JSON line: how the next store call ended (`outcome`) and after how many `seconds`.
Usage: silent_network.py SOCKET_DIR SCHEMA STALL_LIMIT HEARTBEAT_TIMEOUT BOUND
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time

from crawler.stores.pg_jobs import PgJobStore


async def loopback(state: str) -> None:
    proc = await asyncio.create_subprocess_exec("ip", "link", "set", "lo", state)
    assert await proc.wait() == 0, f"ip link set lo {state} failed"


async def main(socket_dir: str, schema: str, stall_limit: float, heartbeat: float, bound: float) -> dict[str, object]:
    await loopback("up")
    path = os.path.join(socket_dir, ".s.PGSQL.5432")

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(path)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(forward, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"postgresql://postgres@127.0.0.1:{port}/test?options=-csearch_path%3D{schema}"
    store = PgJobStore(url, stall_limit=stall_limit, heartbeat_timeout=heartbeat, connect_timeout=1.0)
    await store.open()
    for _ in range(3):
        await store.workers()
    await loopback("down")
    began = time.monotonic()
    try:
        await asyncio.wait_for(store.workers(), bound)
        outcome = "answered"
    except TimeoutError:
        outcome = "still waiting"
    except Exception as exc:
        outcome = type(exc).__name__
    return {"outcome": outcome, "seconds": round(time.monotonic() - began, 1)}


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], sys.argv[2], *map(float, sys.argv[3:6])))
    print(json.dumps(result), flush=True)
    os._exit(0)  # the store's connection is stuck in a dead network: do not wait for it to close
