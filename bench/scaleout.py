"""Scale-out: 1, 2, 4, 8 render worker processes with the stand-in; throughput and efficiency vs linear.

    python -m bench.scaleout           # T = 0.5 s, 12 jobs per worker, rounds 1,2,4,8,8,4,2,1 x 2 runners (~7 min)
    python -m bench.scaleout --quick

One cluster (Redis, S3 server, API; no webhook worker: the jobs have no webhook). For each
worker count N, N render workers (Celery prefork, one child each, the stand-in at
``EDITFARM_STANDIN_RENDER_S=T``) are started and warm, ``jobs_per_worker × N`` generate jobs
(edit of a 1x1 PNG where generate is missing) are submitted at once, and throughput is
jobs / (last ``finished_at`` − first ``started_at``), from the job records. Efficiency is
throughput(N) / (N × throughput(1)), each the median over rounds; the rounds run in ABBA
order (1,2,4,8,8,4,2,1) so drift hits every N alike. ``steady_*`` counts only the window in
which every worker was busy (no ramp-up, no tail). ``--runner serial,pipelined`` (the
default) runs each N with the worker's pipelining off (one step after the other) and on (its
default, ``workers/pipelining.py``), side by side. On 2 cores with a sleeping stand-in the
workers mostly wait: this measures how orchestration (queue, leases, store, S3) scales.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    RUNNER_ENV,
    BenchCluster,
    command_line,
    job_body,
    log,
    median,
    parser,
    summary,
    wait_jobs_done,
    workdir,
    write_report,
)


def steady_rate(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(jobs/s, window s) while every worker was busy: from the moment the last worker took its
    first job to the moment the first worker finished its last one (no ramp-up, no tail)."""
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_worker.setdefault(str(r["worker"]).split("/")[0], []).append(r)
    begin = max(min(r["started_at"] for r in jobs) for jobs in by_worker.values())
    end = min(max(r["finished_at"] for r in jobs) for jobs in by_worker.values())
    done = sum(1 for r in rows if begin < r["finished_at"] <= end)
    return (done / (end - begin) if end > begin else float("nan")), end - begin


def run_once(bench: BenchCluster, workers: int, jobs: int, render_s: float, runner: str) -> dict[str, Any]:
    import httpx

    cluster = bench.cluster
    names = [cluster.start_render_worker(i, RUNNER_ENV[runner]) for i in range(workers)]
    try:
        for name in names:
            cluster.wait_worker_ready(name, timeout_s=180)
        time.sleep(1.0)  # let the freshly started workers settle (first BRPOP issued)
        client = httpx.Client(base_url=cluster.api_url, headers={"Authorization": f"Bearer {cluster.api_key()}"},
                              timeout=30)
        ids = []
        for index in range(jobs):
            answer = client.post("/v1/jobs", json=job_body(steps=2, seed=index))
            if answer.status_code != 202:
                raise RuntimeError(f"submit answered {answer.status_code}: {answer.text[:300]}")
            ids.append(answer.json()["id"])
        client.close()
        records = wait_jobs_done(cluster.redis_url, ids, timeout_s=jobs * (render_s + 2) + 60)
    finally:
        for name in names:
            cluster.stop_process(name)
    rows = list(records.values())
    first = min(r["started_at"] for r in rows)
    last = max(r["finished_at"] for r in rows)
    per_worker: dict[str, int] = {}
    for r in rows:
        per_worker[str(r["worker"]).split("/")[0]] = per_worker.get(str(r["worker"]).split("/")[0], 0) + 1
    throughput = len(rows) / (last - first)
    steady, window = steady_rate(rows)
    result = {"runner": runner, "workers": workers, "jobs": jobs, "makespan_s": round(last - first, 3),
              "jobs_per_s": round(throughput, 3), "steady_jobs_per_s": round(steady, 3),
              "steady_window_s": round(window, 3),
              "statuses": {s: sum(1 for r in rows if r["status"] == s) for s in {r["status"] for r in rows}},
              "job_overhead_ms": summary([(r["finished_at"] - r["started_at"] - render_s) for r in rows], 1000),
              "jobs_per_worker": sorted(per_worker.values())}
    log(f"{runner} N={workers}: {throughput:.2f} jobs/s over {last - first:.2f} s (steady {steady:.2f}), "
        f"per worker {result['jobs_per_worker']}")
    return result


def main() -> int:
    p = parser("scaleout", __doc__)
    p.add_argument("--workers", default="1,2,4,8")
    p.add_argument("--render-s", type=float, default=0.5)
    p.add_argument("--jobs-per-worker", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2, help="1: ascending only; 2: ABBA")
    p.add_argument("--runner", default="", help="serial and/or pipelined (the worker's default: finish in the "
                                               "background, prefetch inputs); default both (--quick: pipelined)")
    args = p.parse_args()
    if args.quick:
        args.workers, args.render_s, args.jobs_per_worker, args.rounds = "1,2", 0.1, 3, 1
    runners = (args.runner or ("pipelined" if args.quick else "serial,pipelined")).split(",")
    counts = [int(n) for n in args.workers.split(",")]
    order: list[int] = []
    for r in range(args.rounds):
        order += counts if r % 2 == 0 else counts[::-1]
    root = workdir(args.workdir, "scaleout")
    runs = []
    # the bench worker app (bench.timed_worker) logs renders and swaps in the runner named per run
    with BenchCluster(root, render_workers=0, render_s=args.render_s, timed=True, webhook_worker=False) as bench:
        for workers in order:
            for runner in runners:
                runs.append(run_once(bench, workers, args.jobs_per_worker * workers, args.render_s, runner))

    def table_for(runner: str) -> list[dict[str, Any]]:
        mine = [r for r in runs if r["runner"] == runner]
        by_n = {n: median(r["jobs_per_s"] for r in mine if r["workers"] == n) for n in counts}
        steady = {n: median(r["steady_jobs_per_s"] for r in mine if r["workers"] == n) for n in counts}
        base, steady_base = by_n[counts[0]] / counts[0], steady[counts[0]] / counts[0]
        return [{"runner": runner, "workers": n, "jobs_per_s": round(by_n[n], 3),
                 "linear_jobs_per_s": round(base * n, 3), "efficiency": round(by_n[n] / (base * n), 3),
                 "steady_jobs_per_s": round(steady[n], 3),
                 "steady_efficiency": round(steady[n] / (steady_base * n), 3),
                 "ideal_jobs_per_s": round(n / args.render_s, 3)} for n in counts]

    tables = {runner: table_for(runner) for runner in runners}
    table = tables[runners[0]]
    report = {"render_s": args.render_s, "jobs_per_worker": args.jobs_per_worker, "order": order,
              "runners": runners, "results": table, "by_runner": tables, "runs": runs,
              "goals": {f"efficiency_ge_0_95[{r}]": all(row["efficiency"] >= 0.95 for row in t)
                        for r, t in tables.items()}}
    write_report("scaleout", report, args.out, args.quick, command_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
