"""Print the test environment's requirements, one per line (the pack itself is never pip-installed:
its top-level folders, such as nodes/, would shadow ComfyUI's own modules).

  python tools/deps.py                        ComfyUI 0.3.75's runtime (pyproject extra `comfyui-0.3.75`)
  python tools/deps.py COMFY/requirements.txt a newer tree's own requirements
each followed by the test tools (extra `test`). Left out of a tree's list: torch (pinned by constraints.txt),
torchvision and torchaudio (no build loads beside the CPU torch 2.13.0: tools/stubs stands in for them at import
time) and the optional packages that need them or a display (spandrel, PyOpenGL, comfy-angle).
"""
import re
import sys
import tomllib

SKIPPED = {"torch", "torchvision", "torchaudio", "spandrel", "pyopengl", "comfy-angle"}

with open("pyproject.toml", "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
if len(sys.argv) > 1:
    with open(sys.argv[1]) as f:
        lines = [line.split("#")[0].strip() for line in f]
    runtime = [r for r in lines if r and re.split(r"[<>=~!\[; ]", r)[0].lower() not in SKIPPED]
else:
    runtime = extras["comfyui-0.3.75"]
print("\n".join(runtime + extras["test"]))
