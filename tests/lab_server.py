"""A JupyterLab server for tests: on 127.0.0.1 at a free port, token required, private Jupyter folders,
shut down through its API (kernels included) and required to stop cleanly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TOKEN = "memstudy-test-token"
# Two shared cores: JupyterLab's start and a kernel's imports take seconds to tens of seconds under load.
START_TIMEOUT_S = 120


def api(base: str, path: str, method: str = "GET") -> object:
    """One call of the Jupyter server's REST API with the token; its JSON answer (None when empty)."""
    request = urllib.request.Request(f"{base}{path}?token={TOKEN}", method=method)
    with urllib.request.urlopen(request, timeout=10) as answer:
        body = answer.read()
    return json.loads(body) if body else None


def wait_until(condition, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll ``condition()`` until it is true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def jupyterlab(folder: Path, private: Path) -> Iterator[str]:
    """JupyterLab on ``folder`` at 127.0.0.1 (a free port, token required), with private config and
    runtime folders; yields its base URL and shuts it down (kernels included) on the way out."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(private / "config"),
        "JUPYTER_RUNTIME_DIR": str(private / "runtime"),
        "JUPYTER_DATA_DIR": str(private / "data"),
    }
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}"]
    command += [
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={TOKEN}",
        f"--notebook-dir={folder}",
    ]
    if os.geteuid() == 0:  # containers and CI run as root, which Jupyter refuses without this
        command.append("--allow-root")
    # No news feed and no update check: nothing asks the network, and no notification asks the user.
    settings = private / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    log = private / "jupyterlab.log"
    with log.open("wb") as stderr:
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)

    def answers() -> bool:
        assert server.poll() is None, f"JupyterLab exited:\n{log.read_text()}"
        try:
            api(base, "/api/status")
        except OSError:
            return False
        return True

    try:
        wait_until(answers, "JupyterLab answering /api/status")
        yield base
    finally:
        try:
            api(base, "/api/shutdown", "POST")  # stops the kernels too, then the server
            server.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    # Reached only when the test passed: then the shutdown must have been clean too.
    assert server.returncode == 0, f"JupyterLab did not stop cleanly:\n{log.read_text()[-3000:]}"
