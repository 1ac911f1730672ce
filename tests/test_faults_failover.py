"""A Sentinel failover under load, proven with real processes.

A Redis primary, one replica and three sentinels (``editfarm_testing.sentinel``), SeaweedFS, the API,
two stand-in render workers and the webhook worker (with the reaper), every one of them given the
group's ``redis+sentinel://`` URL and ``EDITFARM_REDIS_MIN_REPLICAS=1``. Each trial queues 20+ jobs,
waits until 2 run, SIGKILLs the primary while clients keep submitting (each submission with its own
Idempotency-Key, retried with that key on a 503, a 409 ``idempotency_in_progress`` or a dropped
connection), waits for Sentinel to promote the replica and, 1.5 s later (a primary without a replica
meanwhile: creates and job ends fall short of ``MIN_REPLICAS``), brings the killed node back as the
new primary's replica (the next trial kills the other node). Then every job a client was told about
(202, or 200 for a replayed key) is judged as in tests/test_faults.py: ``succeeded`` with its
output object and exactly one terminal webhook message (one ``webhook-id``; delivered at least once:
a delivery whose record the dying primary took with it is made again, counted apart as
``same_message_again``, and a receiver drops the repeat by its id). A job the tenant has but no
client was told about (a key that made two jobs) counts as duplicated.

``FAULT_TRIALS`` (default 2 here, min 2) sets the number of failovers; docs/reliability.md's row was
measured with 10.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from broker import keys
from broker.redis_conn import client_from_url
from cli.cluster import ClusterConfig, LocalCluster
from editfarm_testing.sentinel import SentinelGroup
from editfarm_testing.webhooks import ByJob, FlakyReceiver
from tests.e2e_support import API_KEYS, auth, data_url, png_bytes
from tests.fault_support import QUICK_RECOVERY_ENV, Tally, judge, submit, wait_all_terminal, wait_n_running

pytestmark = pytest.mark.integration

TRIALS = max(2, int(os.environ.get("FAULT_TRIALS", "2")))  # ~50 s a failover: 2 in CI
QUEUED = 20  # jobs queued behind the 2 running ones when the primary dies
RENDER_S = 1.0
CLIENTS = 2  # threads submitting through the failover
REJOIN_AFTER_S = 1.5  # the killed node comes back as a replica this long after the promotion
ENV = {
    "EDITFARM_RENDERER": "standin", "EDITFARM_STANDIN_RENDER_S": repr(RENDER_S),
    "EDITFARM_REDIS_MIN_REPLICAS": "1", "EDITFARM_REDIS_WAIT_TIMEOUT_MS": "1000",
    **QUICK_RECOVERY_ENV,  # take over within seconds (as tests/test_faults.py)
}


@dataclass
class Failover:
    group: SentinelGroup
    cluster: LocalCluster
    receiver: FlakyReceiver
    deliveries: ByJob


@pytest.fixture(scope="module")
def failover(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Failover]:
    root = tmp_path_factory.mktemp("failover")
    group = SentinelGroup(root / "redis")
    try:
        config = ClusterConfig(workdir=root / "cluster", redis_url=group.url, model="standin", api_keys=API_KEYS,
                               render_workers=2, extra_env=ENV)
        with LocalCluster(config) as cluster, FlakyReceiver() as receiver:
            yield Failover(group, cluster, receiver, ByJob(receiver))
    finally:
        group.stop()


# -- clients that submit through the failover ---------------------------------------------------------


@dataclass
class Outcomes:
    """What the submitting clients saw: per Idempotency-Key the job it ended with, and every answer."""

    jobs: dict[str, str] = field(default_factory=dict)  # key -> job id
    answers: Counter[str] = field(default_factory=Counter)
    unsettled: list[str] = field(default_factory=list)  # keys that never got a job in time
    lock: threading.Lock = field(default_factory=threading.Lock)

    def saw(self, answer: str) -> None:
        with self.lock:
            self.answers[answer] += 1


def submit_with_key(api_url: str, key: str, webhook: str, outcomes: Outcomes, give_up_s: float = 60) -> None:
    """Submit one job under ``key`` until the API accepts it (202) or replays it (200), retrying
    what the API says is retryable with the same key, as a careful client (the SDK) does."""
    body = {"operation": "edit", "prompt": "p", "seed": 3, "steps": 4, "image": data_url(png_bytes()),
            "webhook": webhook}
    deadline = time.monotonic() + give_up_s
    while time.monotonic() < deadline:
        try:
            response = httpx.post(f"{api_url}/v1/jobs", json=body, timeout=30,
                                  headers={**auth(), "Idempotency-Key": key})
        except httpx.TransportError as exc:
            outcomes.saw(f"connection error {type(exc).__name__}")
            time.sleep(0.2)
            continue
        code = response.json().get("error", {}).get("code", "") if response.status_code >= 400 else ""
        outcomes.saw(f"{response.status_code} {code}".strip())
        if response.status_code in (200, 202):
            with outcomes.lock:
                outcomes.jobs[key] = response.json()["id"]
            return
        retryable = response.status_code == 503 or code == "idempotency_in_progress"
        assert retryable, f"{key}: {response.status_code} {response.text}"
        time.sleep(min(float(response.headers.get("Retry-After", "1")), 1.0) * 0.5)
    with outcomes.lock:
        outcomes.unsettled.append(key)


class Submitters:
    """``CLIENTS`` threads, each submitting keyed jobs one after another until stopped."""

    def __init__(self, api_url: str, webhook: str, prefix: str) -> None:
        self.outcomes = Outcomes()
        self._stop = threading.Event()
        counter = itertools.count()

        def loop() -> None:
            while not self._stop.is_set():
                submit_with_key(api_url, f"{prefix}-{next(counter)}", webhook, self.outcomes)
                time.sleep(0.05)
        self._threads = [threading.Thread(target=loop, daemon=True) for _ in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> Outcomes:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        return self.outcomes


def tenant_jobs_since(cluster: LocalCluster, since: float) -> set[str]:
    client = client_from_url(cluster.redis_url, socket_timeout=5)
    try:
        return {i.decode() for i in client.zrangebyscore(keys.tenant_jobs("acme"), since, "+inf")}
    finally:
        client.close()


# -- the scenario --------------------------------------------------------------------------------------


def test_sentinel_failover_with_jobs_queued_and_running_loses_and_duplicates_nothing(failover: Failover) -> None:
    group, cluster, receiver = failover.group, failover.cluster, failover.receiver
    tally = Tally("sentinel_failover")
    tally.notes.update(min_replicas=1, answers_during_failover={}, promote_s=[], at_kill=[])
    answers: Counter[str] = Counter()
    for trial in range(TRIALS):
        group.wait_healthy()
        for name in ("render0", "render1"):
            cluster.wait_worker_ready(name)
        since = time.time() - 0.001
        jobs = [submit(cluster, steps=4, seed=trial * 100 + i, webhook=receiver.url) for i in range(QUEUED + 2)]
        wait_n_running(cluster, jobs, 2)
        submitters = Submitters(cluster.api_url, receiver.url, f"t{trial}")
        time.sleep(0.3)  # the clients are submitting when the primary dies
        killed_at = time.monotonic()
        dead = group.kill_primary()
        group.wait_promoted(dead.port)
        tally.notes["promote_s"].append(round(time.monotonic() - killed_at, 1))
        time.sleep(REJOIN_AFTER_S)  # the new primary has no replica yet: creates answer 503 store_unavailable
        group.rejoin(dead)  # the next trial kills the other node
        time.sleep(1.0)  # and submits a little on the healthy group
        outcomes = submitters.stop()
        answers.update(outcomes.answers)
        assert not outcomes.unsettled, outcomes.unsettled
        told = jobs + list(outcomes.jobs.values())
        wait_all_terminal(cluster, told, timeout_s=180)
        failover.deliveries.wait_terminal(told, timeout_s=60)
        judge(cluster, tally, told, failover.deliveries, same_message_again_ok=True)
        # every job the tenant has from this trial is one a client was told about: no key made two
        orphans = tenant_jobs_since(cluster, since) - set(told)
        if orphans:
            tally.duplicated += len(orphans)
            tally.problems.append(f"trial {trial}: jobs no client was told about: {sorted(orphans)}")
        tally.notes["at_kill"].append({"queued_and_running": len(jobs), "keyed_submissions": len(outcomes.jobs)})
    tally.notes["answers_during_failover"] = dict(sorted(answers.items()))
    tally.notes["failovers"] = TRIALS
    tally.write()
    print(tally.line(), tally.notes)
    assert tally.lost == 0 and tally.duplicated == 0 and tally.survived == tally.trials, tally.as_dict()
    assert not tally.problems, tally.problems
    # the clients did submit through the failover, and it was refused (retryably) at some point
    assert sum(n for a, n in answers.items() if not a.startswith(("200", "202"))) > 0, answers
