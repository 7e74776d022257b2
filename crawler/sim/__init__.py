"""sim: the simulator, a seeded stand-in for TikLiveAPI (layering rule: crawler/__init__.py).

records and seeded < the world's parts: users < posts < follows, comments, catalog < data (`World`);
render (wire shapes, media URLs from media) < endpoints < server (HTTP, keys, faults); __main__ runs it.
"""
