"""The rebuild workload reports the CPU each projection's rebuild took per event."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_rebuild_workload_reports_cpu_per_event(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--size", "tiny", "--runs", "1",
         "--json", str(out), "--dir", str(tmp_path), "rebuild"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    results = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    for name in ("records", "statistics"):
        cpu = results[f"{name} · CPU per event"]
        rebuild = results[f"{name} · rebuild"]
        assert cpu["unit"] == "µs"
        # Some CPU, and no more than the process's threads could use in the time the
        # rebuild took (a wrong unit or a wrong clock would be off by far more).
        wall_per_event = 1e6 / rebuild["median"]
        assert 0 < cpu["median"] < 4 * wall_per_event
        assert rebuild["details"][0]["cpu_seconds"] > 0
