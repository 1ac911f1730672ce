"""Redis memory under a steady stream of finished jobs, with retention: ``python -m bench.retention``.

Stand-in jobs go through the job store's own scripts, without Celery or the API: each is created
(params with ``retention_s``), leased (running), finished (succeeded, one output) and gets one
delivered webhook message with one attempt, as a real job's would. The real retention sweeper runs
beside them as a thread (its production code, interval ``--sweep-interval-s``). Redis ``used_memory``
is sampled every ``--sample-s``: it climbs for the first retention period and then stays flat while
jobs keep coming, because each sweep deletes as many as arrived a retention earlier.

Runs until ``--jobs`` were pushed or ``--max-s`` passed, whichever first (the report says which).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from bench.common import command_line, log, parser, summary, workdir, write_report


def _job(index: int, retention_s: int) -> Any:
    from broker.schema import Job, JobParams, new_job_id

    return Job(id=new_job_id(), tenant=f"tenant{index % 10}",
               params=JobParams(prompt="a purple sky over the harbour, golden hour", seed=index,
                                retention_s=retention_s))


def _push(store: Any, outbox: Any, job: Any) -> None:
    from broker.schema import JobStatus, Output

    now = time.time()
    store.create(job)
    store.transition(job.id, JobStatus.RUNNING, {"started_at": now, "lease_until": now + 60, "worker": "w0",
                                                 "attempts": 1})
    output = Output(key=f"tenants/{job.tenant}/jobs/{job.id}/outputs/0.png", content_type="image/png",
                    width=1024, height=1024, sha256="0" * 64, size_bytes=1_500_000)
    store.transition(job.id, JobStatus.SUCCEEDED, {"finished_at": time.time(), "outputs": [output.model_dump()],
                                                    "lease_until": None}, from_=[JobStatus.RUNNING])
    message = f"{job.id}-completed"
    outbox.put(message, {"url": "https://hooks.example.invalid/editfarm", "body": "{}" * 400,
                         "tenant": job.tenant, "state": "delivered", "attempts": "1",
                         "created_at": repr(now), "finished_at": repr(time.time())}, job_id=job.id)
    outbox.record_attempt(message, {"attempt": 1, "at": now, "status_code": 200, "error": None,
                                    "duration_ms": 12.5})


def main(argv: list[str] | None = None) -> int:
    p = parser("retention", __doc__)
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=500.0, help="jobs pushed per second (at most)")
    p.add_argument("--retention-s", type=int, default=60)
    p.add_argument("--sweep-interval-s", type=float, default=2.0)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--max-s", type=float, default=360.0, help="stop pushing after this long")
    args = p.parse_args(argv)
    if args.quick:
        args.jobs, args.rate, args.retention_s, args.sample_s, args.max_s = 600, 100.0, 2, 0.5, 10.0
        args.sweep_interval_s = 0.5

    import redis

    from broker.jobstore import RedisJobStore
    from broker.outbox import OutboxRecords
    from broker.retention import RetentionIndex
    from cli.localservices import start_redis
    from workers.sweeper import RetentionSweeper

    server = start_redis(workdir=workdir(args.workdir, "retention") / "redis", appendonly=False)
    try:
        client = redis.Redis(port=server.port)
        store, outbox, index = RedisJobStore(client), OutboxRecords(client), RetentionIndex(client)
        sweeper = RetentionSweeper(store=store, index=index, interval_s=args.sweep_interval_s)
        sweeps: list[float] = []

        def sweep_loop() -> None:  # the sweeper's own loop, timed
            while not stop.wait(args.sweep_interval_s):
                started = time.perf_counter()
                sweeper.sweep()
                sweeps.append(time.perf_counter() - started)

        stop = threading.Event()
        thread = threading.Thread(target=sweep_loop, daemon=True)
        baseline = int(client.info("memory")["used_memory"])
        samples: list[dict[str, Any]] = []
        started = time.monotonic()
        next_sample = 0.0
        pushed = 0
        thread.start()
        log(f"pushing up to {args.jobs} jobs at {args.rate}/s, retention {args.retention_s} s")
        while pushed < args.jobs:
            elapsed = time.monotonic() - started
            if elapsed >= args.max_s:
                break
            if elapsed >= next_sample:
                memory = int(client.info("memory")["used_memory"])
                samples.append({"t": round(elapsed, 1), "pushed": pushed, "in_redis": index.size(),
                                "keys": int(client.dbsize()), "used_memory_mib": round(memory / 2**20, 2)})
                log(f"t={elapsed:6.1f}s pushed={pushed} terminal in redis={samples[-1]['in_redis']} "
                    f"used_memory={samples[-1]['used_memory_mib']} MiB")
                next_sample += args.sample_s
            ahead = pushed / args.rate - elapsed
            if ahead > 0:
                time.sleep(min(ahead, 0.05))
                continue
            _push(store, outbox, _job(pushed, args.retention_s))
            pushed += 1
        push_s = time.monotonic() - started
        stop.set()
        thread.join()
        final = int(client.info("memory")["used_memory"])
        # flat: the samples taken after the first retention period plus two sweeps
        settle_s = args.retention_s + 2 * args.sweep_interval_s + args.sample_s
        steady = [s for s in samples if s["t"] >= settle_s]
        steady_mib = [s["used_memory_mib"] for s in steady]
        for sample in steady:
            # what retention should leave: the jobs pushed within the last retention period (the push
            # rate follows the machine's load, so the flat line is memory per retained job)
            window_start = max((o for o in samples if o["t"] <= sample["t"] - args.retention_s),
                               key=lambda o: o["t"], default=samples[0])
            sample["pushed_in_last_retention"] = sample["pushed"] - window_start["pushed"]
            if sample["in_redis"]:
                sample["bytes_per_job_in_redis"] = round(
                    (sample["used_memory_mib"] * 2**20 - baseline) / sample["in_redis"])
        per_job_steady = [s["bytes_per_job_in_redis"] for s in steady if "bytes_per_job_in_redis" in s]
        per_job = None
        first = [s for s in samples if 0 < s["t"] <= args.retention_s and s["pushed"]]
        if first:
            last = first[-1]
            per_job = round((last["used_memory_mib"] * 2**20 - baseline) / last["pushed"])
        report = {
            "settings": {"jobs": args.jobs, "rate": args.rate, "retention_s": args.retention_s,
                         "sweep_interval_s": args.sweep_interval_s, "sample_s": args.sample_s, "max_s": args.max_s},
            "pushed": pushed,
            "stopped_by": "jobs" if pushed >= args.jobs else "max_s",
            "push_s": round(push_s, 1),
            "jobs_per_s": round(pushed / push_s, 1) if push_s else None,
            "baseline_used_memory_mib": round(baseline / 2**20, 2),
            "bytes_per_retained_job": per_job,
            "steady": {
                "from_s": settle_s,
                "used_memory_mib_min": min(steady_mib) if steady_mib else None,
                "used_memory_mib_max": max(steady_mib) if steady_mib else None,
                "in_redis_max": max((s["in_redis"] for s in steady), default=None),
                "bytes_per_job_in_redis_min": min(per_job_steady, default=None),
                "bytes_per_job_in_redis_max": max(per_job_steady, default=None),
                # > 1: the sweeper lags behind (jobs stay longer than their retention + a sweep)
                "in_redis_over_last_retention_max": max(
                    (round(s["in_redis"] / s["pushed_in_last_retention"], 3) for s in steady
                     if s["pushed_in_last_retention"]), default=None),
            },
            "end_used_memory_mib": round(final / 2**20, 2),
            "without_retention_mib_estimate": (round((baseline + pushed * per_job) / 2**20, 1)
                                               if per_job else None),
            "sweep_s": summary(sweeps, digits=4),
            "samples": samples,
        }
        write_report("retention", report, args.out, args.quick, command_line())
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
