"""Soak: thousands of jobs through a whole local cluster with the zero-cost render stand-in.

    python -m bench.soak --jobs 3000            # the full run (docs/reliability.md)
    python -m bench.soak --fleet --jobs 300     # the short run tests/test_faults.py makes

Starts a LocalCluster (Redis with AOF, moto's S3 server, the API, ``--workers`` render
workers with ``EDITFARM_RENDERER=standin``, the webhook worker) and a webhook receiver,
submits ``--jobs`` edit jobs from ``--concurrency`` client threads, each with a webhook, and
waits until every accepted job ended. Then it checks each job: succeeded, its output object
in the bucket, exactly one terminal webhook, started once. ``--fleet``: the two-model catalog
of editfarm_testing/catalog.py instead of the one model, the workers split into a pool per
model, every other job a ``generate`` naming ``qwen-image`` (the rest edits on the default).

Prints the figures and writes them as JSON (``--out``): submitted, succeeded, lost (accepted
but not succeeded, or succeeded without its object, or without a terminal webhook),
duplicated (started more than once, or more than one terminal webhook), throughput, latency,
and the RSS of the API and of each worker (process tree), sampled every ``--sample-s``
seconds, with start (after a warm-up), end and max. Exit status 1 if any job was lost or
duplicated.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/soak.py` as well as `python -m bench.soak`
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402 - after the sys.path line above
import redis  # noqa: E402 - after the sys.path line above

from broker import keys  # noqa: E402 - after the sys.path line above
from cli.cluster import ClusterConfig, LocalCluster  # noqa: E402 - after the sys.path line above
from editfarm_testing.catalog import TEXT_TO_IMAGE_MODEL, fleet_catalog  # noqa: E402 - after the sys.path line above
from editfarm_testing.webhooks import Delivery, WebhookReceiver  # noqa: E402 - after the sys.path line above

TERMINAL = ("succeeded", "failed", "canceled")
TERMINAL_TYPES = ("job.succeeded", "job.failed", "job.canceled")


# -- memory ----------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        kids = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                kids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return kids + [g for k in kids for g in _children(k)]
    except Exception:  # noqa: BLE001 - the process is gone
        return []


def _rss_bytes(pid: int) -> int:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0
    except Exception:  # noqa: BLE001 - the process is gone
        return 0


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (a Celery worker and its pool child), MiB."""
    return round(sum(_rss_bytes(p) for p in [pid, *_children(pid)]) / 2**20, 1)


class Sampler:
    """Samples the RSS of the cluster's processes every ``interval_s`` seconds in a thread."""

    def __init__(self, cluster: LocalCluster, interval_s: float) -> None:
        self.cluster, self.interval_s = cluster, interval_s
        self.samples: list[dict[str, float]] = []
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def roles(self) -> dict[str, int]:
        pids = {name: proc.pid for name, proc in self.cluster.procs.items()}
        if self.cluster.redis is not None:
            pids["redis"] = self.cluster.redis.proc.pid
        if self.cluster.s3 is not None:
            pids["s3"] = self.cluster.s3.proc.pid
        return pids

    def sample(self) -> dict[str, float]:
        row = {"t": round(time.monotonic() - self._t0, 2)}
        row.update({role: tree_rss_mb(pid) for role, pid in self.roles().items()})
        self.samples.append(row)
        return row

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def summary(self, since_t: float) -> dict[str, dict[str, float]]:
        rows = [r for r in self.samples if r["t"] >= since_t] or self.samples
        out = {}
        for role in rows[0]:
            if role == "t":
                continue
            values = [r[role] for r in rows if role in r]
            out[role] = {"start": values[0], "end": values[-1], "max": max(values),
                         "growth": round(values[-1] - values[0], 1)}
        return out


# -- webhooks --------------------------------------------------------------------------------------


class Receiver(WebhookReceiver):
    """Counts terminal webhooks (and their ids) per job; answers 204 on kept-alive connections."""

    def __init__(self) -> None:
        self.terminal: dict[str, list[str]] = {}
        super().__init__(keep_alive=True, path="/hooks/soak")

    def accepted(self, delivery: Delivery) -> None:
        try:
            payload = json.loads(delivery.body)
            if payload["type"] in TERMINAL_TYPES:
                with self.lock:
                    self.terminal.setdefault(payload["data"]["id"], []).append(delivery.headers.get("webhook-id", ""))
        except (ValueError, KeyError, TypeError):
            pass

    def count(self) -> int:
        with self.lock:
            return len(self.terminal)


# -- the run ---------------------------------------------------------------------------------------


def _png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (40, 90, 160)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    data = sorted(values)
    k = (len(data) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(data) - 1)
    return round(data[lo] + (data[hi] - data[lo]) * (k - lo), 3)


def _job_rows(client: redis.Redis, job_ids: list[str], fields: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for start in range(0, len(job_ids), 500):
        chunk = job_ids[start:start + 500]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(keys.job(job_id), fields)
        for job_id, values in zip(chunk, pipe.execute(), strict=True):
            rows[job_id] = {f: (json.loads(v) if v is not None else None) for f, v in zip(fields, values, strict=True)}
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="editfarm-soak-"))
    tenant_key = "ef_soak_" + os.urandom(12).hex()
    env = {"EDITFARM_RENDERER": "standin", "EDITFARM_STANDIN_RENDER_S": repr(args.render_s),
           # the soak measures loss and duplication, not the per-tenant limits: both off
           "EDITFARM_RATE_LIMIT_PER_MIN": "0", "EDITFARM_MAX_JOBS_IN_FLIGHT": "0"}
    if args.fleet:  # a stand-in pool per model (it loads nothing: any source), at least one worker each
        edit_workers = max(1, args.workers - args.workers // 2)
        pools = fleet_catalog(workdir, edit_source="/nowhere/standin", edit_workers=edit_workers,
                              text_to_image_workers=max(1, args.workers // 2))
        config = ClusterConfig(workdir=workdir, api_keys=f"soak:{tenant_key}", extra_env=env, **pools)
    else:
        config = ClusterConfig(workdir=workdir, model="standin", render_workers=args.workers,
                               api_keys=f"soak:{tenant_key}", extra_env=env)
    headers = {"Authorization": f"Bearer {tenant_key}"}
    run_id = os.urandom(4).hex()
    image = _png()
    _log(f"starting a cluster in {workdir} ({args.workers} stand-in render workers)")
    with LocalCluster(config) as cluster, Receiver() as receiver:
        store = redis.Redis.from_url(cluster.redis_url)
        sampler = Sampler(cluster, args.sample_s)
        sampler.start()
        local = threading.local()

        retried = Counter[str]()

        def post(seed: int) -> str | None:
            """Submit like a careful client: one Idempotency-Key per job, retries on 429/503/network errors."""
            client = getattr(local, "client", None)
            if client is None:
                client = local.client = httpx.Client(timeout=60)
            body: dict[str, Any] = {"operation": "edit", "prompt": "soak", "image": image, "seed": seed,
                                    "steps": args.steps, "webhook": receiver.url}
            if args.fleet and seed % 2:  # the other pool's model, named
                body = {"operation": "generate", "prompt": "soak", "seed": seed, "steps": args.steps,
                        "width": 64, "height": 48, "model": TEXT_TO_IMAGE_MODEL, "webhook": receiver.url}
            for attempt in range(20):
                try:
                    response = client.post(f"{cluster.api_url}/v1/jobs", json=body,
                                           headers={**headers, "Idempotency-Key": f"soak-{run_id}-{seed}"})
                except httpx.HTTPError as exc:
                    retried[type(exc).__name__] += 1
                    time.sleep(min(5.0, 0.2 * 2 ** attempt))
                    continue
                if response.status_code == 202:
                    return str(response.json()["id"])
                if response.status_code not in (429, 503):
                    _log(f"submission refused: {response.status_code} {response.text[:200]}")
                    return None
                retried[str(response.status_code)] += 1
                time.sleep(min(5.0, float(response.headers.get("retry-after") or 0.2 * 2 ** attempt)))
            return None

        def submit_all(count: int, offset: int) -> tuple[list[str], int]:
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(post, range(offset, offset + count)))
            return [r for r in results if r], sum(1 for r in results if not r)

        def wait_done(job_ids: list[str], timeout_s: float) -> None:
            deadline = time.monotonic() + timeout_s
            pending = list(job_ids)
            while pending and time.monotonic() < deadline:
                rows = _job_rows(store, pending, ("status",))
                pending = [j for j in pending if rows[j]["status"] not in TERMINAL]
                if pending:
                    time.sleep(0.25)

        # warm-up: every process has served a few jobs before memory is measured from
        warm, _ = submit_all(args.warmup, 10**6)
        wait_done(warm, 120)
        warm_t = sampler.sample()["t"]
        _log(f"warm ({len(warm)} jobs); submitting {args.jobs} jobs from {args.concurrency} threads")

        began = time.time()
        accepted: list[str] = []
        rejected = 0
        progress_every = max(1, args.jobs // 10)
        for start in range(0, args.jobs, progress_every):
            ids, bad = submit_all(min(progress_every, args.jobs - start), start)
            accepted += ids
            rejected += bad
            done = sum(1 for r in _job_rows(store, accepted, ("status",)).values() if r["status"] in TERMINAL)
            _log(f"submitted {len(accepted)} (rejected {rejected}), finished {done}")
        submitted_s = time.time() - began
        wait_done(accepted, args.timeout_s)
        ended = time.time()
        # every terminal webhook, then a moment for any duplicate
        deadline = time.monotonic() + 60
        while receiver.count() < len(accepted) + len(warm) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(args.settle_s)
        sampler.stop()

        rows = _job_rows(store, accepted, ("status", "attempts", "outputs", "created_at", "finished_at", "error",
                                           "params"))
        import boto3

        s3 = boto3.client("s3", endpoint_url=cluster.s3_url, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
        stored: set[str] = set()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="editfarm", Prefix="tenants/soak/"):
            stored.update(o["Key"] for o in page.get("Contents", []))

    statuses = Counter(str(r["status"]) for r in rows.values())
    lost, duplicated, problems = [], [], []
    for job_id, row in rows.items():
        hooks = receiver.terminal.get(job_id, [])
        outputs = row["outputs"] or []
        if row["status"] != "succeeded":
            lost.append(job_id)
            problems.append(f"{job_id}: {row['status']} {row['error']}")
        elif not outputs or any(o["key"] not in stored for o in outputs):
            lost.append(job_id)
            problems.append(f"{job_id}: succeeded without its object")
        elif not hooks:
            lost.append(job_id)
            problems.append(f"{job_id}: no terminal webhook")
        if (row["attempts"] or 0) > 1 or len(hooks) > 1:
            duplicated.append(job_id)
            problems.append(f"{job_id}: attempts {row['attempts']}, terminal webhooks {len(hooks)}")
    finished = [r["finished_at"] for r in rows.values() if r["finished_at"]]
    last = max(finished) if finished else ended
    latencies = [r["finished_at"] - r["created_at"] for r in rows.values() if r["finished_at"] and r["created_at"]]
    report: dict[str, Any] = {
        "benchmark": "soak",
        "command": " ".join(["python -m bench.soak", *sys.argv[1:]]),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"jobs": args.jobs, "workers": args.workers, "concurrency": args.concurrency,
                     "render_s": args.render_s, "steps": args.steps, "warmup": args.warmup, "fleet": args.fleet},
        "submitted": len(accepted),
        "rejected": rejected,
        "submit_retries": dict(retried),
        "succeeded": statuses.get("succeeded", 0),
        "succeeded_per_model": dict(Counter(str((r["params"] or {}).get("model")) for r in rows.values()
                                            if r["status"] == "succeeded")),
        "statuses": dict(statuses),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "attempts": {str(k): v for k, v in sorted(Counter(int(r["attempts"] or 0) for r in rows.values()).items())},
        "terminal_webhooks": sum(len(receiver.terminal.get(j, [])) for j in accepted),
        "submit_s": round(submitted_s, 1),
        "wall_s": round(last - began, 1),
        "throughput_jobs_per_s": round(len(finished) / (last - began), 1) if last > began else None,
        "latency_s": {"p50": _percentile(latencies, 50), "p95": _percentile(latencies, 95),
                      "p99": _percentile(latencies, 99), "max": _percentile(latencies, 100)},
        "rss_mb": {role: v for role, v in sampler.summary(warm_t).items() if role not in ("redis", "s3")},
        "rss_mb_services": {role: v for role, v in sampler.summary(warm_t).items() if role in ("redis", "s3")},
        "rss_samples": sampler.samples,
        "problems": problems[:50],
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2, help="render workers (stand-in)")
    parser.add_argument("--fleet", action="store_true",
                        help="the two-model catalog, a pool per model (the workers split), half the jobs each")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads submitting")
    parser.add_argument("--render-s", type=float, default=0.0, help="stand-in render time per job (s)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=20, help="jobs before memory is measured")
    parser.add_argument("--sample-s", type=float, default=1.0, help="RSS sampling interval (s)")
    parser.add_argument("--settle-s", type=float, default=2.0, help="wait for duplicate webhooks (s)")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="for every job to end (s)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    parser.add_argument("--workdir", default="")
    args = parser.parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    brief = {k: v for k, v in report.items() if k not in ("rss_samples",)}
    print(json.dumps(brief, indent=2))
    print(f"# written to {out}", file=sys.stderr)
    return 1 if report["lost"] or report["duplicated"] or not report["submitted"] else 0


if __name__ == "__main__":
    sys.exit(main())
