"""Schemathesis against the live OpenAPI schema of a real `cqrskit serve`.

Generated requests (from the schema, then mutated to break it), and stateful
sequences that follow the links between operations: no answer may be a 5xx,
and every answer must match the schema (status documented, content type and
body as declared). Schema-valid requests that the service still refuses are
allowed: JSON Schema cannot say "no NUL character" or "a token a command
returned", which the service checks and answers with a 4xx.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .harness import ServerPool

pytestmark = pytest.mark.e2e

CHECKS = ",".join((
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_schema_conformance", "response_headers_conformance",
))


def test_no_5xx_and_every_answer_matches_the_schema(servers: ServerPool, tmp_path: Path) -> None:
    server = servers.new()
    st = Path(sys.executable).parent / "schemathesis"
    done = subprocess.run(
        [str(st), "run", f"{server.url}/openapi.json", "--checks", CHECKS,
         "--max-examples", "25", "--seed", "1",
         # An endless event stream: nothing to generate, and it never ends.
         "--exclude-path", "/api/status/stream",
         "--report", "junit", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,  # its cache goes there
    )
    output = done.stdout[:8000] + "\n...\n" + done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0, output
    assert "Tested: 14" in done.stdout, output
    assert server.proc is not None and server.proc.poll() is None, server.log_tail()
    assert "Traceback" not in server.log_tail(400), server.log_tail(400)
