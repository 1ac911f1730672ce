"""GPU duty cycle: one worker, a saturated queue, a render stand-in that holds the "device" for T.

    python -m bench.duty_cycle                 # T = 0.5 s (24 jobs) and 2 s (12 jobs), ~3 min
    python -m bench.duty_cycle --quick

One render worker runs the bench-only timed stand-in (``bench.timed_standin``): it sleeps T
per job (spread over the steps, with the real step callbacks) and logs the exact start and
end of each render; it returns a 1024x1024 image of noise, so the worker's PNG encode and
upload cost what a real output costs (noise is the worst case for PNG). Each job is an edit
of a 1024x1024 PNG (noise, ~3 MB), so the worker downloads and decodes a real-size input.

``--runner serial,pipelined`` (the default) runs each T twice, side by side: the worker with
``EDITFARM_FINISH_IN_BACKGROUND=false EDITFARM_PREFETCH_INPUTS=false`` (one step after the
other), and as it runs by default (``workers/pipelining.py``: encode + upload + terminal
transition on a background thread, next job's input prefetched from the head of the queue
while the current one renders).

All jobs are submitted at once (the queue never runs dry), then:

* duty cycle = time spent rendering / wall time from the first render's start to the last
  render's end;
* gap = next render's start − this render's end (p50, p99): everything the worker does
  between two renders (encode + upload of the last output, terminal transition, ack, next
  message, lease, download + decode of the next input);
* the gap taken apart (``gap_parts_ms``) with each task's entry/return times (logged by
  ``bench.timed_worker``): render end → task returns, task returns → next task
  entered (Celery's turnaround), next task entered → its render starts;
* from the job records: pre-render (started_at → render start: lease, fetch, decode) and
  post-render (render end → finished_at: encode, upload, terminal transition).
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    RUNNER_ENV,
    BenchCluster,
    command_line,
    data_url,
    log,
    parser,
    png,
    summary,
    wait_jobs_done,
    workdir,
    write_report,
)


def run_one(root: Path, render_s: float, jobs: int, side: int, runner: str) -> dict[str, Any]:
    import httpx

    image = data_url(png((side, side), noise=True))
    extra = RUNNER_ENV[runner]
    bench = BenchCluster(root / f"{runner}-T{render_s:g}", render_workers=1, render_s=render_s, timed=True,
                         output_side=side, webhook_worker=False, extra_env=extra)
    with bench:
        cluster = bench.cluster
        client = httpx.Client(base_url=cluster.api_url, headers={"Authorization": f"Bearer {cluster.api_key()}"},
                              timeout=60)
        ids = []
        began = time.monotonic()
        for index in range(jobs):
            answer = client.post("/v1/jobs", json={"operation": "edit", "prompt": "make the sky purple",
                                                   "image": image, "steps": 8, "seed": 1000 + index})
            if answer.status_code != 202:
                raise RuntimeError(f"submit answered {answer.status_code}: {answer.text[:300]}")
            ids.append(answer.json()["id"])
        submit_s = time.monotonic() - began
        client.close()
        records = wait_jobs_done(cluster.redis_url, ids, timeout_s=jobs * (render_s + 5) + 60)
        intervals = bench.render_intervals()
        tasks = bench.task_intervals()
    by_seed = {r["seed"]: r for r in intervals}
    renders = sorted(intervals, key=lambda r: r["start"])
    rendering = sum(r["end"] - r["start"] for r in renders)
    wall = renders[-1]["end"] - renders[0]["start"]
    gaps = [b["start"] - a["end"] for a, b in itertools.pairwise(renders)]
    pre, post = [], []
    for index, job_id in enumerate(ids):
        rec, render = records[job_id], by_seed.get(1000 + index)
        if render is None or rec["status"] != "succeeded":
            continue
        pre.append(render["start"] - rec["started_at"])
        post.append(rec["finished_at"] - render["end"])
    # the gap, taken apart with the tasks' entry/return times: render end → task returns (finish on
    # the critical path), task returns → next task entered (Celery: ack, next message, hand to the
    # pool child), next task entered → its render starts (lease, fetch, decode)
    by_entry = sorted(tasks, key=lambda t: t["entered"])
    until_return, turnaround, until_render = [], [], []
    for a, b in itertools.pairwise(renders):
        done = next((t for t in by_entry if t["entered"] <= a["start"] <= t["returned"]), None)
        nxt = next((t for t in by_entry if t["entered"] <= b["start"] <= t["returned"]), None)
        if done and nxt:
            until_return.append(done["returned"] - a["end"])
            turnaround.append(nxt["entered"] - done["returned"])
            until_render.append(b["start"] - nxt["entered"])
    statuses: dict[str, int] = {}
    for rec in records.values():
        statuses[rec["status"]] = statuses.get(rec["status"], 0) + 1
    result = {"runner": runner, "render_s": render_s, "jobs": jobs, "statuses": statuses, "renders_logged": len(renders),
              "submit_all_s": round(submit_s, 2), "queue_saturated": submit_s < render_s * (jobs - 1),
              "duty_cycle": round(rendering / wall, 5), "wall_s": round(wall, 3), "rendering_s": round(rendering, 3),
              "gap_ms": summary(gaps, 1000), "pre_render_ms": summary(pre, 1000),
              "post_render_ms": summary(post, 1000),
              "gap_parts_ms": {"render_end_to_task_return": summary(until_return, 1000),
                               "task_return_to_next_task": summary(turnaround, 1000),
                               "next_task_to_render_start": summary(until_render, 1000)}}
    log(f"{runner} T={render_s:g}s: duty {result['duty_cycle']:.4f}, gap p50 {result['gap_ms'].get('p50')} ms "
        f"p99 {result['gap_ms'].get('p99')} ms")
    return result


def main() -> int:
    p = parser("duty_cycle", __doc__)
    p.add_argument("--render-s", default="0.5,2", help="stand-in render times (s)")
    p.add_argument("--jobs", default="24,12", help="jobs per render time")
    p.add_argument("--side", type=int, default=1024, help="input and output side (px)")
    p.add_argument("--runner", default="",
                   help="serial: fetch, render, encode, upload one job after the other; pipelined (the "
                        "worker's default): finish in the background, prefetch the next input; "
                        "default serial,pipelined (--quick: pipelined)")
    args = p.parse_args()
    if args.quick:
        args.render_s, args.jobs, args.side = "0.2", "3", 256
    args.runner = args.runner or ("pipelined" if args.quick else "serial,pipelined")
    root = workdir(args.workdir, "duty_cycle")
    render_times = [float(x) for x in args.render_s.split(",")]
    counts = [int(x) for x in args.jobs.split(",")]
    counts += [counts[-1]] * (len(render_times) - len(counts))
    results = [run_one(root, t, n, args.side, runner) for t, n in zip(render_times, counts, strict=False)
               for runner in args.runner.split(",")]
    goals = {}
    for runner in args.runner.split(","):
        at_2s = next((r for r in results if r["render_s"] == 2.0 and r["runner"] == runner), None)
        goals[f"duty_ge_0_995_at_2s[{runner}]"] = None if at_2s is None else at_2s["duty_cycle"] >= 0.995
    report = {"side_px": args.side, "results": results, "goals": goals}
    write_report("duty_cycle", report, args.out, args.quick, command_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
