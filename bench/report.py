"""Render the README "Performance" table from the reports in ``bench/results/``: ``python -m bench.report``.

Reads ``submit``, ``orchestration``, ``duty_cycle``, ``scaleout``, ``pipeline``, ``memory``
(``<name>.json``, as written by each benchmark) and the GPU reports
(``bench/results-gpu-*.json``, from ``bench/gpu_real_size.py`` on an H200), and prints
Markdown rows: figure, value, goal, met?, and the command behind the number.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def yes(flag: bool | None) -> str:
    return "—" if flag is None else ("yes" if flag else "**no**")


def rows() -> list[tuple[str, str, str, str, str]]:
    out: list[tuple[str, str, str, str, str]] = []
    sub = load("submit")
    if sub:
        h, cmd = sub["headline"], f"`{sub['command']}`"
        out.append((f"Submission, 1 API process ({h['setting']}, {sub['operation']})",
                    f"{h['api_jobs_per_s_1_process']:.0f} jobs/s vs bare {h['bare_jobs_per_s_1_process']:.0f} "
                    f"= **{h['ratio_api_over_bare_1_process']}×**", "≥ 0.8× bare", yes(h["goal_ratio_0_8_met"]), cmd))
        out.append(("Submission, best API process count", f"{h['api_jobs_per_s_best']:.0f} jobs/s "
                    f"({h['api_processes_best']} processes)", "≥ 2,000 jobs/s", yes(h["goal_2000_jobs_per_s_met"]), cmd))
        for r in sub["results"]:
            if r["workers"] == 1 and r["variant"] == "api":
                out.append((f"  api, {r['setting']}", f"{r['jobs_per_s']:.0f} jobs/s, p50 {r['p50_ms']:.0f} ms, "
                            f"{r['app_cpu_ms_per_job']:.2f} ms CPU/job", "", "", cmd))
        p = sub.get("proposed")
        if p:
            out.append(("Submission, proposed fast path (prototype `bench/lean_api.py`), 1 process",
                        f"{p['api_proposed_jobs_per_s_1_process']:.0f} jobs/s = **{p['ratio_api_proposed_over_bare_1_process']}×** "
                        f"bare ({p['ratio_api_proposed_over_api_1_process']}× today's API); best "
                        f"{p['api_proposed_jobs_per_s_best']:.0f} jobs/s ({p['api_proposed_processes_best']} processes)",
                        "≥ 0.8×, ≥ 2,000", yes(p["ratio_api_proposed_over_bare_1_process"] >= 0.8
                                               and p["api_proposed_jobs_per_s_best"] >= 2000), cmd))
    orch = load("orchestration")
    if orch:
        cmd, b = f"`{orch['command']}`", orch["baseline_celery_apply_async_get_ms"]
        for name, v in orch["by_variant"].items():
            t = v["submit_to_webhook_ms"]
            label = "Submit → webhook, stand-in 0 s" + ("" if name == "current" else " (proposed, prototypes)")
            out.append((label, f"p50 {t['p50']:.0f} ms ({v['ratio_p50']}× Celery's {b['p50']:.0f} ms), p99 {t['p99']:.0f} ms",
                        "p50 ≤ 3×, p99 ≤ 50 ms", yes(v["goals"]["p50_le_3x_baseline"] and v["goals"]["p99_le_50_ms"]), cmd))
    duty = load("duty_cycle")
    if duty:
        cmd = f"`{duty['command']}`"
        for r in duty["results"]:
            label = f"GPU duty cycle, T = {r['render_s']:g} s ({r['runner']})"
            goal = "≥ 99.5 %" if r["render_s"] == 2.0 else ""
            out.append((label, f"{100 * r['duty_cycle']:.1f} %, gap p50 {r['gap_ms']['p50']:.0f} ms, "
                        f"p99 {r['gap_ms']['p99']:.0f} ms", goal,
                        yes(r["duty_cycle"] >= 0.995) if goal else "", cmd))
    scale = load("scaleout")
    if scale:
        cmd = f"`{scale['command']}`"
        for runner, table in scale.get("by_runner", {"current": scale["results"]}).items():
            cells = ", ".join(f"{r['workers']}: {r['jobs_per_s']:.2f}/s ({r['efficiency']:.2f})" for r in table)
            worst = min(r["efficiency"] for r in table)
            out.append((f"Scale-out, T = {scale['render_s']:g} s ({runner}): workers: jobs/s (efficiency)", cells,
                        "≥ 0.95", yes(worst >= 0.95), cmd))
    pipe = load("pipeline")
    if pipe:
        cmd = f"`{pipe['command']}`"
        out.append((f"Worker vs direct diffusers, tiny model CPU, {pipe['steps']} steps {pipe['size_px'][0]}²",
                    f"{pipe['worker_job_s']['p50']:.2f} s vs {pipe['direct_s']['p50']:.2f} s = "
                    f"**{pipe['ratio_worker_job_over_direct']}×** wall, {pipe.get('ratio_cpu_worker_over_direct', '—')}× CPU; "
                    f"same bytes: {pipe['same_bytes_every_round']}", "≤ 1.05×", yes(pipe["goals"]["ratio_le_1_05"]), cmd))
    for gpu in sorted((ROOT / "bench").glob("results-gpu-*.json")):
        data = json.loads(gpu.read_text())
        runs: dict[tuple[str, int], float] = {(r["path"], r["steps"]): r["s"] for r in data["runs"]}
        psnr = {(r["path"], r["steps"]): r.get("psnr_db_vs_worker") for r in data["runs"]}
        cmd = f"`python bench/gpu_real_size.py` → `bench/{gpu.name}`"
        for steps in (8, 50):
            if ("bare", steps) in runs and ("worker", steps) in runs:
                out.append((f"GPU {data.get('device')}, 20B bf16 1024², {steps} steps: worker vs bare diffusers",
                            f"{runs[('worker', steps)]:.2f} s vs {runs[('bare', steps)]:.2f} s = "
                            f"**{runs[('worker', steps)] / runs[('bare', steps)]:.3f}×** (same sha256)", "≤ 1.05×",
                            yes(runs[("worker", steps)] / runs[("bare", steps)] <= 1.05), cmd))
            if ("worker+compile", steps) in runs and ("worker", steps) in runs:
                out.append((f"GPU {data.get('device')}, {steps} steps: regional torch.compile",
                            f"{runs[('worker+compile', steps)]:.2f} s vs {runs[('worker', steps)]:.2f} s = "
                            f"**{runs[('worker', steps)] / runs[('worker+compile', steps)]:.2f}× faster**, PSNR "
                            f"{psnr.get(('worker+compile', steps)) or '—'} dB vs uncompiled", "", "", cmd))
    mem = load("memory")
    if mem:
        cmd, api = f"`{mem['command']}`", mem["api"]
        out.append(("API RSS (1 process)", f"idle {api['idle_mb']:.0f} MB; generate load {api['generate']['peak_mb']:.0f} MB; "
                    f"1024² edits ×{api['edit_1024px']['connections']} {api['edit_1024px']['peak_mb']:.0f} MB", "≤ 150 MB",
                    yes(mem["goals"]["api_le_150_mb"]), cmd))
        w, m = mem["standin_worker"], mem["model_worker"]
        text = f"stand-in worker child {w['child_after_jobs_mb']:.0f} MB (no torch)"
        if "worker_child_mb" in m:
            text += (f"; tiny-model worker child {m['worker_child_mb']:.0f} MB vs plain script {m['script_mb']:.0f} MB: "
                     f"**+{m['worker_beyond_script_mb']:.0f} MB** beyond the model")
        out.append(("Render worker RSS beyond the model", text, "", "", cmd))
    return out


def main() -> int:
    print("| figure | measured | goal | met | command |")
    print("|---|---|---|---|---|")
    for figure, value, goal, met, cmd in rows():
        print(f"| {figure} | {value} | {goal} | {met} | {cmd} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
