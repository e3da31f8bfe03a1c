"""Session fixture `comfy_server`: the real ComfyUI server (main.py) with Stride installed.

Stride is symlinked into a private base directory's custom_nodes/ as `stride`, exactly as a user
installs it, and the server runs on CPU on a free local port. The fixture yields the base URL and
stops the server by its PID at the end of the session.
"""
import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from bench import host

START_TIMEOUT_S = 90


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path, lines=40):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _wait_ready(url, proc, log_path):
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with code {proc.returncode}:\n{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/object_info", timeout=10) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"ComfyUI did not answer /object_info in {START_TIMEOUT_S} s:\n{_log_tail(log_path)}")


def post_json(url, data):
    request = urllib.request.Request(url, data=json.dumps(data).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
        return json.loads(body) if body else None


def get(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
        return json.loads(body) if response.headers.get_content_type() == "application/json" else body


def wait_for_history(url, prompt_id, timeout=180):
    """The /history entry of a prompt once it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = get(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"].get("completed") is not None:
            assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
            return entry
        time.sleep(0.1)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


@contextlib.contextmanager
def serve(base):
    """Run ComfyUI's main.py with Stride symlinked into base/custom_nodes/stride; yields the base URL and stops the
    server by its PID on exit."""
    base = pathlib.Path(base)
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    os.symlink(host.REPO, base / "custom_nodes" / "stride")
    port = _free_port()
    log_path = base / "server.log"
    pythonpath = os.pathsep.join(filter(None, [host.STUBS, os.environ.get("PYTHONPATH")]))
    # One torch thread: two threads slow down many times over whenever the tests or the browser share the
    # two cores with the server.
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=host.COMFY_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log_path)
        post_json(f"{url}/api/settings/Comfy.TutorialCompleted", True)  # no first-run dialog in the UI
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """The base URL (http://127.0.0.1:<port>) of a running ComfyUI with Stride in custom_nodes/stride."""
    with serve(tmp_path_factory.mktemp("comfy-server")) as url:
        yield url
