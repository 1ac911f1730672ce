"""Orchestration overhead: submit → signed webhook received, with a render stand-in that takes no time.

    python -m bench.orchestration           # 200 jobs (~1 min)
    python -m bench.orchestration --quick

A whole local cluster (Redis, S3 server, API, one render worker with the stand-in at
``EDITFARM_STANDIN_RENDER_S=0``, the webhook worker) and a webhook receiver on loopback.
One job at a time: the clock starts before ``POST /v1/jobs`` and stops when the job's
terminal webhook arrives. Side by side, alternating one for one with the jobs, the
baseline: a bare Celery ``apply_async(...).get()`` of a no-op task on the same Redis
(``bench.noop_celery``, a prefork worker with one child and a Redis result backend).

``--variants`` names the clusters run side by side, jobs alternating between them (``VARIANTS``:
an API app, its submit path and a webhook worker app, so that a prototype can be measured beside
the code as it is); ``current``, the code as it is, is the only one now (the prototypes of the
submission fast path and of the notify task's own first delivery attempt are in the product). The
top-level figures are those of the first variant; ``by_variant`` has each.

``--s3`` names the S3 servers (``seaweedfs``, the default and what the cluster runs; ``moto``, the
mock the tests used before) set side by side the same way: each variant runs once per server, the
extra ones named ``<variant>@<server>`` (e.g. ``current@moto``), and the S3 put alone is timed
against each (``s3_put_64px_png`` on the first, ``s3_put_64px_png@moto``...), so ``floor_by_s3_ms``
gives the floor on each server from one run.

Also alternating with the jobs, the parts of the path that are not ours, each measured alone
(``parts_alone_ms``): an HTTP GET of the API's ``/healthz`` (the submit request's HTTP leg), a
put of a 64x64 PNG (the stand-in's output) into the same S3 server through the workers' own
``S3ObjectStore``, and a POST of a webhook-sized body to the same receiver. ``floor_ms`` adds
their medians to the baseline's (a Celery round trip is two one-way hops, as the render and
notify messages are): what submit → webhook would take if our own code cost nothing.

The breakdown of each job comes from its record (``created_at``, ``started_at``,
``finished_at``, epoch seconds) and the receiver's clock: POST answered, queued → started,
started → finished (fetch, render, encode, upload, terminal transition), finished →
webhook arrived (the notify message, the notify task: outbox and first delivery attempt, HTTP POST).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    BenchCluster,
    TimedReceiver,
    command_line,
    job_body,
    log,
    parser,
    ratio,
    stop_group,
    summary,
    wait_jobs_done,
    workdir,
    write_report,
)


def flat_png(side: int) -> bytes:
    """A flat side x side PNG, as the stand-in renders (a generate job without a size is 64x64)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (7, 0, 128)).save(buf, format="PNG")
    return buf.getvalue()


def start_noop_worker(redis_url: str, log_path: Path) -> subprocess.Popen[bytes]:
    import os

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EDITFARM_")},
           "EDITFARM_BENCH_REDIS_URL": redis_url}
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.noop_celery:app", "worker", "-Q",
                             "bench.noop", "-P", "prefork", "-c", "1", "-n", "noop@local", "--without-gossip",
                             "--without-mingle", "-l", "WARNING"], cwd=ROOT, env=env, stdout=open(log_path, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


VARIANTS = {
    # name: (API app, submit path, webhook worker app)
    "current": ("api.app:create_app", "/v1/jobs", "workers.celery_worker:app"),
}


def breakdown(rows: list[dict[str, Any]], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for row in rows:
        rec = records[row["id"]]
        row["queued_to_started_s"] = rec["started_at"] - rec["created_at"]
        row["started_to_finished_s"] = rec["finished_at"] - rec["started_at"]
        row["finished_to_webhook_s"] = row["arrived_epoch"] - rec["finished_at"]
    return {"post_answered": summary([r["post_s"] for r in rows], 1000),
            "queued_to_started": summary([r["queued_to_started_s"] for r in rows], 1000),
            "started_to_finished": summary([r["started_to_finished_s"] for r in rows], 1000),
            "finished_to_webhook": summary([r["finished_to_webhook_s"] for r in rows], 1000)}


def main() -> int:
    p = parser("orchestration", __doc__)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--variants", default="current", help="comma-separated names from VARIANTS "
                                                          "(current: the code as it is)")
    p.add_argument("--s3", default="seaweedfs", help="comma-separated S3 servers, side by side: seaweedfs "
                                                     "(the real server the cluster runs), moto (the mock)")
    args = p.parse_args()
    if args.quick:
        args.jobs = 10
    servers = args.s3.split(",")
    if unknown := set(servers) - {"seaweedfs", "moto"}:
        p.error(f"unknown --s3 {sorted(unknown)}")
    # (name, VARIANTS entry, S3 server): every variant on every server, the first server's unsuffixed
    runs = [(variant if server == servers[0] else f"{variant}@{server}", variant, server)
            for server in servers for variant in args.variants.split(",")]
    variants = [name for name, _, _ in runs]
    import contextlib

    import httpx
    from celery import Celery

    from storage import S3Config, S3ObjectStore

    root = workdir(args.workdir, "orchestration")
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    records: dict[str, dict[str, Any]] = {}
    baseline: list[float] = []
    operation = job_body()["operation"]
    with contextlib.ExitStack() as stack:
        receiver = stack.enter_context(TimedReceiver())
        clusters = {}
        for name, variant, server in runs:
            api_app, _path, webhook_app = VARIANTS[variant]
            clusters[name] = stack.enter_context(BenchCluster(
                root / name.replace("@", "-"), render_workers=1, render_s=0.0, api_app=api_app,
                webhook_app=webhook_app, s3_server=server)).cluster
        paths = {name: VARIANTS[variant][1] for name, variant, _ in runs}
        first = clusters[variants[0]]
        noop_proc = start_noop_worker(first.redis_url, root / "noop.log")
        stack.callback(stop_group, noop_proc)
        noop = Celery("bench-noop", broker=first.redis_url, backend=first.redis_url, set_as_current=False)
        noop.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
        noop.send_task("bench.noop", args=[0], queue="bench.noop").get(timeout=60)  # worker up
        clients = {v: stack.enter_context(httpx.Client(base_url=c.api_url, timeout=30,
                                                       headers={"Authorization": f"Bearer {c.api_key()}"}))
                   for v, c in clusters.items()}
        put_part = {server: "s3_put_64px_png" if server == servers[0] else f"s3_put_64px_png@{server}"
                    for server in servers}
        parts: dict[str, list[float]] = {"api_http_get": [], **{put_part[s]: [] for s in servers},
                                         "webhook_post": []}
        # the S3 put alone, through the workers' own store, on each server (that of the first run on it)
        objects = {server: S3ObjectStore(S3Config(
            bucket="editfarm", endpoint_url=clusters[next(n for n, _, s in runs if s == server)].s3_url,
            region="us-east-1", access_key_id="test", secret_access_key="test", path_style=True))
            for server in servers}
        png = flat_png(64)
        post_body = json.dumps({"type": "bench.part", "data": {"id": "part", "status": "succeeded",
                                                                "outputs": [{"url": "x" * 400}]}}).encode()
        parts_client = stack.enter_context(httpx.Client(timeout=30))

        def time_parts(index: int) -> None:
            began = time.perf_counter()
            clients[variants[0]].get("/healthz").raise_for_status()
            got = {"api_http_get": time.perf_counter() - began}
            for server, store in objects.items():
                began = time.perf_counter()
                store.put(f"bench/parts/{index}.png", png, "image/png")
                got[put_part[server]] = time.perf_counter() - began
            began = time.perf_counter()
            parts_client.post(receiver.url, content=post_body, headers={"content-type": "application/json"})
            got["webhook_post"] = time.perf_counter() - began
            if index >= warm:
                for name, took in got.items():
                    parts[name].append(took)

        warm = 2 if args.quick else 5
        log(f"{args.jobs} jobs per variant {variants} ({operation}, steps=2, stand-in 0 s), alternating with "
            f"{args.jobs} no-op tasks")
        for index in range(warm + args.jobs):
            began = time.perf_counter()
            noop.send_task("bench.noop", args=[index], queue="bench.noop").get(timeout=30)
            noop_s = time.perf_counter() - began
            if index >= warm:
                baseline.append(noop_s)
            time_parts(index)
            for variant in variants:
                body = job_body(steps=2, seed=index, webhook=receiver.url)
                began = time.perf_counter()
                answer = clients[variant].post(paths[variant], json=body)
                posted = time.perf_counter()
                if answer.status_code != 202:
                    raise RuntimeError(f"{variant} submit answered {answer.status_code}: {answer.text[:300]}")
                job_id = answer.json()["id"]
                arrived, arrived_epoch = receiver.wait_for(job_id, timeout_s=30)
                if index >= warm:
                    rows[variant].append({"id": job_id, "total_s": arrived - began, "post_s": posted - began,
                                          "arrived_epoch": arrived_epoch})
        for variant, cluster in clusters.items():
            records.update(wait_jobs_done(cluster.redis_url, [r["id"] for r in rows[variant]], 30))
    base = summary(baseline, 1000)
    results = {}
    for variant in variants:
        total = summary([r["total_s"] for r in rows[variant]], 1000)
        statuses: dict[str, int] = {}
        for row in rows[variant]:
            status = records[row["id"]]["status"]
            statuses[status] = statuses.get(status, 0) + 1
        results[variant] = {"jobs": len(rows[variant]), "statuses": statuses, "submit_to_webhook_ms": total,
                            "ratio_p50": ratio(total["p50"], base["p50"]), "ratio_p99": ratio(total["p99"], base["p99"]),
                            "breakdown_ms": breakdown(rows[variant], records),
                            "goals": {"p50_le_3x_baseline": (ratio(total["p50"], base["p50"]) or 99) <= 3.0,
                                      "p99_le_50_ms": total["p99"] <= 50.0}}
    current = results[variants[0]]
    alone = {name: summary(values, 1000) for name, values in parts.items()}
    others = alone["api_http_get"]["p50"] + alone["webhook_post"]["p50"]
    floor_by_s3 = {server: round(base["p50"] + others + alone[put_part[server]]["p50"], 3) for server in servers}
    floor = floor_by_s3[servers[0]]
    report = {
        "operation": operation, "variants": variants,
        "jobs": current["jobs"], "statuses": current["statuses"],
        "submit_to_webhook_ms": current["submit_to_webhook_ms"],
        "baseline_celery_apply_async_get_ms": base,
        "ratio_p50": current["ratio_p50"], "ratio_p99": current["ratio_p99"],
        "breakdown_ms": current["breakdown_ms"], "goals": current["goals"],
        "parts_alone_ms": alone, "floor_ms": round(floor, 3), "floor_over_baseline": ratio(floor, base["p50"]),
        "s3_servers": servers, "floor_by_s3_ms": floor_by_s3,
        "by_variant": results,
    }
    write_report("orchestration", report, args.out, args.quick, command_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
