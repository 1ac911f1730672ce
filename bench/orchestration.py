"""Orchestration overhead: submit → signed webhook received, with a render stand-in that takes no time.

    python -m bench.orchestration           # 200 jobs (~1 min)
    python -m bench.orchestration --quick

A whole local cluster (Redis, S3 server, API, one render worker with the stand-in at
``EDITFARM_STANDIN_RENDER_S=0``, the webhook worker) and a webhook receiver on loopback.
One job at a time: the clock starts before ``POST /v1/jobs`` and stops when the job's
terminal webhook arrives. Side by side, alternating one for one with the jobs, the
baseline: a bare Celery ``apply_async(...).get()`` of a no-op task on the same Redis
(``bench.noop_celery``, a prefork worker with one child and a Redis result backend).

The breakdown of each job comes from its record (``created_at``, ``started_at``,
``finished_at``, epoch seconds) and the receiver's clock: POST answered, queued → started,
started → finished (fetch, render, encode, upload, terminal transition), finished →
webhook arrived (notify task, outbox, delivery task, HTTP POST).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
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


def start_noop_worker(redis_url: str, log_path: Path) -> subprocess.Popen[bytes]:
    import os

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EDITFARM_")},
           "EDITFARM_BENCH_REDIS_URL": redis_url}
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.noop_celery:app", "worker", "-Q",
                             "bench.noop", "-P", "prefork", "-c", "1", "-n", "noop@local", "--without-gossip",
                             "--without-mingle", "-l", "WARNING"], cwd=ROOT, env=env, stdout=open(log_path, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def main() -> int:
    p = parser("orchestration", __doc__)
    p.add_argument("--jobs", type=int, default=200)
    args = p.parse_args()
    if args.quick:
        args.jobs = 10
    import httpx

    root = workdir(args.workdir, "orchestration")
    bench = BenchCluster(root, render_workers=1, render_s=0.0)
    with bench, TimedReceiver() as receiver:
        cluster = bench.cluster
        noop_proc = start_noop_worker(cluster.redis_url, root / "logs" / "noop.log")
        try:
            from bench.noop_celery import app as noop_app_template  # noqa: F401 - checks it imports
            from celery import Celery

            noop = Celery("bench-noop", broker=cluster.redis_url, backend=cluster.redis_url, set_as_current=False)
            noop.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
            noop.send_task("bench.noop", args=[0], queue="bench.noop").get(timeout=60)  # worker up
            headers = {"Authorization": f"Bearer {cluster.api_key()}"}
            client = httpx.Client(base_url=cluster.api_url, headers=headers, timeout=30)
            warm = 2 if args.quick else 5
            rows: list[dict[str, Any]] = []
            baseline: list[float] = []
            operation = job_body()["operation"]
            log(f"{args.jobs} jobs ({operation}, steps=2, stand-in 0 s) alternating with {args.jobs} no-op tasks")
            for index in range(warm + args.jobs):
                began = time.perf_counter()
                noop.send_task("bench.noop", args=[index], queue="bench.noop").get(timeout=30)
                noop_s = time.perf_counter() - began

                body = job_body(steps=2, seed=index, webhook=receiver.url)
                began, began_epoch = time.perf_counter(), time.time()
                answer = client.post("/v1/jobs", json=body)
                posted = time.perf_counter()
                if answer.status_code != 202:
                    raise RuntimeError(f"submit answered {answer.status_code}: {answer.text[:300]}")
                job_id = answer.json()["id"]
                arrived, arrived_epoch = receiver.wait_for(job_id, timeout_s=30)
                if index < warm:
                    continue
                baseline.append(noop_s)
                rows.append({"id": job_id, "total_s": arrived - began, "post_s": posted - began,
                             "began_epoch": began_epoch, "arrived_epoch": arrived_epoch})
            client.close()
            records = wait_jobs_done(cluster.redis_url, [r["id"] for r in rows], 30)
        finally:
            stop_group(noop_proc)
    statuses = {}
    for row in rows:
        rec = records[row["id"]]
        statuses[rec["status"]] = statuses.get(rec["status"], 0) + 1
        row["queued_to_started_s"] = rec["started_at"] - rec["created_at"]
        row["started_to_finished_s"] = rec["finished_at"] - rec["started_at"]
        row["finished_to_webhook_s"] = row["arrived_epoch"] - rec["finished_at"]
    total = summary([r["total_s"] for r in rows], 1000)
    base = summary(baseline, 1000)
    report = {
        "jobs": len(rows), "operation": operation, "statuses": statuses,
        "submit_to_webhook_ms": total,
        "baseline_celery_apply_async_get_ms": base,
        "ratio_p50": ratio(total["p50"], base["p50"]),
        "ratio_p99": ratio(total["p99"], base["p99"]),
        "breakdown_ms": {
            "post_answered": summary([r["post_s"] for r in rows], 1000),
            "queued_to_started": summary([r["queued_to_started_s"] for r in rows], 1000),
            "started_to_finished": summary([r["started_to_finished_s"] for r in rows], 1000),
            "finished_to_webhook": summary([r["finished_to_webhook_s"] for r in rows], 1000),
        },
        "goals": {"p50_le_3x_baseline": (ratio(total["p50"], base["p50"]) or 99) <= 3.0,
                  "p99_le_50_ms": total["p99"] <= 50.0},
    }
    write_report("orchestration", report, args.out, args.quick, command_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
