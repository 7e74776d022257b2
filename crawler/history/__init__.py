"""history: see the layering rule in crawler/__init__.py."""
