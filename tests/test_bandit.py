"""bandit finds nothing in src/: each finding is fixed or justified inline (`# nosec`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bandit_finds_no_issue_in_src() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bandit", "-c", "pyproject.toml", "-r", "src", "-f", "json",
         "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    report = json.loads(done.stdout)
    assert report["metrics"]["_totals"]["loc"] > 1000  # it did scan the code
    findings = [
        f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}"
        for r in report["results"]
    ]
    assert not findings, "bandit findings (fix, or justify with `# nosec ID # why`):\n" + (
        "\n".join(findings))
    assert not report["errors"], report["errors"]
