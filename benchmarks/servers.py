"""HTTP servers the benchmarks start as subprocesses: a free port, and a process
started, waited for (its /readyz) and stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from benchmarks.common import ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_process(argv: list[str], env: dict[str, str], port: int) -> Iterator[str]:
    """Start a server (in the repository root, with none of the caller's CQRSKIT_,
    OTEL_ or APPLICATIONINSIGHTS_ settings, `env` on top), wait for its /readyz, and
    stop it with SIGTERM at the end. Yields its base URL."""
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("CQRSKIT_", "OTEL_", "APPLICATIONINSIGHTS_"))}
    environment.update(env)
    proc = subprocess.Popen(argv, env=environment, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(argv[:2])} did not start (exit {proc.poll()})")
            time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
