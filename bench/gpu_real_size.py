"""The real-size path on a GPU: the full Qwen-Image-Edit architecture with random bf16 weights.

Builds the genuine diffusers/transformers classes at their real sizes (20B MMDiT with 60
blocks, Qwen2.5-VL-7B text encoder with its 32-block vision tower, the 16-channel VAE) in
memory with random weights (no hub is reachable; saving ~54 GB to disk would only cost
time), then edits a 1024x1024 image and compares, side by side in one process:

* ``bare``: ``QwenImageEditPipeline.__call__`` + PNG encode, as a script would;
* ``worker``: the worker's adapter (``DiffusersRenderer.render``) + the worker's encoder;
* speed-ups on the worker path: the cuDNN attention backend, then regional torch.compile
  of the repeated transformer blocks.

Prints one JSON object and writes it to ``$OUT/gpu_real_size.json`` (or ``--out``).
``--scale tiny --device cpu`` runs the same code on the tiny model (a smoke test).

    python bench/gpu_real_size.py --steps 8,50 --budget-s 420
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

PROMPT = "make the sky purple and add a small red kite"


def build_components(scale: str, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """The pipeline's components; ``full`` scales the tiny model's configs up to the real sizes."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from workers.pipeline.tiny import build_tiny_edit_components

    components = build_tiny_edit_components(seed=0)
    if scale == "tiny":
        return components
    from transformers import Qwen2_5_VLConfig

    tiny = components["text_encoder"].config.to_dict()
    text, vision = dict(tiny.pop("text_config")), dict(tiny.pop("vision_config"))
    text.pop("layer_types", None)  # derived from num_hidden_layers at init
    # Qwen2.5-VL-7B-Instruct, the text encoder of Qwen-Image(-Edit)
    text.update(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, head_dim=128,
                rope_parameters={**text["rope_parameters"], "mrope_section": [16, 24, 24]})
    vision.update(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  fullatt_block_indexes=[7, 15, 23, 31])
    keep = {k: tiny[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                 "vision_end_token_id") if k in tiny}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **keep)
    processor = components["processor"]
    processor.image_processor.min_pixels, processor.image_processor.max_pixels = 3136, 12845056
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in bf16: 27B fp32 params would not fit
    try:
        with torch.device(device):
            components["text_encoder"] = Qwen2_5_VLForConditionalGeneration(config)
            components["transformer"] = QwenImageTransformer2DModel()  # defaults are the real 20B
            components["vae"] = AutoencoderKLQwenImage()
    finally:
        torch.set_default_dtype(previous)
    return components


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Any) -> tuple[float, Any]:
    sync(device)
    began = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - began, result


def png(image: Image.Image) -> bytes:
    """PNG bytes as the worker writes them (Pillow defaults; the GPU box has no pydantic for
    ``workers.encode``'s imports, so the call is made directly)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def psnr(a: bytes, b: bytes) -> float:
    """Peak signal-to-noise ratio (dB) between two encoded images; inf when identical."""
    import io

    import numpy as np

    x = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else round(10 * np.log10(255.0**2 / mse), 2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", default="8,50")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--budget-s", type=float, default=420, help="skip stages that would start after this")
    parser.add_argument("--only", default="", help="comma list of stages: baseline,attention,compile")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_real_size.json"))
    args = parser.parse_args()
    began = time.perf_counter()
    report: dict[str, Any] = {"scale": args.scale, "size": args.size, "runs": [], "skipped": []}

    from diffusers import QwenImageEditPipeline

    from workers.pipeline.base import RenderRequest
    from workers.pipeline.diffusers_renderer import DiffusersRenderer, resolve_dtype

    dtype = resolve_dtype(args.device, None)
    if args.device.startswith("cuda"):
        report["device"] = torch.cuda.get_device_name()
    report["versions"] = {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__}
    build_s, components = timed(args.device, lambda: build_components(args.scale, args.device, dtype))
    pipe = QwenImageEditPipeline(**components).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    report["build_s"] = round(build_s, 2)
    report["params_b"] = round(sum(p.numel() for m in (pipe.transformer, pipe.text_encoder, pipe.vae)
                                   for p in m.parameters()) / 1e9, 2)
    renderer = DiffusersRenderer(pipe, model="in-memory", device=args.device, dtype=dtype)
    image = Image.radial_gradient("L").resize((args.size, args.size)).convert("RGB")

    images: dict[tuple[str, int], bytes] = {}

    def bare(steps: int) -> bytes:
        out = pipe(image=image, prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0,
                   num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(7),
                   output_type="pil").images[0]
        return png(out)

    def worker(steps: int) -> bytes:
        request = RenderRequest(operation="edit", prompt=PROMPT, negative_prompt=" ", steps=steps,
                                true_cfg_scale=4.0, seed=7, images=[image])
        return png(renderer.render(request, lambda step, total: True)[0])

    def run(name: str, steps: int, fn: Any) -> None:
        if time.perf_counter() - began > args.budget_s:
            report["skipped"].append(f"{name}@{steps}")
            return
        seconds, data = timed(args.device, lambda: fn(steps))
        row: dict[str, Any] = {"path": name, "steps": steps, "s": round(seconds, 3),
                               "sha256": hashlib.sha256(data).hexdigest()[:16]}
        reference = images.get(("worker", steps))
        if reference is not None and name != "worker":
            row["psnr_db_vs_worker"] = psnr(reference, data)
        images[(name, steps)] = data
        report["runs"].append(row)
        print(json.dumps(row), flush=True)

    step_counts = [int(s) for s in args.steps.split(",")]
    stages = set(args.only.split(",")) if args.only else {"baseline", "attention", "compile"}
    run("warmup", min(step_counts), worker)
    for steps in step_counts:  # interleaved so drift hits both paths alike
        if "baseline" in stages:
            run("bare", steps, bare)
        run("worker", steps, worker)
    if args.device.startswith("cuda") and "attention" in stages:
        for backend in ("_native_cudnn", "_native_flash"):
            try:
                pipe.transformer.set_attention_backend(backend)
            except Exception as exc:  # noqa: BLE001 - a backend this build lacks
                report["skipped"].append(f"{backend}: {type(exc).__name__}")
                continue
            run(f"worker+{backend}", min(step_counts), worker)
        pipe.transformer.set_attention_backend("native")
    if args.device.startswith("cuda") and "compile" in stages:
        try:
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
            run("worker+compile(warm-up)", min(step_counts), worker)
            for steps in step_counts:
                run("worker+compile", steps, worker)
        except Exception as exc:  # noqa: BLE001
            report["skipped"].append(f"compile: {type(exc).__name__}: {exc}"[:300])
    if args.device.startswith("cuda"):
        report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    report["total_s"] = round(time.perf_counter() - began, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
