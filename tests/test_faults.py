"""Faults survived, proven with real processes.

One local cluster (Redis with AOF, moto's S3 server, the API, two render workers running the
zero-cost render stand-in, the webhook worker with the reaper) plus one render worker with the
real tiny Qwen-Image-Edit model; the render workers reach S3 through a TCP proxy that can be
switched off, and the webhooks go to a receiver that can fail on purpose. Each scenario
injects one fault while jobs are queued and running, then judges every job it accepted
(tests/fault_support.py: survived / lost / duplicated) and writes its tally to
``test-artifacts/faults/<scenario>.json``.

``EDITFARM_FAULT_TRIALS`` (default 4) sets the trials per scenario; the README's
"Reliability" table was measured with a larger value. The soak test runs ``bench/soak.py``
in its short mode.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from broker import keys
from broker.celery_app import RENDER_QUEUES
from cli.cluster import ROOT, ClusterConfig, LocalCluster
from cli.localservices import TcpProxy, wait_until
from tests.e2e_support import API_KEYS, auth
from tests.fault_support import (
    Deliveries,
    FlakyReceiver,
    Tally,
    get,
    holder,
    job_fields,
    judge,
    submit,
    wait_all_terminal,
    wait_new_child,
    s3_client,
    wait_n_running,
    wait_running,
)

pytestmark = pytest.mark.integration

TRIALS = max(2, int(os.environ.get("EDITFARM_FAULT_TRIALS", "4")))
RENDER_S = 2.0  # each stand-in job holds its worker this long (spread over its steps)
STANDIN = ("render0", "render1")  # the stand-in workers: queues high + normal
TINY = "render9"  # the tiny-model worker: queue low only, so only jobs sent there reach it
STANDIN_QUEUES = (RENDER_QUEUES["high"], RENDER_QUEUES["normal"])

FAULT_ENV = {
    "EDITFARM_RENDERER": "standin", "EDITFARM_STANDIN_RENDER_S": repr(RENDER_S),
    # failover within seconds (see tests/test_e2e_workers.py)
    "EDITFARM_LEASE_S": "3", "EDITFARM_HEARTBEAT_INTERVAL_S": "0.5", "EDITFARM_REAPER_INTERVAL_S": "0.5",
    "EDITFARM_VISIBILITY_TIMEOUT_S": "5", "EDITFARM_UNACKED_RESTORE_INTERVAL_S": "1",
    "EDITFARM_TRANSIENT_RETRY_S": "1",
    # enough quick retries to outlive a receiver that refuses, fails and hangs in turn
    "EDITFARM_WEBHOOK_RETRY_SCHEDULE_S": ",".join(["0"] + ["0.5"] * 4 + ["1"] * 20),
    "EDITFARM_WEBHOOK_TIMEOUT_S": "3",
}

REPORTS: list[Tally] = []


class Faults:
    """The cluster, the S3 proxy in front of moto for the render workers, the webhook receiver."""

    def __init__(self, cluster: LocalCluster, s3_proxy: TcpProxy, receiver: FlakyReceiver, tiny_model: Path) -> None:
        self.cluster, self.s3_proxy, self.receiver = cluster, s3_proxy, receiver
        self.deliveries = Deliveries(receiver)
        self.tiny_model = tiny_model

    def start_standin(self, name: str) -> None:
        self.cluster.start_render_worker(int(name.removeprefix("render")),
                                         {"EDITFARM_S3_ENDPOINT_URL": self.s3_proxy.url}, queues=STANDIN_QUEUES)

    def start_tiny(self) -> None:
        self.cluster.start_render_worker(int(TINY.removeprefix("render")), {
            "EDITFARM_S3_ENDPOINT_URL": self.s3_proxy.url, "EDITFARM_RENDERER": "diffusers",
            "EDITFARM_MODEL": str(self.tiny_model)}, queues=(RENDER_QUEUES["low"],))

    def healthy(self) -> None:
        """Every fault is repaired: S3 reachable, receiver answering, stand-in workers ready."""
        self.s3_proxy.set_mode("up")
        self.receiver.mode = "ok"
        for name in STANDIN:
            self.cluster.wait_worker_ready(name, timeout_s=120)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
           request: pytest.FixtureRequest) -> Iterator[Faults]:
    config = ClusterConfig(workdir=tmp_path_factory.mktemp("faults"), model="standin", api_keys=API_KEYS,
                           render_workers=0, extra_env=FAULT_ENV, redis_appendfsync="always")
    with LocalCluster(config) as cluster, FlakyReceiver() as receiver:
        assert cluster.s3 is not None
        with TcpProxy(cluster.s3.port) as s3_proxy:
            setup = Faults(cluster, s3_proxy, receiver, tiny_model)
            setup.start_tiny()  # loads in the background while the stand-in scenarios run
            for name in STANDIN:
                setup.start_standin(name)
            setup.healthy()
            yield setup
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["", "fault scenarios (trials / survived / lost / duplicated):", *(t.line() for t in REPORTS)]
    if reporter is not None:
        for line in lines:
            reporter.write_line(line)


def finish(tally: Tally) -> None:
    tally.write()
    REPORTS.append(tally)
    print(tally.line())


def assert_all_survived(tally: Tally) -> None:
    finish(tally)
    assert tally.lost == 0 and tally.duplicated == 0 and tally.survived == tally.trials, tally.as_dict()
    assert not tally.problems, tally.problems


# -- workers killed mid-render ---------------------------------------------------------------------


def test_sigkill_of_the_render_child_mid_render_ends_each_job_once(faults: Faults) -> None:
    """SIGKILL the pool child (the process holding the model) while it renders."""
    cluster, tally, jobs = faults.cluster, Tally("kill_child_standin"), []
    faults.healthy()
    for round_ in range(TRIALS // 2):
        pair = [submit(cluster, steps=8, seed=round_ * 2 + i, webhook=faults.receiver.url) for i in range(2)]
        wait_running(cluster, pair)
        victims = {holder(cluster, job_id) for job_id in pair}
        assert victims == set(STANDIN), victims
        pids = {name: cluster.worker_child_pid(name) for name in victims}
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        for name, pid in pids.items():
            wait_new_child(cluster, name, pid)  # Celery replaced the killed child
        jobs += pair
    wait_all_terminal(cluster, jobs)
    faults.deliveries.wait_terminal(jobs)
    judge(cluster, tally, jobs, faults.deliveries, expect_attempts=2)
    assert_all_survived(tally)


def test_sigkill_of_whole_worker_process_groups_ends_each_job_once(faults: Faults) -> None:
    """SIGKILL every process of both render workers (a lost node) while both render; restart them."""
    cluster, tally, jobs = faults.cluster, Tally("kill_group_standin"), []
    faults.healthy()
    for round_ in range(TRIALS // 2):
        pair = [submit(cluster, steps=8, seed=round_ * 2 + i, webhook=faults.receiver.url) for i in range(2)]
        wait_running(cluster, pair)
        victims = {holder(cluster, job_id) for job_id in pair}
        assert victims == set(STANDIN), victims
        for name in victims:
            os.killpg(cluster.procs[name].pid, signal.SIGKILL)
        for name in victims:
            assert cluster.procs[name].wait(30) == -signal.SIGKILL
            cluster.stop_process(name)
            faults.start_standin(name)
        for name in victims:
            cluster.wait_worker_ready(name, timeout_s=120)
        jobs += pair
    wait_all_terminal(cluster, jobs)
    faults.deliveries.wait_terminal(jobs)
    judge(cluster, tally, jobs, faults.deliveries, expect_attempts=2)
    assert_all_survived(tally)


def test_sigkill_of_the_tiny_model_child_mid_render_ends_the_job_once(faults: Faults) -> None:
    """The same with the real tiny Qwen-Image-Edit pipeline (from_pretrained, denoising steps)."""
    cluster, tally = faults.cluster, Tally("kill_child_tiny_model")
    cluster.wait_worker_ready(TINY, timeout_s=300)
    job_id = submit(cluster, steps=10, priority="low", webhook=faults.receiver.url)
    wait_running(cluster, [job_id], min_step=2, timeout_s=120)
    assert holder(cluster, job_id) == TINY
    pid = cluster.worker_child_pid(TINY)
    os.kill(pid, signal.SIGKILL)
    wait_all_terminal(cluster, [job_id], timeout_s=300)
    faults.deliveries.wait_terminal([job_id])
    judge(cluster, tally, [job_id], faults.deliveries, expect_attempts=2)
    tally.notes["renderer"] = "tiny Qwen-Image-Edit (random weights), 10 steps on CPU, killed at step 2"
    cluster.stop_process(TINY, signal.SIGKILL)  # its CPU is needed by the scenarios that follow
    assert_all_survived(tally)


# -- storage unreachable ---------------------------------------------------------------------------


def test_s3_down_during_uploads_jobs_wait_and_retry_and_never_succeed_without_their_object(
        faults: Faults) -> None:
    """The render workers' S3 endpoint refuses connections for 4+ s while renders are about to upload."""
    cluster, tally = faults.cluster, Tally("s3_down_during_upload")
    faults.healthy()
    s3 = s3_client(cluster)
    jobs = [submit(cluster, steps=8, seed=i, webhook=faults.receiver.url) for i in range(max(6, TRIALS))]
    wait_n_running(cluster, jobs, 2, min_step=6)  # renders about to upload
    failed_uploads = lambda: sum(cluster.log(n).count("handed back: put") for n in STANDIN)  # noqa: E731
    before = failed_uploads()
    down_at = time.monotonic()
    faults.s3_proxy.set_mode("refuse")
    unbacked: list[str] = []

    def outage_done() -> bool:
        # meanwhile: a job that is succeeded has its object (read from moto directly, not through the proxy)
        for job_id, row in job_fields(cluster, jobs, "status", "outputs").items():
            if row["status"] == "succeeded":
                for output in row["outputs"] or [None]:
                    try:
                        s3.head_object(Bucket="editfarm", Key=output["key"])
                    except Exception:  # noqa: BLE001
                        unbacked.append(job_id)
        return time.monotonic() - down_at >= 4 and failed_uploads() > before
    try:
        wait_until(outage_done, 60, "an upload failed while S3 was down", interval_s=0.2)
    finally:
        faults.s3_proxy.set_mode("up")
    assert not unbacked, unbacked
    tally.notes["outage_s"] = round(time.monotonic() - down_at, 1)
    wait_all_terminal(cluster, jobs)
    faults.deliveries.wait_terminal(jobs)
    tally.notes["uploads_failed"] = failed_uploads() - before
    judge(cluster, tally, jobs, faults.deliveries)
    assert_all_survived(tally)


# -- webhook receiver failing ----------------------------------------------------------------------


def test_a_failing_webhook_receiver_gets_exactly_one_accepted_signed_delivery(faults: Faults) -> None:
    """The receiver refuses connections, then answers 500, then hangs past the timeout, then recovers."""
    from standardwebhooks.webhooks import Webhook

    from workers.webhooks import WebhookOutbox, message_id_for

    cluster, tally = faults.cluster, Tally("webhook_receiver_failing")
    faults.healthy()
    with FlakyReceiver(hang_s=6) as receiver, TcpProxy(receiver.port) as gate:
        url = f"{gate.url}/hooks/editfarm"
        deliveries = Deliveries(receiver)
        gate.set_mode("refuse")
        jobs = [submit(cluster, steps=2, seed=i, webhook=url) for i in range(max(3, TRIALS))]
        outbox = WebhookOutbox(redis.Redis.from_url(cluster.redis_url))
        messages = {j: message_id_for(j, "job.succeeded") for j in jobs}

        def every_message_saw(error: str) -> bool:
            return all(any(error in str(a.get("error")) for a in outbox.attempts(m)) for m in messages.values())

        wait_until(lambda: every_message_saw("Connection refused"), 120, "refused attempts", interval_s=0.2)
        gate.set_mode("up")
        receiver.mode = "error"
        wait_until(lambda: every_message_saw("http 500"), 60, "500 attempts", interval_s=0.2)
        receiver.mode = "hang"
        wait_until(lambda: every_message_saw("timeout"), 60, "timed-out attempts", interval_s=0.2)
        receiver.mode = "ok"
        wait_until(lambda: all(getattr(outbox.get(m), "state", None) == "delivered" for m in messages.values()),
                   60, "deliveries", interval_s=0.2)
        deliveries.wait_terminal(jobs, settle_s=3)  # any second delivery would come within this
        judge(cluster, tally, jobs, deliveries)
        verifier = Webhook(cluster.webhook_secret)
        for job_id in jobs:
            for headers, body in deliveries.terminal(job_id):
                assert verifier.verify(body, headers)["data"]["id"] == job_id
            sent_ids = {h["webhook-id"] for h, b, _ in receiver.requests if json.loads(b)["data"]["id"] == job_id}
            assert sent_ids == {messages[job_id]}, sent_ids  # the same id on every retry
        attempts = [len(outbox.attempts(m)) for m in messages.values()]
        tally.notes["delivery_attempts_per_message"] = attempts
        tally.notes["requests_seen_by_receiver"] = len(receiver.requests)
    assert_all_survived(tally)


# -- API restarted ---------------------------------------------------------------------------------


def test_restarting_the_api_mid_flight_leaves_running_jobs_alone(faults: Faults) -> None:
    cluster, tally = faults.cluster, Tally("api_restart")
    faults.healthy()
    jobs = [submit(cluster, steps=8, seed=i, webhook=faults.receiver.url) for i in range(max(4, TRIALS))]
    wait_n_running(cluster, jobs, 2)
    cluster.restart_api(signal.SIGKILL)
    for job_id in jobs:  # GET works after the restart, whatever state each job is in
        assert get(cluster, job_id)["status"] in {"queued", "running", "succeeded"}
    wait_all_terminal(cluster, jobs)
    faults.deliveries.wait_terminal(jobs)
    judge(cluster, tally, jobs, faults.deliveries, expect_attempts=1)
    assert_all_survived(tally)


# -- Redis restarted -------------------------------------------------------------------------------


def test_redis_restarted_with_jobs_queued_and_running_every_accepted_job_ends_once(faults: Faults) -> None:
    """Redis is SIGKILLed (appendfsync always) with 2 jobs running and the rest queued, down 2 s."""
    cluster, tally = faults.cluster, Tally("redis_restart")
    faults.healthy()
    jobs = [submit(cluster, steps=8, seed=i, webhook=faults.receiver.url) for i in range(max(8, TRIALS))]
    wait_n_running(cluster, jobs, 2)
    states = [r["status"] for r in job_fields(cluster, jobs, "status").values()]
    tally.notes["at_crash"] = {s: states.count(s) for s in set(states)}
    assert "queued" in states and "running" in states, states
    cluster.restart_redis(signal.SIGKILL, down_s=2)
    client = redis.Redis.from_url(cluster.redis_url)
    assert all(client.exists(keys.job(j)) for j in jobs)  # the AOF kept every accepted job
    wait_all_terminal(cluster, jobs, timeout_s=240)
    faults.deliveries.wait_terminal(jobs, timeout_s=60)
    judge(cluster, tally, jobs, faults.deliveries)
    assert_all_survived(tally)
    # the cluster works on after the restart
    after = submit(cluster, steps=2, webhook=faults.receiver.url)
    wait_all_terminal(cluster, [after], timeout_s=120)
    assert get(cluster, after)["status"] == "succeeded"


def test_get_after_everything_still_answers(faults: Faults) -> None:
    """The cluster that took all the faults above still takes and finishes a job."""
    job_id = submit(faults.cluster, steps=2, webhook=faults.receiver.url)
    wait_all_terminal(faults.cluster, [job_id], timeout_s=120)
    assert get(faults.cluster, job_id)["status"] == "succeeded"
    response = httpx.get(f"{faults.cluster.api_url}/v1/jobs/{job_id}", headers=auth(), timeout=10)
    assert response.status_code == 200


# -- soak ------------------------------------------------------------------------------------------


def test_soak_short_run_loses_and_duplicates_nothing_and_memory_stays_bounded(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    jobs = int(os.environ.get("EDITFARM_SOAK_JOBS", "300"))
    run = subprocess.run([sys.executable, "-m", "bench.soak", "--jobs", str(jobs), "--out", str(out),
                          "--workdir", str(tmp_path / "cluster")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    tally = Tally("soak_short", trials=report["submitted"], survived=report["succeeded"], lost=report["lost"],
                  duplicated=report["duplicated"], notes={"throughput_jobs_per_s": report["throughput_jobs_per_s"],
                                                          "rss_mb": report["rss_mb"]})
    finish(tally)
    assert report["submitted"] == jobs and report["succeeded"] == jobs
    assert report["lost"] == 0 and report["duplicated"] == 0, report["problems"]
    for role, rss in report["rss_mb"].items():
        assert rss["end"] - rss["start"] < 64, (role, rss)  # no leak of any size over a short run
