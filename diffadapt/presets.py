"""Target presets derived from a model's structure.

``preset="attention"`` adapts the projections of every attention module: the q/k/v/out
projections and a joint block's context projections (``add_q_proj`` / ``add_k_proj`` /
``add_v_proj`` / ``to_add_out``, HiDream's ``*_t``, fused ``to_qkv`` ...). ``"attention+ff"``
adds the Linears of the blocks' feed-forward networks, and the Linears that sit directly in a
block beside its attention (Flux single blocks' ``proj_mlp`` / ``proj_out``). The model's input,
output, embedding, modulation / norm (adaLN ``norm.linear``) and final layers are never chosen,
nor a multimodal text encoder's vision tower.

What counts as what, read from modules, not names:

* **attention module**: an instance of diffusers' ``Attention`` (``attention_processor``) or
  ``AttentionModuleMixin`` (Flux, Flux2, ...), or a module whose class name ends in
  ``Attention`` and that has a Linear child (transformers: ``CLIPAttention``, ``T5Attention``,
  ``LlamaAttention``, ``Qwen2_5_VLAttention``, ``Gemma2Attention`` ...). Its **projections** are
  its Linear / Conv1D / ungrouped Conv2d descendants outside its attention processor, a nested
  attention module or a norm.
* **block**: an entry of a ModuleList / ModuleDict / Sequential whose subtree holds an attention
  module (``transformer_blocks.3``, ``encoder.layers.0``, ``down_blocks.1``).
* **feed-forward module**: inside a block, an instance of diffusers' ``FeedForward`` or a module
  whose class name ends in ``FeedForward``, ``SwiGLU``, ``MLP`` / ``Mlp``, ``FFN``,
  ``GLUMBConv`` or ``DenseActDense`` / ``DenseGatedActDense`` (T5). Its layers are its
  Linear / Conv1D / ungrouped Conv2d descendants (a depthwise convolution mixes space, it is no
  projection: Sana's ``conv_depth`` is left out).
  Flux.2's single-stream attention fuses its MLP into the attention's own ``to_qkv_mlp_proj`` /
  ``to_out``: they are the attention module's projections, so ``"attention"`` has them.
* **block MLP Linears**: Linear children of a block module that has an attention module as a child,
  except ones named like modulation / norm / embedding / gate (structure alone cannot tell a
  fused MLP Linear from a modulation Linear sitting at the same place; no model in diffusers
  has the latter, the name rule guards against it).
* never: subtrees of modules defined in ``diffusers.models.embeddings`` or
  ``diffusers.models.normalization`` (time / guidance / pooled-text / patch / caption
  embedders, IP-Adapter image projections, adaLN norms), any ``*Norm*`` module, and
  transformers sub-models of images (input ``pixel_values`` or a vision config: the vision
  towers of Qwen2.5-VL, Gemma 3, Mistral 3).

The chosen names are written as one compact anchored regex (numbered components become
``\\d+`` where that picks no other module of the model), which is what the adapter config
stores as ``target_modules``: PEFT reads the same layers from it.
"""

from __future__ import annotations

import functools
import re
from typing import Iterator, Optional

from torch import nn

from diffadapt import patterns
from diffadapt.methods.base import AdapterConfigError

PRESET_NAMES = ("attention", "attention+ff")

_FF_CLASS = re.compile(r".*(FeedForward|SwiGLU|MLP|Mlp|FFN|GLUMBConv|DenseActDense|DenseGatedActDense)")
_NOT_BLOCK_MLP = re.compile(r"(?i).*(norm|mod|adaln|embed|gate|router).*")
_SKIPPED_MODULES = ("diffusers.models.embeddings", "diffusers.models.normalization")
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


# -- what a module is ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _attention_classes() -> tuple[type, ...]:
    classes: list[type] = []
    try:
        from diffusers.models.attention_processor import Attention

        classes.append(Attention)
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    try:
        from diffusers.models.attention import AttentionModuleMixin

        classes.append(AttentionModuleMixin)
    except ImportError:  # pragma: no cover - older diffusers
        pass
    return tuple(classes)


@functools.lru_cache(maxsize=None)
def _feed_forward_classes() -> tuple[type, ...]:
    try:
        from diffusers.models.attention import FeedForward

        return (FeedForward,)
    except ImportError:  # pragma: no cover
        return ()


@functools.lru_cache(maxsize=None)
def _layer_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D, nn.Conv2d)


def _base(module: nn.Module) -> nn.Module:
    """The layer an AdapterHost wraps (presets of a model that already has adapters)."""
    from diffadapt.host import AdapterHost

    return module.base_layer if isinstance(module, AdapterHost) else module


def _is_layer(module: nn.Module) -> bool:
    module = _base(module)
    if not isinstance(module, _layer_types()):
        return False
    return not (isinstance(module, nn.Conv2d) and module.groups != 1)


def _is_skipped(module: nn.Module) -> bool:
    """Embedders, norms and vision towers: nothing below them is ever a preset layer."""
    cls = type(module)
    if cls.__module__.startswith(_SKIPPED_MODULES) or "Norm" in cls.__name__:
        return True
    config = getattr(module, "config", None)
    if config is None or not hasattr(module, "main_input_name"):  # not a transformers sub-model
        return False
    kind = f"{getattr(config, 'model_type', '')} {type(config).__name__}".lower()
    return module.main_input_name == "pixel_values" or "vision" in kind


def _is_attention(module: nn.Module) -> bool:
    if isinstance(module, _attention_classes()):
        return True
    return type(module).__name__.endswith("Attention") and any(_is_layer(c) for c in module.children())


def _is_feed_forward(module: nn.Module) -> bool:
    return isinstance(module, _feed_forward_classes()) or _FF_CLASS.fullmatch(type(module).__name__) is not None


# -- the walk --------------------------------------------------------------------------------------
def _children(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Children to walk: not into an adapter host's slots or a saved-module host's copies."""
    from diffadapt.host import AdapterHost, SavedModuleHost

    if isinstance(module, (AdapterHost, SavedModuleHost)):
        return iter(())
    return module.named_children()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _layers_below(module: nn.Module, prefix: str, stop) -> Iterator[str]:
    """Names of the layers in ``module``'s subtree, not descending into modules ``stop`` refuses."""
    for name, child in _children(module):
        path = _join(prefix, name)
        if _is_layer(child):
            yield path
        elif not stop(module, child):
            yield from _layers_below(child, path, stop)


def _projections(attention: nn.Module, prefix: str) -> Iterator[str]:
    def stop(parent: nn.Module, child: nn.Module) -> bool:
        return child is getattr(parent, "processor", None) or _is_attention(child) or _is_skipped(child)

    return _layers_below(attention, prefix, stop)


def _has_attention(module: nn.Module, cache: dict) -> bool:
    key = id(module)
    if key not in cache:
        cache[key] = not _is_skipped(module) and (
            _is_attention(module) or any(_has_attention(c, cache) for _, c in _children(module))
        )
    return cache[key]


def preset_layers(model: nn.Module) -> dict[str, list[str]]:
    """``{"attention": [...], "attention+ff": [...]}``: the module names each preset adapts, in
    model order."""
    attention: list[str] = []
    extra: list[str] = []  # feed-forward and block MLP layers
    cache: dict = {}

    def walk(module: nn.Module, prefix: str, in_block: bool) -> None:
        for name, child in _children(module):
            path = _join(prefix, name)
            if _is_skipped(child) or _is_layer(child):
                continue
            if _is_attention(child):
                attention.extend(_projections(child, path))
                continue
            block = in_block or (isinstance(module, _CONTAINERS) and _has_attention(child, cache))
            if block and _is_feed_forward(child):
                extra.extend(_layers_below(child, path, lambda parent, c: _is_skipped(c)))
                continue
            walk(child, path, block)
        if in_block and any(_is_attention(c) for _, c in _children(module)):
            for name, child in _children(module):
                if _is_layer(child) and not _NOT_BLOCK_MLP.fullmatch(name):
                    extra.append(_join(prefix, name))

    if _is_attention(model):  # an attention module on its own
        attention.extend(_projections(model, ""))
    else:
        walk(model, "", False)
    order = {n: i for i, (n, _) in enumerate(model.named_modules(remove_duplicate=False))}
    attention = sorted(dict.fromkeys(attention), key=order.__getitem__)
    both = sorted(dict.fromkeys(attention + extra), key=order.__getitem__)
    return {"attention": attention, "attention+ff": both}


# -- names -> one compact regex --------------------------------------------------------------------
_NUM = r"\d+"


def _tokens(name: str, literal: frozenset) -> tuple[str, ...]:
    """``name`` as regex tokens: numbered components become ``\\d+`` except at ``literal`` positions."""
    return tuple(
        _NUM if part.isdigit() and i not in literal else re.escape(part) for i, part in enumerate(name.split("."))
    )


def _generalised(names: list[str], others: list[str], literal: frozenset = frozenset()) -> list[tuple[str, ...]]:
    """Token paths matching all of ``names`` and none of ``others``: each numbered component is
    ``\\d+`` unless that would pick another module (then, rightmost first, it stays a number)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name in names:
        groups.setdefault(_tokens(name, literal), []).append(name)
    paths = []
    for tokens, members in groups.items():
        regex = re.compile(r"\.".join(tokens))
        if not any(regex.fullmatch(o) for o in others):
            paths.append(tokens)
            continue
        free = [i for i, t in enumerate(tokens) if t == _NUM]
        paths += _generalised(members, others, literal | {free[-1]})  # a full literal never over-matches
    return paths


def _emit(node: dict) -> str:
    """Regex of a token trie: children with the same continuation share one alternation."""
    by_rest: dict[str, list[str]] = {}
    for token, child in node.items():
        if token is None:
            continue
        rest = _emit(child) if any(k is not None for k in child) else ""
        if rest and None in child:
            rest = f"(\\.{rest})?"
        elif rest:
            rest = f"\\.{rest}"
        by_rest.setdefault(rest, []).append(token)
    alternatives = []
    for rest, tokens in by_rest.items():
        if not rest or len(tokens) == 1:
            alternatives += [token + rest for token in tokens]
        else:
            alternatives.append("(" + "|".join(tokens) + ")" + rest)
    return alternatives[0] if len(alternatives) == 1 else "(" + "|".join(alternatives) + ")"


def _trie(paths: list[tuple[str, ...]]) -> dict:
    root: dict = {}
    for path in paths:
        node = root
        for token in path:
            node = node.setdefault(token, {})
        node[None] = {}
    return root


def compact_pattern(chosen: list[str], all_names: list[str]) -> str:
    """An anchored regex (full match) that matches exactly ``chosen`` among ``all_names``."""
    wanted = set(chosen)
    others = [n for n in all_names if n not in wanted]
    paths = _generalised(list(dict.fromkeys(chosen)), others)
    pattern = _emit(_trie(paths))
    compiled = re.compile(pattern)
    if any(compiled.fullmatch(o) for o in others) or not all(compiled.fullmatch(n) for n in chosen):
        exact = [_tokens(n, frozenset(range(n.count(".") + 1))) for n in chosen]  # pragma: no cover
        pattern = _emit(_trie(exact))  # (exact by construction: never reached)
    return pattern


# -- entry point -----------------------------------------------------------------------------------
def preset_pattern(model: nn.Module, preset: str, asked: Optional[str] = None) -> str:
    """The target regex of ``preset`` (one of :data:`PRESET_NAMES`) for ``model``."""
    arch = type(model).__name__
    if preset not in PRESET_NAMES:
        raise AdapterConfigError(
            f"Unknown preset {asked or preset!r} for {arch}; choose one of {', '.join(PRESET_NAMES)}."
        )
    layers = preset_layers(model)
    if not layers["attention"]:
        raise AdapterConfigError(
            f"No target presets for {arch}: it has no attention modules with Linear projections (diffusers "
            "Attention / AttentionModuleMixin, transformers *Attention), so there is nothing a preset could "
            "choose. Pass target_modules (module-name suffixes or a regex) instead."
        )
    names = [n for n, _ in model.named_modules(remove_duplicate=False)]
    pattern = compact_pattern(layers[preset], names)
    if len(pattern) > patterns.MAX_PATTERN_CHARS:
        raise AdapterConfigError(
            f"The {preset!r} preset of this {arch} needs a {len(pattern)}-character regex, more than target_modules "
            f"allows ({patterns.MAX_PATTERN_CHARS}); pass target_modules (module-name suffixes) instead."
        )
    patterns.check_pattern(pattern, "preset")
    return pattern
