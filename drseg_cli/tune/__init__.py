"""``drseg tune``: feature cache, search and report (docs/TUNE.md)."""
