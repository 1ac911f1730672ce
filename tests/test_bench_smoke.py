"""The benchmarks still run: each ``python -m bench.<name> --quick`` writes its JSON with the expected keys.

Benchmarks are not tests: no timing is asserted here (the quick numbers mean nothing). The
benchmarks run three at a time to keep the whole module short; each starts its own
processes (Redis, S3 server, API, workers) on loopback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration

EXPECTED: dict[str, dict[str, Any]] = {
    "submit": {"operation": str, "loadgen": str, "results": list, "ratio_api_over_bare_1_process": dict,
               "headline": ["api_jobs_per_s_1_process", "bare_jobs_per_s_1_process", "ratio_api_over_bare_1_process",
                            "api_jobs_per_s_best", "api_rss_mb_peak_per_process"]},
    "orchestration": {"jobs": int, "statuses": dict, "ratio_p50": float, "ratio_p99": float,
                      "submit_to_webhook_ms": ["p50", "p99"], "baseline_celery_apply_async_get_ms": ["p50", "p99"],
                      "breakdown_ms": ["post_answered", "queued_to_started", "started_to_finished",
                                       "finished_to_webhook"]},
    "duty_cycle": {"side_px": int, "results": list, "goals": dict},
    "scaleout": {"render_s": float, "results": list, "runs": list, "goals": dict},
    "pipeline": {"steps": int, "ratio_worker_job_over_direct": float, "same_bytes_every_round": bool,
                 "worker_job_s": ["p50"], "worker_render_s": ["p50"], "direct_s": ["p50"]},
    "memory": {"api": ["idle_mb", "peak_mb", "generate", "edit_1024px"],
               "api_malloc_arena_max_2": dict,
               "standin_worker": ["child_idle_mb", "child_after_jobs_mb", "prefork_parent_mb"],
               "model_worker": dict, "goals": dict},
    "replicas": {"summary": ["min_replicas_0", "min_replicas_1", "ratio_1_over_0", "store_create_us",
                             "submit_to_webhook"], "runs": dict},
    "retention": {"pushed": int, "samples": list, "bytes_per_retained_job": int,
                  "steady": ["used_memory_mib_max", "bytes_per_job_in_redis_max", "in_redis_over_last_retention_max"]},
    "fleet_scaleout": {"render_s": float, "results": list, "baseline": dict, "runs": list, "goals": dict},
    "submit-fleet": {"results": list, "model_field": dict},
}
# a report name → (its benchmark's module, the options that select it)
MODULES: dict[str, tuple[str, list[str]]] = {"submit-fleet": ("submit", ["--fleet"])}


def _run(name: str, out: Path, extra: list[str]) -> tuple[str, subprocess.CompletedProcess[str]]:
    module, options = MODULES.get(name, (name, []))
    cmd = [sys.executable, "-m", f"bench.{module}", "--quick", "--out", str(out), "--workdir",
           str(out.parent / f"work-{name}"), *options, *extra]
    return name, subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)


def test_every_benchmark_writes_its_report(tmp_path: Path, tiny_model: Path) -> None:
    extra = {"pipeline": ["--model", str(tiny_model)]}
    outs = {name: tmp_path / f"{name}.json" for name in EXPECTED}
    order = ["pipeline", "submit", "orchestration", "duty_cycle", "scaleout", "memory", "replicas", "retention",
             "fleet_scaleout", "submit-fleet"]
    with ThreadPoolExecutor(3) as pool:
        finished = list(pool.map(lambda n: _run(n, outs[n], extra.get(n, [])), order))
    for name, proc in finished:
        assert proc.returncode == 0, f"bench.{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        report = json.loads(outs[name].read_text())
        module = MODULES.get(name, (name,))[0]
        assert report["benchmark"] == module and report["quick"] is True
        assert report["command"].startswith(f"python -m bench.{module}")
        for key, kind in EXPECTED[name].items():
            assert key in report, f"bench.{name}: no {key!r}"
            if isinstance(kind, list):
                for sub in kind:
                    assert sub in report[key], f"bench.{name}: no {key}.{sub}"
            elif kind is float:
                assert isinstance(report[key], (int, float)), f"bench.{name}: {key} is {report[key]!r}"
            else:
                assert isinstance(report[key], kind), f"bench.{name}: {key} is {type(report[key]).__name__}"
    rows = json.loads(outs["duty_cycle"].read_text())["results"]
    assert {"duty_cycle", "gap_ms", "pre_render_ms", "post_render_ms"} <= set(rows[0])
    rows = json.loads(outs["scaleout"].read_text())["results"]
    assert [r["workers"] for r in rows] == [1, 2] and "efficiency" in rows[0]
    # the fleet: each pool's jobs ran on that pool's workers only, and both pools were measured
    fleet = json.loads(outs["fleet_scaleout"].read_text())
    assert [r["pool"] for r in fleet["results"]] == ["pool-a", "pool-b"]
    assert all(r["misrouted"] == 0 for r in fleet["results"]), fleet["results"]
    assert set(fleet["goals"]) == {"efficiency_ge_0_95[pool-a]", "efficiency_ge_0_95[pool-b]",
                                   "efficiency_ge_0_95[one-model cluster, 2 workers]",
                                   "efficiency_ge_0_95[one-model cluster, 4 workers]"}
    # the model field: every variant's submissions were accepted (a job naming a model included)
    sub = json.loads(outs["submit-fleet"].read_text())
    assert {r["variant"] for r in sub["results"]} == {"api", "api-catalog", "api-model"}
    assert all(r["non_2xx"] == 0 and r["requests"] > 0 for r in sub["runs"]), sub["runs"]
    (row,) = sub["model_field"].values()
    assert set(row["jobs_per_s"]) == {"api", "api-catalog", "api-model"} and "ratio_model_over_api" in row
