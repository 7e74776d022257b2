"""history: dated profile snapshots (layering rule: crawler/__init__.py).

db (the connection and shared SQL) < queries (reads; all `history serve` holds) < store (migrations and
ingest's writes); export (the CSV), plot (matplotlib); serve (the web page) renders with pages and svg.
"""
