"""Real pipeline: the worker's time for one job against calling the same diffusers pipeline directly.

    python -m bench.pipeline                     # tiny model on CPU, 8 steps at 512x512, 8 rounds (~2 min)
    python -m bench.pipeline --quick
    python -m bench.pipeline --model DIR         # any Qwen-Image-Edit folder (default: build the tiny one)

A local cluster with one render worker that loads the model with ``from_pretrained`` (the
production path: ``DiffusersRenderer``), and in this process the same folder loaded as a
``QwenImageEditPipeline``. Each round runs one edit job through the API and the worker and
the same edit by a direct pipeline call + PNG encode (what a script would do: same input
image, prompt, negative prompt, CFG, steps, seed and size), in ABBA order (odd rounds run the
direct call first, so drift and the order hit both alike). Reported, as medians:

* ``worker_job_s``: the job's ``finished_at − started_at`` (lease, input download + decode,
  render, encode, upload, terminal transition): the worker's time for one job;
* ``worker_render_s``: the worker's own ``editfarm_render_seconds`` for the job (its
  Prometheus endpoint), i.e. the adapter around the pipeline call;
* ``direct_s``: the pipeline call + PNG encode in this process;
* ``ratio`` = worker_job_s / direct_s (goal ≤ 1.05), and whether both gave the same bytes;
* CPU seconds (user + system) of the worker's processes for the job against those of this
  process for the direct call: on a machine shared with other work, CPU time moves far less
  than wall time, so ``ratio_cpu_worker_over_direct`` is the steadier comparison, and so is
  the ratio of the fastest rounds (``ratio_min_worker_job_over_min_direct``: the least
  disturbed run of each path).

The GPU rows of docs/performance.md come from ``bench/gpu_real_size.py`` (H200, full-size model).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
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
    log,
    median,
    parser,
    ratio,
    summary,
    wait_jobs_done,
    workdir,
    write_report,
)
from editfarm_testing.cluster import worker_child_pid

PROMPT = "make the sky purple and add a small red kite"


def input_png(side: int) -> bytes:
    from PIL import Image

    image = Image.radial_gradient("L").resize((side, side)).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def render_seconds(port: int) -> float:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    match = re.search(r"^editfarm_render_seconds_sum\s+([\d.e+-]+)", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def main() -> int:
    p = parser("pipeline", __doc__)
    p.add_argument("--model", default="", help="model folder (default: build the tiny model in the workdir)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--side", type=int, default=512, help="input and output side (px)")
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    if args.quick:
        args.steps, args.side, args.rounds = 2, 128, 1
    import httpx

    root = workdir(args.workdir, "pipeline")
    model = args.model
    if not model:
        model = str(root / "models" / "tiny-edit")
        if not (Path(model) / "model_index.json").exists():
            log("building the tiny model")
            subprocess.run([sys.executable, "-m", "cli.main", "model", "tiny", model], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
    data = input_png(args.side)
    body = {"operation": "edit", "prompt": PROMPT, "negative_prompt": " ", "true_cfg_scale": 4.0,
            "steps": args.steps, "width": args.side, "height": args.side, "image": data_url(data)}
    loaded: dict[str, Any] = {}

    def load() -> None:  # while the worker loads the same folder (both mostly import torch)
        from diffusers import QwenImageEditPipeline
        from diffusers.utils import logging as diffusers_logging

        from workers.pipeline.diffusers_renderer import _dtype_kwarg, resolve_dtype

        diffusers_logging.disable_progress_bar()
        pipe = QwenImageEditPipeline.from_pretrained(model, **{_dtype_kwarg(): resolve_dtype("cpu", None)})
        pipe.set_progress_bar_config(disable=True)
        loaded["pipe"] = pipe

    import threading

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    log(f"starting the cluster with {model} (the worker loads it and warms up); loading it here too")
    with BenchCluster(root, render_workers=1, model=model, webhook_worker=False) as bench:
        cluster = bench.cluster
        loader.join()
        import torch
        from PIL import Image

        pipe = loaded["pipe"]
        image = Image.open(io.BytesIO(data)).convert("RGB")

        def direct(seed: int) -> bytes:
            out = pipe(image=image, prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0,
                       num_inference_steps=args.steps, width=args.side, height=args.side,
                       generator=[torch.Generator("cpu").manual_seed(seed)], output_type="pil").images[0]
            buf = io.BytesIO()
            out.convert("RGB").save(buf, format="PNG")
            return buf.getvalue()

        client = httpx.Client(base_url=cluster.api_url, headers={"Authorization": f"Bearer {cluster.api_key()}"},
                              timeout=600)
        import psutil
        import redis

        from broker import keys

        store = redis.Redis.from_url(cluster.redis_url)
        metrics_port = cluster.metrics_ports["render0"]
        worker_procs = [psutil.Process(worker_child_pid(cluster, "render0")), psutil.Process(cluster.procs["render0"].pid)]

        def worker_cpu() -> float:
            return sum(t.user + t.system for t in (p.cpu_times() for p in worker_procs))
        rows = []
        warm = 0 if args.quick else 1
        for index in range(warm + args.rounds):  # the first `warm` rounds warm both paths up, not counted
            seed = 7 + index

            def through_worker(seed: int = seed) -> tuple[dict[str, Any], list[dict[str, Any]], float, float]:
                before = render_seconds(metrics_port)
                cpu_before = worker_cpu()
                answer = client.post("/v1/jobs", json={**body, "seed": seed})
                if answer.status_code != 202:
                    raise RuntimeError(f"submit answered {answer.status_code}: {answer.text[:300]}")
                job_id = answer.json()["id"]
                record = wait_jobs_done(cluster.redis_url, [job_id], timeout_s=600)[job_id]
                outputs = json.loads(store.hget(keys.job(job_id), "outputs") or b"[]")
                return record, outputs, render_seconds(metrics_port) - before, worker_cpu() - cpu_before

            def directly(seed: int = seed) -> tuple[bytes, float, float]:
                began, cpu_began = time.perf_counter(), time.process_time()
                png = direct(seed)
                return png, time.perf_counter() - began, time.process_time() - cpu_began

            # ABBA: odd rounds run the direct call first, so drift and the order itself hit both alike
            if index % 2:
                png, direct_s, direct_cpu_s = directly()
                record, outputs, worker_render, worker_cpu_s = through_worker()
            else:
                record, outputs, worker_render, worker_cpu_s = through_worker()
                png, direct_s, direct_cpu_s = directly()
            row = {"round": index, "status": record["status"],
                   "worker_job_s": record["finished_at"] - record["started_at"],
                   "worker_render_s": worker_render, "direct_s": direct_s,
                   "worker_cpu_s": worker_cpu_s, "direct_cpu_s": direct_cpu_s,
                   "same_bytes": bool(outputs) and outputs[0]["sha256"] == hashlib.sha256(png).hexdigest()}
            log(f"round {index}: worker job {row['worker_job_s']:.3f} s (render {worker_render:.3f} s), "
                f"direct {direct_s:.3f} s, same bytes {row['same_bytes']}")
            if index >= warm:
                rows.append(row)
        store.close()
        client.close()
        threads = torch.get_num_threads()
    worker_job = median(r["worker_job_s"] for r in rows)
    direct_med = median(r["direct_s"] for r in rows)
    report = {
        "model": model, "device": "cpu", "steps": args.steps, "size_px": [args.side, args.side],
        "rounds": len(rows), "torch_threads": threads,
        "worker_job_s": summary([r["worker_job_s"] for r in rows], 1, 4),
        "worker_render_s": summary([r["worker_render_s"] for r in rows], 1, 4),
        "direct_s": summary([r["direct_s"] for r in rows], 1, 4),
        "ratio_worker_job_over_direct": ratio(worker_job, direct_med),
        "ratio_worker_render_over_direct": ratio(median(r["worker_render_s"] for r in rows), direct_med),
        "ratio_min_worker_job_over_min_direct": ratio(min(r["worker_job_s"] for r in rows),
                                                      min(r["direct_s"] for r in rows)),
        "worker_cpu_s": summary([r["worker_cpu_s"] for r in rows], 1, 4),
        "direct_cpu_s": summary([r["direct_cpu_s"] for r in rows], 1, 4),
        "ratio_cpu_worker_over_direct": ratio(median(r["worker_cpu_s"] for r in rows),
                                              median(r["direct_cpu_s"] for r in rows)),
        "same_bytes_every_round": all(r["same_bytes"] for r in rows),
        "goals": {"ratio_le_1_05": (ratio(worker_job, direct_med) or 99) <= 1.05},
        "rows": rows,
    }
    write_report("pipeline", report, args.out, args.quick, command_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
