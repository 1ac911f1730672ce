"""Fleet scale-out: two model pools of N stand-in workers each, both loaded at once; efficiency per pool.

    python -m bench.fleet_scaleout            # 2 pools x 4 workers, T = 0.5 s, 12 jobs per worker, ABBA (~5 min)
    python -m bench.fleet_scaleout --quick

Two clusters, up side by side for the whole run (Redis, S3 server, API each; no webhook worker:
the jobs have no webhook):

* the fleet: a catalog of ``--pools`` models (``EDITFARM_MODELS_FILE``, :func:`bench.common.write_standin_catalog`),
  each with its own pool of N render workers (``editfarm worker --model``: a worker consumes only its
  model's queues). ``jobs_per_worker × N`` jobs per model are submitted at once, the models
  interleaved, every job naming its model. Each pool's throughput comes from its own jobs' records
  (jobs / (last ``finished_at`` − first ``started_at``)); its efficiency is throughput(N) / (N ×
  throughput(1)), the 1-worker figure measured in the same run with every pool at 1 worker at once;
* the baseline: a one-model cluster (``EDITFARM_MODEL`` alone, today's queue names) with one pool,
  run exactly as ``bench.scaleout`` runs it (:func:`bench.scaleout.run_once`), at 1 and N workers (the
  same N: ``baseline``) and at the fleet's whole worker count, pools × N (``baseline_same_total_workers``:
  the same number of processes on the same cores, in one pool).

Rounds run in ABBA order over (worker count, cluster) so drift hits both alike; figures are medians
over rounds. The worker's runner is its default (``pipelined``) unless ``--runner serial``. With the
sleeping stand-in the workers mostly wait: this measures whether a second pool's traffic (shared
Redis, API, S3 server and cores) costs the first pool its scaling.
"""

from __future__ import annotations

import contextlib
import string
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
    write_standin_catalog,
)
from bench.scaleout import run_once as run_single_pool
from bench.scaleout import steady_rate


def pool_figures(rows: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """One pool's figures from its own jobs' records (and how many ran on another model's worker)."""
    first = min(r["started_at"] for r in rows)
    last = max(r["finished_at"] for r in rows)
    steady, window = steady_rate(rows)
    per_worker: dict[str, int] = {}
    for r in rows:
        node = str(r["worker"]).split("/")[0]
        per_worker[node] = per_worker.get(node, 0) + 1
    return {"jobs": len(rows), "makespan_s": round(last - first, 3), "jobs_per_s": round(len(rows) / (last - first), 3),
            "steady_jobs_per_s": round(steady, 3), "steady_window_s": round(window, 3),
            "statuses": {s: sum(1 for r in rows if r["status"] == s) for s in {r["status"] for r in rows}},
            # a worker's node is render<i>-<model>@local: a job on any other pool's worker was misrouted
            "misrouted": sum(count for node, count in per_worker.items() if f"-{model}@" not in node),
            "jobs_per_worker": sorted(per_worker.values())}


def run_pools(bench: BenchCluster, models: list[str], workers: int, jobs_per_worker: int, render_s: float,
              runner: str) -> dict[str, Any]:
    """Every pool at ``workers`` workers, ``jobs_per_worker × workers`` jobs per model submitted at once."""
    import httpx

    cluster = bench.cluster
    names = [cluster.start_render_worker(k * workers + i, RUNNER_ENV[runner], model=model)
             for k, model in enumerate(models) for i in range(workers)]
    jobs = jobs_per_worker * workers
    ids: dict[str, list[str]] = {model: [] for model in models}
    try:
        for name in names:
            cluster.wait_worker_ready(name, timeout_s=180)
        time.sleep(1.0)  # let the freshly started workers settle (first BRPOP issued)
        client = httpx.Client(base_url=cluster.api_url, headers={"Authorization": f"Bearer {cluster.api_key()}"},
                              timeout=30)
        for index in range(jobs):
            for model in models:  # interleaved: every pool's queue fills from the start
                answer = client.post("/v1/jobs", json=job_body(steps=2, seed=index, model=model))
                if answer.status_code != 202:
                    raise RuntimeError(f"submit answered {answer.status_code}: {answer.text[:300]}")
                ids[model].append(answer.json()["id"])
        client.close()
        every = [job_id for model in models for job_id in ids[model]]
        records = wait_jobs_done(cluster.redis_url, every, timeout_s=jobs * (render_s + 2) + 60)
    finally:
        for name in names:
            cluster.stop_process(name)
    pools = {model: pool_figures([records[j] for j in ids[model]], model) for model in models}
    rows = list(records.values())
    together = len(rows) / (max(r["finished_at"] for r in rows) - min(r["started_at"] for r in rows))
    result = {"cluster": "fleet", "runner": runner, "workers_per_pool": workers, "pools": pools,
              "jobs_per_s_all_pools": round(together, 3),
              "job_overhead_ms": summary([(r["finished_at"] - r["started_at"] - render_s) for r in rows], 1000)}
    log(f"fleet {len(models)}x{workers}: " + ", ".join(
        f"{m} {p['jobs_per_s']:.2f} jobs/s (steady {p['steady_jobs_per_s']:.2f}, misrouted {p['misrouted']})"
        for m, p in pools.items()))
    return result


def efficiency(one: float, many: float, workers: int) -> float:
    return round(many / (workers * one), 3)


def main() -> int:
    p = parser("fleet_scaleout", __doc__)
    p.add_argument("--pools", type=int, default=2, help="model pools (2 or more)")
    p.add_argument("--workers", type=int, default=4, help="N: workers per pool")
    p.add_argument("--render-s", type=float, default=0.5)
    p.add_argument("--jobs-per-worker", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2, help="1: ascending only; 2: ABBA")
    p.add_argument("--runner", default="pipelined", choices=sorted(RUNNER_ENV))
    p.add_argument("--no-baseline", action="store_true", help="skip the one-model cluster")
    args = p.parse_args()
    if args.quick:
        args.workers, args.render_s, args.jobs_per_worker, args.rounds = 2, 0.1, 3, 1
    if args.pools < 2:
        p.error("--pools must be 2 or more (one pool is bench.scaleout)")
    models = [f"pool-{string.ascii_lowercase[k]}" for k in range(args.pools)]
    total = args.pools * args.workers
    clusters = ["fleet"] + ([] if args.no_baseline else ["single"])
    step = [(n, c) for n in (1, args.workers) for c in clusters]
    if not args.no_baseline:  # the one-model cluster with as many workers as the whole fleet
        step.append((total, "single"))
    order: list[tuple[int, str]] = []
    for r in range(args.rounds):
        order += step if r % 2 == 0 else step[::-1]
    root = workdir(args.workdir, "fleet_scaleout")
    catalog = write_standin_catalog(root / "models.yaml", models)
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        fleet = stack.enter_context(BenchCluster(root / "fleet", models_file=catalog, render_workers=0,
                                                 render_s=args.render_s, timed=True, webhook_worker=False))
        # the one-model cluster (EDITFARM_MODEL alone), up beside the fleet all along
        single = None if args.no_baseline else stack.enter_context(BenchCluster(
            root / "single", render_workers=0, render_s=args.render_s, timed=True, webhook_worker=False))
        for workers, which in order:
            if which == "fleet":
                runs.append(run_pools(fleet, models, workers, args.jobs_per_worker, args.render_s, args.runner))
            else:
                assert single is not None
                run = run_single_pool(single, workers, args.jobs_per_worker * workers, args.render_s, args.runner)
                runs.append({"cluster": "single", **run})

    n = args.workers
    fleet_runs = [r for r in runs if r["cluster"] == "fleet"]
    results = []
    for model in models:
        def of(workers: int, key: str, model: str = model) -> float:
            return median(r["pools"][model][key] for r in fleet_runs if r["workers_per_pool"] == workers)

        results.append({"pool": model, "workers": n, "jobs_per_s": round(of(n, "jobs_per_s"), 3),
                        "one_worker_jobs_per_s": round(of(1, "jobs_per_s"), 3),
                        "linear_jobs_per_s": round(n * of(1, "jobs_per_s"), 3),
                        "efficiency": efficiency(of(1, "jobs_per_s"), of(n, "jobs_per_s"), n),
                        "steady_jobs_per_s": round(of(n, "steady_jobs_per_s"), 3),
                        "steady_efficiency": efficiency(of(1, "steady_jobs_per_s"), of(n, "steady_jobs_per_s"), n),
                        "misrouted": sum(r["pools"][model]["misrouted"] for r in fleet_runs),
                        "ideal_jobs_per_s": round(n / args.render_s, 3)})
    single_runs = [r for r in runs if r["cluster"] == "single"]

    def single_pool(workers: int, label: str) -> dict[str, Any]:
        def base(count: int, key: str) -> float:
            return median(r[key] for r in single_runs if r["workers"] == count)

        return {"pool": label, "workers": workers, "jobs_per_s": round(base(workers, "jobs_per_s"), 3),
                "one_worker_jobs_per_s": round(base(1, "jobs_per_s"), 3),
                "linear_jobs_per_s": round(workers * base(1, "jobs_per_s"), 3),
                "efficiency": efficiency(base(1, "jobs_per_s"), base(workers, "jobs_per_s"), workers),
                "steady_jobs_per_s": round(base(workers, "steady_jobs_per_s"), 3),
                "steady_efficiency": efficiency(base(1, "steady_jobs_per_s"), base(workers, "steady_jobs_per_s"),
                                                workers),
                "ideal_jobs_per_s": round(workers / args.render_s, 3)}

    # the one-model cluster at the same N (bench.scaleout's figure), and with the fleet's whole worker count
    baseline = single_pool(n, f"one-model cluster, {n} workers") if single_runs else None
    baseline_total = single_pool(total, f"one-model cluster, {total} workers") if single_runs else None
    fleet_all = median(r["jobs_per_s_all_pools"] for r in fleet_runs if r["workers_per_pool"] == n)
    goals = {f"efficiency_ge_0_95[{row['pool']}]": row["efficiency"] >= 0.95 for row in results}
    for row in (baseline, baseline_total):
        if row is not None:
            goals[f"efficiency_ge_0_95[{row['pool']}]"] = row["efficiency"] >= 0.95
    report = {"render_s": args.render_s, "jobs_per_worker": args.jobs_per_worker, "workers_per_pool": n,
              "pools": models, "runner": args.runner, "order": [f"{c}:{w}" for w, c in order],
              "results": results, "baseline": baseline, "baseline_same_total_workers": baseline_total,
              "fleet_jobs_per_s_all_pools": round(fleet_all, 3), "runs": runs, "goals": goals}
    table = [*results, *([baseline, baseline_total] if baseline and baseline_total else [])]
    log(f"side by side, T = {args.render_s:g} s ({args.runner}):")
    for row in table:
        log(f"  {row['pool']:30s} 1 worker {row['one_worker_jobs_per_s']:6.2f} jobs/s, {row['workers']} workers "
            f"{row['jobs_per_s']:6.2f} jobs/s: efficiency {row['efficiency']:.3f} (steady {row['steady_efficiency']:.3f})")
    write_report("fleet_scaleout", report, args.out, args.quick, command_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
