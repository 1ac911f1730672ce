"""Memory profiles and fast presets measured against the plain (bf16) model: memory, seconds per
image at 8 and 50 steps, and deviation (PSNR and SSIM of the image, max abs difference of the
final latents) on the same seed and inputs.

Each configuration runs in its own process, so its peak memory is its own:

* CPU (always): the tiny random-weight model (4 transformer blocks) rendering text-to-image at
  ``--size`` px with CFG 4 (the distilled-LoRA preset: CFG 1, as such LoRAs are used). Memory is
  the process's peak RSS (``ru_maxrss``: the Python/torch runtime included) and the bytes the
  transformer's parameters are stored in. The offload profiles run with their hooks on the CPU
  (``allow_offload_on_cpu``): they measure the hooks' cost, not a transfer.
* GPU (only when ``torch.cuda.is_available()``): the full-size architecture with random bf16
  weights (``bench/gpu_real_size.py``'s builder) editing a 1024² image; memory is
  ``torch.cuda.max_memory_allocated``; 24 and 48 GiB cards are simulated with
  ``torch.cuda.set_per_process_memory_fraction`` (does a 1024² edit complete inside?). Without a
  GPU these rows say "not measured".

Writes ``bench/results/profiles.json`` and prints the README's table (Markdown).

    python -m bench.profiles            # ~5 minutes on 2 CPU cores
    python -m bench.profiles --quick    # proves it runs
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, command_line, log, parser, write_report

# (label, profile, preset fields, true_cfg_scale)
CONFIGS: list[tuple[str, str, dict[str, Any], float]] = [
    ("bf16", "bf16", {}, 4.0),
    ("fp8-storage", "fp8-storage", {}, 4.0),
    ("int8", "int8", {}, 4.0),
    ("fp8", "fp8", {}, 4.0),
    ("offload-text-encoder", "offload-text-encoder", {}, 4.0),
    ("offload", "offload", {}, 4.0),
    ("fp8-storage+offload-text-encoder", "fp8-storage+offload-text-encoder", {}, 4.0),
    ("fp8-storage+offload-text-encoder+offload", "fp8-storage+offload-text-encoder+offload", {}, 4.0),
    ("bf16 + first-block cache 0.05", "bf16", {"block_cache": "first-block", "block_cache_threshold": 0.05}, 4.0),
    ("bf16 + first-block cache 0.2", "bf16", {"block_cache": "first-block", "block_cache_threshold": 0.2}, 4.0),
    ("bf16 + TaylorSeer cache", "bf16", {"block_cache": "taylorseer"}, 4.0),
    ("bf16 + fused LoRA, CFG 1", "bf16", {"fuse_loras": "LORA:1.0"}, 1.0),
    ("fp8-storage + first-block cache 0.05", "fp8-storage", {"block_cache": "first-block",
                                                              "block_cache_threshold": 0.05}, 4.0),
]
PROMPT = "make the sky purple and add a small red kite"
SEED = 7
# the 24 and 48 GB classes' usable memory as nvidia-smi reports it (see workers/fitcheck.CARD_CLASSES)
SIMULATED_CARDS_GIB = {"24 GB": 22.5, "48 GB": 45.0}


# -- quality ---------------------------------------------------------------------------------------

def psnr_db(a: Any, b: Any) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else round(float(10 * np.log10(255.0**2 / mse)), 2)


def _gaussian_blur(x: Any, sigma: float = 1.5, radius: int = 5) -> Any:
    import numpy as np

    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    x = np.apply_along_axis(lambda row: np.convolve(row, taps, mode="valid"), 0, x)
    return np.apply_along_axis(lambda col: np.convolve(col, taps, mode="valid"), 1, x)


def ssim(a: Any, b: Any) -> float:
    """SSIM (Wang et al. 2004: 11-tap Gaussian window, sigma 1.5, K1 0.01, K2 0.03) of two RGB
    uint8 arrays, on their luma, mean over the valid window positions."""
    import numpy as np

    def luma(x: Any) -> Any:
        return x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])

    x, y = luma(a), luma(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _gaussian_blur(x), _gaussian_blur(y)
    vx = _gaussian_blur(x * x) - mx * mx
    vy = _gaussian_blur(y * y) - my * my
    cxy = _gaussian_blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return round(float(value.mean()), 4)


# -- one configuration, in its own process -----------------------------------------------------------

def _stored_bytes(module: Any) -> int:
    """Bytes ``module``'s parameters are stored in (torchao tensors: their quantized data and scales)."""
    total = 0
    for parameter in module.parameters():
        inner = [getattr(parameter, name) for name in ("qdata", "scale", "zero_point") if hasattr(parameter, name)]
        tensors = [t for t in inner if hasattr(t, "element_size")] or [parameter]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _load(spec: dict[str, Any]) -> Any:
    import torch

    from workers.pipeline.diffusers_renderer import DiffusersRenderer
    from workers.pipeline.presets import FastPreset
    from workers.pipeline.profiles import parse_profile

    preset = FastPreset.parse(**spec["preset"])
    profile = parse_profile(spec["profile"])
    if spec["scale"] == "tiny":
        return DiffusersRenderer.load(spec["model"], spec["device"], profile=profile, preset=preset,
                                      allow_offload_on_cpu=True)
    # full size on a GPU: built in host memory, then cast/quantized/offloaded and moved by the profile
    from diffusers import QwenImageEditPipeline

    from bench.gpu_real_size import build_components
    from workers.pipeline.fast import fuse_and_schedule, speed_up
    from workers.pipeline.memory import apply_profile

    if spec.get("card_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["card_gib"] * 2**30 / total))
    pipe: Any = QwenImageEditPipeline(**build_components("full", "cpu", torch.bfloat16))
    fuse_and_schedule(pipe, preset)
    apply_profile(pipe, profile, spec["device"], torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    renderer = DiffusersRenderer(pipe, model="in-memory", device=spec["device"], dtype=torch.bfloat16)
    renderer.profile, renderer.preset = profile, preset
    renderer.compile_watch = speed_up(pipe, preset)
    return renderer


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image

    cuda = spec["device"].startswith("cuda")
    renderer = _load(spec)
    kind, size = ("edit", 1024) if spec["scale"] == "full" else ("generate", spec["size"])
    pipe = renderer.pipeline(kind)
    inputs: dict[str, Any] = {"width": size, "height": size}
    if kind == "edit":
        inputs["image"] = Image.radial_gradient("L").resize((size, size)).convert("RGB")
    result: dict[str, Any] = {"transformer_stored_mb": round(_stored_bytes(pipe.transformer) / 2**20, 3), "runs": {}}
    # untimed: the first call pays one-off costs (kernel selection, allocator growth, lazy imports)
    pipe(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=spec["cfg"], num_inference_steps=2,
         generator=torch.Generator("cpu").manual_seed(SEED), output_type="pil", **inputs)
    for steps in spec["steps"]:
        latents: list[Any] = []

        def keep(_pipe: Any, step: int, _t: Any, kwargs: dict[str, Any], latents: list[Any] = latents) -> Any:
            latents[:] = [kwargs["latents"]]
            return kwargs

        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        try:
            image = pipe(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=spec["cfg"], num_inference_steps=steps,
                         generator=torch.Generator("cpu").manual_seed(SEED), output_type="pil",
                         callback_on_step_end=keep, **inputs).images[0]
        except torch.OutOfMemoryError:
            result["runs"][str(steps)] = {"completed": False, "error": "out of memory"}
            break
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        stem = Path(spec["out_dir"]) / f"{spec['index']}-{steps}"
        np.save(f"{stem}.npy", latents[0].float().cpu().numpy())
        image.convert("RGB").save(f"{stem}.png")
        result["runs"][str(steps)] = {"completed": True, "s_per_image": round(seconds, 3)}
    if cuda:
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def _run_child(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "bench.profiles", "--child", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


# -- the whole matrix ---------------------------------------------------------------------------------

def _deviation(out_dir: Path, index: str, base: str, steps: int) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    stem, ref = out_dir / f"{index}-{steps}", out_dir / f"{base}-{steps}"
    if not (Path(f"{stem}.png").exists() and Path(f"{ref}.png").exists()):
        return {}
    a = np.asarray(Image.open(f"{stem}.png").convert("RGB"))
    b = np.asarray(Image.open(f"{ref}.png").convert("RGB"))
    latents = float(np.abs(np.load(f"{stem}.npy") - np.load(f"{ref}.npy")).max())
    return {"psnr_db": psnr_db(a, b), "ssim": ssim(a, b), "latents_max_abs_diff": round(latents, 5)}


def _matrix(device: str, scale: str, model: str, lora: str, args: Any, out_dir: Path,
            card_gib: float | None = None) -> list[dict[str, Any]]:
    rows = []
    configs = CONFIGS[:3] if args.quick else CONFIGS
    steps = [2] if args.quick else [int(s) for s in args.steps.split(",")]
    for index, (label, profile, preset, cfg) in enumerate(configs):
        if card_gib is not None and preset:
            continue  # the simulated cards ask only which profiles complete
        preset = {k: (v.replace("LORA", lora) if isinstance(v, str) else v) for k, v in preset.items()}
        spec = {"device": device, "scale": scale, "model": model, "profile": profile, "preset": preset, "cfg": cfg,
                "steps": steps if card_gib is None else steps[:1], "size": args.size, "out_dir": str(out_dir),
                "index": f"{device}-{card_gib}-{index}", "card_gib": card_gib}
        log(f"{device} {scale}{f' in {card_gib} GiB' if card_gib else ''}: {label}")
        result = _run_child(spec, args.timeout_s)
        row: dict[str, Any] = {"config": label, "profile": profile, "preset": preset, "true_cfg_scale": cfg,
                               "device": device, "scale": scale, **result}
        if card_gib is None and "error" not in result:
            row["deviation_vs_bf16"] = {s: _deviation(out_dir, f"{device}-None-{index}", f"{device}-None-0", s)
                                        for s in steps}
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], steps: list[int]) -> str:
    from workers.fitcheck import CARD_CLASSES, estimate_peak_gib
    from workers.pipeline.profiles import parse_profile

    head = ("| profile / preset | GPU peak, 1024² (estimate; measured) | fits (estimate) | CPU tiny: transformer "
            "stored, peak RSS | CPU tiny: s/image at " + " / ".join(map(str, steps)) + " steps | deviation vs bf16 "
            f"at {steps[-1]} steps: PSNR, SSIM, latents max abs |\n|---|---|---|---|---|---|")
    lines = [head]
    for row in rows:
        if row["device"] != "cpu":
            continue
        profile = parse_profile(row["profile"])
        estimate = estimate_peak_gib(profile)
        fits = [name.split(" (")[0] for name, gib in CARD_CLASSES if estimate <= gib - 0.3]
        gpu = next((r for r in rows if r["device"] != "cpu" and r["config"] == row["config"]), None)
        measured = f"{gpu['peak_gpu_gib']} GiB" if gpu and "peak_gpu_gib" in gpu else "not measured"
        runs = row.get("runs", {})
        times = " / ".join(str(runs.get(str(s), {}).get("s_per_image", "-")) for s in steps)
        dev = row.get("deviation_vs_bf16", {}).get(steps[-1], {})
        deviation = (f"{dev['psnr_db']} dB, {dev['ssim']}, {dev['latents_max_abs_diff']}" if dev else
                     row.get("error", "-"))
        memory = f"{row.get('transformer_stored_mb', '-')} MB, {row.get('peak_rss_mb', '-')} MB"
        same_model = not row["preset"] or "fuse_loras" not in row["preset"]
        lines.append(f"| {row['config']} | ~{estimate:.0f} GiB; {measured} | "
                     f"{', '.join(fits) or 'none'}{'' if same_model else ' (as its profile)'} | {memory} | {times} | "
                     f"{deviation}{'' if same_model else ' (another model by design)'} |")
    return "\n".join(lines)


def main() -> int:
    p = parser("profiles", __doc__)
    p.add_argument("--child", default="", help=argparse_hidden())
    p.add_argument("--steps", default="8,50")
    p.add_argument("--size", type=int, default=128, help="CPU output side (px)")
    p.add_argument("--timeout-s", type=float, default=900)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    import torch

    from workers.pipeline.tiny import build_tiny_edit_model, write_tiny_lora

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-profiles-") as scratch:
        out_dir = Path(scratch)
        model = str(build_tiny_edit_model(out_dir / "tiny4", num_layers=4))
        lora = str(write_tiny_lora(out_dir / "lora", seed=5))
        rows = _matrix("cpu", "tiny", model, lora, args, out_dir)
        gpu: dict[str, Any] = {"available": torch.cuda.is_available()}
        if torch.cuda.is_available() and not args.quick:
            gpu["device"] = torch.cuda.get_device_name()
            rows += _matrix("cuda", "full", "", lora, args, out_dir)
            gpu["simulated_cards"] = {name: _matrix("cuda", "full", "", lora, args, out_dir, card_gib=gib)
                                      for name, gib in SIMULATED_CARDS_GIB.items()}
        else:
            gpu["rows"] = "not measured (no GPU in this run)"
    steps = [2] if args.quick else [int(s) for s in args.steps.split(",")]
    table = markdown(rows, steps)
    print(table)
    write_report("profiles", {"cpu_size_px": args.size, "steps": steps, "rows": rows, "gpu": gpu,
                              "memory_cpu": "peak RSS of the configuration's own process (ru_maxrss), runtime included",
                              "gpu_estimates": "workers/fitcheck.py: arithmetic on the architecture, not measured",
                              "table": table, "total_s": round(time.perf_counter() - began, 1)},
                 args.out, args.quick, command_line())
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
