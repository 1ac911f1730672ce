"""Helpers for end-to-end tests against a real local cluster."""

from __future__ import annotations

import base64
import io
import time
import zlib
from typing import Any

import httpx
from PIL import Image

TENANTS = {"acme": "key-acme-0123456789", "globex": "key-globex-0123456789"}
API_KEYS = ",".join(f"{t}:{k}" for t, k in TENANTS.items())


def png_bytes(size: tuple[int, int] = (96, 64), color: tuple[int, int, int] = (30, 120, 200)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 8):  # some structure, so the edit has something to look at
        img.putpixel((x, x % size[1]), (255, 255, 0))
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_with_corrupt_pixels(size: tuple[int, int] = (96, 64)) -> bytes:
    """A PNG whose chunks are all intact (right CRCs, IEND there) but whose compressed pixel data is not:
    the API's integrity check (Pillow's ``verify()``) passes it; only a full decode finds it."""
    png = png_bytes(size)
    start = png.index(b"IDAT") - 4
    length = int.from_bytes(png[start:start + 4], "big")
    garbage = b"\x78\x9c" + bytes((i * 37 + 11) % 256 for i in range(max(8, length - 2)))
    chunk = len(garbage).to_bytes(4, "big") + b"IDAT" + garbage + zlib.crc32(b"IDAT" + garbage).to_bytes(4, "big")
    return png[:start] + chunk + png[start + 12 + length:]


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def auth(tenant: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {TENANTS[tenant]}"}


def wait_terminal(api_url: str, job_id: str, tenant: str = "acme", timeout_s: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{api_url}/v1/jobs/{job_id}", headers=auth(tenant), timeout=10).json()
        if job["status"] in {"succeeded", "failed", "canceled"}:
            return dict(job)
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still not finished")


def rendered_by(redis_url: str, job_id: str) -> str:
    """The Celery node that rendered the job, from its record (``<node>/<instance of that start>``)."""
    import redis

    from broker.jobstore import RedisJobStore

    client = redis.Redis.from_url(redis_url)
    try:
        job = RedisJobStore(client).get(job_id)
    finally:
        client.close()
    assert job is not None and job.worker is not None, job
    return job.worker.split("/")[0]
