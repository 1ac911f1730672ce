"""Tiny random-weight Qwen-Image models built from the real classes, one per pipeline family.

``build_tiny_model(dir, pipeline=...)`` saves a model that loads with that pipeline class's
``from_pretrained``: ``QwenImagePipeline`` (text to image), ``QwenImageEditPipeline``,
``QwenImageEditPlusPipeline`` (multi-image edit), ``QwenImageEditInpaintPipeline`` and
``QwenImage21Pipeline`` (its own architecture: Qwen3-VL encoder, 16x VAE, single-stream
transformer). Like the real family, the Qwen-Image models share the text encoder and VAE of a
seed and differ in the transformer, so a text-to-image model's weights are not the edit model's
(the edit inpaint pipeline runs the edit model's weights, as the real one does).

The edit model (``build_tiny_edit_model``, the default) serves every operation in today's
one-model cluster: the renderer loads it as a ``QwenImageEditPipeline`` and makes the
text-to-image, inpaint, img2img and multi-image edit pipelines from it with ``from_pipe`` (they
need a subset of the same components). ``write_tiny_lora`` writes a random LoRA for its
transformer in the diffusers LoRA format.

Used by tests, CI and local development: no hub download is possible (or wanted), yet the
worker must exercise exactly the code path real weights take: ``save_pretrained`` here,
``QwenImageEditPipeline.from_pretrained`` in the worker. Every component is the genuine
diffusers/transformers class with its dimensions shrunk; the geometry that the pipeline
derives from configs (VAE scale factor 8, 2x2 latent packing, 14 px vision patches merged
2x2, the M-RoPE layout) is the same as the real model's, so only quality differs. The whole
folder is about 0.7 MB; a 2-step edit takes a few seconds on a 2-core CPU, most of it in the
VAE, which the pipeline always runs at ~1 MP.

Needs transformers >= 5 (``Qwen2Tokenizer(vocab=..., merges=...)``, ``rope_parameters``).

Dimension constraints (violating one fails at the first forward pass, not at construction):

* text ``head_dim / 2 == sum(mrope_section)``;
* vision ``out_hidden_size == text hidden_size == transformer joint_attention_dim``;
* transformer ``in_channels == 4 * z_dim`` (2x2 packing), ``out_channels == z_dim``;
* transformer ``sum(axes_dims_rope) == attention_head_dim``, each axis even;
* VAE ``len(temperal_downsample) == len(dim_mult) - 1`` (this also sets the scale factor).

Qwen-Image 2.1 has its own (checked in ``_check_qwen21_dims``): the transformer reads the VAE's
latents unpatched (``in_channels == z_dim``), the VAE compresses 16x (five ``dim_mult`` stages)
and one merged vision token covers one 2x2 group of latents (vision ``patch_size *
spatial_merge_size == 32``); text ``head_dim / 2 == sum(mrope_section)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageTransformer2DModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

__all__ = [
    "SPECIAL_TOKENS",
    "TINY_PIPELINES",
    "build_tiny_components",
    "build_tiny_edit_components",
    "build_tiny_edit_model",
    "build_tiny_model",
    "build_tiny_processor",
    "build_tiny_qwen21_components",
    "build_tiny_scheduler",
    "build_tiny_text_encoder",
    "build_tiny_tokenizer",
    "build_tiny_transformer",
    "build_tiny_vae",
    "write_tiny_lora",
]

# The Qwen2.5-VL special tokens, in the real vocabulary's order (ids 151643..151664 there).
# Here they follow the 256 byte-level symbols, so <|endoftext|> is id 256.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
_BYTE_SYMBOLS = 256
# Padded to a multiple of 64 like the real 152064-row embedding; the spare rows are never used.
_VOCAB_SIZE = 320

# Tiny dims. Text head_dim = 32 / 2 = 16, so mrope_section sums to 8 (real: [16, 24, 24]).
_TEXT_HIDDEN = 32
_TEXT_HEADS = 2
_MROPE_SECTION = [2, 3, 3]
_VISION_HIDDEN = 16
_Z_DIM = 4
_DIT_HEAD_DIM = 16
_DIT_AXES_ROPE = (4, 6, 6)  # frame, height, width; real: (16, 56, 56)
_VISION_PATCH = 14  # the real patch size: the image processor and vision tower must agree
_VISION_MERGE = 2
# Cap the processor's resize so the prompt image is 4..16 merged vision tokens instead of the
# real ~1000+; the text encoder sees the same structure, just fewer tokens.
_VISION_MIN_PIXELS = (_VISION_PATCH * _VISION_MERGE) ** 2 * 4
_VISION_MAX_PIXELS = (_VISION_PATCH * _VISION_MERGE) ** 2 * 16

# The constraints listed in the module docstring, checked once here rather than at the first
# forward pass deep inside a render.
assert _TEXT_HIDDEN // _TEXT_HEADS == 2 * sum(_MROPE_SECTION)
assert sum(_DIT_AXES_ROPE) == _DIT_HEAD_DIM and all(d % 2 == 0 for d in _DIT_AXES_ROPE)
assert _VOCAB_SIZE >= _BYTE_SYMBOLS + len(SPECIAL_TOKENS)

# The real Qwen-Image scheduler config: dynamic (resolution-dependent) exponential shift.
SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def _token_id(name: str) -> int:
    """The tiny vocabulary id of a special token (raises ValueError if unknown)."""
    return _BYTE_SYMBOLS + SPECIAL_TOKENS.index(name)


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE ``Qwen2Tokenizer`` with no merges plus the Qwen chat/vision tokens.

    With no merges every UTF-8 byte is one token: any text encodes, no ``unk`` is needed,
    and the vocabulary is fully determined by code (no training, hence deterministic).
    """
    # alphabet() is an unordered list of the 256 byte symbols; sort by code point so the ids do
    # not depend on hash order (this gives GPT-2's order: "!" is 0, printable ASCII first).
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for name in SPECIAL_TOKENS:
        vocab[name] = _token_id(name)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=131072,
    )
    return tokenizer


def build_tiny_processor(tokenizer: Qwen2Tokenizer) -> Qwen2VLProcessor:
    """The Qwen2-VL processor (image + video processors + ``tokenizer``) with a small pixel cap."""
    pixel_kwargs: dict[str, Any] = {
        "patch_size": _VISION_PATCH,
        "merge_size": _VISION_MERGE,
        "temporal_patch_size": 2,
        "min_pixels": _VISION_MIN_PIXELS,
        "max_pixels": _VISION_MAX_PIXELS,
    }
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixel_kwargs),
        video_processor=Qwen2VLVideoProcessor(**pixel_kwargs),
        tokenizer=tokenizer,
    )


def build_tiny_text_encoder() -> Qwen2_5_VLForConditionalGeneration:
    """A 1-layer Qwen2.5-VL with a 1-block vision tower, random weights (current torch RNG)."""
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": _VOCAB_SIZE,
            "hidden_size": _TEXT_HIDDEN,
            "intermediate_size": 2 * _TEXT_HIDDEN,
            "num_hidden_layers": 1,
            "num_attention_heads": _TEXT_HEADS,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": _MROPE_SECTION, "rope_theta": 1e6},
            "bos_token_id": _token_id("<|endoftext|>"),
            "eos_token_id": _token_id("<|im_end|>"),
            "pad_token_id": _token_id("<|endoftext|>"),
        },
        vision_config={
            "depth": 1,
            "hidden_size": _VISION_HIDDEN,
            "intermediate_size": 2 * _VISION_HIDDEN,
            "num_heads": 2,
            "out_hidden_size": _TEXT_HIDDEN,
            "patch_size": _VISION_PATCH,
            "spatial_merge_size": _VISION_MERGE,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [0],
        },
        image_token_id=_token_id("<|image_pad|>"),
        video_token_id=_token_id("<|video_pad|>"),
        vision_start_token_id=_token_id("<|vision_start|>"),
        vision_end_token_id=_token_id("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_vae() -> AutoencoderKLQwenImage:
    """A 4-level Qwen-Image VAE (spatial x8 like the real one) with 8 channels throughout.

    The pipeline always encodes/decodes at ~1 MP, so this VAE dominates CPU time. Choices that
    keep it cheap: no residual blocks per encoder level (``num_res_blocks=0``; the decoder still
    has one per level), and 8 channels, since CPU oneDNN only takes conv3d with >= 8 input
    channels (fewer falls back to the ~4x slower ``slow_conv3d``).
    """
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=_Z_DIM,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=0,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * _Z_DIM,
        latents_std=[1.0] * _Z_DIM,
    )


def build_tiny_transformer(num_layers: int = 1) -> QwenImageTransformer2DModel:
    """A ``num_layers``-block MMDiT (default 1), 2 heads of 16, fed 2x2-packed latents and the
    text hidden states. Memory profiles and block caches that treat the first and last blocks
    apart need 3 or more."""
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * _Z_DIM,
        out_channels=_Z_DIM,
        num_layers=num_layers,
        attention_head_dim=_DIT_HEAD_DIM,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=_DIT_AXES_ROPE,
    )


def build_tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching Euler scheduler with the real Qwen-Image config (no weights)."""
    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def build_tiny_edit_components(seed: int = 0, num_layers: int = 1) -> dict[str, Any]:
    """All ``QwenImageEditPipeline`` components, keyed by the pipeline's ``__init__`` names.

    Each model is built right after ``torch.manual_seed(seed)`` so its weights do not depend
    on which other components were built first. The caller's global RNG state is restored.
    """
    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tiny_tokenizer()
        torch.manual_seed(seed)
        text_encoder = build_tiny_text_encoder()
        torch.manual_seed(seed)
        vae = build_tiny_vae()
        torch.manual_seed(seed)
        transformer = build_tiny_transformer(num_layers)
    return {
        "scheduler": build_tiny_scheduler(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "processor": build_tiny_processor(tokenizer),
        "transformer": transformer,
    }


def build_tiny_edit_model(out_dir: str | Path, seed: int = 0, num_layers: int = 1) -> Path:
    """Build the tiny edit pipeline and ``save_pretrained`` it into ``out_dir``.

    The folder (~0.7 MB) loads with ``QwenImageEditPipeline.from_pretrained(out_dir)`` like a
    real checkpoint and is deterministic for a given ``seed`` and library versions.
    Returns ``out_dir`` as a ``Path``. Raises ``OSError`` if it cannot be written.
    """
    return build_tiny_model(out_dir, pipeline="QwenImageEditPipeline", seed=seed, num_layers=num_layers)


# -- the family --------------------------------------------------------------------------------

# Every pipeline class a tiny model can be built for (the Qwen-Image pipelines the model catalog
# knows, broker/catalog.py).
TINY_PIPELINES: tuple[str, ...] = (
    "QwenImagePipeline",
    "QwenImageEditPipeline",
    "QwenImageEditPlusPipeline",
    "QwenImageEditInpaintPipeline",
    "QwenImage21Pipeline",
)

# The Qwen-Image models share the text encoder and VAE and differ in the transformer (as the real
# Qwen-Image, -Edit and -Edit-2509 do): each family member's transformer is seeded this far from
# ``seed``. 0 for the edit model keeps its weights what they were before the family existed; the
# edit inpaint pipeline runs the edit model's weights, like the real one.
_TRANSFORMER_SEED_OFFSET: dict[str, int] = {
    "QwenImageEditPipeline": 0,
    "QwenImageEditInpaintPipeline": 0,
    "QwenImagePipeline": 1_000_003,
    "QwenImageEditPlusPipeline": 2_000_003,
}
_NO_PROCESSOR = frozenset({"QwenImagePipeline"})  # text to image: no vision input


def build_tiny_components(pipeline: str = "QwenImageEditPipeline", seed: int = 0,
                          num_layers: int = 1) -> dict[str, Any]:
    """The components of a tiny ``pipeline`` (one of ``TINY_PIPELINES``), keyed by its
    ``__init__`` names; deterministic for a ``seed``. The caller's RNG state is restored.
    ``num_layers``: transformer blocks of the Qwen-Image (not 2.1) models.

    Raises:
        ValueError: ``pipeline`` is not one of ``TINY_PIPELINES``.
    """
    if pipeline == "QwenImage21Pipeline":
        return build_tiny_qwen21_components(seed)
    if pipeline not in _TRANSFORMER_SEED_OFFSET:
        raise ValueError(f"no tiny model for {pipeline!r}; one of {', '.join(TINY_PIPELINES)}")
    components = build_tiny_edit_components(seed, num_layers)
    offset = _TRANSFORMER_SEED_OFFSET[pipeline]
    if offset:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + offset)
            components["transformer"] = build_tiny_transformer(num_layers)
    if pipeline in _NO_PROCESSOR:
        del components["processor"]
    return components


def build_tiny_model(out_dir: str | Path, *, pipeline: str = "QwenImageEditPipeline", seed: int = 0,
                     num_layers: int = 1) -> Path:
    """Build a tiny ``pipeline`` model and ``save_pretrained`` it into ``out_dir``.

    The folder (under 1 MB) loads with ``<pipeline>.from_pretrained(out_dir)`` like a real
    checkpoint of that class and is deterministic for a given ``seed`` and library versions.
    Returns ``out_dir`` as a ``Path``.

    Raises:
        ValueError: ``pipeline`` is not one of ``TINY_PIPELINES``.
        OSError: the folder cannot be written.
    """
    components = build_tiny_components(pipeline, seed, num_layers)  # first: an unknown class writes nothing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Any: mypy sees diffusers' lazily-imported classes as opaque dummies.
    pipe: Any = getattr(diffusers, pipeline)(**components)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# -- Qwen-Image 2.1 ----------------------------------------------------------------------------
# Its classes are imported where used: a diffusers without Qwen-Image 2.1 (0.40 and older) still
# builds the other tiny models. Returned as Any: mypy sees diffusers' lazy classes as dummies.

# Tiny dims. Text head_dim 16, so mrope_section sums to 8; the transformer's head is 16 wide too
# (its rotary axes sum to it).
_Q21_TEXT_HIDDEN = 32
_Q21_TEXT_HEADS = 2
_Q21_TEXT_HEAD_DIM = 16
_Q21_MROPE_SECTION = [2, 3, 3]
_Q21_VISION_HIDDEN = 16
# One merged vision token must cover the 2x2 latents of a 32 px tile (the VAE's 16x, then the
# transformer's 2x2 grouping of image slots): patch 16, merged 2x2, as in the real model.
_Q21_VISION_PATCH = 16
_Q21_VISION_MERGE = 2
# 8 latent channels: CPU oneDNN takes conv3d only with >= 8 input channels (see build_tiny_vae),
# and it keeps the latents apart from the 4-channel (RGBA) images the VAE reads.
_Q21_Z_DIM = 8
_Q21_DIT_HEAD_DIM = 16
_Q21_DIT_AXES_ROPE = (4, 6, 6)
_Q21_VISION_MIN_PIXELS = (_Q21_VISION_PATCH * _Q21_VISION_MERGE) ** 2
_Q21_VISION_MAX_PIXELS = (_Q21_VISION_PATCH * _Q21_VISION_MERGE) ** 2 * 16


def _check_qwen21_dims() -> None:
    """The 2.1 constraints listed in the module docstring, checked at import."""
    assert _Q21_TEXT_HEAD_DIM == 2 * sum(_Q21_MROPE_SECTION)
    assert sum(_Q21_DIT_AXES_ROPE) == _Q21_DIT_HEAD_DIM and all(d % 2 == 0 for d in _Q21_DIT_AXES_ROPE)
    assert _Q21_VISION_PATCH * _Q21_VISION_MERGE == 32


_check_qwen21_dims()

# The ChatML layout the 2.1 pipeline formats its prompts in by hand; it also tokenizes its system
# message through this template to know how many leading tokens to drop, so the two must agree
# (the real checkpoint ships Qwen3-VL's template, which renders these messages the same way).
QWEN21_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


def build_tiny_qwen21_processor(tokenizer: Qwen2Tokenizer) -> Any:
    """The Qwen3-VL processor (image + video processors + ``tokenizer``) with a small pixel cap."""
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    pixel_kwargs: dict[str, Any] = {
        "patch_size": _Q21_VISION_PATCH,
        "merge_size": _Q21_VISION_MERGE,
        "temporal_patch_size": 2,
    }
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            **pixel_kwargs, min_pixels=_Q21_VISION_MIN_PIXELS, max_pixels=_Q21_VISION_MAX_PIXELS),
        video_processor=Qwen3VLVideoProcessor(**pixel_kwargs),
        tokenizer=tokenizer,
        chat_template=QWEN21_CHAT_TEMPLATE,
    )


def build_tiny_qwen21_text_encoder() -> Any:
    """A 1-layer Qwen3-VL with a 1-block vision tower, random weights (current torch RNG)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config={
            "vocab_size": _VOCAB_SIZE,
            "hidden_size": _Q21_TEXT_HIDDEN,
            "intermediate_size": 2 * _Q21_TEXT_HIDDEN,
            "num_hidden_layers": 1,
            "num_attention_heads": _Q21_TEXT_HEADS,
            "num_key_value_heads": 1,
            "head_dim": _Q21_TEXT_HEAD_DIM,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": _Q21_MROPE_SECTION,
                                "rope_theta": 1e6},
            "bos_token_id": _token_id("<|endoftext|>"),
            "eos_token_id": _token_id("<|im_end|>"),
            "pad_token_id": _token_id("<|endoftext|>"),
        },
        vision_config={
            "depth": 1,
            "hidden_size": _Q21_VISION_HIDDEN,
            "intermediate_size": 2 * _Q21_VISION_HIDDEN,
            "num_heads": 2,
            "out_hidden_size": _Q21_TEXT_HIDDEN,
            "patch_size": _Q21_VISION_PATCH,
            "spatial_merge_size": _Q21_VISION_MERGE,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,  # an 8x8 grid, interpolated to the image's
            "deepstack_visual_indexes": [0],  # the real ones (8, 16, 24) exceed a 1-block tower
        },
        image_token_id=_token_id("<|image_pad|>"),
        video_token_id=_token_id("<|video_pad|>"),
        vision_start_token_id=_token_id("<|vision_start|>"),
        vision_end_token_id=_token_id("<|vision_end|>"),
    )
    return Qwen3VLForConditionalGeneration(config)


def build_tiny_qwen21_vae() -> Any:
    """A 5-level Qwen-Image 2.1 VAE (spatial x16, RGBA in and out like the real one), 8 channels."""
    from diffusers import AutoencoderKLQwenImage21

    return AutoencoderKLQwenImage21(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=_Q21_Z_DIM,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True, True],
        latents_mean=[0.0] * _Q21_Z_DIM,
        latents_std=[1.0] * _Q21_Z_DIM,
    )


def build_tiny_qwen21_transformer() -> Any:
    """A 1-block single-stream transformer, 2 heads of 16, reading unpatched latents."""
    from diffusers import QwenImage21Transformer2DModel

    return QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=_Q21_Z_DIM,
        out_channels=_Q21_Z_DIM,
        num_layers=1,
        attention_head_dim=_Q21_DIT_HEAD_DIM,
        num_attention_heads=2,
        context_in_dim=_Q21_TEXT_HIDDEN,
        mlp_ratio=2,
        axes_dims_rope=_Q21_DIT_AXES_ROPE,
    )


def build_tiny_qwen21_components(seed: int = 0) -> dict[str, Any]:
    """All ``QwenImage21Pipeline`` components, each model seeded like the edit model's."""
    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tiny_tokenizer()
        torch.manual_seed(seed)
        text_encoder = build_tiny_qwen21_text_encoder()
        torch.manual_seed(seed)
        vae = build_tiny_qwen21_vae()
        torch.manual_seed(seed)
        transformer = build_tiny_qwen21_transformer()
    return {
        "scheduler": build_tiny_scheduler(),
        "vae": vae,
        "text_encoder": text_encoder,
        "processor": build_tiny_qwen21_processor(tokenizer),
        "transformer": transformer,
    }


# The attention projections of every MMDiT block (image and text streams), like real
# Qwen-Image LoRAs target.
TINY_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")


def write_tiny_lora(out_dir: str | Path, seed: int = 0, rank: int = 4, name: str = "tiny-lora") -> Path:
    """Write a random LoRA for the tiny transformer to ``out_dir/<name>.safetensors`` and
    return its path.

    Built the way a trained one is saved: PEFT's ``LoraConfig`` injected into a tiny
    transformer with ``add_adapter`` (``init_lora_weights=False``: both A and B random, so the
    adapter changes the output), its PEFT state dict saved with
    ``QwenImagePipeline.save_lora_weights`` (diffusers' LoRA format, safetensors). The same
    ``seed`` writes the same weights. Needs ``peft``.
    """
    from diffusers import QwenImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer: Any = build_tiny_transformer()
        transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TINY_LORA_TARGETS), init_lora_weights=False)
        )
    layers = get_peft_model_state_dict(transformer)
    QwenImagePipeline.save_lora_weights(
        out, transformer_lora_layers=layers, weight_name=f"{name}.safetensors", safe_serialization=True
    )
    return out / f"{name}.safetensors"
