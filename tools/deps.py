"""Print the dependencies of a pyproject extra, one per line (the pack itself is never pip-installed:
its top-level folders, such as nodes/, would shadow ComfyUI's own modules)."""
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"][sys.argv[1]]))
