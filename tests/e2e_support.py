"""Helpers for end-to-end tests against a real local cluster."""

from __future__ import annotations

import base64
import io
import time
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
