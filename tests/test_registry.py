"""The Comfy Registry's view of Stride: its validator passes, and the archive its packer builds (git-tracked files
plus [tool.comfy] includes, minus .comfyignore) holds what the pack needs at run time and nothing of the
development set-up."""
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

from bench import host

COMFY = os.path.join(os.path.dirname(sys.executable), "comfy")  # comfy-cli, installed with the test tools
FLAGS = ["--skip-prompt", "--no-enable-telemetry"]


def comfy(*args, cwd):
    """(exit code, stdout + stderr) of a comfy-cli command."""
    result = subprocess.run([COMFY, *FLAGS, *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=120)
    return result.returncode, result.stdout + result.stderr


def git(*args, cwd=host.REPO):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def checkout(dest):
    """A git repository at dest holding the working tree as it would be committed (tracked and new files)."""
    git("init", "-q", str(dest))
    for name in git("ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0"):
        if name and os.path.isfile(os.path.join(host.REPO, name)):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(os.path.join(host.REPO, name), os.path.join(dest, name))
    git("add", "-A", cwd=dest)
    return dest


def test_registry_validation_passes():
    code, output = comfy("node", "validate", cwd=host.REPO)
    assert code == 0 and "validation checks passed" in output, output


def test_the_published_archive_holds_the_pack_and_nothing_of_the_development_setup(tmp_path):
    tree = checkout(tmp_path / "stride")
    code, output = comfy("node", "pack", cwd=tree)
    assert code == 0, output
    assert "does not exist" not in output, output  # every include is a path the packer finds
    names = set(zipfile.ZipFile(tree / "node.zip").namelist())
    tracked = git("ls-files", cwd=tree).split()
    must = {n for n in tracked if n.startswith(("demo/weights/", "example_workflows/", "web/", "nodes/", "samplers/"))}
    must |= {"__init__.py", "pyproject.toml", "LICENSE", "README.md", "demo/oracle_gmm.safetensors"}
    assert must <= names, sorted(must - names)
    assert {"demo/weights/dit_large.safetensors", "web/stride.js", "web/icon.svg"} <= names
    assert not [n for n in names if n.endswith("/")], "empty directory entries"
    assert not [n for n in names if n.startswith((".venv", ".comfyui", "out/", "bench/", "tests/", "tools/"))]


def test_the_icon_is_a_file_of_the_repository():
    with open(os.path.join(host.REPO, "pyproject.toml"), "rb") as f:
        icon = tomllib.load(f)["tool"]["comfy"]["Icon"]
    path = icon.split("/main/", 1)[1] if "/main/" in icon else icon
    assert os.path.isfile(os.path.join(host.REPO, path)), icon
