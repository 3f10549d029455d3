"""`python -m benchmarks [--size tiny|small|full] [--runs 3] [--json out.json] [workload ...]`."""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks import append, lag, rebuild
from benchmarks.common import (
    SIZES,
    Measurement,
    Size,
    machine,
    markdown_table,
    print_table,
    summarize,
    write_json,
)

Workload = Callable[[Size, Path], list[Measurement]]


def _lazy(module: str) -> Workload:
    """A workload imported only when it runs: the distributed ones need psycopg and
    nats-py (the `postgres` and `nats` extras), which the embedded ones do not."""

    def run(size: Size, workdir: Path) -> list[Measurement]:
        workload: Workload = importlib.import_module(f"benchmarks.{module}").run
        return workload(size, workdir)

    return run


# One module with `run(size, workdir)` each. The embedded ones use SQLite; the
# distributed ones use PostgreSQL and NATS (see docs/benchmarks.md) and are imported
# lazily, so that `python -m benchmarks append` works without those extras.
WORKLOADS: dict[str, Workload] = {
    append.NAME: append.run,
    rebuild.NAME: rebuild.run,
    lag.NAME: lag.run,
    # Distributed topology: PostgreSQL stores (and NATS JetStream for the lag).
    "append_postgres": _lazy("append_postgres"),
    "lag_distributed": _lazy("lag_distributed"),
    # Telemetry's cost: commands/s over HTTP with the OTLP exporter on against off.
    "telemetry": _lazy("telemetry"),
    # Side by side with the peers: the `eventsourcing` library (the `bench` extra) on
    # SQLite and PostgreSQL, and the HTTP command route against a bare FastAPI route.
    "eventsourcing": _lazy("peers_eventsourcing"),
    "http": _lazy("http_route"),
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run cqrskit's benchmarks; print each case's median over the runs, "
        "with a baseline measured in the same run and the ratio to it.",
    )
    parser.add_argument("workloads", nargs="*", choices=[[], *WORKLOADS], metavar="workload",
                        help=f"which to run (default: all of {', '.join(WORKLOADS)})")
    parser.add_argument("--size", choices=list(SIZES), default="small",
                        help="tiny: seconds, for CI; small: about a minute a run; full: minutes")
    parser.add_argument("--runs", type=int, default=3, help="runs of each workload (default 3)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--markdown", action="store_true",
                        help="print a Markdown table instead of the terminal one")
    parser.add_argument("--dir", type=Path,
                        help="where to put the databases (default: the system temp dir; "
                        "it must be on a real disk, not tmpfs, for fsync to count)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    size = SIZES[args.size]
    names = args.workloads or list(WORKLOADS)
    runs: list[list[Measurement]] = [[] for _ in range(args.runs)]
    with tempfile.TemporaryDirectory(prefix="cqrskit-bench-", dir=args.dir) as tmp:
        for name in names:
            for number in range(args.runs):
                print(f"{name}: run {number + 1} of {args.runs} ({size.name})", file=sys.stderr)
                workdir = Path(tmp) / f"{name}-{number}"
                workdir.mkdir()
                started = time.perf_counter()
                runs[number] += WORKLOADS[name](size, workdir)
                print(f"  {time.perf_counter() - started:.1f}s", file=sys.stderr)
    summaries = summarize(runs)
    info = machine()
    title = (
        f"cqrskit benchmarks · size {size.name} · median of {args.runs} run(s) · "
        f"{info['cpus']} CPUs · Python {info['python']} · SQLite {info['sqlite']}"
    )
    if args.markdown:
        print(f"{title}\n\n{markdown_table(summaries)}")
    else:
        print_table(summaries, title)
    if args.json:
        write_json(args.json, summaries, size=size, runs=args.runs, argv=argv)
    return 0
