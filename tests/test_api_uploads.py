"""Slow senders: the body deadline (408 request_timeout, connection closed) and upload slots shared between
tenants. Unit tests of the pieces, then the attack itself against a real API process (uvicorn on loopback,
real Redis and S3 server): slowloris connections from one tenant while another uploads."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from api.uploads import LARGE_BODY_BYTES, BodyPace, UploadSlots, UploadTicket
from cli.localservices import ManagedProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


# -- unit: slots and deadlines ----------------------------------------------------------------------


def _peaks(slots: UploadSlots, tenants: list[str]) -> tuple[int, dict[str, int]]:
    """Run one holder per entry of ``tenants``; (peak slots held, peak per tenant)."""
    peak = 0
    per: dict[str, int] = {}

    async def one(tenant: str) -> None:
        nonlocal peak
        await slots.acquire(tenant)
        try:
            peak = max(peak, slots.held())
            per[tenant] = max(per.get(tenant, 0), slots.held(tenant))
            await asyncio.sleep(0.01)
        finally:
            slots.release(tenant)

    async def run() -> None:
        await asyncio.gather(*(one(t) for t in tenants))

    asyncio.run(run())
    assert slots.held() == 0
    return peak, per


def test_slots_bound_the_process_and_each_tenant() -> None:
    peak, per = _peaks(UploadSlots(3, 2), ["a"] * 6 + ["b"] * 6)
    assert peak == 3 and per == {"a": 2, "b": 2}
    peak, per = _peaks(UploadSlots(2, 1), ["a"] * 5)
    assert peak == 1 and per == {"a": 1}


def test_a_tenant_at_its_share_does_not_hold_up_another_tenant() -> None:
    async def run() -> list[str]:
        slots = UploadSlots(2, 1)
        order: list[str] = []
        await slots.acquire("a")  # a holds its share, forever
        waiting_a = asyncio.create_task(slots.acquire("a"))
        await asyncio.sleep(0)

        async def b() -> None:
            await slots.acquire("b")
            order.append("b")
            slots.release("b")

        await asyncio.wait_for(b(), 1)
        assert not waiting_a.done()
        slots.release("a")  # the waiting a gets it
        await asyncio.wait_for(waiting_a, 1)
        assert slots.held("a") == 1
        return order

    assert asyncio.run(run()) == ["b"]


def test_a_cancelled_waiter_holds_nothing() -> None:
    async def run() -> None:
        slots = UploadSlots(1, 1)
        ticket = UploadTicket(slots, "a")
        await ticket.take()
        late = UploadTicket(slots, "a")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(late.take(), 0.05)
        assert not late.holding and slots.held() == 1
        ticket.give_back()
        ticket.give_back()  # twice is once
        late.give_back()  # never held: nothing
        assert slots.held() == 0
        await asyncio.wait_for(late.take(), 1)
        assert slots.held("a") == 1

    asyncio.run(run())


def test_the_body_deadline_grows_with_the_bytes_received_up_to_the_cap() -> None:
    pace = BodyPace(initial_s=2, min_bytes_per_s=1000, max_s=10, started=time.monotonic())
    assert 1.5 < pace.remaining_s(0) <= 2
    assert 4.5 < pace.remaining_s(3000) <= 5
    assert 9.5 < pace.remaining_s(10**9) <= 10  # the cap
    pace.waited_s = 3  # time waiting for a slot is not the sender's
    assert 4.5 < pace.remaining_s(0) <= 5
    assert 9.5 < pace.total_remaining_s() <= 10


# -- the attack, against a real API process -------------------------------------------------------------

KEYS = {"a": "key-a-0123456789abcdef", "b": "key-b-0123456789abcdef"}
BODY_TIMEOUT_S, BODY_MAX_S = 1.5, 4.0
# how much later than its deadline a connection may be answered and closed: scheduling on a loaded machine
SLACK_S = 1.5


@pytest.fixture(scope="module")
def api(redis_server: ManagedProcess, s3_server: ManagedProcess, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[str]:
    import boto3

    boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket="uploads-test")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDITFARM_")}
    env.update({
        "EDITFARM_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/3",
        "EDITFARM_S3_ENDPOINT_URL": s3_server.url, "EDITFARM_S3_BUCKET": "uploads-test",
        "EDITFARM_S3_ACCESS_KEY_ID": "test", "EDITFARM_S3_SECRET_ACCESS_KEY": "test",
        "EDITFARM_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
        # 2 upload slots, so at most 1 per tenant; a body gets 1.5 s plus 1 s per 100 kB, 4 s in all
        "EDITFARM_MAX_CONCURRENT_UPLOADS": "2",
        "EDITFARM_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S), "EDITFARM_BODY_MIN_BYTES_PER_S": "100000",
        "EDITFARM_BODY_MAX_S": str(BODY_MAX_S),
    })
    log = open(tmp_path_factory.mktemp("api") / "api.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 60, "the API")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _png_of_about(size_bytes: int) -> bytes:
    side = int((size_bytes / 3) ** 0.5) + 1  # noise barely compresses: ~3 bytes a pixel
    pixels = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG", compress_level=1)
    return out.getvalue()


class Slowloris(threading.Thread):
    """One connection that declares a 2 MB body and sends one byte of it every 0.25 s, until answered."""

    def __init__(self, port: int, key: str) -> None:
        super().__init__(daemon=True)
        self.port, self.key = port, key
        self.answer = b""
        self.started = self.closed = 0.0

    def run(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.started = time.monotonic()
        sock.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.key}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 2000000\r\n\r\n").encode())
        try:
            while time.monotonic() - self.started < 30:
                readable, _, _ = select.select([sock], [], [], 0.25)
                if readable:
                    while chunk := sock.recv(65536):
                        self.answer += chunk
                    break
                sock.sendall(b" ")
        except OSError:  # reset after the answer: the answer is what counts
            pass
        finally:
            self.closed = time.monotonic()
            sock.close()


def test_slow_senders_of_one_tenant_get_408_and_leave_other_uploads_alone(api: str) -> None:
    port = int(api.rsplit(":", 1)[1])
    attackers = [Slowloris(port, KEYS["a"]) for _ in range(4)]
    for attacker in attackers:
        attacker.start()
    time.sleep(1.0)  # every slow connection is in: one holds a's slot, the others wait for it

    # 1.2 MB, as in the report: over LARGE_BODY_BYTES, so it needs an upload slot as a's senders do
    image = _png_of_about(1_200_000)
    assert len(image) > LARGE_BODY_BYTES
    began = time.monotonic()
    upload = httpx.post(f"{api}/v1/jobs", headers={"Authorization": f"Bearer {KEYS['b']}"},
                        data={"prompt": "make the sky purple", "steps": "2"},
                        files={"image": ("in.png", image, "image/png")}, timeout=30)
    took_s = time.monotonic() - began
    assert upload.status_code == 202, upload.text
    assert took_s < 2.0, f"b's 1.2 MB upload took {took_s:.2f} s behind a's slow senders"

    # a small chunked submission (no Content-Length) never waits for an upload slot, even a's own
    def chunked() -> Iterator[bytes]:
        yield b'{"operation": "generate", '
        yield b'"prompt": "a lighthouse at dusk", "steps": 2}'

    began = time.monotonic()
    small = httpx.post(f"{api}/v1/jobs", headers={"Authorization": f"Bearer {KEYS['a']}",
                                                   "Content-Type": "application/json"},
                       content=chunked(), timeout=30)
    assert small.status_code == 202, small.text
    assert small.request.headers.get("transfer-encoding") == "chunked"
    assert time.monotonic() - began < 2.0

    for attacker in attackers:
        attacker.join(30)
    for attacker in attackers:
        head, _, body = attacker.answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), attacker.answer[:300]
        assert b"connection: close" in head.lower() and b'"request_timeout"' in body
        # answered and closed by the server (EOF) within the total deadline
        assert attacker.closed - attacker.started < BODY_MAX_S + SLACK_S

    # the slots were given back: a can upload now
    again = httpx.post(f"{api}/v1/jobs", headers={"Authorization": f"Bearer {KEYS['a']}"},
                       data={"prompt": "p", "steps": "2"}, files={"image": ("in.png", image, "image/png")},
                       timeout=30)
    assert again.status_code == 202, again.text


def test_a_sender_that_sends_nothing_after_its_headers_gets_408(api: str) -> None:
    port = int(api.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT_S + 10) as sock:
        began = time.monotonic()
        sock.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['b']}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 40\r\n\r\n").encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
        assert time.monotonic() - began < BODY_TIMEOUT_S + SLACK_S


def test_a_slot_freed_while_a_cancelled_waiter_has_not_cleaned_up_goes_to_the_next_one() -> None:
    """A waiter whose body deadline cancelled it is skipped, not granted: granting it raised
    InvalidStateError in the releasing request, which then answered 500 instead of its own 408."""
    async def scenario() -> tuple[bool, bool]:
        slots = UploadSlots(1, 1)
        await slots.acquire("a")
        late = asyncio.ensure_future(slots.acquire("b"))
        nxt = asyncio.ensure_future(slots.acquire("c"))
        await asyncio.sleep(0)  # both wait
        late.cancel()  # its future is cancelled now; its cleanup runs on its next turn
        slots.release("a")  # must not raise, and must hand the slot to "c"
        await asyncio.sleep(0)
        with contextlib.suppress(asyncio.CancelledError):
            await late
        await nxt
        return late.cancelled(), nxt.done() and not nxt.cancelled()

    assert asyncio.run(scenario()) == (True, True)
