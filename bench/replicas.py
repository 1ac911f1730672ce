"""Submission throughput and submit → webhook latency with ``EDITFARM_REDIS_MIN_REPLICAS=1`` against 0,
side by side in one run.

    python -m bench.replicas            # 3 interleaved rounds of 10 s per setting, 200 jobs each (~4 min)
    python -m bench.replicas --quick    # one short round, 10 jobs (smoke)

Starts a Redis primary (AOF, ``appendfsync everysec``, as the local cluster) and one replica
(``redis-server --replicaof``, cli/redisreplica.py) once; each round starts the API
(``uvicorn --factory api.app:create_app``, no access log) on a fresh database with
``MIN_REPLICAS`` 0 or 1 (same topology: the replica is attached both times, only the ``WAIT``
differs), warms it up for 2 s, and loads ``POST /v1/jobs`` (a ``generate`` job: no input image, no
S3 put) from ``bench.loadgen`` in its own process. Reports medians over rounds, the ratio 1/0 (of the
medians, and the median of each round's ratio to the 0 measured just before it), and
checks that the replica holds every job the primary has at the end of a round. Then, with no HTTP
in between, the job store's create alone, one at a time from one client (``--creates`` per setting,
in interleaved blocks of 200): its median and p99 latency with and without the ``WAIT``.

Last, submit → webhook (``--jobs`` per setting): two whole local clusters on the same primary (its
databases 1 and 2; each with the API, one stand-in render worker at 0 s and the webhook worker, and
its own SeaweedFS), ``MIN_REPLICAS`` 0 and 1, one job at a time, alternating between them: the clock
starts before ``POST /v1/jobs`` and stops when the job's terminal webhook arrives (as
``bench.orchestration``). With 1 the create and the job's end each wait for the replica.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import command_line, job_body, log, median, parser, ratio, stop_group, workdir, write_report

API_KEY = "ef_bench_key_0123456789abcdef"
# high enough never to refuse a benchmark's jobs, non-zero so the checks still run on every request
LIMITS_NEVER_REFUSE = {"EDITFARM_RATE_LIMIT_PER_MIN": "1000000000", "EDITFARM_MAX_JOBS_IN_FLIGHT": "1000000000"}


def start_api(redis_url: str, min_replicas: int, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("EDITFARM_")}
    env.update({"EDITFARM_REDIS_URL": redis_url, "EDITFARM_S3_ENDPOINT_URL": "http://127.0.0.1:1",
                "EDITFARM_API_KEYS": f"bench:{API_KEY}", "EDITFARM_REDIS_MIN_REPLICAS": str(min_replicas),
                "EDITFARM_REDIS_WAIT_TIMEOUT_MS": "1000", **LIMITS_NEVER_REFUSE})
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host", "127.0.0.1",
           "--port", str(port), "--no-access-log", "--log-level", "warning"]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited: see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_group(proc)
    raise TimeoutError("the API is not ready")


def load(url: str, body_file: Path, seconds: float, connections: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.loadgen", "--url", url, "--body-file", str(body_file),
                           "--header", "Content-Type: application/json",
                           "--header", f"Authorization: Bearer {API_KEY}",
                           "--connections", str(connections), "--duration", str(seconds), "--warmup", "0"],
                          capture_output=True, text=True, timeout=seconds + 60, cwd=Path(__file__).parent.parent,
                          check=False)
    result: dict[str, Any] = json.loads(proc.stdout)
    result["non_2xx"] = sum(v for k, v in result.get("statuses", {}).items() if not k.startswith("2"))
    return result


def store_creates(primary_port: int, count: int) -> dict[str, Any]:
    """Latency (µs) of ``RedisJobStore.create_and_enqueue_within``, one at a time, MIN_REPLICAS 0 and 1."""
    import redis

    from bench.common import summary
    from broker.jobstore import RedisJobStore
    from broker.jobstore.quota import NO_QUOTA
    from broker.queues import RenderQueue
    from broker.replication import NO_WAIT, ReplicaPolicy
    from broker.schema import Job, JobParams, new_job_id

    client = redis.Redis(port=primary_port)
    stores = {"min_replicas_0": RedisJobStore(client, replicas=NO_WAIT),
              "min_replicas_1": RedisJobStore(client, replicas=ReplicaPolicy(min_replicas=1, wait_timeout_ms=1000))}
    latencies: dict[str, list[float]] = {name: [] for name in stores}
    queue = RenderQueue()
    done = 0
    while done < count:
        for name, store in stores.items():
            for _ in range(min(200, count - done)):
                job = Job(id=new_job_id(), tenant="bench", params=JobParams(prompt="make the sky purple", seed=7))
                _, message = queue.message(job.id)
                began = time.perf_counter()
                store.create_and_enqueue_within(job, "bench-creates", message, NO_QUOTA)
                latencies[name].append(time.perf_counter() - began)
        done += 200
    client.close()
    return {name: summary(values, 1e6, 1) for name, values in latencies.items()}


def webhook_latency(primary_port: int, root: Path, jobs: int, warm: int) -> dict[str, Any]:
    """Submit → webhook (ms) and the POST alone, MIN_REPLICAS 0 and 1, one job at a time, alternating."""
    import contextlib

    import httpx

    from bench.common import BenchCluster, TimedReceiver, percentile, summary

    settings = {"min_replicas_0": 0, "min_replicas_1": 1}
    totals: dict[str, list[float]] = {name: [] for name in settings}
    posts: dict[str, list[float]] = {name: [] for name in settings}
    with contextlib.ExitStack() as stack:
        receiver = stack.enter_context(TimedReceiver())
        clients = {}
        for db, (name, min_replicas) in enumerate(settings.items(), start=1):
            cluster = stack.enter_context(BenchCluster(
                root / name, redis_url=f"redis://127.0.0.1:{primary_port}/{db}",
                extra_env={"EDITFARM_REDIS_MIN_REPLICAS": str(min_replicas),
                           "EDITFARM_REDIS_WAIT_TIMEOUT_MS": "1000"})).cluster
            clients[name] = stack.enter_context(httpx.Client(
                base_url=cluster.api_url, timeout=30, headers={"Authorization": f"Bearer {cluster.api_key()}"}))
        for index in range(warm + jobs):
            for name, client in clients.items():
                began = time.perf_counter()
                answer = client.post("/v1/jobs", json=job_body(steps=2, seed=index, webhook=receiver.url))
                posted = time.perf_counter()
                if answer.status_code != 202:
                    raise RuntimeError(f"{name} submit answered {answer.status_code}: {answer.text[:300]}")
                arrived, _ = receiver.wait_for(answer.json()["id"], timeout_s=30)
                if index >= warm:
                    totals[name].append(arrived - began)
                    posts[name].append(posted - began)
    def with_p95(values: list[float]) -> dict[str, Any]:
        return {**summary(values, 1000), "p95": round(percentile([v * 1000 for v in values], 95), 3)}

    return {name: {"submit_to_webhook_ms": with_p95(totals[name]), "post_ms": with_p95(posts[name])}
            for name in settings}


def main() -> int:
    import redis

    from broker import keys
    from cli.localservices import free_port, start_redis
    from cli.redisreplica import start_replica

    p = parser("replicas", __doc__)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--creates", type=int, default=4000)
    p.add_argument("--jobs", type=int, default=200, help="submit → webhook jobs per setting")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.creates, args.jobs = 3.0, 1, 400, 10
    root = workdir(args.workdir, "replicas")
    primary = start_redis(workdir=root / "redis", log=root / "redis.log")
    replica = start_replica(primary.port, root / "replica")
    redis_url = f"redis://127.0.0.1:{primary.port}/0"
    body_file = root / "body.json"
    body_file.write_text(json.dumps(job_body(steps=2)))
    client, on_replica = redis.Redis(port=primary.port), redis.Redis(port=replica.port)
    runs: dict[str, list[dict[str, Any]]] = {"min_replicas_0": [], "min_replicas_1": []}
    try:
        for round_no in range(args.rounds):
            for min_replicas in (0, 1):
                name = f"min_replicas_{min_replicas}"
                client.flushdb()
                client.config_resetstat()
                port = free_port()
                api = start_api(redis_url, min_replicas, port, root / "api.log")
                try:
                    url = f"http://127.0.0.1:{port}/v1/jobs"
                    load(url, body_file, 2.0, args.connections)  # warm-up, not counted
                    result = load(url, body_file, args.seconds, args.connections)
                finally:
                    stop_group(api)
                jobs = int(client.zcard(keys.tenant_jobs("bench")))
                time.sleep(0.2)  # MIN_REPLICAS=0: let asynchronous replication catch up before comparing
                result["jobs_on_primary"] = jobs
                result["wait_commands"] = int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
                result["jobs_on_replica"] = int(on_replica.zcard(keys.tenant_jobs("bench")))
                runs[name].append(result)
                log(f"round {round_no + 1} {name}: {result['requests_per_s']:.0f} req/s, "
                    f"p50 {result['latency_ms']['p50']} ms, non-2xx {result['non_2xx']}")
        client.flushdb()
        creates = store_creates(primary.port, args.creates)
        log(f"store creates: {creates}")
        client.flushdb()
        latency = webhook_latency(primary.port, root, args.jobs, warm=2 if args.quick else 5)
        log(f"submit → webhook: {latency}")
    finally:
        client.close()
        on_replica.close()
        replica.stop()
        primary.stop()
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        summary[name] = {
            "requests_per_s": round(median(r["requests_per_s"] for r in results), 1),
            "p50_ms": round(median(r["latency_ms"]["p50"] for r in results), 2),
            "p99_ms": round(median(r["latency_ms"]["p99"] for r in results), 2),
            "non_2xx": sum(r["non_2xx"] for r in results),
            "replica_has_every_job": all(r["jobs_on_replica"] == r["jobs_on_primary"] for r in results),
            "wait_commands": sum(r["wait_commands"] for r in results),
        }
    summary["ratio_1_over_0"] = ratio(summary["min_replicas_1"]["requests_per_s"],
                                      summary["min_replicas_0"]["requests_per_s"])
    # each round's 1 against the 0 measured just before it: steadier than the ratio of medians when the
    # machine's other load drifts between rounds
    by_round = [ratio(one["requests_per_s"], zero["requests_per_s"])
                for zero, one in zip(runs["min_replicas_0"], runs["min_replicas_1"], strict=True)]
    summary["ratio_1_over_0_by_round"] = by_round
    summary["ratio_1_over_0_paired_median"] = round(median(r for r in by_round if r is not None), 3)
    summary["store_create_us"] = creates
    summary["submit_to_webhook"] = latency
    summary["submit_to_webhook_p50_ratio_1_over_0"] = ratio(
        latency["min_replicas_1"]["submit_to_webhook_ms"]["p50"], latency["min_replicas_0"]["submit_to_webhook_ms"]["p50"])
    report = {"settings": {"seconds": args.seconds, "rounds": args.rounds, "connections": args.connections,
                           "creates": args.creates, "jobs": args.jobs,
                           "wait_timeout_ms": 1000, "topology": "1 primary (AOF everysec) + 1 replica, loopback"},
              "summary": summary, "runs": runs}
    write_report("replicas", report, args.out, args.quick, command_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
