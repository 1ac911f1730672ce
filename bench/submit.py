"""Submission throughput: ``POST /v1/jobs`` against a bare endpoint doing the same Redis writes.

    python -m bench.submit                # full run (~8 min on 2 cores)
    python -m bench.submit --quick        # one short round (smoke)
    python -m bench.submit --mode edit    # edit jobs carrying a 1024x1024 PNG as a data URL

Starts Redis (AOF, like the local cluster) and the S3 server (SeaweedFS) once; then, for each
server setting, starts the API (``uvicorn --factory api.app:create_app``) or the bare
endpoint (``bench.bare_api``) alone on a fresh database, warms it up for 2 s, and loads it
from a separate process (``wrk`` when installed, else ``bench.loadgen``) for ``--seconds``
with ``--connections`` keep-alive connections. Rounds are interleaved (api, bare, api, bare,
... per setting, ``--rounds`` times) so drift hits both alike; the report gives medians
over rounds, the ratio api/bare per setting, CPU per job of the app, Redis and S3 server
processes, and the app processes' peak RSS under load.

``--mode generate`` (the default) posts a ``generate`` job when ``broker.schema.Operation`` has it
(no input image), else an ``edit`` of the smallest valid PNG (1x1), in which case the API also
puts that image into S3 per request and the ``bare+s3`` variant does the same put.
``--mode edit`` posts an ``edit`` job whose image is a 1024x1024 photo-like PNG (~2 MB, a data URL
of ~2.7 MB) against ``bare+s3``, which base64-decodes it, checks it with Pillow's ``verify()``,
puts it into the same S3 server with boto3 and makes the same Redis writes (report:
``bench/results/submit-edit.json``).

Variants: ``api`` (the real ``POST /v1/jobs``), ``bare`` (``bench.bare_api``: only the same
Redis writes, async), ``bare-sync`` (the same writes with the blocking client in a thread; not in
--quick) and ``bare+s3`` (edit only: plus the image's base64 decode, ``verify()`` and S3 put).
``--settings`` picks server settings by name (comma-separated); ``--workers ""`` skips the
multi-process rows.

``--fleet`` (report: ``bench/results/submit-fleet.json``) asks whether a job's ``model`` costs
submission anything: ``api`` (the one-model cluster, ``EDITFARM_MODEL`` alone, as every other variant
runs), ``api-catalog`` (the same API with a catalog of two models, ``EDITFARM_MODELS_FILE``, the jobs
naming no model: the catalog's default takes them) and ``api-model`` (that catalog, every job naming
its second model), in interleaved rounds at the fastest setting, 1 process; then the same three
apps in one process, called as ASGI applications in alternated blocks (``bench/submit_inproc.py``,
``--blocks``; report ``in_process``): their CPU per job, which a shared machine's other work moves
far less than a server's throughput. ``model_field`` gives the ratios, over the medians and round
by round, and the goal (naming a model costs at most 5 %), judged on the in-process CPU per job.
Every variant of the API runs with ``EDITFARM_MODEL`` set (a one-model catalog; the API loads no
weights), the catalog variants with ``EDITFARM_MODELS_FILE`` instead.

Settings compared at 1 process: uvicorn's h11 + asyncio with log level info and the access
log (how ``editfarm api`` runs today: the project does not depend on uvloop/httptools), the
same with ``--no-access-log --log-level warning``, and httptools + uvloop without the access
log (when installed); then the last one at ``--workers`` 2 and 3.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    command_line,
    job_body,
    log,
    median,
    parser,
    ratio,
    stop_group,
    tree_pids,
    workdir,
    write_report,
    write_standin_catalog,
)

API_KEY = "ef_bench_key_0123456789abcdef"
# per-tenant submission limits: high enough never to refuse a benchmark's jobs, non-zero so the
# checks still run on every request as they do in production
LIMITS_NEVER_REFUSE = {"EDITFARM_RATE_LIMIT_PER_MIN": "1000000000", "EDITFARM_MAX_JOBS_IN_FLIGHT": "1000000000"}
APPS = {"api": "api.app:create_app", "bare": "bench.bare_api:create_app"}
# variant → (app, path)
VARIANTS = {"api": ("api", "/v1/jobs"), "bare": ("bare", "/v1/jobs"), "bare+s3": ("bare", "/v1/jobs"),
            "bare-sync": ("bare", "/v1/jobs"), "api-dynamic-malloc": ("api", "/v1/jobs"),
            "api-uploads-4": ("api", "/v1/jobs"), "api-catalog": ("api", "/v1/jobs"), "api-model": ("api", "/v1/jobs")}
# the API with a catalog of these two models (EDITFARM_MODELS_FILE) instead of EDITFARM_MODEL alone;
# api-model's jobs name the second one (the first is the default that takes api-catalog's)
CATALOG_VARIANTS = ("api-catalog", "api-model")
CATALOG_MODELS = ("t2i", "t2i-lightning")
# what the one-model variants run with: EDITFARM_MODEL alone (the API reads no weights)
ONE_MODEL = "/nowhere/qwen-image-edit"
# variant → settings of its app beyond the services' (api-dynamic-malloc: glibc's own mmap threshold, which
# keeps freed upload buffers in the heap: what the API's memory bound costs an upload in page faults)
# api-uploads-4: 4 upload slots (3 for one tenant) instead of 2 (1): what the slots cost one busy tenant
VARIANT_ENV = {"api-dynamic-malloc": {"EDITFARM_MALLOC_MMAP_THRESHOLD_BYTES": "0"},
               "api-uploads-4": {"EDITFARM_MAX_CONCURRENT_UPLOADS": "4"}}


def have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def server_settings() -> list[dict[str, Any]]:
    # the first is how `editfarm api` / `python -m api` run today without uvloop/httptools installed
    # (the project does not depend on them): uvicorn's defaults, log level info, access log on
    rows = [{"name": "h11+asyncio,access-log", "args": ["--loop", "asyncio", "--http", "h11", "--log-level", "info"]},
            {"name": "h11+asyncio,no-access-log",
             "args": ["--loop", "asyncio", "--http", "h11", "--no-access-log", "--log-level", "warning"]}]
    if have("uvloop") and have("httptools"):
        rows.append({"name": "httptools+uvloop,no-access-log",
                     "args": ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]})
    return rows


class Services:
    def __init__(self, root: Path) -> None:
        from cli.localservices import start_redis, start_s3

        self.redis = start_redis(workdir=root / "redis", log=root / "redis.log")
        self.s3 = start_s3(log=root / "s3.log", workdir=root / "s3", bucket="editfarm")
        self.redis_url = f"redis://127.0.0.1:{self.redis.port}/0"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDITFARM_")}
        env.update({"EDITFARM_REDIS_URL": self.redis_url, "EDITFARM_S3_ENDPOINT_URL": self.s3.url,
                    "EDITFARM_S3_BUCKET": "editfarm", "EDITFARM_S3_ACCESS_KEY_ID": "test",
                    "EDITFARM_S3_SECRET_ACCESS_KEY": "test", "EDITFARM_API_KEYS": f"bench:{API_KEY}",
                    "EDITFARM_ALLOW_PRIVATE_URLS": "true", "EDITFARM_ALLOW_HTTP_URLS": "true",
                    "EDITFARM_MODEL": ONE_MODEL, **LIMITS_NEVER_REFUSE})
        return env

    def flush(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        client.flushdb()
        client.close()

    def stop(self) -> None:
        self.s3.stop()
        self.redis.stop()


def start_app(services: Services, app: str, args: list[str], workers: int, port: int, log_path: Path,
              extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
    import httpx

    cmd = [sys.executable, "-m", "uvicorn", "--factory", APPS[app], "--host", "127.0.0.1", "--port", str(port),
           *args]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    with open(log_path, "ab") as log_file:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, env={**services.env(), **extra_env}, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{app} exited: see {log_path}")
        try:
            # with --workers every child must be up: wait until the count of children is reached
            if (httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
                    and (workers == 1 or len(tree_pids(proc.pid)) >= workers + 1)):
                time.sleep(0.3 if workers == 1 else 1.5)
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_group(proc)
    raise TimeoutError(f"{app} not ready")


WRK_SCRIPT = """wrk.method = "POST"
wrk.body = io.open("{body}", "rb"):read()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def load(url: str, body_file: Path, seconds: float, connections: int, tool: str) -> dict[str, Any]:
    """Run the load generator in its own process; returns requests/s, statuses and latency (ms)."""
    if tool == "wrk":
        script = body_file.with_suffix(".lua")
        script.write_text(WRK_SCRIPT.format(body=body_file, key=API_KEY))
        seconds = max(1, round(seconds))  # wrk takes whole seconds
        out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "--latency", "-s", str(script),
                              url], capture_output=True, text=True, timeout=seconds + 60, check=False).stdout
        if "Requests/sec" not in out:
            raise RuntimeError(f"wrk failed: {out}")
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors = re.search(r"Socket errors: (.*)", out)
        lat = {}
        for q in ("50", "90", "99"):
            m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
            if m:
                lat[f"p{q}"] = round(float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)], 2)
        return {"loadgen": "wrk -t1", "connections": connections, "duration_s": seconds, "requests": total,
                "requests_per_s": rps, "non_2xx": int(non2xx.group(1)) if non2xx else 0,
                "socket_errors": errors.group(1) if errors else None, "latency_ms": lat}
    proc = subprocess.run([sys.executable, "-m", "bench.loadgen", "--url", url, "--body-file", str(body_file),
                          "--header", "Content-Type: application/json", "--header", f"Authorization: Bearer {API_KEY}",
                          "--connections", str(connections), "--duration", str(seconds), "--warmup", "0"],
                         capture_output=True, text=True, timeout=seconds + 60, cwd=Path(__file__).parent.parent,
                         check=False)
    result: dict[str, Any] = json.loads(proc.stdout)
    statuses = result.get("statuses", {})
    result["non_2xx"] = sum(v for k, v in statuses.items() if not k.startswith("2"))
    return result


def cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class RssSampler:
    """Peak summed RSS (MB) of a process tree, sampled every 0.2 s in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_total, self.peak_each = pid, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            each = []
            for pid in tree_pids(self.pid):
                try:
                    each.append(psutil.Process(pid).memory_info().rss / 2**20)
                except psutil.NoSuchProcess:
                    pass
            if each:
                self.peak_total = max(self.peak_total, sum(each))
                self.peak_each = max(self.peak_each, max(each))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def photo_png(side_px: int = 1024) -> bytes:
    """A ``side_px``² PNG that compresses like a photo (smooth gradients plus sensor-like noise: ~2 MB at
    1024²), unlike flat grey (a few KB) or pure noise (3 MB, worse than any photo)."""
    import io

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side_px, 0:side_px]
    base = np.stack([(x / 4) % 256, (y / 4) % 256, ((x + y) / 8) % 256], axis=-1)
    noisy = base + np.random.default_rng(0).normal(0, 6, base.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def probe_body(services: Services, root: Path) -> dict[str, Any]:
    """``generate`` if this API accepts it (no input image), else an edit of the 1x1 PNG."""
    import httpx

    from cli.localservices import free_port

    port = free_port()
    proc = start_app(services, "api", [], 1, port, root / "probe.log", {})
    try:
        for operation in ("generate", "edit"):
            body = job_body(operation, steps=2)
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json=body,
                                headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
            if answer.status_code == 202:
                return body
            log(f"{operation} submission answered {answer.status_code}: {answer.text[:200]}")
    finally:
        stop_group(proc)
    raise RuntimeError("the API accepted neither a generate nor an edit job")


def model_body(body_file: Path) -> Path:
    """The body of ``body_file`` naming the catalog's second model (written once, beside it)."""
    path = body_file.with_name("body-model.json")
    if not path.exists():
        path.write_text(json.dumps({**json.loads(body_file.read_text()), "model": CATALOG_MODELS[1]}))
    return path


def in_process_run(services: Services, root: Path, body_file: Path, blocks: int) -> dict[str, Any]:
    """``bench.submit_inproc``'s figures: the three fleet variants' CPU per job inside one process."""
    services.flush()
    cmd = [sys.executable, "-m", "bench.submit_inproc", "--body-file", str(body_file), "--catalog",
           str(root / "models.yaml"), "--model", CATALOG_MODELS[1], "--one-model", ONE_MODEL, "--key", API_KEY,
           "--blocks", str(blocks), *(["--jobs-per-block", "50"] if blocks < 10 else [])]
    log(f"in-process: {blocks} blocks per variant")
    proc = subprocess.run(cmd, env=services.env(), cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                          text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.submit_inproc failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    log(f"in-process CPU per job (us): {result['cpu_us_per_job']}, non-202 {result['non_202']}")
    return result


def model_field(runs: list[dict[str, Any]], in_process: dict[str, Any] | None = None) -> dict[str, Any]:
    """What naming a model costs submission: ``api-model`` against ``api-catalog`` (the same catalog, no
    model named) and against ``api`` (the one-model cluster), per setting, over the medians and round
    by round (rounds are interleaved, so a round's ratio holds the same drift on both sides)."""
    out: dict[str, Any] = {}
    for setting in dict.fromkeys(r["setting"] for r in runs if r["workers"] == 1):
        mine = [r for r in runs if r["setting"] == setting and r["workers"] == 1]
        per_variant = {v: [r for r in mine if r["variant"] == v] for v in ("api", *CATALOG_VARIANTS)}
        if not per_variant["api-model"]:
            continue
        rates = {v: median(r["requests_per_s"] for r in rows) for v, rows in per_variant.items() if rows}
        cpu = {v: round(median(r["cpu_ms_per_job"]["app"] for r in rows), 3) for v, rows in per_variant.items() if rows}
        row: dict[str, Any] = {"jobs_per_s": {v: round(x, 1) for v, x in rates.items()}, "app_cpu_ms_per_job": cpu}
        for base in ("api-catalog", "api"):
            if base in rates:
                pairs = list(zip(per_variant["api-model"], per_variant[base], strict=False))
                row[f"ratio_model_over_{base.replace('-', '_')}"] = ratio(rates["api-model"], rates[base])
                row[f"ratio_model_over_{base.replace('-', '_')}_per_round"] = [
                    ratio(m["requests_per_s"], b["requests_per_s"]) for m, b in pairs]
                # a saturated process's throughput is 1 / its CPU per job: this ratio is what the
                # throughput ratio would be without the machine's other load taking the core away
                row[f"cpu_ratio_{base.replace('-', '_')}_over_model"] = ratio(cpu[base], cpu["api-model"])
        if "api" in rates and "api-catalog" in rates:
            row["ratio_catalog_over_api"] = ratio(rates["api-catalog"], rates["api"])
        # "within 5 % of today's": today's is the one-model cluster when it ran, else the same catalog.
        # Judged on the API's CPU per job (one process saturated by the load: its throughput is 1 / its CPU
        # per job once it has its core), in-process when measured (paired blocks), else the server's: on a
        # shared machine the wall-clock ratio moves by tens of percent from round to round with the other
        # work, the server's CPU per job by ~10 %, the in-process blocks' by a few
        today = "api" if "api" in rates else "api-catalog"
        key = today.replace("-", "_")
        row["today"] = today
        paired = (in_process or {}).get(f"cpu_ratio_{key}_over_api_model_paired_median")
        row["goal_basis"] = "in_process cpu per job, paired blocks" if paired else "app_cpu_ms_per_job"
        row["goal_within_5_percent"] = (paired or row.get(f"cpu_ratio_{key}_over_model") or 0) >= 0.95
        row["jobs_per_s_ratio_within_5_percent"] = (row.get(f"ratio_model_over_{key}") or 0) >= 0.95
        out[setting] = row
    return out


def one_run(services: Services, root: Path, variant: str, setting: dict[str, Any], workers: int,
            body_file: Path, seconds: float, connections: int, tool: str) -> dict[str, Any]:
    from cli.localservices import free_port

    app, path = VARIANTS[variant]
    services.flush()
    extra = {"EDITFARM_BENCH_BARE_S3": "true" if variant == "bare+s3" else "",
             "EDITFARM_BENCH_BARE_OPERATION": json.loads(body_file.read_text())["operation"],
             "EDITFARM_BENCH_BARE_SYNC": "true" if variant == "bare-sync" else "", **VARIANT_ENV.get(variant, {})}
    if variant in CATALOG_VARIANTS:  # both set is refused at start
        extra.update({"EDITFARM_MODELS_FILE": str(root / "models.yaml"), "EDITFARM_MODEL": ""})
    if variant == "api-model":
        body_file = model_body(body_file)
    port = free_port()
    proc = start_app(services, app, setting["args"], workers, port, root / f"{variant}.log", extra)
    url = f"http://127.0.0.1:{port}{path}"
    try:
        for _ in range(5):  # first requests of each process build clients; --workers N starts N of them
            warm = load(url, body_file, 2, connections, tool)
            if warm["non_2xx"]:
                raise RuntimeError(f"{variant} answered non-2xx during warm-up: {warm}; see {root}")
            if warm["requests"] > 0:
                break
        else:
            raise RuntimeError(f"{variant} answered nothing during warm-up; see {root}")
        app_pids = tree_pids(proc.pid)
        others = {"redis": [services.redis.proc.pid], "s3": tree_pids(services.s3.proc.pid)}
        before = {"app": cpu_seconds(app_pids), **{k: cpu_seconds(v) for k, v in others.items()}}
        with RssSampler(proc.pid) as rss:
            result = load(url, body_file, seconds, connections, tool)
        after = {"app": cpu_seconds(app_pids), **{k: cpu_seconds(v) for k, v in others.items()}}
    finally:
        stop_group(proc)
    done = max(1, result["requests"])
    result.update(variant=variant, setting=setting["name"], workers=workers,
                  cpu_ms_per_job={k: round((after[k] - before[k]) * 1000 / done, 3) for k in after},
                  rss_mb_peak={"total": round(rss.peak_total, 1), "largest_process": round(rss.peak_each, 1)})
    log(f"{variant:10s} {setting['name']:32s} x{workers}: {result['requests_per_s']:8.1f} req/s "
        f"p50 {result['latency_ms'].get('p50')} ms, non-2xx {result['non_2xx']}, "
        f"cpu/job {result['cpu_ms_per_job']}")
    return result


def main() -> int:
    p = parser("submit", __doc__)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=0,
                   help="keep-alive connections (default: 64; 8 for --mode edit, whose requests take 2.7 MB each)")
    p.add_argument("--workers", default="2,3", help="API processes to try with the fastest setting")
    p.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    p.add_argument("--mode", choices=["generate", "edit"], default="generate",
                   help="generate: no input image; edit: a 1024x1024 PNG as a data URL")
    p.add_argument("--settings", default="", help="comma-separated server settings to run (default: all)")
    p.add_argument("--variants", default="", help="comma-separated variants to run (default: per mode)")
    p.add_argument("--blocks", type=int, default=40, help="--fleet: in-process blocks per variant")
    p.add_argument("--fleet", action="store_true",
                   help="a job's model field: api, api-catalog, api-model at the fastest setting, 1 process "
                        "(report submit-fleet.json)")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.workers = 1.5, 1, ""
    if args.fleet:
        args.workers = ""
        args.variants = args.variants or "api,api-catalog,api-model"
    args.connections = args.connections or (8 if args.mode == "edit" else 64)
    if args.out == p.get_default("out") and (args.fleet or args.mode == "edit"):
        name = "-".join(["submit", *(["fleet"] if args.fleet else []), *(["edit"] if args.mode == "edit" else [])])
        args.out = str(Path(args.out).with_name(f"{name}.json"))
    tool = args.loadgen if args.loadgen != "auto" else ("wrk" if shutil.which("wrk") else "python")
    root = workdir(args.workdir, "submit")
    write_standin_catalog(root / "models.yaml", CATALOG_MODELS)
    services = Services(root)
    if args.mode == "edit":
        body = job_body("edit", steps=2, image=photo_png())
    else:
        body = job_body(steps=2) if args.quick else probe_body(services, root)
    body_file = root / "body.json"
    body_file.write_text(json.dumps(body))
    operation = body["operation"]
    variants = ["api", "bare"] + (["bare+s3"] if operation == "edit" else [])
    if args.mode == "edit":
        # the Redis-only variants tell nothing more about an upload
        variants = ["api", "bare+s3"] + ([] if args.quick else ["api-dynamic-malloc", "api-uploads-4"])
    elif not args.quick:
        variants += ["bare-sync"]
    if args.variants:
        variants = [v for v in args.variants.split(",") if v in VARIANTS]
    settings = server_settings()
    if args.settings:
        chosen = set(args.settings.split(","))
        settings = [s for s in settings if s["name"] in chosen] or settings[-1:]
    if args.quick or (args.fleet and not args.settings):
        settings = settings[-1:]
    log(f"operation={operation}, loadgen={tool}, settings={[s['name'] for s in settings]}, variants={variants}")
    runs: list[dict[str, Any]] = []
    try:
        for round_index in range(args.rounds):
            for setting in settings:
                # --fleet: ABBA order, so that the small differences it looks for are not the drift's
                for variant in variants[::-1] if args.fleet and round_index % 2 else variants:
                    if variant == "bare-sync" and setting is not settings[-1]:
                        continue
                    runs.append(one_run(services, root, variant, setting, 1, body_file, args.seconds,
                                        args.connections, tool))
            best = settings[-1]
            for workers in [int(w) for w in args.workers.split(",") if w]:
                for variant in ("api", "bare+s3" if operation == "edit" else "bare"):
                    if variant in variants:
                        runs.append(one_run(services, root, variant, best, workers, body_file, args.seconds,
                                            args.connections, tool))
        in_process = in_process_run(services, root, body_file, blocks=3 if args.quick else args.blocks) \
            if args.fleet else None
    finally:
        services.stop()

    # medians over rounds, per (variant, setting, workers)
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["variant"], run["setting"], run["workers"]), []).append(run)
    table = []
    for (variant, name, workers), rows in groups.items():
        table.append({"variant": variant, "setting": name, "workers": workers, "rounds": len(rows),
                      "jobs_per_s": round(median(r["requests_per_s"] for r in rows), 1),
                      "p50_ms": median(r["latency_ms"].get("p50", float("nan")) for r in rows),
                      "p99_ms": median(r["latency_ms"].get("p99", float("nan")) for r in rows),
                      "non_2xx": sum(r["non_2xx"] for r in rows),
                      "app_cpu_ms_per_job": round(median(r["cpu_ms_per_job"]["app"] for r in rows), 3),
                      "redis_cpu_ms_per_job": round(median(r["cpu_ms_per_job"]["redis"] for r in rows), 3),
                      "s3_cpu_ms_per_job": round(median(r["cpu_ms_per_job"]["s3"] for r in rows), 3),
                      "rss_mb_peak_total": max(r["rss_mb_peak"]["total"] for r in rows),
                      "rss_mb_peak_largest_process": max(r["rss_mb_peak"]["largest_process"] for r in rows)})

    def rate(variant: str, setting: str, workers: int) -> float | None:
        for row in table:
            if (row["variant"], row["setting"], row["workers"]) == (variant, setting, workers):
                return float(row["jobs_per_s"])
        return None

    fair = "bare+s3" if operation == "edit" else "bare"
    ratios = {}
    for setting in settings:
        api_rate = rate("api", setting["name"], 1)
        ratios[setting["name"]] = {v: ratio(api_rate or 0, rate(v, setting["name"], 1) or 0)
                                   for v in variants if v != "api" and rate(v, setting["name"], 1)}
    api_rows = [r for r in table if r["variant"] == "api"]
    bare_rows = [r for r in table if r["variant"] == fair]
    best_api = max(api_rows, key=lambda r: r["jobs_per_s"])
    best_single = max((r for r in api_rows if r["workers"] == 1), key=lambda r: r["jobs_per_s"])
    fair_single = rate(fair, best_single["setting"], 1) or 0
    report = {
        "mode": args.mode, "operation": operation, "body_bytes": body_file.stat().st_size, "loadgen": tool, "connections": args.connections, "seconds": args.seconds,
        "rounds": args.rounds, "fair_baseline": fair,
        "results": sorted(table, key=lambda r: (r["workers"], r["setting"], r["variant"])),
        "ratio_api_over_bare_1_process": ratios,
        "headline": {
            "api_jobs_per_s_1_process": best_single["jobs_per_s"], "setting": best_single["setting"],
            "bare_jobs_per_s_1_process": fair_single,
            "ratio_api_over_bare_1_process": ratio(best_single["jobs_per_s"], fair_single),
            "api_jobs_per_s_best": best_api["jobs_per_s"], "api_processes_best": best_api["workers"],
            "api_rss_mb_peak_per_process": max(r["rss_mb_peak_largest_process"] for r in api_rows),
            "goal_ratio_0_8_met": (ratio(best_single["jobs_per_s"], fair_single) or 0) >= 0.8,
            "goal_2000_jobs_per_s_met": best_api["jobs_per_s"] >= 2000,
        },
        # what the bare endpoint itself reaches per process count: the ceiling of this machine
        "bare_jobs_per_s_by_processes": {str(r["workers"]): r["jobs_per_s"] for r in sorted(
            (r for r in bare_rows if r["setting"] == settings[-1]["name"]), key=lambda r: r["workers"])},
        "runs": runs,
    }
    if "api-model" in variants:
        report["model_field"] = model_field(runs, in_process)
    if in_process is not None:
        report["in_process"] = in_process
    write_report("submit", report, args.out, args.quick, command_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
