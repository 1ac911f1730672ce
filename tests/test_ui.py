"""The web UI (/ui): its routes, and a real headless Chromium driving it against a real cluster.

The browser test needs Debian's ``chromium`` (``/usr/bin/chromium``) and the
``playwright`` Python package (no ``playwright install``: the system browser is
used); it is skipped when either is missing. A screenshot of the finished job
is saved to ``test-artifacts/ui-result.png``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from api.routers import ui
from api.settings import ApiSettings
from cli.cluster import LocalCluster
from cli.localservices import free_port
from editfarm_testing.api import TEST_KEYS, fake_services
from tests.e2e_support import TENANTS, auth, png_bytes, rendered_by

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("EDITFARM_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def with_ui(app: FastAPI) -> FastAPI:
    """``app`` with the UI routes, unless create_app already includes them."""
    if not any(getattr(route, "path", None) == "/ui/" for route in app.routes):
        app.include_router(ui.router)
    return app


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="ui-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the in-process API did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(15)


def launch(pw: Any) -> Any:
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


# -- the routes (in process, no cluster) -----------------------------------------------------------


@pytest.fixture()
def http() -> Iterator[TestClient]:
    with TestClient(with_ui(create_app(services=fake_services())), follow_redirects=False) as client:
        yield client


def test_ui_redirects_to_the_page_which_is_served_with_a_strict_policy(http: TestClient) -> None:
    redirect = http.get("/ui")
    assert redirect.status_code == 308 and redirect.headers["location"] == "ui/"
    page = http.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="app.js"' in page.text and 'href="style.css"' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert http.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert http.get("/ui/style.css").headers["content-type"].startswith("text/css")
    assert "/ui/" not in http.get("/openapi.json").json()["paths"]


def test_ui_assets_revalidate_with_etags(http: TestClient) -> None:
    first = http.get("/ui/app.js")
    again = http.get("/ui/app.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and not again.content


@pytest.mark.parametrize("path", ["/ui/secret.txt", "/ui/..%2Fapp.py", "/ui/%2e%2e/routers/ui.py", "/ui/README.md"])
def test_only_the_ui_files_are_served(http: TestClient, path: str) -> None:
    response = http.get(path)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


# -- the browser, against a real cluster -----------------------------------------------------------


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists() and not shutil.which(CHROMIUM):
        _missing(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def cluster(shared_cluster: LocalCluster) -> LocalCluster:
    """The session's ordinary cluster (tests/conftest.py)."""
    return shared_cluster


@contextlib.contextmanager
def ui_of(cluster: LocalCluster) -> Iterator[str]:
    """Where the UI is served: the cluster's own API once it includes the UI routes, else an API
    built in this process (same settings as the cluster's) with them added, under uvicorn."""
    if httpx.get(f"{cluster.api_url}/ui/", timeout=10).status_code == 200:
        yield cluster.api_url
        return
    with pytest.MonkeyPatch.context() as env:
        for name, value in cluster.env.items():
            if name.startswith("EDITFARM_"):
                env.setenv(name, value)
        settings = ApiSettings()
    with serve(with_ui(create_app(settings))) as url:
        yield url


@pytest.fixture(scope="module")
def ui_url(cluster: LocalCluster) -> Iterator[str]:
    with ui_of(cluster) as url:
        yield url


@pytest.mark.integration
def test_a_user_logs_in_uploads_draws_a_box_submits_and_sees_the_result(
        ui_url: str, tmp_path: Path) -> None:
    sync_playwright = _playwright()
    image_path = tmp_path / "street.png"
    image_path.write_bytes(png_bytes((128, 96), (40, 140, 90)))
    declared = set(httpx.get(f"{ui_url}/openapi.json", timeout=10).json()["components"]["schemas"]
                   ["JobRequest"]["properties"])
    problems: list[str] = []
    event_streams: list[str] = []

    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(20_000)
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: event_streams.append(r.url) if r.url.endswith("/events") else None)

            page.goto(f"{ui_url}/ui")
            assert page.url == f"{ui_url}/ui/"
            page.wait_for_selector("body[data-ready=true]")

            # a wrong key gets a friendly message, the right one signs in
            page.fill("#api-key", "not-a-key")
            page.click("#login-button")
            page.wait_for_selector("#login-error:not([hidden])")
            assert "not accepted" in page.inner_text("#login-error")
            problems.clear()  # Chromium logs the refused request (401) as a console error
            page.fill("#api-key", TENANTS["acme"])
            page.click("#login-button")
            page.wait_for_selector("#app-view:not([hidden])")
            assert page.evaluate("sessionStorage.getItem('editfarm.apiKey')") == TENANTS["acme"]
            assert page.is_checked("#op-edit")

            # inpaint: upload, then draw a box from (20%, 25%) to (70%, 75%) of the image
            page.click("label[for=op-inpaint]")
            page.set_input_files("#file-input", str(image_path))
            page.wait_for_selector("#editor:not([hidden])")
            assert "128×96" in page.inner_text("#image-info")
            canvas = page.locator("#box-canvas").bounding_box()
            assert canvas is not None and canvas["width"] > 300
            x, y, w, h = canvas["x"], canvas["y"], canvas["width"], canvas["height"]
            page.mouse.move(x + 0.2 * w, y + 0.25 * h)
            page.mouse.down()
            page.mouse.move(x + 0.45 * w, y + 0.5 * h, steps=4)
            page.mouse.move(x + 0.7 * w, y + 0.75 * h, steps=4)
            page.mouse.up()
            assert page.locator("#box-list li").count() == 1
            assert "20%, 25% → 70%, 75%" in page.inner_text("#box-list")

            page.fill("#prompt", "make the sky purple")
            page.click(".advanced summary")
            page.fill("#seed", "7")
            page.fill("#steps", "2")
            with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as posted:
                page.click("#submit-button")
            body = json.loads(posted.value.post_data or "{}")
            assert body["operation"] == "inpaint" and body["prompt"] == "make the sky purple"
            assert body["seed"] == 7 and body["steps"] == 2 and body["image"].startswith("data:image/png;base64,")
            if "boxes" in declared:  # sent once the server takes boxes; left out (with a notice) before
                [box] = body["boxes"]
                assert box == pytest.approx([0.2, 0.25, 0.7, 0.75], abs=0.02)
            else:
                assert "boxes" not in body
                page.wait_for_selector("#toast[data-kind=info]:not([hidden])")

            # live progress, then the result image
            page.wait_for_function(
                "() => { const i = document.querySelector('#outputs img');"
                " return i && i.complete && i.naturalWidth > 0; }", timeout=300_000)
            assert page.inner_text("#status-badge") == "Done"
            assert page.inner_text("#status-text").startswith("Done")
            job_id = page.inner_text("#job-details").split("Job")[-1].strip()
            job = httpx.get(f"{ui_url}/v1/jobs/{job_id}", headers=auth(), timeout=10).json()
            assert job["status"] == "succeeded" and job["params"]["seed"] == 7
            shown = page.get_attribute("#outputs img", "src") or ""
            assert shown.split("?")[0] == job["outputs"][0]["url"].split("?")[0]
            assert any(job_id in url for url in event_streams), event_streams
            page.wait_for_selector(f"#recent-list [data-job-id='{job_id}']")
            assert page.locator("#outputs button.download").count() == 1

            text = page.inner_text("body")
            assert '{"' not in text and "null" not in text  # no JSON is ever shown
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "ui-result.png"), full_page=True)
        finally:
            browser.close()
    assert not problems, problems


@pytest.mark.integration
def test_the_model_picker_offers_the_models_of_the_operation_and_the_job_runs_on_the_one_picked(
        fleet_cluster: LocalCluster, tmp_path: Path) -> None:
    """tests/conftest.py's fleet_cluster: t2i (generate, inpaint) and edit (edit, inpaint; the default
    for inpaint) each have a worker, lightning (generate) has none."""
    sync_playwright = _playwright()
    image_path = tmp_path / "room.png"
    image_path.write_bytes(png_bytes((128, 96)))
    problems: list[str] = []

    def options(page: Any) -> list[tuple[str, str]]:
        return [(o.get_attribute("value") or "", o.inner_text()) for o in page.locator("#model-select option").all()]

    def render(page: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Submit the form; the request's body, and the job once the page shows its result."""
        with page.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.request.method == "POST") as posted:
            page.click("#submit-button")
        body = json.loads(posted.value.request.post_data or "{}")
        job_id = posted.value.json()["id"]
        page.wait_for_function("(id) => document.querySelector('#status-badge').textContent === 'Done'"
                               " && document.querySelector('#job-details').textContent.endsWith(id)", arg=job_id)
        return body, httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth(), timeout=10).json()

    with ui_of(fleet_cluster) as url, sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(20_000)
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(f"{url}/ui/")
            page.wait_for_selector("body[data-ready=true]")
            page.fill("#api-key", TENANTS["acme"])
            page.press("#api-key", "Enter")
            page.wait_for_selector("#model-section:not([hidden])")
            # only the operations some model serves
            assert page.locator("#operations label").all_inner_texts() == ["Edit", "Inpaint", "Generate"]
            assert options(page) == [("", "(default) edit — 1 worker"), ("edit", "edit · edit, inpaint — 1 worker")]

            page.click("label[for=op-generate]")
            assert options(page) == [("", "(default) t2i — 1 worker"),
                                     ("t2i", "t2i · generate, inpaint — 1 worker"),
                                     ("lightning", "lightning · generate — no workers: jobs wait")]
            page.select_option("#model-select", "lightning")
            assert "No workers are running it now" in page.inner_text("#model-info")

            page.click("label[for=op-inpaint]")  # lightning does not serve inpaint: back to the default
            assert [value for value, _ in options(page)] == ["", "t2i", "edit"]
            assert page.input_value("#model-select") == ""
            page.set_input_files("#file-input", str(image_path))
            page.wait_for_selector("#editor:not([hidden])")
            box = page.locator("#box-canvas").bounding_box()
            assert box is not None
            page.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + 0.2 * box["height"])
            page.mouse.down()
            page.mouse.move(box["x"] + 0.6 * box["width"], box["y"] + 0.7 * box["height"], steps=4)
            page.mouse.up()
            page.fill("#prompt", "a wooden table")
            page.click(".advanced summary")
            page.fill("#steps", "2")
            page.select_option("#model-select", "t2i")
            assert "t2i serves generate, inpaint." in page.inner_text("#model-info")

            body, job = render(page)
            assert body["operation"] == "inpaint" and body["model"] == "t2i"
            assert job["status"] == "succeeded" and job["model"] == "t2i"
            assert rendered_by(fleet_cluster.redis_url, job["id"]) == "render0-t2i@local"
            details = page.inner_text("#job-details").split("\n")
            assert details[details.index("Model") + 1] == "t2i"
            page.wait_for_selector(f"#recent-list [data-job-id='{job['id']}'] [data-model='t2i']")

            page.select_option("#model-select", "")  # "(default)" names no model: the catalog picks edit
            body, job = render(page)
            assert "model" not in body and job["model"] == "edit" and job["status"] == "succeeded"
            assert rendered_by(fleet_cluster.redis_url, job["id"]) == "render1-edit@local"
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "ui-models.png"), full_page=True)
        finally:
            browser.close()
    assert not problems, problems


ALL_OPERATIONS = ["edit", "generate", "inpaint", "outpaint", "move", "upscale"]


def test_inpaint_sends_a_painted_mask_and_shows_the_apis_error_message(tmp_path: Path) -> None:
    """No cluster: an in-process API over fakes; the browser is told (by a patched /openapi.json) that
    the server takes every operation, and the submit is answered with a 422 to see how errors read."""
    sync_playwright = _playwright()
    image_path = tmp_path / "room.png"
    image_path.write_bytes(png_bytes((128, 96)))
    submitted: list[dict[str, Any]] = []

    def patched_openapi(route: Any) -> None:
        doc = route.fetch().json()
        schemas = doc["components"]["schemas"]
        schemas["Operation"]["enum"] = ALL_OPERATIONS
        for name in ("mask", "boxes", "outpaint", "move", "width", "height"):
            schemas["JobRequest"]["properties"][name] = {}
        route.fulfill(json=doc)

    def refuse_submit(route: Any) -> None:
        if route.request.method != "POST":
            route.continue_()
            return
        submitted.append(json.loads(route.request.post_data or "{}"))
        route.fulfill(status=422, json={"error": {"code": "invalid_parameter", "param": "mask",
                                                  "message": "mask: the mask is not usable here"}})

    with serve(with_ui(create_app(services=fake_services()))) as url, sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(15_000)
            page.route("**/openapi.json", patched_openapi)
            page.route("**/v1/jobs", refuse_submit)
            page.goto(f"{url}/ui/")
            page.wait_for_selector("body[data-ready=true]")
            page.fill("#api-key", TEST_KEYS["acme"])
            page.press("#api-key", "Enter")
            page.wait_for_selector("#app-view:not([hidden])")
            labels = [page.inner_text(f"label[for=op-{op}]") for op in ALL_OPERATIONS]
            assert labels == ["Edit", "Generate", "Inpaint", "Outpaint", "Move", "Upscale"]

            page.click("label[for=op-inpaint]")
            page.set_input_files("#file-input", str(image_path))
            page.wait_for_selector("#editor:not([hidden])")
            page.fill("#prompt", "a wooden table")
            page.click("#submit-button")  # neither a mask nor a box yet
            assert "Paint the area" in page.inner_text("#form-error")

            page.click("#tool-brush")
            box = page.locator("#box-canvas").bounding_box()
            assert box is not None
            x, y, w, h = box["x"], box["y"], box["width"], box["height"]
            page.mouse.move(x + 0.25 * w, y + 0.5 * h)
            page.mouse.down()
            page.mouse.move(x + 0.75 * w, y + 0.5 * h, steps=8)
            page.mouse.up()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "ui-inpaint.png"))
            page.click("#submit-button")
            page.wait_for_selector("#form-error:not([hidden])")
            assert page.inner_text("#form-error") == "Mask: the mask is not usable here."

            page.click("label[for=op-generate]")
            assert page.is_hidden("#image-section") and page.is_visible("#width")
            page.click("label[for=op-outpaint]")
            page.click("#submit-button")
            assert "at least one side" in page.inner_text("#form-error")
        finally:
            browser.close()

    [body] = submitted
    assert body["operation"] == "inpaint" and body["prompt"] == "a wooden table" and "boxes" not in body
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"].split(",", 1)[1]))).convert("L")
    assert mask.size == (128, 96)
    assert mask.getpixel((64, 48)) == 255 and mask.getpixel((5, 5)) == 0 and mask.getpixel((64, 5)) == 0
    assert mask.getpixel((20, 48)) == 0  # left of where the stroke began


def _missing(reason: str) -> None:
    """Skip on a laptop without a browser; in CI (which installs one) a missing browser is a failure."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)
