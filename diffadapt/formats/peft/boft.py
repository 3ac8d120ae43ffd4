"""BOFT in PEFT's files: ``BOFTConfig``, ``<path>.boft_R`` / ``.boft_s``; the config helpers OFT's
declaration shares."""

from __future__ import annotations

import dataclasses
from typing import Any

from diffadapt.formats.peft import PeftFormat, sorted_lists
from diffadapt.methods import AdapterConfig, AdapterConfigError
from diffadapt.methods.base import TARGETING_FIELDS
from diffadapt.methods.boft import BOFTConfig

_FIELDS = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout")


def rotation_dict(config: AdapterConfig, fields: tuple[str, ...]) -> dict[str, Any]:
    """``fields`` + PEFT's common fields of an OFT / BOFT ``config``, for PEFT's config class."""
    name = type(config).__name__
    if getattr(config, "rotation_side", "input") != "input" or getattr(config, "constraint", 0):
        raise AdapterConfigError(
            f"{name}: rotation_side={config.rotation_side!r}, constraint={config.constraint!r} cannot be written "
            "in PEFT format: PEFT's OFT/BOFT rotate the layer input (W R^T) and have no LyCORIS norm constraint, "
            "so PEFT would compute another function. Save it as one diffadapt .safetensors file, or export it for "
            "LyCORIS / ComfyUI (`diffadapt convert SRC DST --to lycoris`)."
        )
    if config.overrides:
        raise AdapterConfigError(
            f"{type(config).__name__}: PEFT's config has no per-layer settings, so overrides="
            f"{config.overrides!r} cannot be written in PEFT format. Save in diffadapt format or drop them."
        )
    common = ("init_weights", "bias", "fan_in_fan_out") + tuple(f for f in TARGETING_FIELDS if f != "overrides")
    return sorted_lists({k: getattr(config, k) for k in fields + common})


def rotation_config(cls: type[AdapterConfig], data: dict[str, Any], **defaults: Any) -> AdapterConfig:
    """Build ``cls`` from an ``adapter_config.json`` dict; PEFT bookkeeping keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)} - {"overrides"}
    return cls(**sorted_lists({**defaults, **{k: v for k, v in data.items() if k in names}}))


def config_for_saved(config: BOFTConfig, shapes: dict[str, tuple[int, ...]]) -> BOFTConfig:
    """PEFT without its CUDA extension trains one factor whatever its config says: ``boft_R``'s shape tells."""
    return config.for_saved_factors(shapes["boft_R"][0]) if "boft_R" in shapes else config


FORMAT = PeftFormat(
    "BOFT",
    {"boft_R": "boft_R", "boft_s": "boft_s"},
    lambda config: rotation_dict(config, _FIELDS),
    lambda data: rotation_config(BOFTConfig, data),
    config_for_saved=config_for_saved,
)
