"""Data files for programs: a complete CSV (a job's OUT.csv, `history export`'s file) written again as Parquet or
JSON Lines beside it (OUT.parquet, OUT.jsonl), typed and without the formula guard.

The CSV stays the exactly-once journal: the data file is derived from it once it is complete, read in batches
(memory stays flat) and written through a temporary name (`files.atomic_path`). Column types come from the
record dataclasses (`record_kinds`): ids as text, counts as nullable int64, `*_time` columns (Unix seconds in
the CSV) as UTC timestamps, flags as booleans.
"""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from crawler.api.records import Record
from crawler.errors import UsageError
from crawler.files import atomic_path
from crawler.sinks.csv_sink import unguard

FORMATS = ("csv", "parquet", "jsonl")
Kind = Literal["text", "int", "bool", "unix_time", "iso_time", "date"]
BATCH_ROWS = 8192  # rows converted (and one Parquet row group) at a time: memory stays flat on any file size
PARQUET_HINT = "pip install 'crawler[parquet]' (pyarrow), or use --format jsonl"


def record_kinds(record: type[Record]) -> dict[str, Kind]:
    """Each column's type, from the record's dataclass fields: str is text (every id among them), bool a flag,
    int a count, or a time in Unix seconds when the column's name ends in ``_time``."""
    hints = typing.get_type_hints(record)
    kinds: dict[str, Kind] = {}
    for f in fields(record):  # type: ignore[arg-type]
        hint = hints[f.name]
        if hint is str:
            kinds[f.name] = "text"
        elif hint is bool:
            kinds[f.name] = "bool"
        elif hint is int or int in typing.get_args(hint):
            kinds[f.name] = "unix_time" if f.name.endswith("_time") else "int"
        else:
            raise TypeError(f"{record.__name__}.{f.name}: no data file type for {hint}")
    return kinds


def datafile_path(csv_path: Path, fmt: str) -> Path:
    """Where the ``fmt`` copy of ``csv_path`` goes: beside it, ``.csv`` replaced (OUT.csv -> OUT.parquet)."""
    if csv_path.suffix.lower() == ".csv":
        return csv_path.with_suffix(f".{fmt}")
    return csv_path.with_name(f"{csv_path.name}.{fmt}")


def require(fmt: str) -> None:
    """A UsageError (exit 2, before anything is sent) when ``fmt`` cannot be written here: parquet needs pyarrow."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise UsageError(f"--format parquet needs pyarrow, which is not installed: {PARQUET_HINT}") from None


def write_datafile(source: Path, kinds: Mapping[str, Kind], fmt: str, *, guarded: bool = True,
                   if_missing: bool = False) -> Path | None:
    """Write the complete CSV ``source`` again as ``fmt`` beside it (None for csv: nothing to write); the path.

    ``kinds``: the type of each column by name (a column not in it is text). ``guarded``: the CSV was written
    with the formula guard (not --raw), so text cells lose the ' the guard added, and only that one.
    ``if_missing``: leave an existing data file as it is (a finished job run again with --format).
    """
    if fmt == "csv":
        return None
    target = datafile_path(source, fmt)
    if if_missing and target.exists():
        return target
    with source.open(encoding="utf-8-sig", newline="") as fh:  # a --bom file's BOM is no part of a name
        reader = csv.reader(fh)
        header = next(reader, [])
        columns = [(name, kinds.get(name, "text")) for name in header]
        convert = [_converter(kind, guarded=guarded) for _, kind in columns]
        width = len(header)

        def typed(row: list[str]) -> list[Any]:
            if len(row) != width:  # never from this tool's writers; kept rather than lost
                row = (row + [""] * width)[:width]
            return [c(v) for c, v in zip(convert, row, strict=True)]

        batches = (list(map(typed, chunk)) for chunk in _chunks(reader, BATCH_ROWS))
        with atomic_path(target) as tmp:
            if fmt == "parquet":
                _write_parquet(tmp, columns, batches)
            else:
                _write_jsonl(tmp, [name for name, _ in columns], batches)
    return target


def _chunks(rows: Iterable[list[str]], size: int) -> Iterator[list[list[str]]]:
    it = iter(rows)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _converter(kind: Kind, *, guarded: bool) -> Callable[[str], Any]:
    """The function from a CSV cell to its typed value (None for an empty cell of a number, flag or time)."""
    if kind == "text":
        return unguard if guarded else str
    if kind == "int":
        return lambda v: int(v) if v else None
    if kind == "bool":
        return lambda v: None if not v else v == "true"
    if kind == "unix_time":
        return lambda v: dt.datetime.fromtimestamp(int(v), dt.UTC) if v else None
    if kind == "iso_time":
        return lambda v: dt.datetime.fromisoformat(v).astimezone(dt.UTC) if v else None
    return lambda v: dt.date.fromisoformat(v) if v else None


def _write_jsonl(path: Path, names: Sequence[str], batches: Iterable[list[list[Any]]]) -> None:
    """One JSON object per line, keys in column order; times as ISO-8601 UTC text (…Z), days as YYYY-MM-DD."""
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for batch in batches:
            out.writelines(json.dumps(dict(zip(names, row, strict=True)), ensure_ascii=False, default=_json_value)
                           + "\n" for row in batch)


def _json_value(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    raise TypeError(f"no JSON form for {type(value).__name__}")


def _write_parquet(path: Path, columns: Sequence[tuple[str, Kind]], batches: Iterable[list[list[Any]]]) -> None:
    """A Parquet file with an explicit schema: text as string, counts as int64, flags as bool, times as
    timestamp[us, UTC], days as date32; every column nullable (an empty number is null, empty text "")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = {"text": pa.string(), "int": pa.int64(), "bool": pa.bool_(), "unix_time": pa.timestamp("us", tz="UTC"),
             "iso_time": pa.timestamp("us", tz="UTC"), "date": pa.date32()}
    schema = pa.schema([pa.field(name, arrow[kind]) for name, kind in columns])
    with pq.ParquetWriter(path, schema) as writer:
        for batch in batches:
            cells = list(zip(*batch, strict=True))
            arrays = [pa.array(col, type=f.type) for col, f in zip(cells, schema, strict=True)]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
