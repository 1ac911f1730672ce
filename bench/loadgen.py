"""A small HTTP/1.1 load generator, for machines without ``wrk``: ``python -m bench.loadgen``.

Keeps ``--connections`` keep-alive connections busy with the same request for
``--duration`` seconds (after ``--warmup`` seconds not counted) and prints one JSON object:
requests, requests_per_s, status counts and latency percentiles (ms). Raw asyncio streams
(uvloop when installed): a few microseconds of client CPU per request, so it measures the
server, not itself, as far as one process can.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import summary


async def _worker(host: str, port: int, request: bytes, stop: list[float], counting: list[float],
                  latencies: list[float], statuses: dict[int, int], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop[0]:
            began = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            chunked = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            elif length:
                await reader.readexactly(length)
            ended = time.perf_counter()
            if began >= counting[0]:
                latencies.append(ended - began)
                statuses[status] = statuses.get(status, 0) + 1
    except (OSError, asyncio.IncompleteReadError) as exc:
        errors.append(type(exc).__name__)
    finally:
        writer.close()


async def run(url: str, body: bytes, headers: dict[str, str], connections: int, duration_s: float,
              warmup_s: float) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in headers.items())]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    start = time.perf_counter()
    counting, stop = [start + warmup_s], [start + warmup_s + duration_s]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    await asyncio.gather(*(_worker(host, port, request, stop, counting, latencies, statuses, errors)
                           for _ in range(connections)))
    return {"loadgen": "bench.loadgen", "connections": connections, "duration_s": duration_s,
            "requests": len(latencies), "requests_per_s": round(len(latencies) / duration_s, 1),
            "statuses": {str(k): v for k, v in statuses.items()}, "errors": len(errors),
            "latency_ms": summary(latencies, 1000)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--body-file", required=True)
    p.add_argument("--header", action="append", default=[], help="'Name: value'")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=8)
    p.add_argument("--warmup", type=float, default=1)
    args = p.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    coro = run(args.url, Path(args.body_file).read_bytes(), headers, args.connections, args.duration, args.warmup)
    try:
        import uvloop

        result = uvloop.run(coro)
    except ImportError:
        result = asyncio.run(coro)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
