"""The `http` workload's load generator, run in a process of its own:
`python -m benchmarks.http_load URL CONNECTIONS SECONDS WARMUP_SECONDS`.

CONNECTIONS keep-alive HTTP/1.1 connections (plain asyncio streams, which cost the
client far less CPU than an HTTP library would), each sending one POST of an
InsertRecord body at a time and reading the 202 before the next, for SECONDS after
WARMUP_SECONDS unmeasured. Prints one JSON object: requests, seconds, req/s and the
latency percentiles in milliseconds from an HDR histogram (microsecond resolution).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

import orjson
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from benchmarks.common import payload

PATH = "/api/command/insert"


def _requests(host: str, port: int) -> list[bytes]:
    requests = []
    for i in range(256):
        body = orjson.dumps({"data": payload(i)})
        head = (f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        requests.append(head.encode() + body)
    return requests


async def _connection(
    host: str, port: int, requests: list[bytes], start: float, stop: float,
    histogram: HdrHistogram, counts: list[int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        i = 0
        while True:
            sent = time.perf_counter()
            if sent >= stop:
                return
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            if status != 202:
                raise RuntimeError(f"{status}: {body[:200]!r}")
            if sent >= start:
                histogram.record_value(max(1, round((time.perf_counter() - sent) * 1e6)))
                counts[0] += 1
    finally:
        writer.close()


async def drive(url: str, connections: int, seconds: float, warmup: float) -> dict[str, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = _requests(host, port)
    histogram = HdrHistogram(1, 60_000_000, 3)
    counts = [0]
    start = time.perf_counter() + warmup
    stop = start + seconds
    await asyncio.gather(*(
        _connection(host, port, requests, start, stop, histogram, counts)
        for _ in range(connections)
    ))
    elapsed = time.perf_counter() - start
    result = {"requests": counts[0], "seconds": elapsed, "rate": counts[0] / elapsed}
    for p in (50, 90, 99):
        result[f"p{p}"] = histogram.get_value_at_percentile(p) / 1000
    result["max"] = histogram.get_max_value() / 1000
    return result


def main() -> None:
    url, connections, seconds, warmup = sys.argv[1:5]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(drive(url, int(connections), float(seconds), float(warmup)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
