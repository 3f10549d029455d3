"""What every workload shares: sizes, payloads, measurements, timing, memory, output."""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# The repository root: where `python -m benchmarks...` works.
ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------- sizes


@dataclass(frozen=True, slots=True)
class Size:
    """How much work each workload does; `tiny` must finish in seconds (CI smoke test)."""

    name: str
    # append: commands per measured case, streams updated by the UpdateRecord cases,
    # and rows of the 1000-rows-per-transaction baseline.
    append_commands: int
    append_streams: int
    batch_baseline_rows: int
    # rebuild: events in the log.
    rebuild_events: int
    # lag: seconds of closed-loop calibration, then of steady load.
    lag_calibration_seconds: float
    lag_seconds: float
    # lag_distributed: events projected through NATS in the throughput cases.
    projection_events: int


SIZES: dict[str, Size] = {
    "tiny": Size("tiny", 400, 200, 5_000, 2_000, 0.5, 1.0, 1_000),
    "small": Size("small", 5_000, 1_000, 100_000, 100_000, 1.0, 5.0, 20_000),
    "full": Size("full", 20_000, 1_000, 1_000_000, 1_000_000, 2.0, 10.0, 100_000),
}

# ------------------------------------------------------------------- payloads

_COLORS = ("red", "green", "blue", "amber", "violet")
_TAGS = ("alpha", "beta", "gamma", "delta")
_NOTE = (
    "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. "
    "Sphinx of black quartz, judge my vow."
)


def payload(i: int) -> dict[str, Any]:
    """A record's data: about 300 bytes of JSON, varied enough to look real."""
    return {
        "name": f"record {i:08d}",
        "color": _COLORS[i % len(_COLORS)],
        "size": i % 40,
        "price": round((i * 37) % 100_000 / 100, 2),
        "active": i % 3 != 0,
        "tags": list(_TAGS[: 1 + i % len(_TAGS)]),
        "owner": {"team": f"team-{i % 17}", "email": f"user{i % 1000}@example.com"},
        "note": _NOTE,
    }


# --------------------------------------------------------------- measurements


@dataclass(slots=True)
class Measurement:
    """One number from one run. `baseline` names another case of the same workload
    and run; the table shows this value divided by that one."""

    workload: str
    case: str
    value: float
    unit: str
    baseline: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Summary:
    """One case over all runs: the median, the spread, and the median ratio to its baseline."""

    workload: str
    case: str
    unit: str
    median: float
    low: float
    high: float
    values: list[float]
    baseline: str | None
    ratio: float | None
    details: list[dict[str, Any]]


def summarize(runs: Sequence[Sequence[Measurement]]) -> list[Summary]:
    """Group the runs' measurements by case, in first-seen order.

    The ratio is computed within each run (value / that run's baseline value),
    then the median of those ratios is reported: the baseline always shared the
    machine's state with what it is compared to.
    """
    order: list[tuple[str, str]] = []
    grouped: dict[tuple[str, str], list[Measurement]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        by_case = {(m.workload, m.case): m for m in run}
        for key, m in by_case.items():
            if key not in grouped:
                order.append(key)
                grouped[key] = []
                ratios[key] = []
            grouped[key].append(m)
            base = by_case.get((m.workload, m.baseline)) if m.baseline else None
            if base is not None and base.value:
                ratios[key].append(m.value / base.value)
    summaries = []
    for key in order:
        ms = grouped[key]
        values = [m.value for m in ms]
        summaries.append(Summary(
            workload=key[0],
            case=key[1],
            unit=ms[0].unit,
            median=statistics.median(values),
            low=min(values),
            high=max(values),
            values=values,
            baseline=ms[0].baseline,
            ratio=statistics.median(ratios[key]) if ratios[key] else None,
            details=[m.details for m in ms if m.details],
        ))
    return summaries


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# --------------------------------------------------------------------- memory

_STATUS = Path("/proc/self/status")


def _status_kib(key: str) -> int | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def rss_mib() -> float:
    """Resident set size now, in MiB (Linux /proc; 0 elsewhere)."""
    return (_status_kib("VmRSS") or 0) / 1024


def peak_rss_mib() -> float:
    """Peak resident set size since start or the last `reset_peak_rss`, in MiB."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if the kernel refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


# ------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
            check=False, cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "commit": commit,
        # Other work on the machine skews absolute numbers; ratios suffer less.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------- output


def _number(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _row(s: Summary) -> list[str]:
    spread = f"{_number(s.low)} - {_number(s.high)}" if len(s.values) > 1 else ""
    ratio = f"{s.ratio:.2f}x" if s.ratio is not None else ""
    return [s.workload, s.case, _number(s.median), s.unit, spread, s.baseline or "", ratio]


_HEADERS = ["workload", "case", "median", "unit", "min - max", "baseline (same run)", "ratio"]


def print_table(summaries: Sequence[Summary], title: str) -> None:
    table = Table(title=title)
    for header in _HEADERS:
        table.add_column(header, justify="right" if header in ("median", "ratio") else "left")
    previous = None
    for s in summaries:
        if previous is not None and s.workload != previous:
            table.add_section()
        previous = s.workload
        table.add_row(*_row(s))
    Console(width=max(160, Console().width)).print(table)


def markdown_table(summaries: Sequence[Summary]) -> str:
    lines = ["| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
    lines += ["| " + " | ".join(_row(s)) + " |" for s in summaries]
    return "\n".join(lines)


def write_json(
    path: Path, summaries: Sequence[Summary], *, size: Size, runs: int, argv: Sequence[str]
) -> None:
    document = {
        "machine": machine(),
        "size": size.name,
        "runs": runs,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *argv]),
        "results": [asdict(s) for s in summaries],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
