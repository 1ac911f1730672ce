"""Shared pieces of the benchmarks: statistics, reports, a stand-in cluster, a webhook receiver.

Every benchmark prints its figures and writes one JSON report (``--out``, default
``bench/results/<name>.json``). Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# The render worker's two ways of running jobs, set through its own settings (workers/pipelining.py):
# serial: fetch, render, encode, upload, one job after the other; pipelined (the default): the next job
# is taken and its inputs fetched, and the last one encoded and uploaded, while the current job renders.
RUNNER_ENV = {
    "serial": {"EDITFARM_RENDER_LANE": "false", "EDITFARM_FINISH_IN_BACKGROUND": "false"},
    "pipelined": {"EDITFARM_RENDER_LANE": "true", "EDITFARM_FINISH_IN_BACKGROUND": "true"},
}

if str(ROOT) not in sys.path:  # `python bench/<name>.py` as well as `python -m bench.<name>`
    sys.path.insert(0, str(ROOT))

from editfarm_testing.webhooks import TERMINAL_TYPES, WebhookReceiver  # noqa: E402 - after the sys.path line above

# -- statistics ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    rank = (len(data) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return float(data[low] + (data[high] - data[low]) * (rank - low))


def summary(values: Iterable[float], scale: float = 1.0, digits: int = 3) -> dict[str, float | int]:
    """n, p50, p90, p99, min, max, mean of ``values`` times ``scale`` (e.g. 1000 for s → ms)."""
    data = [v * scale for v in values]
    if not data:
        return {"n": 0}
    return {"n": len(data), "p50": round(percentile(data, 50), digits), "p90": round(percentile(data, 90), digits),
            "p99": round(percentile(data, 99), digits), "min": round(min(data), digits),
            "max": round(max(data), digits), "mean": round(sum(data) / len(data), digits)}


def median(values: Iterable[float]) -> float:
    return percentile(list(values), 50)


def ratio(a: float, b: float, digits: int = 3) -> float | None:
    return round(a / b, digits) if b else None


# -- reports ---------------------------------------------------------------------------------------


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run that only proves the benchmark works")
    p.add_argument("--out", default=str(RESULTS / f"{name}.json"), help="where the JSON report goes")
    p.add_argument("--workdir", default="", help="scratch folder (default: a temporary one)")
    p.add_argument("--note", default="", help="a word on the run's conditions, kept in the report's environment")
    return p


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "machine": platform.machine(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def write_report(name: str, report: dict[str, Any], out: str, quick: bool, command: str) -> dict[str, Any]:
    """Print ``report`` as JSON and write it to ``out`` (with the benchmark name, command and machine)."""
    env = environment()
    note = _note()
    if note:
        env["note"] = note
    full = {"benchmark": name, "quick": quick, "command": command, "measured_at": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "environment": env, **report}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(full, indent=2, default=str) + "\n")
    print(json.dumps(full, indent=2, default=str))
    print(f"# written to {path}", file=sys.stderr)
    import shutil

    for scratch in _SCRATCH:
        shutil.rmtree(scratch, ignore_errors=True)
    return full


def _note() -> str:
    """``--note`` of this run's command line, if any (every benchmark's parser takes it)."""
    argv = sys.argv[1:]
    for index, arg in enumerate(argv):
        if arg.startswith("--note="):
            return arg.split("=", 1)[1]
        if arg == "--note" and index + 1 < len(argv):
            return argv[index + 1]
    return ""


def command_line() -> str:
    """How this benchmark was run (``--note`` left out: it is in the report's environment)."""
    module = Path(sys.argv[0]).stem
    argv, kept = sys.argv[1:], []
    skip = False
    for arg in argv:
        if skip or arg.startswith("--note="):
            skip = False
            continue
        if arg == "--note":
            skip = True
            continue
        kept.append(arg)
    return " ".join([f"python -m bench.{module}", *kept])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


_SCRATCH: list[Path] = []


def workdir(arg: str, name: str) -> Path:
    """``--workdir`` if given (kept), else a temporary folder removed once the report is written
    (a failed run leaves it, with its logs)."""
    if arg:
        path = Path(arg)
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = Path(tempfile.mkdtemp(prefix=f"editfarm-bench-{name}-"))
    _SCRATCH.append(path)
    return path


# -- inputs ----------------------------------------------------------------------------------------


def png(size: tuple[int, int] = (1, 1), noise: bool = False, seed: int = 0) -> bytes:
    """A PNG: 1x1 grey (the smallest valid input) or ``size`` of noise (encodes like a photo or worse)."""
    from PIL import Image

    if noise:
        import numpy as np

        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
    else:
        image = Image.new("RGB", size, (128, 128, 128))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def has_generate() -> bool:
    """Whether this tree's job schema has the text-to-image operation (no input image)."""
    from broker.schema import Operation

    return hasattr(Operation, "GENERATE")


def job_body(operation: str = "auto", steps: int = 2, seed: int | None = None, webhook: str | None = None,
             image: bytes | None = None, **extra: Any) -> dict[str, Any]:
    """A valid POST /v1/jobs body: ``generate`` when the schema has it (``auto``), else an edit of
    ``image`` (default: the smallest valid PNG)."""
    if operation == "auto":
        operation = "generate" if has_generate() and image is None else "edit"
    body: dict[str, Any] = {"operation": operation, "prompt": "make the sky purple", "steps": steps, **extra}
    if operation != "generate":
        body["image"] = data_url(image if image is not None else png())
    if seed is not None:
        body["seed"] = seed
    if webhook:
        body["webhook"] = webhook
    return body


# -- processes -------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def tree_pids(pid: int) -> list[int]:
    import psutil

    try:
        parent = psutil.Process(pid)
        return [pid, *(c.pid for c in parent.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """SIGTERM the process group we started (start_new_session=True), SIGKILL after ``timeout_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def write_standin_catalog(path: Path, names: Sequence[str]) -> Path:
    """A model catalog (``EDITFARM_MODELS_FILE``) of ``names``, each serving generate and edit, the first
    the default for both. Their sources point nowhere: the stand-in loads no model."""
    lines = ["models:"]
    for index, name in enumerate(names):
        lines += [f"  - name: {name}", f"    source: /nowhere/{name}", "    pipeline: QwenImageEditPipeline",
                  "    operations: [generate, edit]"]
        if index == 0:
            lines.append("    default_for: [generate, edit]")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


class BenchCluster:
    """A LocalCluster whose render workers run the stand-in; ``timed=True`` uses the bench-only
    :class:`bench.timed_standin.TimedStandinRenderer`, which logs each render's start/end.
    ``redis_url``: an outside Redis (None: the cluster starts its own). ``models_file``: a catalog (see
    :func:`write_standin_catalog`) instead of the one model; its workers are started per model
    (``cluster.start_render_worker(index, model=...)``)."""

    def __init__(self, workdir: Path, render_workers: int = 1, render_s: float = 0.0, timed: bool = False,
                 output_side: int = 0, model: str = "standin", extra_env: dict[str, str] | None = None,
                 webhook_worker: bool = True, api_app: str = "api.app:create_app",
                 webhook_app: str = "workers.celery_worker:app", s3_server: str = "seaweedfs",
                 redis_url: str | None = None, models_file: Path | None = None) -> None:
        from cli.cluster import ClusterConfig, LocalCluster

        self.render_log = workdir / "render-intervals"
        # per-tenant submission limits: never refuse a benchmark's jobs, but still run the checks
        env = {"EDITFARM_LEASE_S": "60", "EDITFARM_HEARTBEAT_INTERVAL_S": "10",
               "EDITFARM_RATE_LIMIT_PER_MIN": "1000000000", "EDITFARM_MAX_JOBS_IN_FLIGHT": "1000000000",
               **(extra_env or {})}
        if model == "standin":
            env.update({"EDITFARM_RENDERER": "standin", "EDITFARM_STANDIN_RENDER_S": repr(render_s)})
        if timed:
            self.render_log.mkdir(parents=True, exist_ok=True)
            env.update({"EDITFARM_BENCH_RENDER_LOG": str(self.render_log),
                        "EDITFARM_BENCH_OUTPUT_SIDE": str(output_side)})
        config = ClusterConfig(workdir=workdir, model=None if models_file else model, models_file=models_file,
                               render_workers=render_workers, extra_env=env, s3_server=s3_server,
                               redis_url=redis_url)
        timed_app = timed
        with_webhooks = webhook_worker

        class _Cluster(LocalCluster):
            """LocalCluster's own command lines, with the bench apps swapped in where asked."""

            def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> None:
                if name.startswith("render") and timed_app:
                    args = ["bench.timed_worker:app" if a == "workers.celery_worker:app" else a for a in args]
                elif name == "webhooks":
                    args = [webhook_app if a == "workers.celery_worker:app" else a for a in args]
                elif name == "api":
                    args = [api_app if a == "api.app:create_app" else a for a in args]
                super()._spawn(name, args, extra_env)

            def start_webhook_worker(self) -> None:
                if with_webhooks:
                    super().start_webhook_worker()

        self.cluster = _Cluster(config)

    def __enter__(self) -> Self:
        self.cluster.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cluster.stop()

    def render_intervals(self) -> list[dict[str, Any]]:
        """Render start/end (epoch s) as logged by the timed stand-in, sorted by start."""
        rows = []
        for path in self.render_log.glob("[0-9]*[0-9].jsonl"):
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return sorted(rows, key=lambda r: r["start"])

    def task_intervals(self) -> list[dict[str, Any]]:
        """Each render task's entry/return (epoch s), logged by bench.timed_worker, sorted by entry."""
        rows = []
        for path in self.render_log.glob("*.tasks.jsonl"):
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return sorted(rows, key=lambda r: r["entered"])


# -- webhooks --------------------------------------------------------------------------------------


class TimedReceiver(WebhookReceiver):
    """A webhook receiver on 127.0.0.1 (keep-alive) that tells when a job's terminal webhook arrived."""

    def __init__(self) -> None:
        super().__init__(keep_alive=True, path="/hooks/bench")

    def wait_for(self, job_id: str, timeout_s: float = 30) -> tuple[float, float]:
        """(perf_counter, epoch) at which ``job_id``'s terminal webhook arrived (others are skipped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no webhook for {job_id} within {timeout_s} s")
            delivery = self.received.get(timeout=left)
            try:
                payload = json.loads(delivery.body)
                got, kind = payload["data"]["id"], payload["type"]
            except (ValueError, KeyError, TypeError):
                continue  # not a job's webhook (the benchmark's own plain POSTs)
            if got == job_id and kind in TERMINAL_TYPES:
                return delivery.perf_s, delivery.at_s


def wait_jobs_done(redis_url: str, job_ids: Sequence[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Poll the job records until every job is terminal; returns id → {status, created_at, started_at, finished_at}."""
    import redis

    from broker import keys

    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    fields = ("status", "created_at", "started_at", "finished_at", "worker")
    done: dict[str, dict[str, Any]] = {}
    pending = list(job_ids)
    while pending and time.monotonic() < deadline:
        pipe = client.pipeline(transaction=False)
        for job_id in pending:
            pipe.hmget(keys.job(job_id), fields)
        for job_id, values in zip(pending, pipe.execute(), strict=True):
            row = {k: (json.loads(v) if v is not None else None) for k, v in zip(fields, values, strict=True)}
            if row["status"] in ("succeeded", "failed", "canceled"):
                done[job_id] = row
        pending = [j for j in pending if j not in done]
        if pending:
            time.sleep(0.05)
    client.close()
    if pending:
        raise TimeoutError(f"{len(pending)} of {len(job_ids)} jobs not finished within {timeout_s} s")
    return done
