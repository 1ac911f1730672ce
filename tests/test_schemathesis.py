"""Property-based tests of the API against its own OpenAPI document (schemathesis).

Every operation of ``/openapi.json`` is called with generated requests (valid and invalid) on an app
over :func:`editfarm_testing.api.fake_services` (in memory; name resolution is stubbed so image, webhook and
LoRA URLs are refused without any network traffic). Each response must not be a 5xx, must have a
status code, content type, headers and body the document declares. Authentication comes from a
``map_headers`` hook; path ids are sometimes swapped for ids of seeded jobs so the job routes are
exercised past their 404. Bounded: at most ``MAX_EXAMPLES`` cases per operation.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from api.delivery_log import InMemoryDeliveryLog
from broker.schema import Job, JobParams, JobStatus, Operation, Output
from editfarm_testing.api import TEST_KEYS, fake_services, make_settings

MAX_EXAMPLES = 30
AUTH = {"Authorization": f"Bearer {TEST_KEYS['acme']}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def _seeded_services() -> Any:
    """Fake services with a few finished jobs of acme (one with a delivery log) and one of globex."""
    services = fake_services(make_settings(sse_max_duration_s=2.0, sse_keepalive_s=0.5,
                                           rate_limit_per_min=0))  # 429s would hide the intake from the fuzzer
    now = time.time()
    log = services.deliveries
    assert isinstance(log, InMemoryDeliveryLog)
    for index, (tenant, status, webhook) in enumerate([
        ("acme", JobStatus.SUCCEEDED, "https://hooks.example/editfarm"),
        ("acme", JobStatus.FAILED, None),
        ("acme", JobStatus.CANCELED, "https://hooks.example/editfarm"),
        ("globex", JobStatus.SUCCEEDED, "https://hooks.example/other"),
    ]):
        job_id = f"job_seeded{index}"
        params = JobParams(operation=Operation.GENERATE, prompt="a lighthouse", seed=index, webhook=webhook)
        outputs = [Output(key=f"tenants/{tenant}/jobs/{job_id}/outputs/0.png", content_type="image/png",
                          width=16, height=16, sha256="0" * 64, size_bytes=10)]
        services.store.create(Job(id=job_id, tenant=tenant, params=params, created_at=now - 100 + index))
        services.store.compare_and_set(job_id, {}, {
            "status": status.value, "finished_at": now, "started_at": now - 10,
            "outputs": [o.model_dump() for o in outputs] if status is JobStatus.SUCCEEDED else [],
            "error": None if status is JobStatus.SUCCEEDED else {"code": "render_failed", "message": "x"},
        })
        if webhook:
            event = f"job.{status.value}"
            message_id = f"msg_{job_id}_{event.replace('.', '_')}"
            body = json.dumps({"type": event, "timestamp": "2026-01-01T00:00:00Z", "data": {"id": job_id}})
            log.add(job_id, message_id, webhook, body, tenant, state="failed", created_at=now - 5,
                    finished_at=now)
            log.add_attempt(message_id, {"attempt": 1, "at": now - 5, "status_code": 500, "error": "http 500",
                                         "duration_ms": 12})
    return services


KNOWN_JOB_IDS = ["job_seeded0", "job_seeded1", "job_seeded2", "job_seeded3"]
app = create_app(services=_seeded_services())
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.hook("map_headers")
def authenticate(context: Any, headers: dict[str, Any] | None) -> dict[str, Any]:
    """acme's key instead of whatever Authorization was generated (the 401 paths have their own tests)."""
    return {**{k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}, **AUTH}


@schema.hook("flatmap_path_parameters")
def known_jobs(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """Now and then a seeded job's id instead of a random one, so routes get past their 404."""
    if not path_parameters or "job_id" not in path_parameters:
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, *({**path_parameters, "job_id": j} for j in KNOWN_JOB_IDS)])


@pytest.fixture(autouse=True)
def _no_name_resolution(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every host name 'does not resolve': URL inputs are refused (422) and nothing leaves the process."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "name resolution is disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield


@schema.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case) -> None:
    # the coverage phase does not run map hooks: its cases get the key here (except the ones that test
    # a missing key on purpose)
    case.call_and_validate(headers=AUTH, checks=CHECKS)
