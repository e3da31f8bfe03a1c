"""Stride's benchmark programs: `.venv/bin/python -m bench.<name> [--quick] [--json PATH]`."""
