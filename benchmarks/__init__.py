"""cqrskit benchmarks: `python -m benchmarks --help`.

One module per workload, each with `NAME` and `run(size, workdir) -> list[Measurement]`;
`common` holds sizes, payloads, timing helpers and the table and JSON output;
`raw_sqlite` the no-library baselines. See docs/benchmarks.md for results.
"""
