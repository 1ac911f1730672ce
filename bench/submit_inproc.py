"""The API's own CPU per submission, in one process, the variants of ``bench.submit --fleet`` alternated.

    python -m bench.submit_inproc --catalog models.yaml --model NAME --blocks 40   # env: the API's settings

Run by ``bench.submit --fleet`` (its ``in_process`` figures) with the API's environment. Builds
one app per variant (``create_app``, the real services on the benchmark's Redis and S3 server)
in this process and calls each as an ASGI application directly, no HTTP server and no client:
``--jobs-per-block`` ``POST /v1/jobs`` with ``--in-flight`` at once, the block's CPU time
(``time.process_time``) per job, blocks of the variants alternated (ABBA) ``--blocks`` times.
On a shared machine the wall-clock throughput of a server moves with everything else the cores
run; a process's own CPU per job much less, and blocks of well under a second, alternated,
see the same conditions. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import median, ratio


async def _post(app: Any, body: bytes, key: str) -> int:
    """One ``POST /v1/jobs`` through the ASGI app; its status."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/jobs", "raw_path": b"/v1/jobs", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {key}".encode()), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 80), "state": {}}
    delivered = False
    never = asyncio.get_running_loop().create_future()
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await never  # the client never goes away

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    try:
        await app(scope, receive, send)
    finally:
        never.cancel()
    return status


async def _block(app: Any, body: bytes, key: str, jobs: int, in_flight: int) -> tuple[float, float, int]:
    """(CPU s per job, wall s per job, non-202 answers) of ``jobs`` submissions, ``in_flight`` at once."""
    gate = asyncio.Semaphore(in_flight)

    async def one() -> int:
        async with gate:
            return await _post(app, body, key)

    cpu, wall = time.process_time(), time.perf_counter()
    statuses = await asyncio.gather(*(one() for _ in range(jobs)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / jobs, wall / jobs, sum(1 for s in statuses if s != 202)


async def measure(variants: dict[str, tuple[dict[str, str], bytes]], key: str, blocks: int, jobs: int,
                  in_flight: int) -> dict[str, Any]:
    from api.app import create_app
    from api.settings import ApiSettings

    apps = {name: create_app(ApiSettings(**overrides))  # type: ignore[arg-type]  # the two settings named
            for name, (overrides, _) in variants.items()}
    names = list(variants)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    refused = {n: 0 for n in names}
    async with contextlib.AsyncExitStack() as running:
        for name in names:  # started as a server starts them; then warmed: clients, scripts loaded, validation
            await running.enter_async_context(apps[name].router.lifespan_context(apps[name]))
            await _block(apps[name], variants[name][1], key, jobs, in_flight)
        for index in range(blocks):
            for name in names if index % 2 == 0 else names[::-1]:
                c, w, bad = await _block(apps[name], variants[name][1], key, jobs, in_flight)
                cpu[name].append(c)
                wall[name].append(w)
                refused[name] += bad
    base = names[0]
    out: dict[str, Any] = {"blocks": blocks, "jobs_per_block": jobs, "in_flight": in_flight, "variants": names,
                           "cpu_us_per_job": {n: round(median(v) * 1e6, 1) for n, v in cpu.items()},
                           "cpu_us_per_job_p10_p90": {n: [round(x * 1e6, 1) for x in _p10_p90(v)] for n, v in cpu.items()},
                           "wall_us_per_job": {n: round(median(v) * 1e6, 1) for n, v in wall.items()},
                           "non_202": refused}
    # a block's ratio against the baseline's block of the same round: the same conditions on both sides
    for name in names[1:]:
        pairs = [b / m for m, b in zip(cpu[name], cpu[base], strict=True)]
        label = f"cpu_ratio_{base}_over_{name}".replace("-", "_")
        out[label] = ratio(median(cpu[base]), median(cpu[name]))
        out[f"{label}_paired_median"] = round(median(pairs), 3)
    return out


def _p10_p90(values: list[float]) -> tuple[float, float]:
    from bench.common import percentile

    return percentile(values, 10), percentile(values, 90)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.submit_inproc", description=__doc__.split("\n\n")[0])
    p.add_argument("--body-file", required=True, help="the JSON body of every submission")
    p.add_argument("--catalog", required=True, help="the two-model catalog of the catalog variants")
    p.add_argument("--model", required=True, help="the model the api-model variant's jobs name")
    p.add_argument("--one-model", required=True, help="EDITFARM_MODEL of the one-model variant")
    p.add_argument("--key", required=True, help="an API key of EDITFARM_API_KEYS")
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--jobs-per-block", type=int, default=200)
    p.add_argument("--in-flight", type=int, default=32)
    args = p.parse_args()
    body = json.loads(Path(args.body_file).read_text())
    plain = json.dumps(body).encode()
    named = json.dumps({**body, "model": args.model}).encode()
    variants = {"api": ({"model": args.one_model, "models_file": ""}, plain),
                "api-catalog": ({"model": "", "models_file": args.catalog}, plain),
                "api-model": ({"model": "", "models_file": args.catalog}, named)}
    runner: Callable[[Coroutine[Any, Any, dict[str, Any]]], dict[str, Any]] = asyncio.run
    try:  # the loop the API runs on (uvicorn picks uvloop when installed)
        import uvloop

        runner = uvloop.run
    except ImportError:
        pass
    result = runner(measure(variants, args.key, args.blocks, args.jobs_per_block, args.in_flight))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
