"""The runner for every operation (unit level): the RenderRequest it builds from a job, LoRA
resolution, invalid inputs, several outputs, progress totals and output encoding. In-memory
stores and a fake renderer that records what it was asked."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image

from broker import keys
from broker import schema as broker_schema
from broker.events import InMemoryEventPublisher
from broker.jobstore import InMemoryJobStore
from broker.schema import Job, JobParams, JobStatus, new_job_id
from editfarm_testing.workers import RecordingQueue
from storage import InMemoryObjectStore
from workers import operations
from workers.loras import LoraResolver, LoraUnavailable
from workers.pipeline import base
from workers.pipeline.base import (
    InvalidRequest,
    MoveSpec,
    OutpaintSpec,
    Renderer,
    RenderInterrupted,
    RenderRequest,
    UnsupportedOperation,
    UpscaleSpec,
)
from workers.runner import GpuBroken, Runner, RunnerConfig
from workers.transitions import Transitions


class RecordingRenderer(Renderer):
    """Records each RenderRequest; reports ``planned_steps`` progress; returns ``num_images``
    distinct solid images of ``operations.output_size`` (RGBA when the main input has alpha)."""

    device = "cpu"

    def __init__(self) -> None:
        self.requests: list[RenderRequest] = []
        self.error: Exception | None = None
        self.healthchecks = 0

    def render(self, request: RenderRequest, on_step: Any = None, *, previews: Any = None) -> list[Image.Image]:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        total = operations.planned_steps(request)
        for step in range(1, total + 1):
            if on_step is not None and not on_step(step, total):
                raise RenderInterrupted(step, total)
        size = operations.output_size(request)
        alpha = bool(request.images) and request.images[0].mode == "RGBA" and request.operation != "generate"
        return [Image.new("RGBA" if alpha else "RGB", size, (40 * k, 100, 200, 128)[: 4 if alpha else 3])
                for k in range(request.num_images)]

    def healthcheck(self) -> None:
        self.healthchecks += 1

    def warmup(self) -> None:
        pass


def png(size: tuple[int, int] = (64, 48), mode: str = "RGB", color: Any = (10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.store = InMemoryJobStore()
        self.objects = InMemoryObjectStore()
        self.renderer = RecordingRenderer()
        self.loras = LoraResolver(self.objects, bucket="editfarm", cache_dir=tmp_path / "loras")
        config = RunnerConfig(worker_name="w@test")
        transitions = Transitions(store=self.store, publisher=InMemoryEventPublisher(),
                                  notify=lambda job, event: None, config=config)
        self.runner = Runner(transitions=transitions, objects=self.objects, renderer=self.renderer,
                             queue=RecordingQueue(), config=config, loras=self.loras)

    def submit(self, inputs: list[bytes] | None = None, mask: bytes | None = None, **params: Any) -> Job:
        job_id = new_job_id()
        input_keys = []
        for index, data in enumerate(inputs if inputs is not None else [png()]):
            key = keys.input_object("acme", job_id, index, "png")
            self.objects.put(key, data, "image/png")
            input_keys.append(key)
        mask_key = None
        if mask is not None:
            mask_key = keys.mask_object("acme", job_id, "png")
            self.objects.put(mask_key, mask, "image/png")
        if params.get("operation", "edit") == "edit":
            params.setdefault("prompt", "p")
        job = Job(id=job_id, tenant="acme", params=JobParams(**{"seed": 7, "steps": 4, **params}),
                  input_keys=input_keys, mask_key=mask_key)
        self.store.create(job)
        return job

    def run(self, job: Job) -> tuple[Job, RenderRequest | None]:
        status = self.runner.run(job.id)
        done = self.store.get(job.id)
        assert done is not None and done.status is status
        return done, self.renderer.requests[-1] if self.renderer.requests else None


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


# -- the RenderRequest per operation ---------------------------------------------------------------


def test_an_edit_with_references_passes_every_image_and_keeps_the_main_images_alpha(h: Harness) -> None:
    job = h.submit([png(mode="RGBA", color=(1, 2, 3, 100)), png((32, 32)), png((16, 48))], prompt="hat",
                   width=128, height=96, num_images=2, negative_prompt=None)
    done, request = h.run(job)
    assert done.status is JobStatus.SUCCEEDED and request is not None
    assert request.operation == "edit" and request.prompt == "hat" and request.negative_prompt is None
    assert [i.size for i in request.images] == [(64, 48), (32, 32), (16, 48)]
    assert request.images[0].mode == "RGBA" and request.images[1].mode == "RGB"
    assert (request.width, request.height, request.num_images, request.seed, request.steps) == (128, 96, 2, 7, 4)
    assert request.mask is None and request.loras == []
    assert [(o.width, o.height) for o in done.outputs] == [(128, 96)] * 2


def test_a_generate_job_renders_with_no_input_image(h: Harness) -> None:
    done, request = h.run(h.submit([], operation="generate", prompt="a boat", width=96, height=64))
    assert done.status is JobStatus.SUCCEEDED and request is not None
    assert request.operation == "generate" and request.images == [] and (request.width, request.height) == (96, 64)
    assert [(o.width, o.height) for o in done.outputs] == [(96, 64)]


def test_an_inpaint_gets_its_mask_as_luminance_its_boxes_and_strength(h: Harness) -> None:
    mask = png(mode="RGBA", color=(255, 255, 255, 0))  # the colour counts, not the alpha
    done, request = h.run(h.submit(mask=mask, operation="inpaint", boxes=[[0.1, 0.2, 0.5, 0.6]],
                                   strength=0.5, steps=10))
    assert done.status is JobStatus.SUCCEEDED and request is not None
    assert request.mask is not None and request.mask.mode == "L" and request.mask.getpixel((0, 0)) == 255
    assert request.boxes == [(0.1, 0.2, 0.5, 0.6)] and request.strength == 0.5 and request.prompt == ""
    assert done.progress.model_dump() == {"step": 5, "total": 5}  # effective steps of strength 0.5


def test_outpaint_move_and_upscale_get_their_specs(h: Harness) -> None:
    done, request = h.run(h.submit(operation="outpaint", outpaint={"width": 128, "direction": "right"}))
    assert done.status is JobStatus.SUCCEEDED and request is not None
    assert request.outpaint == OutpaintSpec(width=128, direction="right")
    assert [(o.width, o.height) for o in done.outputs] == [(128, 48)]

    done, request = h.run(h.submit(mask=png(mode="L", color=255), operation="move",
                                   move={"box": [0.1, 0.1, 0.5, 0.5], "dx": 8, "dy": -4, "scale": 0.5}))
    assert done.status is JobStatus.SUCCEEDED and request is not None
    assert request.move == MoveSpec(box=(0.1, 0.1, 0.5, 0.5), dx=8, dy=-4, scale=0.5, seam=8)
    assert request.mask is not None and request.mask.size == (64, 48)

    done, request = h.run(h.submit(operation="upscale", width=256, upscale={"tile": 128, "overlap": 32},
                                   steps=10))
    assert done.status is JobStatus.SUCCEEDED and request is not None
    assert request.upscale == UpscaleSpec(scale=2.0, tile=128, overlap=32) and request.width == 256
    assert [(o.width, o.height) for o in done.outputs] == [(256, 192)]
    tiles = len(operations._upscale_plan(request))
    assert tiles > 1 and done.progress.model_dump() == {"step": tiles * 3, "total": tiles * 3}  # strength 0.3


def test_the_running_job_shows_the_planned_total_before_its_first_step(h: Harness) -> None:
    seen: list[dict[str, int]] = []
    job = h.submit(operation="inpaint", boxes=[[0, 0, 1, 1]], strength=0.25, steps=8)
    original = h.renderer.render

    def render(request: RenderRequest, on_step: Any = None, *, previews: Any = None) -> list[Image.Image]:
        current = h.store.get(job.id)
        assert current is not None
        seen.append(current.progress.model_dump())
        return original(request, on_step, previews=previews)

    h.renderer.render = render  # type: ignore[method-assign]
    done, _ = h.run(job)
    assert seen == [{"step": 0, "total": 2}] and done.progress.total == 2


# -- several outputs, encoding ------------------------------------------------------------------------


def test_num_images_gives_that_many_distinct_outputs(h: Harness) -> None:
    done, _ = h.run(h.submit(num_images=3, width=64, height=48))
    assert done.status is JobStatus.SUCCEEDED
    assert [o.key for o in done.outputs] == [keys.output_object("acme", done.id, k, "png") for k in range(3)]
    assert len({o.sha256 for o in done.outputs}) == 3
    for output in done.outputs:
        assert hashlib.sha256(h.objects.get(output.key)).hexdigest() == output.sha256


def test_outputs_are_encoded_with_the_jobs_format_quality_and_dpi(h: Harness) -> None:
    done, _ = h.run(h.submit(width=64, height=48, output_format="jpeg", output_quality=50, dpi=300))
    [output] = done.outputs
    assert output.key.endswith("/outputs/0.jpeg") and output.content_type == "image/jpeg"
    image = Image.open(io.BytesIO(h.objects.get(output.key)))
    assert image.format == "JPEG" and image.info["dpi"] == (300, 300)

    done, _ = h.run(h.submit([png(mode="RGBA", color=(1, 2, 3, 100))], operation="inpaint",
                             boxes=[[0, 0, 1, 1]], dpi=72))
    image = Image.open(io.BytesIO(h.objects.get(done.outputs[0].key)))
    assert image.mode == "RGBA" and round(image.info["dpi"][0]) == 72


# -- failures ----------------------------------------------------------------------------------------


def test_invalid_request_fails_the_job_with_invalid_input_and_no_health_check(h: Harness) -> None:
    h.renderer.error = InvalidRequest("the mask selects no pixel to repaint")
    done, _ = h.run(h.submit(operation="inpaint", mask=png(mode="L", color=0)))
    assert done.status is JobStatus.FAILED and done.error is not None
    assert done.error.code == "invalid_input" and "no pixel" in done.error.message
    assert h.renderer.healthchecks == 0


def test_an_operation_the_loaded_model_does_not_serve_fails_with_unsupported_operation(h: Harness) -> None:
    """A job routed to a model that cannot run it (a text-to-image pool asked for an edit) ends
    with its own code and the renderer's tenant-readable text, without a retry or health check."""
    h.renderer.error = UnsupportedOperation("this model does not serve edit jobs; it serves generate, inpaint")
    done, _ = h.run(h.submit())
    assert done.status is JobStatus.FAILED and done.error is not None
    assert done.error.code == "unsupported_operation" and "serves generate, inpaint" in done.error.message
    assert h.renderer.healthchecks == 0 and done.attempts == 1


def test_a_request_the_renderer_types_refuse_is_invalid_input_without_rendering(h: Harness) -> None:
    job = h.submit([], operation="inpaint", boxes=[[0, 0, 1, 1]])  # its image is missing
    done, request = h.run(job)
    assert done.status is JobStatus.FAILED and done.error is not None and done.error.code == "invalid_input"
    assert request is None


def test_an_unreadable_mask_is_input_unreadable(h: Harness) -> None:
    done, request = h.run(h.submit(operation="inpaint", mask=b"not a png"))
    assert done.error is not None and done.error.code == "input_unreadable" and request is None


def test_other_render_errors_still_fail_render_failed_and_check_the_device(h: Harness) -> None:
    h.renderer.error = RuntimeError("boom")
    done, _ = h.run(h.submit())
    assert done.error is not None and done.error.code == "render_failed" and h.renderer.healthchecks == 1
    h.renderer.healthcheck = lambda: (_ for _ in ()).throw(RuntimeError("gone"))  # type: ignore[method-assign]
    with pytest.raises(GpuBroken):
        h.runner.run(h.submit().id)


# -- LoRAs ---------------------------------------------------------------------------------------------


def test_a_lora_in_the_cluster_bucket_is_downloaded_once_and_passed_as_a_local_file(h: Harness) -> None:
    h.objects.put("loras/style.safetensors", b"lora-weights-1", "application/octet-stream")
    uri = "s3://editfarm/loras/style.safetensors"
    done, request = h.run(h.submit(loras=[{"uri": uri, "scale": 0.7}, {"uri": uri, "scale": -1}]))
    assert done.status is JobStatus.SUCCEEDED and request is not None
    [(path, scale), (again, scale2)] = request.loras
    assert (scale, scale2) == (0.7, -1.0) and path == again
    assert Path(path).suffix == ".safetensors" and Path(path).read_bytes() == b"lora-weights-1"
    assert Path(path).is_relative_to(h.loras.cache_dir)
    # new content under the same key is a new file; the old one stays for other jobs
    h.objects.put("loras/style.safetensors", b"lora-weights-2", "application/octet-stream")
    _, request = h.run(h.submit(loras=[{"uri": uri}]))
    assert request is not None and Path(request.loras[0][0]).read_bytes() == b"lora-weights-2"
    assert request.loras[0][0] != path and Path(path).exists()


def test_a_missing_lora_object_fails_the_job_input_unreadable_without_rendering(h: Harness) -> None:
    done, request = h.run(h.submit(loras=[{"uri": "s3://editfarm/loras/nope.safetensors"}]))
    assert done.status is JobStatus.FAILED and done.error is not None
    assert done.error.code == "input_unreadable" and "no such object" in done.error.message
    assert request is None


def test_a_lora_in_a_bucket_not_allowed_is_refused(h: Harness) -> None:
    with pytest.raises(LoraUnavailable, match="not allowed"):
        h.loras.resolve("s3://elsewhere/l.safetensors")
    done, _ = h.run(h.submit(loras=[{"uri": "s3://elsewhere/l.safetensors"}]))
    assert done.error is not None and done.error.code == "input_unreadable"


class _LoraHandler(http.server.BaseHTTPRequestHandler):
    body = b"https-lora-weights"
    etag = '"v1"'
    gets: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).gets.append(self.path)
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "/files/l.safetensors")
            self.end_headers()
        elif self.path == "/files/l.safetensors":
            if self.headers.get("If-None-Match") == self.etag:
                self.send_response(304)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("ETag", self.etag)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def lora_server() -> Iterator[str]:
    _LoraHandler.gets = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LoraHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_lora_url_is_fetched_under_the_url_policy_and_revalidated_with_its_etag(
        tmp_path: Path, lora_server: str) -> None:
    resolver = LoraResolver(InMemoryObjectStore(), bucket="editfarm", cache_dir=tmp_path,
                            allow_private=True, allow_http=True)
    path = resolver.resolve(f"{lora_server}/redirect/l.safetensors")
    assert Path(path).read_bytes() == _LoraHandler.body
    assert resolver.resolve(f"{lora_server}/redirect/l.safetensors") == path  # 304: the cached copy
    assert _LoraHandler.gets == ["/redirect/l.safetensors", "/files/l.safetensors"] * 2
    with pytest.raises(LoraUnavailable, match="HTTP 404"):
        resolver.resolve(f"{lora_server}/missing.safetensors")
    small = LoraResolver(InMemoryObjectStore(), bucket="editfarm", cache_dir=tmp_path / "small",
                         allow_private=True, allow_http=True, max_bytes=4)
    with pytest.raises(LoraUnavailable, match="larger than 4 bytes"):
        small.resolve(f"{lora_server}/files/l.safetensors")


def test_the_default_url_policy_refuses_loopback_and_plain_http_loras(tmp_path: Path, lora_server: str) -> None:
    strict = LoraResolver(InMemoryObjectStore(), bucket="editfarm", cache_dir=tmp_path)
    with pytest.raises(LoraUnavailable, match="not allowed"):
        strict.resolve(f"{lora_server}/files/l.safetensors")
    https_only = LoraResolver(InMemoryObjectStore(), bucket="editfarm", cache_dir=tmp_path, allow_private=True)
    with pytest.raises(LoraUnavailable, match="not allowed"):
        https_only.resolve(f"{lora_server}/files/l.safetensors")
    assert _LoraHandler.gets == []


def test_the_lora_cache_is_trimmed_to_its_size_least_recently_used_first(tmp_path: Path) -> None:
    objects = InMemoryObjectStore()
    resolver = LoraResolver(objects, bucket="editfarm", cache_dir=tmp_path, max_cache_bytes=25)
    paths: list[Path] = []
    for name in ("a", "b", "c"):
        for older, path in enumerate(paths):  # distinct use times, whatever the file system's clock resolution
            os.utime(path, (1000 + older, 1000 + older))
        objects.put(f"{name}.safetensors", name.encode() * 10, "application/octet-stream")
        paths.append(Path(resolver.resolve(f"s3://editfarm/{name}.safetensors")))
        assert paths[-1].exists()
    assert [p.exists() for p in paths] == [False, True, True]  # 30 bytes > 25: the least recently used went


# -- the broker's limits are the renderer's -------------------------------------------------------------


def test_the_broker_schema_limits_mirror_the_renderers() -> None:
    for name in ("SIZE_MULTIPLE", "MIN_SIDE", "MAX_NATIVE_SIDE", "MAX_UPSCALE_SIDE", "MAX_CANVAS_SIDE",
                 "MAX_NUM_IMAGES", "MAX_REFERENCE_IMAGES", "MAX_BOXES", "MAX_LORAS", "MIN_STRENGTH"):
        assert getattr(broker_schema, name) == getattr(base, name), name
    assert broker_schema.OUTPAINT_DIRECTIONS == base.DIRECTIONS
    assert tuple(op.value for op in broker_schema.Operation) == base.OPERATIONS
