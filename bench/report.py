"""Render the "Performance" table of ``docs/performance.md`` from ``bench/results/``: ``python -m bench.report``.

Reads ``submit``, ``submit-edit``, ``submit-fleet``, ``orchestration``, ``replicas``, ``duty_cycle``,
``scaleout``, ``fleet_scaleout``, ``pipeline``, ``memory``
(``<name>.json``, as written by each benchmark) and the GPU reports
(``bench/results-gpu-*.json``, from ``bench/gpu_real_size.py`` on an H200), and writes
Markdown rows (figure, value, goal, met?, and the command behind the number) between the two
marker comments of ``docs/performance.md``; the prose around the table is left alone.
``--print`` prints the table instead; ``--check`` exits 1 when the document is out of date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "performance.md"
# The table lives between these two lines of DOC; everything else there is written by hand.
BEGIN = "<!-- begin: table rendered by `python -m bench.report` from bench/results; edit those, not this -->"
END = "<!-- end: table rendered by `python -m bench.report` -->"

Row = tuple[str, str, str, str, str]


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def yes(flag: bool | None) -> str:
    return "—" if flag is None else ("yes" if flag else "**no**")


def submit_rows(sub: dict[str, Any]) -> list[Row]:
    cmd, h = f"`{sub['command']}`", sub["headline"]
    fair = sub["fair_baseline"]
    rate = {(r["variant"], r["setting"], r["workers"]): r for r in sub["results"]}
    out: list[Row] = []
    for r in sub["results"]:
        if r["workers"] == 1 and r["variant"] == "api":
            base = rate.get((fair, r["setting"], 1))
            value = (f"{r['jobs_per_s']:.0f} jobs/s vs bare {base['jobs_per_s']:.0f} = "
                     f"**{r['jobs_per_s'] / base['jobs_per_s']:.2f}×**; CPU/job {r['app_cpu_ms_per_job']:.1f} ms "
                     f"vs {base['app_cpu_ms_per_job']:.1f} ms") if base else f"{r['jobs_per_s']:.0f} jobs/s"
            out.append((f"Submission, 1 API process, {r['setting']}", value, "≥ 0.8× bare",
                        yes(base is not None and r["jobs_per_s"] / base["jobs_per_s"] >= 0.8), cmd))
    p = sub.get("proposed")
    if p:
        value = (f"{p['api_proposed_jobs_per_s_1_process']:.0f} jobs/s = "
                 f"**{p['ratio_api_proposed_over_bare_1_process']}×** bare, "
                 f"{p['ratio_api_proposed_over_api_1_process']}× today's API")
        out.append((f"Submission, 1 process, proposed fast path (prototype `bench/lean_api.py`), {p['setting']}",
                    value, "≥ 0.8× bare", yes(p["ratio_api_proposed_over_bare_1_process"] >= 0.8), cmd))
    counts = sorted({r["workers"] for r in sub["results"] if r["workers"] > 1})
    if counts:
        best = sub["results"][-1]["setting"]
        for variant in ("api", "api-proposed", fair):
            cells = [f"{n}: {rate[(variant, best, n)]['jobs_per_s']:.0f}" for n in [1, *counts]
                     if (variant, best, n) in rate]
            if cells:
                top = max(rate[(variant, best, n)]["jobs_per_s"] for n in [1, *counts] if (variant, best, n) in rate)
                goal, met = ("≥ 2,000 jobs/s", yes(top >= 2000)) if variant != fair else ("", "")
                out.append((f"Submission, API processes: jobs/s ({variant})", ", ".join(cells), goal, met, cmd))
    out.append(("API RSS under submission load (largest process)", f"{h['api_rss_mb_peak_per_process']:.0f} MB",
                "≤ 150 MB", yes(h["api_rss_mb_peak_per_process"] <= 150), cmd))
    return out


def edit_submit_rows(sub: dict[str, Any]) -> list[Row]:
    """``bench.submit --mode edit``: the API against the bare endpoint that decodes, verifies and stores the image."""
    cmd, fair = f"`{sub['command']}`", sub["fair_baseline"]
    rate = {(r["variant"], r["setting"], r["workers"]): r for r in sub["results"]}
    out: list[Row] = []
    for r in sub["results"]:
        base = rate.get((fair, r["setting"], 1))
        if r["workers"] == 1 and r["variant"] == "api" and base:
            value = (f"{r['jobs_per_s']:.0f} jobs/s vs bare {base['jobs_per_s']:.0f} = "
                     f"**{r['jobs_per_s'] / base['jobs_per_s']:.2f}×**; CPU/job {r['app_cpu_ms_per_job']:.1f} ms "
                     f"vs {base['app_cpu_ms_per_job']:.1f} ms")
            out.append((f"Edit submission (1024² PNG data URL, {sub.get('body_bytes', 0) / 1e6:.1f} MB), "
                        f"1 API process, {r['setting']}", value, "≥ 0.8× bare",
                        yes(r["jobs_per_s"] / base["jobs_per_s"] >= 0.8), cmd))
    return out


def orchestration_rows(orch: dict[str, Any]) -> list[Row]:
    cmd, b = f"`{orch['command']}`", orch["baseline_celery_apply_async_get_ms"]
    out: list[Row] = []
    for name, v in orch.get("by_variant", {"current": orch}).items():
        t, parts = v["submit_to_webhook_ms"], v["breakdown_ms"]
        value = (f"p50 {t['p50']:.0f} ms = **{v['ratio_p50']}×** Celery's {b['p50']:.1f} ms; p99 {t['p99']:.0f} ms "
                 f"(POST {parts['post_answered']['p50']:.0f}, queue {parts['queued_to_started']['p50']:.0f}, "
                 f"run {parts['started_to_finished']['p50']:.0f}, webhook {parts['finished_to_webhook']['p50']:.0f} ms)")
        label = "Submit → webhook, stand-in 0 s" + ("" if name == "current" else f" ({name})")
        met = v["goals"]["p50_le_3x_baseline"] and v["goals"]["p99_le_50_ms"]
        out.append((label, value, "p50 ≤ 3× bare Celery, p99 ≤ 50 ms", yes(met), cmd))
    alone = orch.get("parts_alone_ms")
    if alone:
        value = (f"{orch['floor_ms']:.1f} ms = **{orch['floor_over_baseline']}×** Celery's {b['p50']:.1f} ms: "
                 f"Celery round trip + API HTTP leg {alone['api_http_get']['p50']:.1f} + S3 put "
                 f"{alone['s3_put_64px_png']['p50']:.1f} + webhook POST {alone['webhook_post']['p50']:.1f} ms "
                 "(each measured alone, p50)")
        server = orch.get("s3_servers", ["moto"])[0]  # runs before --s3 existed were on moto
        out.append((f"Submit → webhook: floor of the parts that are not ours (S3: {server})", value, "", "", cmd))
    by_s3 = orch.get("floor_by_s3_ms", {})
    if len(by_s3) > 1:  # --s3 seaweedfs,moto: the same floor on each S3 server, side by side
        puts = {s: alone["s3_put_64px_png" if i == 0 else f"s3_put_64px_png@{s}"]["p50"]
                for i, s in enumerate(orch["s3_servers"])}
        value = "; ".join(f"{s}: floor {f:.1f} ms (S3 put {puts[s]:.1f} ms)" for s, f in by_s3.items())
        out.append(("Submit → webhook floor by S3 server (one run)", value, "", "", cmd))
    return out


def replica_rows(rep: dict[str, Any]) -> list[Row]:
    """``bench.replicas``: EDITFARM_REDIS_MIN_REPLICAS 1 against 0, side by side in one run."""
    cmd, s = f"`{rep['command']}`", rep["summary"]
    zero, one = s["min_replicas_0"], s["min_replicas_1"]
    out: list[Row] = [(
        "Submission with `EDITFARM_REDIS_MIN_REPLICAS` 1 vs 0 (1 replica, loopback)",
        f"{one['requests_per_s']:.0f} vs {zero['requests_per_s']:.0f} jobs/s (medians) = {s['ratio_1_over_0']}×; "
        f"round by round **{s.get('ratio_1_over_0_paired_median', s['ratio_1_over_0'])}×** (median); "
        f"every job on the replica: {yes(one['replica_has_every_job'])}", "", "", cmd)]
    latency = s.get("submit_to_webhook")
    if latency:
        t0, t1 = latency["min_replicas_0"]["submit_to_webhook_ms"], latency["min_replicas_1"]["submit_to_webhook_ms"]
        p0, p1 = latency["min_replicas_0"]["post_ms"], latency["min_replicas_1"]["post_ms"]
        out.append(("Submit → webhook with `EDITFARM_REDIS_MIN_REPLICAS` 1 vs 0, stand-in 0 s",
                    f"p50 {t1['p50']:.1f} vs {t0['p50']:.1f} ms (**{s['submit_to_webhook_p50_ratio_1_over_0']}×**), "
                    f"p95 {t1['p95']:.1f} vs {t0['p95']:.1f} ms; POST alone p50 {p1['p50']:.1f} vs {p0['p50']:.1f} ms",
                    "", "", cmd))
    return out


def duty_rows(duty: dict[str, Any]) -> list[Row]:
    cmd, out = f"`{duty['command']}`", []
    for r in duty["results"]:
        parts = r.get("gap_parts_ms", {})
        detail = ""
        if parts and r["runner"] != "pipelined":  # pipelined: the task returns at render start; parts don't apply
            detail = (f" (finish {parts['render_end_to_task_return'].get('p50', 0):.0f} + Celery "
                      f"{parts['task_return_to_next_task'].get('p50', 0):.0f} + fetch/decode/lease "
                      f"{parts['next_task_to_render_start'].get('p50', 0):.0f} ms)")
        goal = "≥ 99.5 %" if r["render_s"] == 2.0 else ""
        runner = {"serial": "pipelining off", "pipelined": "pipelined, the default"}.get(r["runner"], r["runner"])
        value = (f"**{100 * r['duty_cycle']:.1f} %**; gap p50 {r['gap_ms']['p50']:.0f} ms{detail}, "
                 f"p99 {r['gap_ms']['p99']:.0f} ms")
        out.append((f"GPU duty cycle, T = {r['render_s']:g} s ({runner})", value, goal,
                    yes(r["duty_cycle"] >= 0.995) if goal else "", cmd))
    return out


def scale_rows(scale: dict[str, Any]) -> list[Row]:
    cmd, out = f"`{scale['command']}`", []
    for runner, table in scale.get("by_runner", {"current": scale["results"]}).items():
        cells = ", ".join(f"{r['workers']}: {r['jobs_per_s']:.2f} ({r['efficiency']:.3f})" for r in table)
        worst = min(r["efficiency"] for r in table)
        label = {"serial": "pipelining off", "pipelined": "pipelined, the default"}.get(runner, runner)
        out.append((f"Scale-out, T = {scale['render_s']:g} s ({label}): workers: jobs/s (efficiency)", cells,
                    "≥ 0.95", yes(worst >= 0.95), cmd))
    return out


def fleet_scale_rows(fleet: dict[str, Any]) -> list[Row]:
    """``bench.fleet_scaleout``: each pool's scaling with every pool loaded at once, beside the one-model cluster."""
    cmd, n, base = f"`{fleet['command']}`", fleet["workers_per_pool"], fleet.get("baseline")
    cells = ", ".join(f"{r['pool']}: {r['jobs_per_s']:.2f} ({r['efficiency']:.3f})" for r in fleet["results"])
    for row in (base, fleet.get("baseline_same_total_workers")):
        if row:
            cells += f"; one-model cluster beside it, {row['workers']} workers: {row['jobs_per_s']:.2f} ({row['efficiency']:.3f})"
    worst = min(r["efficiency"] for r in fleet["results"])
    label = {"serial": "pipelining off", "pipelined": "pipelined, the default"}.get(fleet["runner"], fleet["runner"])
    return [(f"Fleet scale-out, {len(fleet['pools'])} pools × {n} workers loaded at once, T = {fleet['render_s']:g} s "
             f"({label}): per pool jobs/s (efficiency vs {n}× its 1 worker)", cells, "≥ 0.95 per pool", yes(worst >= 0.95),
             cmd)]


def fleet_submit_rows(sub: dict[str, Any]) -> list[Row]:
    """``bench.submit --fleet``: submissions naming a model against the one-model cluster's, over HTTP
    (throughput, the server's CPU per job) and in one process (the API's CPU per job, paired blocks)."""
    cmd, out = f"`{sub['command']}`", []
    inproc = sub.get("in_process")
    for setting, r in sub.get("model_field", {}).items():
        rate, cpu, today = r["jobs_per_s"], r["app_cpu_ms_per_job"], r["today"]
        key = today.replace("-", "_")
        rounds = r[f"ratio_model_over_{key}_per_round"]
        value = (f"HTTP: {rate['api-model']:.0f} jobs/s vs {rate[today]:.0f} = {r[f'ratio_model_over_{key}']}× "
                 f"(rounds {min(rounds)}–{max(rounds)}), server CPU/job {cpu['api-model']:.2f} vs {cpu[today]:.2f} ms "
                 f"= {r[f'cpu_ratio_{key}_over_model']}×")
        if inproc and today == "api":
            us = inproc["cpu_us_per_job"]
            value += (f"; in-process CPU/job {us['api-model']:.0f} vs {us['api']:.0f} µs = "
                      f"**{inproc['cpu_ratio_api_over_api_model_paired_median']}×** (paired blocks; the catalog "
                      f"naming no model: {inproc['cpu_ratio_api_over_api_catalog_paired_median']}×)")
        out.append((f"Submission naming a model (catalog of 2) vs the one-model cluster, 1 API process, {setting}",
                    value, "≥ 0.95× today's", yes(r["goal_within_5_percent"]), cmd))
    return out


def pipeline_rows(pipe: dict[str, Any]) -> list[Row]:
    cmd = f"`{pipe['command']}`"
    w, d = pipe["worker_job_s"], pipe["direct_s"]
    value = (f"wall {w['p50']:.2f} s vs {d['p50']:.2f} s = **{pipe['ratio_worker_job_over_direct']}×** (medians; "
             f"rounds ranged {min(w['min'], d['min']):.1f}–{max(w['max'], d['max']):.1f} s with the machine's other "
             f"load); CPU time {pipe['worker_cpu_s']['p50']:.2f} s vs {pipe['direct_cpu_s']['p50']:.2f} s = "
             f"**{pipe.get('ratio_cpu_worker_over_direct', '—')}×**; same bytes every round: "
             f"{pipe['same_bytes_every_round']}")
    return [(f"Worker job vs direct diffusers call, tiny model, CPU, {pipe['steps']} steps, {pipe['size_px'][0]}²",
             value, "≤ 1.05×", yes(pipe["goals"]["ratio_le_1_05"]), cmd)]


def gpu_duty_rows(name: str, data: dict[str, Any]) -> list[Row]:
    """The real-size duty cycle through the worker's Runner (bench/gpu_duty.py), serial vs pipelined."""
    cmd = f"`python bench/gpu_duty.py --jobs 3 --steps 8` ({data['device']}) → `bench/{name}`"
    out: list[Row] = []
    for mode, label in (("serial", "pipelining off"), ("pipelined", "pipelined, the default")):
        runs = [r for r in data["runs"] if r["mode"] == mode]
        if not runs:
            continue
        duty = sorted(r["duty_cycle"] for r in runs)
        median = statistics.median(duty)
        gap_ms = statistics.median(r["gap_ms_p50"] for r in runs)
        value = (f"**{100 * median:.2f} %** (runs {', '.join(f'{100 * d:.2f}' for d in duty)}); "
                 f"gap p50 {gap_ms:.0f} ms; render {runs[0]['render_s_p50']:.1f} s")
        out.append((f"{data['device']}, 20B architecture, 1024², 8 steps: GPU duty cycle through the worker's "
                    f"runner ({label}; in-memory stores)", value, "≥ 99.5 %", yes(median >= 0.995), cmd))
    return out


def gpu_rows() -> list[Row]:
    out: list[Row] = []
    for gpu in sorted((ROOT / "bench").glob("results-gpu-*.json")):
        data = json.loads(gpu.read_text())
        if "duty" in gpu.name:
            out += gpu_duty_rows(gpu.name, data)
            continue
        runs = {(r["path"], r["steps"]): r for r in data["runs"]}
        only = " --only compile" if "compile" in gpu.name else ""
        cmd = f"`python bench/gpu_real_size.py --steps 8,50{only}` (H200, `bench/gpu_run.sh`) → `bench/{gpu.name}`"
        device = data.get("device", "GPU")
        for steps in (8, 50):
            worker, bare = runs.get(("worker", steps)), runs.get(("bare", steps))
            if worker and bare:
                same = " (same image: equal sha256)" if worker["sha256"] == bare["sha256"] else ""
                out.append((f"{device}, 20B architecture, random bf16, 1024², {steps} steps: worker vs bare diffusers",
                            f"{worker['s']:.2f} s vs {bare['s']:.2f} s = **{worker['s'] / bare['s']:.3f}×**{same}",
                            "≤ 1.05×", yes(worker["s"] / bare["s"] <= 1.05), cmd))
            compiled = runs.get(("worker+compile", steps))
            if worker and compiled and compiled.get("psnr_db_vs_worker"):
                value = (f"{compiled['s']:.2f} s vs {worker['s']:.2f} s = **{worker['s'] / compiled['s']:.2f}× "
                         f"faster**; PSNR {compiled['psnr_db_vs_worker']} dB vs uncompiled")
                out.append((f"{device}, {steps} steps: regional torch.compile (speed-up)", value, "", "", cmd))
    return out


def memory_rows(mem: dict[str, Any]) -> list[Row]:
    cmd, out = f"`{mem['command']}`", []
    for key, label in (("api", ""), ("api_malloc_arena_max_2", ", MALLOC_ARENA_MAX=2")):
        api = mem.get(key)
        if not api or "skipped" in api:
            continue
        edit = api["edit_1024px"]
        value = (f"idle {api['idle_mb']:.0f} MB; generate load peak **{api['generate']['peak_mb']:.0f} MB**; "
                 f"1024² edit uploads ({edit['connections']} at once) peak **{edit['peak_mb']:.0f} MB**, "
                 f"{api['after_mb']:.0f} MB after")
        out.append((f"API RSS, 1 process ({api.get('setting', '')}{label})", value, "≤ 150 MB",
                    yes(api["peak_mb"] <= 150), cmd))
    w, m = mem["standin_worker"], mem["model_worker"]
    text = f"stand-in worker's pool child {w['child_after_jobs_mb']:.0f} MB after 1024² jobs (no torch)"
    if "worker_child_mb" in m:
        text += (f"; tiny-model worker child {m['worker_child_mb']:.0f} MB vs a plain script with the same "
                 f"pipeline {m['script_mb']:.0f} MB: **+{m['worker_beyond_script_mb']:.0f} MB** beyond the model")
    out.append(("Render worker RSS beyond the model", text, "", "", cmd))
    return out


def rows() -> list[Row]:
    out: list[Row] = []
    for name, render in (("submit", submit_rows), ("submit-edit", edit_submit_rows),
                         ("submit-fleet", fleet_submit_rows), ("orchestration", orchestration_rows),
                         ("replicas", replica_rows), ("duty_cycle", duty_rows), ("scaleout", scale_rows),
                         ("fleet_scaleout", fleet_scale_rows), ("pipeline", pipeline_rows)):
        data = load(name)
        if data:
            out += render(data)
    out += gpu_rows()
    mem = load("memory")
    if mem:
        out += memory_rows(mem)
    return out


def table() -> str:
    """The Markdown table of every figure in ``bench/results``, one row per figure."""
    lines = ["| figure | measured | goal | met | command |", "|---|---|---|---|---|"]
    lines += [f"| {figure} | {value} | {goal} | {met} | {cmd} |" for figure, value, goal, met, cmd in rows()]
    return "\n".join(lines) + "\n"


def render_into(document: str, rendered: str) -> str:
    """``document`` with the text between its BEGIN and END lines replaced by ``rendered``.

    Raises:
        ValueError: the document lacks either marker line, or has them out of order.
    """
    head, begin, rest = document.partition(BEGIN + "\n")
    _, end, tail = rest.partition(END + "\n")
    if not begin or not end:
        raise ValueError(f"the table markers are missing: a line {BEGIN!r}, then a line {END!r}")
    return f"{head}{begin}\n{rendered}\n{end}{tail}"  # blank lines: the comments stay apart from the table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", help="print the table, write nothing")
    mode.add_argument("--check", action="store_true", help=f"exit 1 if {DOC.relative_to(ROOT)} is out of date")
    args = parser.parse_args(argv)
    rendered = table()
    if args.print:
        sys.stdout.write(rendered)
        return 0
    current = DOC.read_text()
    updated = render_into(current, rendered)
    if args.check:
        if updated != current:
            print(f"{DOC.relative_to(ROOT)} is out of date: run python -m bench.report", file=sys.stderr)
            return 1
        return 0
    if updated != current:
        DOC.write_text(updated)
    print(f"wrote the table of {DOC.relative_to(ROOT)} ({len(rendered.splitlines()) - 2} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
