"""LyCORIS / kohya / ComfyUI adapter files: the format, and importing OFT and BOFT (export of
every diffadapt method: :mod:`diffadapt.formats.lycoris_export`).

The format (one ``.safetensors``, keys ``<prefix><module name>.<tensor>``; checked against
lycoris-lora 4.1.3 ``modules/diag_oft.py`` and ``modules/boft.py`` + ``functional/``, ComfyUI
``comfy/weight_adapter/oft.py`` / ``boft.py`` / ``comfy/lora.py``, kohya ``networks/oft.py`` and
A1111 ``extensions-builtin/Lora/network_oft.py``):

* ``oft_blocks`` ``A``: 3-d ``(N, b, b)`` = OFT ("diag-oft"), 4-d ``(m, N, b, b)`` = BOFT, over the
  layer's **output** channels (``N b = out_features``). ``Q = A - A^T``, ``r = (I + Q)(I - Q)^{-1}``.
  OFT: ``W' = blockdiag(r_k^T) W``. BOFT: ``m`` factors, factor ``i`` gathers each run of
  ``2^i b`` output rows as ``(2, 2^i b / 2) -> (2^i b / 2, 2)`` (the two half-chunks of a block
  *interleaved*), multiplies each ``b``-block by ``r`` and scatters back; factor 0 first.
* ``alpha`` (0-d): a norm **constraint**, not a LoRA scale: ``Q <- Q c / |Q|_F`` when
  ``|Q|_F + 1e-8 > c``, ``|.|`` over all the layer's blocks; ``c = alpha * out_features`` in LyCORIS,
  kohya and A1111, ``c = alpha`` in ComfyUI; ``0`` = none (A1111/kohya: 0 turns the rotation off).
* ``rescale`` ``(out, 1, ...)``: ``W' <- diag(rescale) W'`` (ComfyUI ignores it for 3-d blocks).
* The UIs also read ``<name>.diff`` (``W' = W + diff``; LyCORIS "full") and LoRA ``lora_up.weight``
  ``(out, r[, 1, 1])`` / ``lora_down.weight`` ``(r, in[, kh, kw])`` / ``alpha`` (``W' = W + alpha/r up down``).

Prefixes: ``lora_unet_`` / kohya's OFT ``oft_unet_`` (UNet; diffusers names for SD 1.x, ldm names
for SDXL, :mod:`diffadapt.formats.names`), ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_``
(text encoders), ``lycoris_`` (LyCORIS' wrapper on the denoiser), ``lora_transformer_`` and
``<component>.`` (DiTs, diffusers names), ``diffusion_model.`` (ComfyUI's own trainer: its model's
paths, ldm names for SD UNets; its ``alpha`` is ComfyUI's limit itself, read as ``alpha / out_features``;
the all-zero ``diff`` / ``diff_b`` it writes beside the blocks are dropped, trained ones refused).

Mapping onto diffadapt (exact, both ways): 3-d blocks -> :class:`~diffadapt.methods.oft.OFTConfig`
with ``rotation_side="output"``, ``S = Q`` (``oft_R`` = upper triangle of ``Q``); 4-d blocks (or a
``rescale``) -> :class:`~diffadapt.methods.boft.BOFTConfig` output side with ``boft_R = 2 P A^T P^T``
(``S = -Q`` in diffadapt's butterfly order ``P``), ``boft_s`` = ``rescale``; ``alpha`` ->
``constraint`` (LyCORIS' meaning, ``alpha * out_features``). Per-layer block sizes and alphas
become ``overrides``. Export writes ``oft_blocks = Q / 2`` (LyCORIS only reads ``A - A^T``), so a
round trip keeps ``Q`` bit for bit; a constraint that some UI would apply differently is baked
into the blocks and ``alpha`` is written as 0. Input-side rotations (PEFT's convention) have no
``oft_blocks`` form and go out as ``.diff``; HRA as an exact LoRA (``W Q = W - (W V) Y^T``);
FourierFT and FRoD as ``.diff`` or, with ``lora_rank``, as a truncated-SVD LoRA whose error is reported.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from diffadapt.artifact import ComponentAdapter, PipelineAdapter, components
from diffadapt.checkpoint import PREFIX, CheckpointError, read_safetensors, value_problem
from diffadapt.host import AdapterHost, layer_spec
from diffadapt.methods import AdapterConfig
from diffadapt.methods.base import LayerSpec
from diffadapt.methods.boft import BOFTConfig
from diffadapt.methods.oft import OFTConfig
from diffadapt.formats import names

DENOISERS = ("unet", "transformer")
OFT_KEYS = ("oft_blocks", "alpha", "rescale")
# suffixes of other LyCORIS / LoRA algorithms (recognised, to refuse them by name)
OTHER_KEYS = {
    "lora_up.weight": "LoRA/LoCon", "lora_down.weight": "LoRA/LoCon", "lora_mid.weight": "LoCon",
    "hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "lokr_w2": "LoKr", "lokr_w2_a": "LoKr",
    "diff": "full (diff)", "diff_b": "full (diff)", "w_norm": "norm", "b_norm": "norm",
    "a1.weight": "GLoRA", "dora_scale": "DoRA", "oft_diag": "old LyCORIS OFT (oft_diag)",
}
# prefix -> component it names (None: the denoiser, unet or transformer)
PREFIXES = (
    ("lora_unet_", None),
    ("oft_unet_", None),
    ("lora_transformer_", "transformer"),
    ("lycoris_", None),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("diffusion_model.", None),  # ComfyUI's own trainer: its model's module paths (ldm names for SD UNets)
)
COMFY_PREFIX = "diffusion_model."
ZERO_OK = ("diff", "diff_b")  # ComfyUI's trainer writes them beside oft_blocks: all-zero ones change nothing


# -- detection --------------------------------------------------------------------------------------
def _split_key(key: str) -> tuple[str, str]:
    """``<module name>.<tensor>`` -> (module name, tensor suffix); known multi-part suffixes first."""
    for suffix in sorted((*OFT_KEYS, *OTHER_KEYS), key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    module, _, suffix = key.rpartition(".")
    return module, suffix


def is_community_file(tensors: dict[str, Tensor]) -> bool:
    """True for a LyCORIS / kohya / ComfyUI state dict (not diffadapt's or PEFT's layout)."""
    if not tensors or any(k.startswith(PREFIX) for k in tensors):
        return False
    return any(_split_key(k)[1] in (*OFT_KEYS, *OTHER_KEYS) for k in tensors) and any(
        k.startswith(tuple(p for p, _ in PREFIXES)) or _split_key(k)[1] == "oft_blocks" for k in tensors
    )


# -- import ------------------------------------------------------------------------------------------
def _denoiser(mods: dict[str, nn.Module]) -> Optional[str]:
    return "" if "" in mods else next((n for n in DENOISERS if n in mods), None)


class _Resolver:
    """Community module names -> (component, module path) for one pipeline or model."""

    def __init__(self, mods: dict[str, nn.Module], lycoris_component: Optional[str]):
        self.mods = mods
        self.denoiser = _denoiser(mods)
        self.lycoris_component = lycoris_component
        self._tables: dict[str, dict[str, str]] = {}

    def table(self, component: str) -> dict[str, str]:
        if component not in self._tables:
            self._tables[component] = names.module_table(self.mods[component])
        return self._tables[component]

    def component_for(self, wanted: Optional[str]) -> Optional[str]:
        if "" in self.mods:  # a bare model takes every prefix
            return ""
        if wanted == "text_encoder_3" and wanted not in self.mods:  # kohya's te3 = T5 (Flux: text_encoder_2)
            return next((n for n, m in self.mods.items() if type(m).__name__.startswith("T5")), None)
        return wanted if wanted in self.mods else None

    def resolve(self, module_key: str) -> Optional[tuple[str, str]]:
        for prefix, wanted in PREFIXES:
            if module_key.startswith(prefix):
                rest = module_key[len(prefix):]
                if prefix == "lycoris_" and self.lycoris_component is not None:
                    wanted = self.lycoris_component
                component = self.component_for(wanted) if wanted is not None else self.denoiser
                if component is None:
                    return None
                path = self.table(component).get(names.flat(rest))
                return (component, path) if path is not None else None
        head, _, rest = module_key.partition(".")  # diffusers style: <component>.<module path>
        if "" in self.mods:  # a bare model: the component name is optional
            table = self.table("")
            path = table.get(names.flat(rest)) if rest else None
            path = path or table.get(names.flat(module_key))
            return ("", path) if path is not None else None
        component = self.component_for(head)
        path = self.table(component).get(names.flat(rest)) if component is not None and rest else None
        return (component, path) if path is not None else None


@dataclass
class _Layer:
    path: str
    blocks: Tensor  # (N, b, b) or (m, N, b, b), float32
    alpha: float
    rescale: Optional[Tensor]
    spec: Optional[LayerSpec] = None
    comfy_alpha: bool = False  # alpha is the norm limit itself (ComfyUI), not alpha * out_features


def _group(tensors: dict[str, Tensor], source: object) -> dict[str, dict[str, Tensor]]:
    groups: dict[str, dict[str, Tensor]] = {}
    others: Counter = Counter()
    nonzero: list[str] = []
    has_blocks = any(key.endswith(".oft_blocks") for key in tensors)
    for key, value in tensors.items():
        module, suffix = _split_key(key)
        if suffix in OFT_KEYS:
            problem = value_problem(key, value)  # before any float cast: int blocks, a NaN that A - A^T hides
            if problem:
                raise CheckpointError(f"{source}: {problem}; refusing the file (nothing was changed).")
            groups.setdefault(module, {})[suffix] = value
        elif has_blocks and suffix in ZERO_OK:
            if bool(value.detach().ne(0).any()):
                nonzero.append(key)
        else:
            others[OTHER_KEYS.get(suffix, f"'.{suffix}'")] += 1
    if nonzero and not others:
        peak = max(float(tensors[k].detach().abs().max()) for k in nonzero)
        raise CheckpointError(
            f"{source}: {len(nonzero)} diff/diff_b tensors beside the oft_blocks are nonzero (e.g. {nonzero[0]}, "
            f"max |x| {peak:.3g}; ComfyUI's trainer trains biases and norm weights with the rotation): no diffadapt "
            "adapter changes biases or norms. Load the file in ComfyUI, or drop those keys to import the rotation alone."
        )
    if others:
        kinds = ", ".join(f"{k} ({n} tensors)" for k, n in others.items())
        raise CheckpointError(
            f"{source} holds {kinds}: diffadapt imports LyCORIS/kohya OFT and BOFT adapters (oft_blocks) only. "
            "Load LoRA files with diffusers' pipe.load_lora_weights."
        )
    lonely = [m for m, g in groups.items() if "oft_blocks" not in g]
    if lonely:
        raise CheckpointError(f"{source}: {', '.join(lonely[:3])} have alpha/rescale but no oft_blocks.")
    return groups


def read_lycoris(
    path: Union[str, os.PathLike],
    target: Any,
    lycoris_component: Optional[str] = None,
    tensors: Optional[dict[str, Tensor]] = None,
    header: Optional[dict[str, str]] = None,
):
    """A LyCORIS / kohya / ComfyUI OFT or BOFT file as a :class:`~diffadapt.pipeline.PipelineAdapter`
    for ``target`` (a pipeline or a model), whose modules resolve the file's names.

    ``lycoris_component`` names the component of ``lycoris_``-prefixed keys (default: the
    denoiser). Raises CheckpointError naming what does not fit: other algorithms, unknown module
    names, block shapes that do not tile the layer's output channels.
    """
    if target is None:
        raise CheckpointError(
            f"{path} is a LyCORIS/kohya/ComfyUI file: its module names can only be resolved against the model. "
            "Load it into a pipeline (diffadapt.load_adapter(pipe, path)) or pass the base model (--model)."
        )
    if tensors is None:
        header, tensors = read_safetensors(path)
    resolver = _Resolver(components(target), lycoris_component)
    per_component: dict[str, list[_Layer]] = {}
    unknown = []
    for module_key, group in _group(tensors, path).items():
        hit = resolver.resolve(module_key)
        if hit is None:
            unknown.append(module_key)
            continue
        component, module_path = hit
        alpha = group.get("alpha")
        per_component.setdefault(component, []).append(_Layer(
            module_path,
            group["oft_blocks"].detach().to(torch.float32),
            float(alpha) if alpha is not None else 0.0,
            None if group.get("rescale") is None else group["rescale"].detach().to(torch.float32),
            comfy_alpha=module_key.startswith(COMFY_PREFIX),
        ))
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} module names match no module of this {type(target).__name__} "
            f"(components {sorted(resolver.mods)}): {', '.join(unknown[:5])}. Names must be diffusers/transformers "
            "paths or, for SD UNets, ldm paths (kohya); BFL/SAI-style DiT names (double_blocks, joint_blocks) are not mapped."
        )
    if not per_component:
        raise CheckpointError(f"{path} holds no oft_blocks tensors.")
    parts = {}
    for component, layers in per_component.items():
        model = resolver.mods[component]
        kohya_oft = component == resolver.denoiser and any(k.startswith("oft_unet_") for k in tensors)
        parts[component] = ComponentAdapter(*_component_from_lycoris(model, layers, path, kohya_oft), type(model).__name__)
    methods = sorted({part.config.method for part in parts.values()})
    metadata = {"method": methods[0] if len(methods) == 1 else ",".join(methods), "source_format": "lycoris"}
    for key in ("ss_network_module", "ss_network_args", "ss_base_model_version"):
        if header and key in header:
            metadata[key] = header[key]
    if "" in parts:  # a bare model's part: the file names no component for it
        return PipelineAdapter({}, metadata, unplaced=parts[""])
    return PipelineAdapter(parts, metadata)


def _component_from_lycoris(
    model: nn.Module, layers: list[_Layer], source: object, kohya_oft: bool = False
) -> tuple[AdapterConfig, dict[str, Tensor]]:
    """One component's layers -> (OFT or BOFT config, tensors under PEFT key names)."""
    problems = []
    for layer in layers:
        module = model.get_submodule(layer.path)
        module = module.base_layer if isinstance(module, AdapterHost) else module
        try:
            spec = layer_spec(layer.path, module)
        except TypeError as exc:
            problems.append(str(exc))
            continue
        n, b = layer.blocks.shape[-3], layer.blocks.shape[-1]
        if layer.blocks.dim() not in (3, 4) or layer.blocks.shape[-2] != b or n * b != spec.out_features:
            problems.append(
                f"{layer.path}: oft_blocks {tuple(layer.blocks.shape)} do not tile its {spec.out_features} output channels"
            )
        if layer.rescale is not None and layer.rescale.numel() != spec.out_features:
            problems.append(f"{layer.path}: rescale {tuple(layer.rescale.shape)} vs {spec.out_features} output channels")
        if layer.alpha < 0 or not math.isfinite(layer.alpha):
            problems.append(f"{layer.path}: alpha={layer.alpha} is not a constraint >= 0")
        elif layer.comfy_alpha:  # ComfyUI: |Q| <= alpha; diffadapt's constraint c means |Q| <= c * out_features
            layer.alpha = layer.alpha / spec.out_features
        layer.spec = spec
    if problems:
        raise CheckpointError(f"{source} does not fit this {type(model).__name__}: " + "; ".join(problems[:5]))
    if kohya_oft and any(layer.alpha == 0 for layer in layers):
        warnings.warn(
            f"{source}: kohya OFT file with alpha=0; kohya's own loader clamps the rotation to nothing there, "
            "diffadapt reads 0 as 'no constraint' (LyCORIS' meaning).",
            stacklevel=2,
        )
    boft = any(layer.blocks.dim() == 4 or layer.rescale is not None for layer in layers)
    rows, cols = None, None
    tensors: dict[str, Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for layer in layers:
        blocks, key = layer.blocks, f"{PREFIX}{layer.path}"
        b = blocks.shape[-1]
        if boft:
            if blocks.dim() == 4:  # S = -Q in diffadapt's butterfly order: boft_R = 2 P A^T P^T
                order = half_chunk_order(b)
                r = 2.0 * blocks[..., order, :][..., :, order].mT
            else:  # diag-oft inside BOFT (m = 1, natural order): S = Q, boft_R = 2 A
                r = 2.0 * blocks[None]
            s = torch.ones(layer.spec.out_features) if layer.rescale is None else layer.rescale.reshape(-1)
            conv = layer.spec.kind == "conv2d"
            tensors[f"{key}.boft_R"] = r.contiguous()
            tensors[f"{key}.boft_s"] = (s[None, :] if conv else s[:, None]).contiguous()
            values[layer.path] = dict(boft_block_size=b, boft_n_butterfly_factor=r.shape[0], constraint=layer.alpha)
        else:
            if rows is None or rows.numel() != b * (b - 1) // 2:
                rows, cols = torch.triu_indices(b, b, 1)
            q = blocks - blocks.mT  # S = Q: oft_R packs Q's strict upper triangle
            tensors[f"{key}.oft_R.weight"] = q[:, rows, cols].contiguous()
            values[layer.path] = dict(oft_block_size=b, constraint=layer.alpha)
    # diffadapt.fitting.fit fits the config to the *first* layer's shapes (BOFT's factor count),
    # and safetensors files keep keys sorted: the sorted-first layer sets the defaults.
    suffix = "boft_R" if boft else "oft_R.weight"
    first = values[min(values, key=lambda p: f"{p}.{suffix}")]
    tensors = dict(sorted(tensors.items()))
    overrides = {}
    for path, v in values.items():
        changed = {k: x for k, x in v.items() if first[k] != x}
        if changed:
            overrides[re.escape(path)] = changed
    common = dict(target_modules=[layer.path for layer in layers], overrides=overrides, rotation_side="output")
    if boft:
        config = BOFTConfig(boft_block_num=0, **first, **common)
    else:
        config = OFTConfig(r=0, use_cayley_neumann=False, **first, **common)
    return config, tensors


def half_chunk_order(b: int) -> Tensor:
    """Our block position ``u`` -> LyCORIS' (interleaved) position: ``[0, 2, 4, ..., 1, 3, 5, ...]``."""
    return torch.cat([torch.arange(0, b, 2), torch.arange(1, b, 2)])
