"""Faults survived, proven with real processes.

One local cluster (Redis with AOF, the S3 server (SeaweedFS), the API, two render workers running the
zero-cost render stand-in, the webhook worker with the reaper) plus two render workers with the
real tiny Qwen-Image model; the stand-in workers reach S3 through a TCP proxy that can be switched
off, and the webhooks go to a receiver that can fail on purpose. The cluster is a fleet
(editfarm_testing/catalog.py): the stand-ins serve ``qwen-image-edit`` (every job that names no
model), the tiny-model workers a third model, ``tiny``, so each scenario runs on per-model queues
and indexes. Each scenario injects one fault while jobs are queued and running, then judges every
job it accepted (tests/fault_support.py: survived / lost / duplicated) and writes its tally to
``test-artifacts/faults/<scenario>.json``.

``FAULT_TRIALS`` (default 4) sets the trials per scenario (the table of docs/reliability.md was
measured with 10). The soak test runs ``bench/soak.py`` in its short mode (``SOAK_JOBS``,
default 300) on a fleet (``--fleet``: a stand-in pool per model of the two-model catalog). Three
of the tests (S3 hand-backs vs worker deaths, Redis errors mid-render, a restarted worker's drain
deadline) found bugs that are fixed now.
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
from broker.queues import RenderQueue
from cli.cluster import ROOT, ClusterConfig, LocalCluster
from cli.localservices import wait_until
from editfarm_testing.catalog import (
    EDIT_MODEL,
    TEXT_TO_IMAGE_MODEL,
    CatalogModel,
    fleet_catalog,
    legacy_render_keys,
)
from editfarm_testing.cluster import process_log, restart_api, restart_redis, worker_child_pid
from editfarm_testing.tcpproxy import TcpProxy
from editfarm_testing.webhooks import ByJob, FlakyReceiver
from tests.e2e_support import API_KEYS, auth
from tests.fault_support import (
    QUICK_RECOVERY_ENV,
    Tally,
    get,
    holder,
    job_fields,
    judge,
    s3_client,
    submit,
    wait_all_terminal,
    wait_n_running,
    wait_new_child,
    wait_running,
)

pytestmark = pytest.mark.integration

TRIALS = max(2, int(os.environ.get("FAULT_TRIALS", "4")))
RENDER_S = 2.0  # each stand-in job holds its worker this long (spread over its steps)
STANDIN = ("render0", "render1")  # the stand-in workers: qwen-image-edit's queues high + normal
TINY = ("render8", "render9")  # tiny-model workers: model TINY_MODEL, so only jobs that name it reach them
TINY_MODEL = "tiny"
EDIT_QUEUES = RenderQueue(model=EDIT_MODEL).names
STANDIN_QUEUES = (EDIT_QUEUES["high"], EDIT_QUEUES["normal"])

FAULT_ENV = {"EDITFARM_RENDERER": "standin", "EDITFARM_STANDIN_RENDER_S": repr(RENDER_S), **QUICK_RECOVERY_ENV}

REPORTS: list[Tally] = []


class Faults:
    """The cluster, the S3 proxy in front of SeaweedFS for the render workers, the webhook receiver."""

    def __init__(self, cluster: LocalCluster, s3_proxy: TcpProxy, receiver: FlakyReceiver, tiny_model: Path) -> None:
        self.cluster, self.s3_proxy, self.receiver = cluster, s3_proxy, receiver
        self.deliveries = ByJob(receiver)
        self.tiny_model = tiny_model
        self.redis_restart_jobs: list[str] = []

    def start_standin(self, name: str) -> None:
        self.cluster.start_render_worker(int(name.removeprefix("render")),
                                         {"EDITFARM_S3_ENDPOINT_URL": self.s3_proxy.url}, queues=STANDIN_QUEUES,
                                         model=EDIT_MODEL)

    def start_tiny(self, name: str) -> None:
        # straight to S3, not through the proxy: the S3 outage scenario is about the stand-in workers
        self.cluster.start_render_worker(int(name.removeprefix("render")), {"EDITFARM_RENDERER": "diffusers"},
                                         model=TINY_MODEL)

    def healthy(self) -> None:
        """Every fault is repaired: S3 reachable, receiver answering, stand-in workers ready."""
        self.s3_proxy.set_mode("up")
        self.receiver.mode = "ok"
        for name in STANDIN:
            self.cluster.wait_worker_ready(name, timeout_s=120)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
           request: pytest.FixtureRequest) -> Iterator[Faults]:
    workdir = tmp_path_factory.mktemp("faults")
    # no pool started by the cluster: the fixture starts the stand-ins (behind the S3 proxy) and the tiny ones
    catalog = fleet_catalog(workdir, edit_source=tiny_model, edit_workers=0, extra=[
        CatalogModel(name=TINY_MODEL, source=tiny_model, operations=("generate",))])
    config = ClusterConfig(workdir=workdir, api_keys=API_KEYS, extra_env=FAULT_ENV, redis_appendfsync="always",
                           **catalog)
    with LocalCluster(config) as cluster, FlakyReceiver() as receiver:
        assert cluster.s3 is not None
        with TcpProxy(cluster.s3.port) as s3_proxy:
            setup = Faults(cluster, s3_proxy, receiver, tiny_model)
            for name in TINY:  # they load the model in the background while the stand-in scenarios run
                setup.start_tiny(name)
            for name in STANDIN:
                setup.start_standin(name)
            setup.healthy()
            yield setup
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line("fault scenarios (details in test-artifacts/faults/):")
            for tally in REPORTS:
                reporter.write_line("  " + tally.line())


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
    cluster, tally, jobs = faults.cluster, Tally("kill_child_standin"), list[str]()
    faults.healthy()
    for round_ in range(TRIALS // 2):
        wait_all_terminal(cluster, jobs)  # both workers idle: the pair runs side by side
        pair = [submit(cluster, steps=8, seed=round_ * 2 + i, webhook=faults.receiver.url) for i in range(2)]
        wait_running(cluster, pair)
        victims = {holder(cluster, job_id) for job_id in pair}
        assert victims == set(STANDIN), victims
        pids = {name: worker_child_pid(cluster, name) for name in victims}
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
    cluster, tally, jobs = faults.cluster, Tally("kill_group_standin"), list[str]()
    faults.healthy()
    for round_ in range(TRIALS // 2):
        wait_all_terminal(cluster, jobs)  # both workers idle: the pair runs side by side
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


def test_sigkill_of_the_render_child_while_its_last_job_uploads_in_the_background_ends_it_once(
        faults: Faults) -> None:
    """The render has returned and the task was acked; the job's upload hangs (S3 swallows it) on the
    background finisher when the child is killed: the job's lease lapses and the reaper re-sends it."""
    cluster, tally, jobs = faults.cluster, Tally("kill_child_during_background_finish"), list[str]()
    faults.healthy()
    for round_ in range(TRIALS // 2):
        wait_all_terminal(cluster, jobs)
        pair = [submit(cluster, steps=8, seed=100 + round_ * 2 + i, webhook=faults.receiver.url) for i in range(2)]
        wait_n_running(cluster, pair, 2, min_step=6)
        faults.s3_proxy.set_mode("blackhole")
        try:
            wait_n_running(cluster, pair, 2, min_step=8)  # rendered: every step made, not yet succeeded
            time.sleep(0.3)  # the finish is on its way into the swallowed upload
            victims = {holder(cluster, job_id) for job_id in pair}
            pids = {name: worker_child_pid(cluster, name) for name in victims}
            for pid in pids.values():
                os.kill(pid, signal.SIGKILL)
        finally:
            faults.s3_proxy.set_mode("up")
        for name, pid in pids.items():
            wait_new_child(cluster, name, pid)
        jobs += pair
    wait_all_terminal(cluster, jobs)
    faults.deliveries.wait_terminal(jobs)
    judge(cluster, tally, jobs, faults.deliveries)
    tally.notes["renderer"] = "stand-in; killed after the render returned, its upload swallowed by the S3 proxy"
    assert_all_survived(tally)
    assert all(n >= 2 for n in tally.attempts.elements()), tally.attempts  # each job ran again


# -- storage unreachable ---------------------------------------------------------------------------


def test_s3_down_during_uploads_jobs_wait_and_retry_and_never_succeed_without_their_object(
        faults: Faults) -> None:
    """The render workers' S3 endpoint refuses connections for 4+ s while renders are about to upload."""
    cluster, tally = faults.cluster, Tally("s3_down_during_upload")
    faults.healthy()
    s3 = s3_client(cluster)
    jobs = [submit(cluster, steps=8, seed=i, webhook=faults.receiver.url) for i in range(max(6, TRIALS))]
    wait_n_running(cluster, jobs, 2, min_step=6)  # renders about to upload
    def failed_uploads() -> int:
        return sum(process_log(cluster, n).count("handed back: put") for n in STANDIN)
    before = failed_uploads()
    down_at = time.monotonic()
    faults.s3_proxy.set_mode("refuse")
    unbacked: list[str] = []

    def outage_done() -> bool:
        # meanwhile: a job that is succeeded has its object (read from the S3 server directly, not through the proxy)
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


def test_a_job_that_waited_out_an_s3_outage_survives_one_worker_death(faults: Faults) -> None:
    cluster = faults.cluster
    faults.healthy()
    faults.s3_proxy.set_mode("refuse")
    try:
        job_id = submit(cluster, steps=8, webhook=faults.receiver.url)
        # handed back while S3 is down: each delivery starts the job (attempts + 1), fails to read its
        # input and hands it back; wait until that happened as often as EDITFARM_MAX_ATTEMPTS (3)
        wait_until(lambda: (job_fields(cluster, [job_id], "attempts")[job_id]["attempts"] or 0) >= 3, 60,
                   "hand-backs during the outage", interval_s=0.1)
    finally:
        faults.s3_proxy.set_mode("up")
    wait_running(cluster, [job_id])
    name = holder(cluster, job_id)
    pid = worker_child_pid(cluster, name)
    os.kill(pid, signal.SIGKILL)  # its worker dies once
    wait_new_child(cluster, name, pid)
    wait_all_terminal(cluster, [job_id])
    final = get(cluster, job_id)
    assert final["status"] == "succeeded", final["error"]


# -- webhook receiver failing ----------------------------------------------------------------------


def test_a_failing_webhook_receiver_gets_exactly_one_accepted_signed_delivery(faults: Faults) -> None:
    """The receiver refuses connections, then answers 500, then hangs past the timeout, then recovers."""
    from standardwebhooks.webhooks import Webhook

    from workers.webhooks import WebhookOutbox, message_id_for

    cluster, tally = faults.cluster, Tally("webhook_receiver_failing")
    faults.healthy()
    with FlakyReceiver(hang_s=6) as receiver, TcpProxy(receiver.port) as gate:
        url = f"{gate.url}/hooks/editfarm"
        deliveries = ByJob(receiver)
        gate.set_mode("refuse")
        jobs = [submit(cluster, steps=2, seed=i, webhook=url) for i in range(max(3, TRIALS))]
        outbox = WebhookOutbox(redis.Redis.from_url(cluster.redis_url))
        messages = {j: message_id_for(j, "job.succeeded") for j in jobs}

        def every_message_saw(error: str) -> bool:
            return all(any(error in str(a.get("error")) for a in outbox.attempts(m)) for m in messages.values())

        wait_until(lambda: every_message_saw("connection_refused"), 120, "refused attempts", interval_s=0.2)
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
            for delivery in deliveries.terminal(job_id):
                assert verifier.verify(delivery.body, delivery.headers)["data"]["id"] == job_id
            sent_ids = {d.headers["webhook-id"] for d in receiver.requests if json.loads(d.body)["data"]["id"] == job_id}
            assert sent_ids == {messages[job_id]}, sent_ids  # the same id on every retry
        attempts = [len(outbox.attempts(m)) for m in messages.values()]
        tally.notes["delivery_attempts_per_message"] = attempts
        tally.notes["requests_seen_by_receiver"] = len(receiver.requests)
    assert_all_survived(tally)


# -- the real tiny model ---------------------------------------------------------------------------


def test_sigkill_of_a_tiny_model_child_mid_render_ends_the_job_once(faults: Faults) -> None:
    """The same with the real tiny Qwen-Image pipeline (from_pretrained, real denoising steps on CPU):
    the child is killed mid-render and the other tiny-model worker takes the job over."""
    cluster, tally = faults.cluster, Tally("kill_child_tiny_model")
    for name in TINY:
        cluster.wait_worker_ready(name, timeout_s=300)
    # text-to-image at 1024x1024, 100 steps: the tiny model's steps take ~20-40 ms each here, so the
    # render lasts seconds and the kill lands mid-render (at 64x64, 12 steps it could end before the kill)
    job_id = submit(cluster, operation="generate", width=1024, height=1024, steps=100, model=TINY_MODEL,
                    webhook=faults.receiver.url)
    wait_running(cluster, [job_id], min_step=2, timeout_s=120)
    victim = holder(cluster, job_id)
    assert victim in TINY
    os.kill(worker_child_pid(cluster, victim), signal.SIGKILL)
    at_kill = job_fields(cluster, [job_id], "status", "progress", "attempts")[job_id]
    assert at_kill["status"] == "running" and at_kill["attempts"] == 1 and at_kill["progress"]["step"] < 100
    wait_all_terminal(cluster, [job_id], timeout_s=300)
    faults.deliveries.wait_terminal([job_id])
    judge(cluster, tally, [job_id], faults.deliveries, expect_attempts=2)
    tally.notes["renderer"] = "tiny Qwen-Image (random weights), generate 1024x1024, 100 steps on CPU, killed at step 2+"
    for name in TINY:  # their CPU is better spent on what follows
        cluster.stop_process(name, signal.SIGKILL)
    assert_all_survived(tally)


# -- a worker restarted under the same name ---------------------------------------------------------


def test_a_worker_restarted_under_the_same_name_after_a_sigterm_still_renders(faults: Faults) -> None:
    """SIGTERM (a deploy) and start again under the same Celery node name: the new process must work.

    EDITFARM_DRAIN_TIMEOUT_S=1 stands in for the default 600 s, which the key outlives by an hour."""
    cluster = faults.cluster
    env = {"EDITFARM_S3_ENDPOINT_URL": faults.s3_proxy.url, "EDITFARM_DRAIN_TIMEOUT_S": "1"}
    low = (EDIT_QUEUES["low"],)  # the stand-ins take high and normal only: only this one takes low jobs
    for tiny in TINY:
        cluster.stop_process(tiny, signal.SIGKILL)
    name = cluster.start_render_worker(7, env, queues=low, model=EDIT_MODEL)
    try:
        cluster.wait_worker_ready(name, timeout_s=120)
        assert cluster.stop_process(name, signal.SIGTERM, timeout_s=60, group=False) == 0
        cluster.start_render_worker(7, env, queues=low, model=EDIT_MODEL)
        cluster.wait_worker_ready(name, timeout_s=120)
        job_id = submit(cluster, steps=8, priority="low", webhook=faults.receiver.url)
        # it succeeds, or it keeps being handed back ("worker shutting down") and started again
        wait_until(lambda: job_fields(cluster, [job_id], "status")[job_id]["status"] == "succeeded" or (
            job_fields(cluster, [job_id], "attempts")[job_id]["attempts"] or 0) >= 3, 90, "job", interval_s=0.1)
        final = get(cluster, job_id)
        assert final["status"] == "succeeded" and final["attempts"] == 1, (final["status"], final["attempts"])
    finally:
        cluster.stop_process(name, signal.SIGKILL)


# -- API restarted ---------------------------------------------------------------------------------


def test_restarting_the_api_mid_flight_leaves_running_jobs_alone(faults: Faults) -> None:
    cluster, tally = faults.cluster, Tally("api_restart")
    faults.healthy()
    jobs = [submit(cluster, steps=8, seed=i, webhook=faults.receiver.url) for i in range(max(4, TRIALS))]
    wait_n_running(cluster, jobs, 2)
    restart_api(cluster, signal.SIGKILL)
    for job_id in jobs:  # GET works after the restart, whatever state each job is in
        assert get(cluster, job_id)["status"] in {"queued", "running", "succeeded"}
    wait_all_terminal(cluster, jobs)
    faults.deliveries.wait_terminal(jobs)
    judge(cluster, tally, jobs, faults.deliveries, expect_attempts=1)
    assert_all_survived(tally)


# -- Redis restarted -------------------------------------------------------------------------------


def test_redis_restarted_with_jobs_queued_and_running_every_accepted_job_ends_once(faults: Faults) -> None:
    """Redis is SIGKILLed (appendfsync always) with 2 jobs running and 4+ queued, and stays down 2 s."""
    cluster, tally = faults.cluster, Tally("redis_restart")
    faults.healthy()
    jobs = [submit(cluster, steps=8, seed=i, webhook=faults.receiver.url) for i in range(max(6, TRIALS))]
    wait_n_running(cluster, jobs, 2)
    states = [r["status"] for r in job_fields(cluster, jobs, "status").values()]
    tally.notes["at_crash"] = {s: states.count(s) for s in set(states)}
    assert "queued" in states and "running" in states, states
    faults.redis_restart_jobs = jobs
    restart_redis(cluster, signal.SIGKILL, down_s=2)
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


def test_a_redis_outage_during_a_render_is_never_judged_a_render_failure(faults: Faults) -> None:
    """Reads the render workers' logs of the Redis restart scenario above."""
    if not faults.redis_restart_jobs:
        pytest.skip("the Redis restart scenario did not run")
    judged = []
    for name in STANDIN:
        lines = process_log(faults.cluster, name).splitlines()
        for i, line in enumerate(lines):
            if "failed while rendering" in line and any(j in line for j in faults.redis_restart_jobs):
                cause = "\n".join(lines[i:i + 120])
                if "redis.exceptions" in cause:
                    judged.append(line)
    assert not judged, judged


def test_get_after_everything_still_answers(faults: Faults) -> None:
    """The cluster that took all the faults above still takes and finishes a job."""
    job_id = submit(faults.cluster, steps=2, webhook=faults.receiver.url)
    wait_all_terminal(faults.cluster, [job_id], timeout_s=120)
    assert get(faults.cluster, job_id)["status"] == "succeeded"
    response = httpx.get(f"{faults.cluster.api_url}/v1/jobs/{job_id}", headers=auth(), timeout=10)
    assert response.status_code == 200
    # every re-send, hand-back and restore above went to the model's own keys: the one-model names are empty
    client = redis.Redis.from_url(faults.cluster.redis_url)
    assert not [k for k in legacy_render_keys() if client.exists(k)]


# -- soak ------------------------------------------------------------------------------------------


def test_soak_short_run_loses_and_duplicates_nothing_and_memory_stays_bounded(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    jobs = int(os.environ.get("SOAK_JOBS", "300"))
    run = subprocess.run([sys.executable, "-m", "bench.soak", "--fleet", "--jobs", str(jobs), "--warmup", "10",
                          "--settle-s", "1", "--out", str(out), "--workdir", str(tmp_path / "cluster")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    tally = Tally("soak_short", trials=report["submitted"], survived=report["succeeded"], lost=report["lost"],
                  duplicated=report["duplicated"], notes={"throughput_jobs_per_s": report["throughput_jobs_per_s"],
                                                          "rss_mb": report["rss_mb"]})
    tally.ended = tally.started + report["wall_s"]
    tally.attempts.update({int(k): v for k, v in report.get("attempts", {}).items()})
    finish(tally)
    assert report["submitted"] == jobs and report["succeeded"] == jobs
    assert report["lost"] == 0 and report["duplicated"] == 0, report["problems"]
    assert set(report["succeeded_per_model"]) == {EDIT_MODEL, TEXT_TO_IMAGE_MODEL}  # both pools rendered
    for role, rss in report["rss_mb"].items():
        assert rss["end"] - rss["start"] < 64, (role, rss)  # no leak of any size over a short run
