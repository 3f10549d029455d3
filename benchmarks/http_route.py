"""http: the full command route over HTTP against a bare FastAPI route, in the same run.

Two servers, one after the other, each one uvicorn process with the same settings
(`uvicorn.run`'s defaults as `cqrskit serve` uses them: one worker, the default loop
and HTTP implementation, no access log, log level warning):
- bare FastAPI (the baseline): `benchmarks.http_bare`, a POST route with a pydantic
  body of InsertRecord's shape that answers 202 with a small JSON and does nothing else;
- `cqrskit serve` on SQLite NORMAL: POST /api/command/insert, a new record each, the
  update processor running in the same process as it does in production.
The load comes from a separate process (`benchmarks.http_load`): 16 keep-alive
connections, each sending one ~330-byte InsertRecord body at a time, for a fixed
time after an unmeasured warm-up. Reported: requests/s (cqrskit's with bare FastAPI's
as the baseline) and the latency p50 / p90 / p99 / max from an HDR histogram.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import ROOT, Measurement, Size
from benchmarks.servers import free_port, server_process

NAME = "http"
CONNECTIONS = 16
BARE = "bare FastAPI"
CQRSKIT = "cqrskit serve · SQLite NORMAL"


def rate_case(server: str) -> str:
    return f"{server} · POST insert · {CONNECTIONS} connections"


def latency_case(server: str, stat: str) -> str:
    return f"{server} · latency {stat}"


def run_load(
    url: str, seconds: float, *, connections: int = CONNECTIONS, warmup: float | None = None
) -> dict[str, float]:
    """Run the load generator in a process of its own; return what it measured."""
    if warmup is None:
        warmup = min(1.0, seconds / 2)
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.http_load", url, str(connections), str(seconds),
         str(warmup)],
        cwd=ROOT, capture_output=True, text=True, timeout=seconds + warmup + 60, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the load generator failed: {completed.stderr[-2000:]}")
    result: dict[str, float] = json.loads(completed.stdout)
    return result


def _measure(server: str, url: str, seconds: float) -> list[Measurement]:
    result = run_load(url, seconds)
    details = {"requests": result["requests"], "seconds": round(result["seconds"], 3)}
    baseline = None if server == BARE else rate_case(BARE)
    measurements = [Measurement(NAME, rate_case(server), result["rate"], "req/s",
                                baseline=baseline, details=details)]
    for stat in ("p50", "p90", "p99", "max"):
        measurements.append(Measurement(NAME, latency_case(server, stat), result[stat], "ms"))
    return measurements


def run(size: Size, workdir: Path) -> list[Measurement]:
    seconds = size.lag_seconds
    bin_dir = Path(sys.executable).parent
    port = free_port()
    uvicorn_argv = [str(bin_dir / "uvicorn"), "benchmarks.http_bare:app", "--host", "127.0.0.1",
                    "--port", str(port), "--log-level", "warning", "--no-access-log"]
    with server_process(uvicorn_argv, {}, port) as url:
        results = _measure(BARE, url, seconds)
    port = free_port()
    data = workdir / "cqrskit"
    data.mkdir()
    env = {"CQRSKIT_DATA_DIR": str(data), "CQRSKIT_SQLITE_SYNCHRONOUS": "NORMAL",
           "CQRSKIT_LOG_LEVEL": "WARNING", "CQRSKIT_TELEMETRY": "none"}
    with server_process([str(bin_dir / "cqrskit"), "serve", "--port", str(port)], env, port) as url:
        results += _measure(CQRSKIT, url, seconds)
    return results
