"""A small HTTP client for the job API, used by `editfarm submit` and the demo."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "canceled"}


class ApiError(Exception):
    def __init__(self, status_code: int, code: str, message: str) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code, self.code, self.message = status_code, code, message


def _raise_for(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            err = response.json()["error"]
            raise ApiError(response.status_code, err["code"], err["message"])
        except (ValueError, KeyError, TypeError):
            raise ApiError(response.status_code, "http_error", response.text[:200]) from None


class JobsClient:
    def __init__(self, api_url: str, api_key: str, timeout_s: float = 60) -> None:
        self.http = httpx.Client(base_url=api_url.rstrip("/"), timeout=timeout_s,
                                 headers={"Authorization": f"Bearer {api_key}"})

    def submit_file(self, image: Path, fields: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/jobs as multipart with an image file. Raises ApiError."""
        form = {k: str(v) for k, v in fields.items() if v is not None}
        with image.open("rb") as fh:
            response = self.http.post("/v1/jobs", data=form, files={"image": (image.name, fh)})
        _raise_for(response)
        return dict(response.json())

    def get(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        _raise_for(response)
        return dict(response.json())

    def wait(self, job_id: str, timeout_s: float = 600, interval_s: float = 0.25,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job is terminal. Raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            time.sleep(interval_s)
        raise TimeoutError(f"job {job_id} not finished after {timeout_s} s")

    def download(self, url: str, path: Path) -> Path:
        response = httpx.get(url, timeout=60)
        response.raise_for_status()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(response.content)
        return path
