"""A PostgreSQL job read back: its OUT.csv (`export`, `crawler export`) and `crawler jobs`."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path
from typing import Any

from crawler import testing
from crawler.config import Settings
from crawler.errors import (
    UsageError,
)
from crawler.files import atomic_write
from crawler.jobs.commands import COMMANDS, CommandSpec
from crawler.jobs.prepare import failures_path
from crawler.runs.job_worker import job_store
from crawler.sinks.csv_sink import cell, write_failures
from crawler.sinks.datafile import record_kinds, write_datafile
from crawler.stores.pg_jobs import PgJobStore


async def export(store: PgJobStore, jid: str, out: Path, spec: CommandSpec, *, bom: bool, raw: bool,
                 fmt: str = "csv") -> int:
    """Write the job's rows to `out` (temporary file, fsync, rename) with the local sink's cell rules, then
    OUT.parquet / OUT.jsonl from it (``fmt``, `--format`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_write(out) as fh:
        if bom:
            fh.write("\ufeff")
        writer = csv.writer(fh, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(spec.record.COLUMNS)
        async for values in store.rows(jid):
            writer.writerow([cell(v, raw=raw) for v in values])
            n += 1
            testing.reached("exporting")
    await asyncio.to_thread(write_datafile, out, record_kinds(spec.record), fmt, guarded=not raw)
    return n


async def jobs_report(settings: Settings, *, url: str, as_json: bool = False) -> str:
    """`crawler jobs`: every job with its id, progress, failures, both credit counters and workers."""
    async with job_store(settings, url) as store:
        found: list[dict[str, Any]] = []
        for pg in await store.jobs():
            p = await store.progress(pg.id)
            found.append({
                "id": pg.id, "command": pg.command, "status": pg.status, "items": p.total, "done": p.done,
                "failed": p.failed, "pending": p.pending, "failures": await store.failure_counts(pg.id),
                "rows": pg.rows, "requests_sent": pg.requests_sent, "credits_billed": pg.credits_billed,
                "max_credits": pg.max_credits,
                "workers": [{"host": w.host, "pid": w.pid, "key_hash": w.key_hash, "ledger": w.ledger, "live": w.live}
                            for w in await store.workers(pg.id, pg.heartbeat_timeout)],
            })
    if as_json:
        return json.dumps(found, indent=2)
    lines = []
    for j in found:
        fails = ", ".join(f"{k}: {v}" for k, v in sorted(j["failures"].items())) or "none"
        lines.append(f"{j['id']}  {j['command']:<14} {j['status']:<8} {j['done']:,} done, {j['failed']:,} failed,"
                     f" {j['pending']:,} pending of {j['items']:,}; rows {j['rows']:,};"
                     f" requests_sent {j['requests_sent']:,}; credits_billed {j['credits_billed']:,}")
        lines.append(f"    failures: {fails}")
        for w in j["workers"]:
            lines.append(f"    worker {w['host']} pid {w['pid']} key {w['key_hash'][:8]} ledger {w['ledger']}"
                         f"{' (live)' if w['live'] else ''}")
    return "\n".join(lines) if lines else "no jobs"


async def export_job(settings: Settings, *, url: str, jid: str, out: Path, bom: bool | None = None,
                     raw: bool | None = None) -> int:
    """`crawler export JOB -o OUT.csv`: a finished job's output again, byte for byte (the output.bom/output.raw
    its starter wrote with, unless `bom`/`raw` are given: the --bom/--raw flags); --format: OUT.parquet too."""
    async with job_store(settings, url) as store:
        pg = await store.job(jid)
        if pg is None:
            raise UsageError(f"export: no job {jid} in {store.where} (see crawler jobs --jobs-url URL)")
        progress = await store.progress(pg.id)
        if progress.pending:
            raise UsageError(f"export: job {pg.id} is not finished ({progress.pending:,} items pending): run"
                             " `crawler work --jobs-url URL` or its starting command to finish it")
        spec = COMMANDS[pg.command]
        bom = pg.bom if bom is None else bom
        raw = pg.raw if raw is None else raw
        n = await export(store, pg.id, out, spec, bom=bom, raw=raw, fmt=settings.output_format)
        write_failures(failures_path(out), await store.failures(pg.id), raw=raw)
        return n
