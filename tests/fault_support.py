"""Helpers for the fault tests (tests/test_faults.py): job submission and waiting, and the tally
each scenario reports (the receiver that fails on purpose is ``editfarm_testing.webhooks.FlakyReceiver``).

A scenario's jobs are judged the same way everywhere (:func:`judge`):

- survived: ``succeeded``, its output object is in the bucket with the recorded sha256 and
  size, and exactly one terminal webhook was accepted for it;
- lost: not ``succeeded`` (failed, canceled, never finished), or its object is missing, or no
  terminal webhook arrived;
- duplicated: more than one terminal webhook accepted for it (by delivery, or by distinct
  ``webhook-id``).

``attempts`` (how many times a job was started) is reported as a histogram: a job taken over
after its worker was killed has ``attempts == 2`` by design, and that is not a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx

from broker import keys
from broker.redis_conn import client_from_url
from cli.cluster import ROOT, LocalCluster
from cli.localservices import ServiceDied, wait_until
from editfarm_testing.cluster import worker_child_pid
from editfarm_testing.webhooks import ByJob
from tests.e2e_support import auth, data_url, png_bytes

TERMINAL = ("succeeded", "failed", "canceled")
# every process of a fault test's cluster recovers within seconds: leases, the reaper, Celery's
# redelivery, storage retries, webhook retries and the outbox relay (see tests/test_e2e_workers.py)
QUICK_RECOVERY_ENV = {
    "EDITFARM_LEASE_S": "3", "EDITFARM_HEARTBEAT_INTERVAL_S": "0.5", "EDITFARM_REAPER_INTERVAL_S": "0.5",
    "EDITFARM_VISIBILITY_TIMEOUT_S": "5", "EDITFARM_UNACKED_RESTORE_INTERVAL_S": "1",
    "EDITFARM_TRANSIENT_RETRY_S": "1",
    # enough quick retries to outlive a receiver that refuses, fails and hangs in turn
    "EDITFARM_WEBHOOK_RETRY_SCHEDULE_S": ",".join(["0"] + ["0.5"] * 4 + ["1"] * 20),
    # a delivery lost with a dying primary is queued again by the relay within seconds
    "EDITFARM_WEBHOOK_RELAY_AFTER_S": "3",
    "EDITFARM_WEBHOOK_TIMEOUT_S": "3",
    # a queued job whose render message went down with a Redis primary gets a new one within seconds
    "EDITFARM_STRANDED_AFTER_S": "10",
}

REPORT_DIR = ROOT / "test-artifacts" / "faults"


# -- jobs ------------------------------------------------------------------------------------------


def submit(cluster: LocalCluster, steps: int = 4, seed: int = 1, **fields: Any) -> str:
    body = {"operation": "edit", "prompt": "p", "seed": seed, "steps": steps, **fields}
    if body["operation"] != "generate":
        body["image"] = data_url(png_bytes())
    response = httpx.post(f"{cluster.api_url}/v1/jobs", json=body, headers=auth(), timeout=60)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def get(cluster: LocalCluster, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{cluster.api_url}/v1/jobs/{job_id}", headers=auth(), timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def job_fields(cluster: LocalCluster, job_ids: list[str], *names: str) -> dict[str, dict[str, Any]]:
    """Fields of the job records read straight from Redis (cheap for many jobs; plain or Sentinel URL)."""
    client = client_from_url(cluster.redis_url, socket_timeout=5)
    try:
        pipe = client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), names)
        rows = pipe.execute()
    finally:
        client.close()
    return {j: {n: (json.loads(v) if v is not None else None) for n, v in zip(names, row, strict=True)}
            for j, row in zip(job_ids, rows, strict=True)}


def wait_running(cluster: LocalCluster, job_ids: list[str], min_step: int = 1, timeout_s: float = 90) -> None:
    """Until every job runs (all at once) and has made ``min_step`` steps; fails at once if one ended."""
    def check() -> bool:
        rows = job_fields(cluster, job_ids, "status", "progress")
        ended = {j: r["status"] for j, r in rows.items() if r["status"] in TERMINAL}
        if ended:
            raise ServiceDied(f"jobs ended before they all ran together: {ended}")
        return all(r["status"] == "running" and (r["progress"] or {}).get("step", 0) >= min_step
                   for r in rows.values())
    wait_until(check, timeout_s, f"jobs {job_ids} running", interval_s=0.05)


def wait_n_running(cluster: LocalCluster, job_ids: list[str], n: int, min_step: int = 1,
                   timeout_s: float = 90) -> list[str]:
    """Until ``n`` of the jobs run with ``min_step`` steps made; returns those ids."""
    box: dict[str, list[str]] = {}

    def check() -> bool:
        rows = job_fields(cluster, job_ids, "status", "progress")
        box["ids"] = [j for j, r in rows.items()
                      if r["status"] == "running" and (r["progress"] or {}).get("step", 0) >= min_step]
        return len(box["ids"]) >= n
    wait_until(check, timeout_s, f"{n} jobs running", interval_s=0.05)
    return box["ids"][:n]


def wait_all_terminal(cluster: LocalCluster, job_ids: list[str], timeout_s: float = 180) -> None:
    """Until every job is terminal in the job store (polls Redis; the API is checked by :func:`judge`)."""
    def check() -> bool:
        return all(r["status"] in TERMINAL for r in job_fields(cluster, job_ids, "status").values())
    try:
        wait_until(check, timeout_s, "jobs terminal", interval_s=0.2)
    except TimeoutError:
        pass  # judge() counts the unfinished ones as lost


def holder(cluster: LocalCluster, job_id: str) -> str:
    """Name of the render worker (``render0``...) whose lease the job holds (its node: ``render0@local``,
    or ``render0-<model>@local`` on a fleet)."""
    worker = job_fields(cluster, [job_id], "worker")[job_id]["worker"] or ""
    return str(worker).split("@", 1)[0].split("-", 1)[0]


def wait_new_child(cluster: LocalCluster, name: str, old_pid: int, timeout_s: float = 120) -> int:
    """Until the worker's pool child was replaced (a new pid in its ready file); returns it."""
    box: dict[str, int] = {}

    def check() -> bool:
        proc = cluster.procs.get(name)
        assert proc is not None and proc.poll() is None, f"{name} exited: see its log"
        box["pid"] = worker_child_pid(cluster, name)
        return box["pid"] != old_pid
    wait_until(check, timeout_s, f"{name} new child", interval_s=0.1)
    return box["pid"]


def s3_client(cluster: LocalCluster) -> Any:
    return boto3.client("s3", endpoint_url=cluster.s3_url, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test")


# -- the tally -------------------------------------------------------------------------------------


@dataclass
class Tally:
    scenario: str
    trials: int = 0
    survived: int = 0
    lost: int = 0
    duplicated: int = 0
    attempts: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "trials": self.trials, "survived": self.survived, "lost": self.lost,
                "duplicated": self.duplicated, "attempts": {str(k): v for k, v in sorted(self.attempts.items())},
                "wall_s": round((self.ended or time.monotonic()) - self.started, 1), "problems": self.problems[:20],
                **self.notes}

    def line(self) -> str:
        d = self.as_dict()
        return (f"{self.scenario:<28} trials {self.trials:>4}  survived {self.survived:>4}  lost {self.lost:>3}  "
                f"duplicated {self.duplicated:>3}  attempts {d['attempts']}  {d['wall_s']} s")

    def write(self) -> Path:
        self.ended = self.ended or time.monotonic()
        REPORT_DIR.mkdir(parents=True, exist_ok=True)
        path = REPORT_DIR / f"{self.scenario}.json"
        path.write_text(json.dumps({**self.as_dict(), "trials_env": os.environ.get("FAULT_TRIALS")},
                                   indent=2) + "\n")
        return path


def judge(cluster: LocalCluster, tally: Tally, job_ids: list[str], deliveries: ByJob | None,
          expect_attempts: int | None = None, same_message_again_ok: bool = False) -> None:
    """Add ``job_ids`` to ``tally`` as survived / lost / duplicated (see the module docstring).

    Reads every job through the API (so GET works), checks each output object in the bucket,
    and counts terminal webhooks. ``expect_attempts`` turns a different attempt count into a problem.
    ``same_message_again_ok``: one terminal message (one ``webhook-id``) delivered more than once is
    counted in ``tally.notes["same_message_again"]``, not as a duplicate: across a failover whose
    dying primary took the record of a delivery with it, the message is sent again rather than lost,
    and a receiver drops the repeat by its ``webhook-id`` (Standard Webhooks). Two messages for one
    job are always a duplicate.
    """
    s3 = s3_client(cluster)
    for job_id in job_ids:
        tally.trials += 1
        job = get(cluster, job_id)
        tally.attempts[int(job.get("attempts") or 0)] += 1
        problems: list[str] = []
        if job["status"] != "succeeded":
            problems.append(f"{job_id}: {job['status']} {job.get('error')}")
        for output in job.get("outputs") or []:
            try:
                head = s3.head_object(Bucket="editfarm", Key=output["key"])
            except Exception as exc:  # noqa: BLE001 - a missing object is what we look for
                problems.append(f"{job_id}: output {output['key']} missing ({type(exc).__name__})")
                continue
            body = s3.get_object(Bucket="editfarm", Key=output["key"])["Body"].read()
            if head["ContentLength"] != output["size_bytes"] or hashlib.sha256(body).hexdigest() != output["sha256"]:
                problems.append(f"{job_id}: output {output['key']} differs from its record")
        if job["status"] == "succeeded" and not job.get("outputs"):
            problems.append(f"{job_id}: succeeded without outputs")
        duplicated = False
        if deliveries is not None:
            terminal = deliveries.terminal(job_id)
            ids = {d.headers.get("webhook-id") for d in terminal}
            if not terminal:
                problems.append(f"{job_id}: no terminal webhook")
            elif len(ids) == 1 and len(terminal) > 1 and same_message_again_ok:
                tally.notes["same_message_again"] = tally.notes.get("same_message_again", 0) + 1
            elif len(terminal) > 1 or len(ids) > 1:
                duplicated = True
                tally.problems.append(f"{job_id}: {len(terminal)} terminal webhooks, ids {sorted(map(str, ids))}")
        if expect_attempts is not None and job.get("attempts") != expect_attempts:
            tally.problems.append(f"{job_id}: attempts {job.get('attempts')} (expected {expect_attempts})")
        if problems:
            tally.lost += 1
            tally.problems += problems
        elif duplicated:
            tally.duplicated += 1
        else:
            tally.survived += 1
