"""Which modules of a model get adapters: PEFT-style target matching and per-architecture presets.

``target_modules`` means what it means in PEFT: a list of module-name suffixes, one regex string
(full match), or ``"all-linear"``. Presets are derived from the model's structure
(:mod:`diffadapt.presets`: the projections of its attention modules, and its blocks' feed-forward
layers) and written as one anchored regex, so that a bare ``proj_out`` never hits the top-level
output layer of a DiT.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Optional, Union

from torch import nn

from diffadapt import patterns
from diffadapt import quantized_layers as quantized
from diffadapt.methods.base import AdapterConfigError, layer_index_pattern

PRESET_ALIASES = {"attn": "attention", "attn-ff": "attention+ff", "attn+ff": "attention+ff", "all": "attention+ff"}


# the attributes diffadapt's wrappers (diffadapt.host) keep modules under: a host's base layer and
# adapters, a modules_to_save wrapper's original and copies. Paths through them are not the model's own.
WRAPPER_ATTRIBUTES = ("base_layer", "adapters", "original_module", "copies")


def inside_wrapper(name: str) -> bool:
    """Whether module path ``name`` runs through a diffadapt wrapper (:data:`WRAPPER_ATTRIBUTES`)."""
    path = f".{name}."
    return any(f".{attribute}." in path for attribute in WRAPPER_ATTRIBUTES)


def architecture(model: nn.Module) -> str:
    return type(model).__name__


def preset_pattern(model: nn.Module, preset: str) -> str:
    """The regex of ``preset`` for ``model``, derived from its structure (:mod:`diffadapt.presets`)."""
    from diffadapt import presets

    return presets.preset_pattern(model, PRESET_ALIASES.get(preset, preset), preset)


def _matches(spec: Union[str, list[str], None], name: str, module: nn.Module, field: str = "target_modules") -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        if spec == "all-linear":
            from transformers.pytorch_utils import Conv1D

            return isinstance(module, (nn.Linear, Conv1D))
        return patterns.fullmatch(spec, name, field)
    return any(name == t or name.endswith("." + t) for t in spec)


def _layer_index(name: str, layers_pattern: Union[str, list[str], None]) -> Optional[int]:
    """PEFT's block index of a module path: the FIRST numbered component after a ``layers_pattern``
    component, or without a pattern the first one that has two components before it and one after
    (so ``down_blocks.0.attentions.1...`` is block 1 and ``to_out.0`` is never an index)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(m.group(1)) if m else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        m = patterns.match(layer_index_pattern(pattern), name, "layers_pattern")
        if m:
            return int(m.group(1))
    return None


def _output_layer(model: nn.Module) -> Optional[nn.Module]:
    """A transformers model's output embedding (``lm_head``), which ``"all-linear"`` leaves out as PEFT does."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _quantized_layer(module: nn.Module) -> bool:
    """A quantized linear layer of a type diffadapt cannot adapt (e.g. HQQ, not an nn.Linear): a
    candidate, so that naming it is refused with its type (:func:`diffadapt.quantized.check_supported`)
    instead of skipped."""
    return getattr(module, "in_features", None) is not None and quantized.kind(module) == quantized.UNSUPPORTED


def select_targets(model: nn.Module, config, supported: tuple[type, ...]) -> list[str]:
    """Names of the modules ``config`` targets, in model order. Raises if none match."""
    from diffadapt.host import AdapterHost

    layers = set(
        [config.layers_to_transform] if isinstance(config.layers_to_transform, int) else (config.layers_to_transform or [])
    )
    names = []
    candidates = []
    head = _output_layer(model) if config.target_modules == "all-linear" else None
    exact = set(config.target_modules) if isinstance(config.target_modules, (list, tuple, set)) else set()
    for name, module in model.named_modules():
        if isinstance(module, AdapterHost):
            module = module.base_layer
        elif not (isinstance(module, supported) or _quantized_layer(module)) or inside_wrapper(name):
            continue
        candidates.append(name)
        if not _matches(config.target_modules, name, module) or (head is not None and module is head):
            continue
        if _matches(config.exclude_modules, name, module, "exclude_modules"):
            continue
        if layers and name not in exact and _layer_index(name, config.layers_pattern) not in layers:
            continue  # PEFT: a target named by its full path is not filtered by layer
        names.append(name)
    if not names:
        raise AdapterConfigError(no_match_message(config.target_modules, candidates, type(model).__name__))
    return names


def no_match_message(target: object, candidates: Iterable[str], arch: str) -> str:
    candidates = list(candidates)
    wanted = [target] if isinstance(target, str) else list(target or [])
    near: list[str] = []
    for t in wanted:
        tails = {c.split(".")[-1]: c for c in candidates}
        near += [tails[k] for k in difflib.get_close_matches(str(t).split(".")[-1], list(tails), n=3, cutoff=0.4)]
        near += difflib.get_close_matches(str(t), candidates, n=3, cutoff=0.4)
    near = list(dict.fromkeys(near))[:6] or candidates[:6]
    return (
        f"target_modules={target!r} matches no adaptable layer of this {arch} ({len(candidates)} Linear/Conv "
        f"layers). Nearest module names: {', '.join(near)}."
    )
