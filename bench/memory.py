"""Memory: the API process's RSS under load, and the render worker's RSS beyond the model.

    python -m bench.memory            # ~3 min
    python -m bench.memory --quick    # API (default allocator) and stand-in worker only

* API: one API process (``uvicorn --factory api.app:create_app``, h11 + asyncio, log level info:
  how ``editfarm api`` runs today) on Redis
  and the S3 server; RSS idle, then the peak (sampled every 0.2 s) under ``--seconds`` of load
  from ``wrk``/``bench.loadgen``: generate submissions with 64 connections, and edits of a
  1024x1024 PNG (~3 MB of noise, 4 MB as a data URL: every request decodes a full image)
  with 16 connections. Then (not in ``--quick``) the same API with the two memory bounds off,
  as it was before them: any number of uploads taken in at once
  (``EDITFARM_MAX_CONCURRENT_UPLOADS=1000``) and glibc's dynamic mmap threshold
  (``EDITFARM_MALLOC_MMAP_THRESHOLD_BYTES=0``); see ``api/intake.py`` and ``api/malloc.py``.
* stand-in worker: the render worker's pool child (the process that would hold the model)
  with the stand-in, after edits of 1024x1024 inputs with 1024x1024 noise outputs: the
  worker's own footprint (Celery, clients, runner, image buffers), no torch at all.
* model worker (not in ``--quick``): the pool child with the tiny model after one edit,
  against a plain script that loads the same folder with ``from_pretrained`` and runs the same
  edit (``bench.memory --script``): the worker's RSS beyond "the model" is the difference.
"""

from __future__ import annotations

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
    command_line,
    data_url,
    job_body,
    log,
    parser,
    png,
    rss_mb,
    stop_group,
    wait_jobs_done,
    workdir,
    write_report,
)
from editfarm_testing.cluster import worker_child_pid

PROMPT = "make the sky purple"
# the API without its memory bounds (upload slots, fixed mmap threshold): how it was before them
UNBOUNDED = {"EDITFARM_MAX_CONCURRENT_UPLOADS": "1000", "EDITFARM_MALLOC_MMAP_THRESHOLD_BYTES": "0"}


def api_memory(root: Path, seconds: float, tool: str, extra_env: dict[str, str]) -> dict[str, Any]:
    from bench.submit import RssSampler, Services, load, server_settings, start_app
    from cli.localservices import free_port

    services = Services(root / ("api-" + "-".join(f"{k}={v}" for k, v in extra_env.items())))
    result: dict[str, Any] = {"loadgen": tool, "seconds": seconds, "env": extra_env}
    try:
        port = free_port()
        setting = server_settings()[0]  # how `editfarm api` runs today
        result["setting"] = setting["name"]
        proc = start_app(services, "api", setting["args"], 1, port, root / "api.log", extra_env)
        try:
            url = f"http://127.0.0.1:{port}/v1/jobs"
            result["idle_mb"] = rss_mb(proc.pid)
            bodies = {"generate": job_body("generate", steps=2),
                      "edit_1024px": job_body("edit", steps=2, image=png((1024, 1024), noise=True))}
            for name, body in bodies.items():
                body_file = root / f"{name}.json"
                body_file.write_text(json.dumps(body))
                connections = 64 if name == "generate" else 16
                with RssSampler(proc.pid) as rss:
                    run = load(url, body_file, seconds, connections, tool)
                result[name] = {"connections": connections, "jobs_per_s": run["requests_per_s"],
                                "non_2xx": run["non_2xx"],
                                "body_bytes": body_file.stat().st_size, "peak_mb": round(rss.peak_total, 1)}
                log(f"API {extra_env or ''} under {name} load: peak {rss.peak_total:.1f} MB "
                    f"at {run['requests_per_s']} jobs/s")
            result["after_mb"] = rss_mb(proc.pid)
        finally:
            stop_group(proc)
    finally:
        services.stop()
    result["peak_mb"] = max(result["generate"]["peak_mb"], result["edit_1024px"]["peak_mb"])
    return result


def standin_worker_memory(root: Path, jobs: int, side: int) -> dict[str, Any]:
    import httpx

    bench = BenchCluster(root / "standin", render_workers=1, render_s=0.05, timed=True, output_side=side,
                         webhook_worker=False)
    with bench:
        cluster = bench.cluster
        child = worker_child_pid(cluster, "render0")
        parent = cluster.procs["render0"].pid
        idle = rss_mb(child)
        image = data_url(png((side, side), noise=True))
        client = httpx.Client(base_url=cluster.api_url, headers={"Authorization": f"Bearer {cluster.api_key()}"},
                              timeout=60)
        ids = [client.post("/v1/jobs", json={"operation": "edit", "prompt": PROMPT, "image": image, "steps": 2,
                                             "seed": i}).json()["id"] for i in range(jobs)]
        client.close()
        wait_jobs_done(cluster.redis_url, ids, timeout_s=60 + jobs * 5)
        time.sleep(0.5)
        return {"jobs": jobs, "side_px": side, "child_idle_mb": idle, "child_after_jobs_mb": rss_mb(child),
                "prefork_parent_mb": rss_mb(parent),
                "torch_imported_in_child": _has_torch(child)}


def _has_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def model_worker_memory(root: Path, model: str, side: int) -> dict[str, Any]:
    import httpx

    data = png((side, side), noise=True)
    body = {"operation": "edit", "prompt": PROMPT, "negative_prompt": " ", "true_cfg_scale": 4.0, "steps": 2,
            "width": side, "height": side, "seed": 7}
    script = subprocess.run([sys.executable, "-m", "bench.memory", "--script", "--model", model, "--side", str(side)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    script_row = json.loads(script.stdout.strip().splitlines()[-1])
    with BenchCluster(root / "model", render_workers=1, model=model, webhook_worker=False) as bench:
        cluster = bench.cluster
        child = worker_child_pid(cluster, "render0")
        client = httpx.Client(base_url=cluster.api_url, headers={"Authorization": f"Bearer {cluster.api_key()}"},
                              timeout=600)
        job_id = client.post("/v1/jobs", json={**body, "image": data_url(data)}).json()["id"]
        client.close()
        wait_jobs_done(cluster.redis_url, [job_id], timeout_s=600)
        worker_mb = rss_mb(child)
        parent_mb = rss_mb(cluster.procs["render0"].pid)
    weights_mb = round(sum(f.stat().st_size for f in Path(model).rglob("*.safetensors")) / 2**20, 2)
    return {"model": model, "weights_on_disk_mb": weights_mb, "worker_child_mb": worker_mb,
            "prefork_parent_mb": parent_mb, "script_mb": script_row["rss_mb"],
            "worker_beyond_script_mb": round(worker_mb - script_row["rss_mb"], 1),
            "worker_beyond_weights_mb": round(worker_mb - weights_mb, 1)}


def script_main(model: str, side: int) -> int:
    """The plain-script reference: load the folder, run one edit, print RSS (MB) as JSON."""
    import io

    import torch
    from diffusers import QwenImageEditPipeline
    from diffusers.utils import logging as diffusers_logging
    from PIL import Image

    from workers.pipeline.diffusers_renderer import _dtype_kwarg, resolve_dtype

    diffusers_logging.disable_progress_bar()
    pipe: Any = QwenImageEditPipeline.from_pretrained(model, **{_dtype_kwarg(): resolve_dtype("cpu", None)})
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(io.BytesIO(png((side, side), noise=True))).convert("RGB")
    out = pipe(image=image, prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=2,
               width=side, height=side, generator=[torch.Generator("cpu").manual_seed(7)]).images[0]
    out.save(io.BytesIO(), format="PNG")
    print(json.dumps({"rss_mb": rss_mb(__import__("os").getpid())}))
    return 0


def main() -> int:
    p = parser("memory", __doc__)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--model", default="", help="model folder for the model worker (default: build the tiny one)")
    p.add_argument("--side", type=int, default=1024)
    p.add_argument("--script", action="store_true", help=argparse_suppress())
    args = p.parse_args()
    if args.script:
        return script_main(args.model, args.side)
    if args.quick:
        args.seconds, args.side = 1, 256
    import shutil

    tool = "wrk" if shutil.which("wrk") else "python"
    root = workdir(args.workdir, "memory")
    report: dict[str, Any] = {"api": api_memory(root, args.seconds, tool, {}),
                              "api_unbounded": {"skipped": "--quick"} if args.quick else
                              api_memory(root, args.seconds, tool, UNBOUNDED),
                              # kept for readers of older reports: MALLOC_ARENA_MAX=2 did not lower the
                              # peak (302 vs 289 MB); the fixed mmap threshold of api/malloc.py does
                              "api_malloc_arena_max_2": {"skipped": "superseded by the fixed mmap threshold"},
                              "standin_worker": standin_worker_memory(root, 3 if args.quick else 10, args.side)}
    if args.quick:
        report["model_worker"] = {"skipped": "--quick"}
    else:
        model = args.model
        if not model:
            model = str(root / "models" / "tiny-edit")
            subprocess.run([sys.executable, "-m", "cli.main", "model", "tiny", model], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
        report["model_worker"] = model_worker_memory(root, model, 512)
    report["goals"] = {"api_le_150_mb": report["api"]["peak_mb"] <= 150}
    write_report("memory", report, args.out, args.quick, command_line())
    return 0


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
