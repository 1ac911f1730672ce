"""GPU duty cycle of the worker's runner with the real-size model: serial vs pipelined, side by side.

The full Qwen-Image-Edit architecture with random bf16 weights (``bench.gpu_real_size``'s
``build_components``), rendered through the worker's own ``Runner`` and ``DiffusersRenderer``
the way one Celery pool child calls it (``runner.run(job_id)`` for one job after another),
with in-memory job/object stores (no Redis or S3 on the GPU box: so the serial gap here is a
lower bound — a real S3 upload and download only widen it). Each job edits a 1024² PNG.

* ``serial``: ``EDITFARM_RENDER_LANE=false EDITFARM_FINISH_IN_BACKGROUND=false`` — fetch and
  decode, render, encode and store, one after the other;
* ``pipelined`` (the default): the next job's inputs are fetched while one renders, it starts
  the moment the device frees, and the last output is encoded and stored in the background.

Duty cycle = time inside ``renderer.render`` / wall time from the first render's start to the
last one's end; gap = next render start − this render end.

    python bench/gpu_duty.py --jobs 4 --steps 8          # on the GPU box (bench/gpu_run.sh)
    python bench/gpu_duty.py --scale tiny --device cpu   # smoke test of the same code
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.gpu_real_size import PROMPT, build_components  # noqa: E402


class _NoOtherJobs:
    """The runner's queue here: the jobs are run one after the other by this script, so "jobs wait"
    (the lane takes the next one early, as a busy worker does), none outranks another and none is
    handed back (in-memory stores do not fail)."""

    def requeue(self, job: Any) -> None:
        pass

    def give_way(self, job: Any) -> bool:
        return False

    def jobs_waiting(self) -> bool:
        return True


def run_mode(mode: str, renderer: Any, jobs: int, steps: int, size: int) -> dict[str, Any]:
    from broker.events import InMemoryEventPublisher
    from broker.jobstore import InMemoryJobStore
    from broker.schema import Job, JobParams, JobStatus, new_job_id
    from storage import InMemoryObjectStore
    from workers.pipelining import Pipelining
    from workers.runner import Runner, RunnerConfig
    from workers.transitions import Transitions

    intervals: list[tuple[float, float]] = []
    render = renderer.render

    def timed_render(request: Any, on_step: Any = None, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return render(request, on_step, **kwargs)
        finally:
            intervals.append((began, time.perf_counter()))

    store, objects = InMemoryJobStore(), InMemoryObjectStore()
    pipelining = Pipelining(True, True) if mode == "pipelined" else None
    config = RunnerConfig(worker_name="gpu-bench")
    transitions = Transitions(store=store, publisher=InMemoryEventPublisher(), notify=lambda job, event: None,
                              config=config)
    runner = Runner(transitions=transitions, objects=objects, renderer=renderer, queue=_NoOtherJobs(),
                    config=config, pipelining=pipelining)
    renderer.render = timed_render
    ids = []
    for index in range(jobs):
        buf = io.BytesIO()
        Image.effect_noise((size, size), 40 + index).convert("RGB").save(buf, format="PNG")
        job = Job(id=new_job_id(), tenant="bench", input_keys=[f"in/{index}.png"],
                  params=JobParams(prompt=PROMPT, negative_prompt=" ", steps=steps, seed=7 + index))
        objects.put(f"in/{index}.png", buf.getvalue(), "image/png")
        store.create(job)
        ids.append(job.id)
    began = time.perf_counter()
    try:
        for job_id in ids:  # one Celery pool child: the next task starts when the last one returned
            runner.run(job_id)
        if pipelining is not None:
            pipelining.drain(600)
    finally:
        renderer.render = render
    total_s = time.perf_counter() - began
    statuses = [store.get(j).status.value for j in ids]  # type: ignore[union-attr]
    rendering = sum(end - start for start, end in intervals)
    wall = intervals[-1][1] - intervals[0][0]
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(intervals)]
    result = {"mode": mode, "jobs": jobs, "steps": steps, "statuses": statuses,
              "all_succeeded": all(s == JobStatus.SUCCEEDED.value for s in statuses),
              "duty_cycle": round(rendering / wall, 5), "render_s_p50": round(statistics.median(
                  end - start for start, end in intervals), 3),
              "gap_ms_p50": round(1000 * statistics.median(gaps), 1) if gaps else None,
              "gap_ms_max": round(1000 * max(gaps), 1) if gaps else None, "all_jobs_s": round(total_s, 2)}
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--modes", default="serial,pipelined,serial,pipelined")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_duty.json"))
    args = parser.parse_args()
    from diffusers import QwenImageEditPipeline

    from workers.pipeline.diffusers_renderer import DiffusersRenderer, resolve_dtype

    dtype = resolve_dtype(args.device, None)
    components = build_components(args.scale, args.device, dtype)
    pipe = QwenImageEditPipeline(**components).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    renderer = DiffusersRenderer(pipe, model="in-memory", device=args.device, dtype=dtype)
    report: dict[str, Any] = {"scale": args.scale, "size": args.size, "runs": [],
                              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    run_mode("warmup", renderer, 1, args.steps, args.size)
    for mode in args.modes.split(","):  # alternated, so drift hits both alike
        report["runs"].append(run_mode(mode, renderer, args.jobs, args.steps, args.size))
    for mode in ("serial", "pipelined"):
        mine = [r for r in report["runs"] if r["mode"] == mode]
        if mine:
            report[f"{mode}_duty_cycle_median"] = statistics.median(r["duty_cycle"] for r in mine)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
