"""A job's inputs and outputs in the object store: the render request built from the job, outputs stored.

Plain functions of the runner (``workers/runner.py``), which owns the job's state; nothing here
changes a job record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from broker import events, keys
from broker.events import EventPublisher
from broker.schema import Job, Output, OutputFormat
from storage import ObjectNotFound, ObjectStore
from workers.encode import UnreadableImage, decode_image, decode_mask, encode, encode_output
from workers.loras import LoraResolver
from workers.pipeline.base import InvalidRequest, MoveSpec, OutpaintSpec, RenderRequest, UpscaleSpec

log = logging.getLogger("editfarm.runner")


def render_request(job: Job, objects: ObjectStore, loras: LoraResolver) -> RenderRequest:
    """The job's RenderRequest, its inputs fetched and decoded and its LoRAs on local disk.

    Raises UnreadableImage / LoraUnavailable (input_unreadable),
    InvalidRequest (fields the renderer refuses), StorageUnavailable.
    """
    p = job.params
    images = [_input(objects, key, decode_image, "the image" if i == 0 else f"reference image {i}")
              for i, key in enumerate(job.input_keys)]
    mask = _input(objects, job.mask_key, decode_mask, "the mask") if job.mask_key else None
    lora_files = [(loras.resolve(lora.uri), lora.scale) for lora in p.loras]
    try:
        return RenderRequest(
            operation=p.operation.value, prompt=p.prompt or "", negative_prompt=p.negative_prompt,
            steps=p.steps, true_cfg_scale=p.true_cfg_scale, seed=p.seed, images=images,
            num_images=p.num_images, width=p.width, height=p.height, strength=p.strength, mask=mask,
            boxes=[(b[0], b[1], b[2], b[3]) for b in p.boxes],
            outpaint=OutpaintSpec(**p.outpaint.model_dump()) if p.outpaint else None,
            move=MoveSpec(**{**p.move.model_dump(), "box": tuple(p.move.box)}) if p.move else None,
            upscale=UpscaleSpec(**p.upscale.model_dump()) if p.upscale else None,
            loras=lora_files,
        )
    except ValueError as exc:  # the API validates the same rules; a job that slipped past fails cleanly
        raise InvalidRequest(str(exc)) from None


def _input(objects: ObjectStore, key: str, decode: Callable[[bytes], Any], label: str) -> Any:
    """The stored input ``key`` decoded; errors name it as its tenant knows it (``label``), not by
    its storage key or the decoder's exception (those stay chained, for the log).

    Raises UnreadableImage (missing or undecodable), StorageUnavailable.
    """
    try:
        return decode(objects.get(key))
    except ObjectNotFound as exc:
        raise UnreadableImage(f"{label} is not stored (any more)") from exc
    except UnreadableImage as exc:
        raise UnreadableImage(f"{label} could not be decoded as an image") from exc


def upload_outputs(job: Job, images: list[Any], objects: ObjectStore) -> list[Output]:
    """Encode each image (format, quality, DPI of the job) and store it as output ``index``.

    Raises StorageUnavailable when the object store is unreachable.
    """
    p = job.params
    fmt = p.output_format
    outputs = []
    for index, image in enumerate(images):
        data = encode_output(image, fmt, p.output_quality, p.dpi)
        key = keys.output_object(job.tenant, job.id, index, fmt.value)
        stored = objects.put(key, data, fmt.content_type)
        outputs.append(Output(key=key, content_type=fmt.content_type, width=image.width,
                              height=image.height, sha256=stored.sha256, size_bytes=stored.size_bytes))
    return outputs


def preview_sink(job: Job, objects: ObjectStore, publisher: EventPublisher) -> Callable[[int, Any], None]:
    """A renderer's preview callback for ``job``: stores each preview as a small JPEG and announces its key."""

    def sink(step: int, image: Any) -> None:
        try:
            key = keys.preview_object(job.tenant, job.id, step)
            objects.put(key, encode(image.convert("RGB"), OutputFormat.JPEG, quality=70), "image/jpeg")
            publisher.publish(job.id, events.PREVIEW, {"step": step, "key": key})
        except Exception:  # noqa: BLE001 - a preview is advisory; the render goes on
            log.warning("preview of job %s at step %d not stored", job.id, step)

    return sink
