"""The App Service start command (deploy/azure/startup.sh) serves the cqrskit API.

The script itself is run, as App Service runs it: gunicorn with uvicorn workers,
configured by deploy/azure/gunicorn.conf.py and CQRSKIT_* settings only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import DEPLOY

pytestmark = pytest.mark.e2e

START = DEPLOY / "startup.sh"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The process environment: no CQRSKIT_* of the test runner, this venv's gunicorn."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(CQRSKIT_DATA_DIR=str(tmp_path / "data"), **settings)
    return env


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    pytest.importorskip("gunicorn", reason="install the appservice extra: pip install -e "
                        "'.[dev]'")
    port = _free_port()
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["sh", str(START)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=_environment(tmp_path, CQRSKIT_PORT=str(port)),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, f"gunicorn exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready in 30s: {log_path.read_text()}"
            time.sleep(0.1)
        yield process, url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_the_start_command_serves_the_api_and_stops_cleanly(
    gunicorn: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    process, url = gunicorn
    with httpx.Client(base_url=url, timeout=10) as client:
        sent = client.post("/api/command/insert", json={"id": "as-1", "data": {"n": 1}},
                           headers={"Idempotency-Key": "as-key-1"})
        assert sent.status_code == 202, sent.text
        assert sent.json()["id"] == "as-1"
        status = client.get(sent.headers["Location"])
        assert status.status_code == 200, status.text
        assert (status.json()["id"], status.json()["command_id"]) == ("as-1", "as-key-1")
        bad = client.post("/api/command/insert", content=b"{", headers={
            "Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"] == "malformed_json"
    # The events are in the command DB the settings named, nowhere else.
    assert (tmp_path / "data" / "command.db").exists()
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def test_the_start_command_refuses_to_listen_beyond_loopback_without_auth(
    tmp_path: Path,
) -> None:
    pytest.importorskip("gunicorn")
    answer = subprocess.run(
        ["sh", str(START)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
        env=_environment(tmp_path, CQRSKIT_HOST="0.0.0.0", CQRSKIT_PORT=str(_free_port())),
    )
    assert answer.returncode != 0
    assert "refusing to listen on 0.0.0.0 without authentication" in answer.stdout + answer.stderr
