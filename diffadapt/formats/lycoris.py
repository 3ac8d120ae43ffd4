"""LyCORIS / kohya / ComfyUI adapter files: import OFT and BOFT, export every diffadapt method.

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
``<component>.`` (DiTs, diffusers names).

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

import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from diffadapt import model as mdl
from diffadapt._version import __version__
from diffadapt.artifact import PipelineAdapter, components
from diffadapt.checkpoint import PREFIX, CheckpointError, read_safetensors
from diffadapt.host import AdapterHost, layer_spec
from diffadapt.methods import AdapterConfig, get_method
from diffadapt.methods.base import LayerSpec
from diffadapt.methods.boft import BOFT, BOFTConfig
from diffadapt.methods.hra import HRA
from diffadapt.methods.oft import OFT, OFTConfig
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
)
EXPORT_FORMAT = "diffadapt.lycoris-export"


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
                path = self.table(component).get(rest)
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


def _group(tensors: dict[str, Tensor], source: object) -> dict[str, dict[str, Tensor]]:
    groups: dict[str, dict[str, Tensor]] = {}
    others: Counter = Counter()
    for key, value in tensors.items():
        module, suffix = _split_key(key)
        if suffix in OFT_KEYS:
            groups.setdefault(module, {})[suffix] = value
        else:
            others[OTHER_KEYS.get(suffix, f"'.{suffix}'")] += 1
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
        ))
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} module names match no module of this {type(target).__name__} "
            f"(components {sorted(resolver.mods)}): {', '.join(unknown[:5])}. Names must be diffusers/transformers "
            "paths or, for SD UNets, ldm paths (kohya); BFL/SAI-style DiT names (double_blocks, joint_blocks) are not mapped."
        )
    if not per_component:
        raise CheckpointError(f"{path} holds no oft_blocks tensors.")
    parts, classes = {}, {}
    for component, layers in per_component.items():
        model = resolver.mods[component]
        kohya_oft = component == resolver.denoiser and any(k.startswith("oft_unet_") for k in tensors)
        parts[component] = _component_from_lycoris(model, layers, path, kohya_oft)
        classes[component] = type(model).__name__
    methods = sorted({config.method for config, _ in parts.values()})
    metadata = {"method": methods[0] if len(methods) == 1 else ",".join(methods), "source_format": "lycoris"}
    for key in ("ss_network_module", "ss_network_args", "ss_base_model_version"):
        if header and key in header:
            metadata[key] = header[key]
    return PipelineAdapter(parts, metadata, classes)


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
        layer.spec = spec
    if problems:
        raise CheckpointError(f"{source} does not fit this {type(model).__name__}: " + "; ".join(problems[:5]))
    if kohya_oft and any(layer.alpha == 0 for layer in layers):
        warnings.warn(
            f"{source}: kohya OFT file with alpha=0; kohya's own loader clamps the rotation to nothing there, "
            "diffadapt reads 0 as 'no constraint' (LyCORIS' meaning)."
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
                order = _half_chunk_order(b)
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
    # checkpoint.prepare_adapter fits the config to the *first* layer's shapes (BOFT's factor count),
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


def _half_chunk_order(b: int) -> Tensor:
    """Our block position ``u`` -> LyCORIS' (interleaved) position: ``[0, 2, 4, ..., 1, 3, 5, ...]``."""
    return torch.cat([torch.arange(0, b, 2), torch.arange(1, b, 2)])


# -- export ------------------------------------------------------------------------------------------
@dataclass
class _Source:
    """What export needs of one adapted layer."""

    component: str
    path: str
    method: type
    config: AdapterConfig  # this layer's config (overrides applied)
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    out_features: int
    weight_shape: Optional[tuple[int, ...]]  # the module's weight shape (None: unknown without a model)
    kind: Optional[str]
    host: Optional[AdapterHost] = None
    adapter_name: str = ""


def _prefix(component: str, classes: dict[str, Optional[str]]) -> str:
    """kohya's prefixes for SD UNets and text encoders, LyCORIS' ``lycoris_`` for DiTs."""
    cls = classes.get(component) or ""
    if component == "":
        if cls.startswith(("CLIPText", "T5")):
            return "lora_te_"
        return "lora_unet_" if cls == "UNet2DConditionModel" else "lycoris_"
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder":
        return "lora_te1_" if "text_encoder_2" in classes else "lora_te_"
    if component == "text_encoder_2":
        return "lora_te3_" if cls.startswith("T5") else "lora_te2_"
    if component == "text_encoder_3":
        return "lora_te3_"
    if component == "transformer":
        return "lycoris_"
    raise CheckpointError(f"No community key prefix is known for component {component!r}; export the denoiser and text encoders only.")


def _rotation_tensors(src: _Source, notes: Counter) -> dict[str, Tensor]:
    """Output-side OFT/BOFT -> ``oft_blocks`` (+ ``rescale``) and ``alpha``, exactly."""
    config = src.config
    skew = src.method.skew(config, src.params, src.buffers).detach().float()  # constraint applied
    scale = None
    if src.method is OFT:
        skew = skew.expand(src.out_features // skew.shape[-1], -1, -1) if config.block_share else skew
        blocks = skew / 2  # Q = A - A^T = S
    else:
        s = src.params["boft_s"].detach().float().reshape(-1)
        scale = None if bool((s == 1).all()) else s
        if skew.shape[0] == 1 and scale is None:
            blocks = skew[0] / 2  # one factor, natural order: diag-oft
        else:
            back = torch.argsort(_half_chunk_order(skew.shape[-1]))
            blocks = (-skew / 2)[..., back, :][..., :, back]  # Q = -S in LyCORIS' interleaved order
            n = blocks.shape[1]
            full = n.bit_length() if n & (n - 1) == 0 else 0  # LyCORIS' own loader wants log2(N) + 1 factors
            if full > blocks.shape[0]:  # identity factors (A = 0) after ours change nothing
                blocks = torch.cat([blocks, blocks.new_zeros(full - blocks.shape[0], *blocks.shape[1:])])
                notes["BOFT padded with identity factors to LyCORIS' log2(N)+1"] += 1
            elif not full:
                notes["BOFT block count not a power of two: ComfyUI reads it, LyCORIS' own loader does not"] += 1
    if blocks.dim() == 3 and blocks.shape[-1] > blocks.shape[0]:
        notes["OFT block size > block count: ComfyUI reads it, LyCORIS' own loader does not"] += 1
    norm = float(torch.linalg.vector_norm(blocks - blocks.mT))
    alpha = float(config.constraint)
    if alpha and norm + 1e-8 > alpha:  # ComfyUI clamps to alpha, LyCORIS to alpha * out: bake it
        notes["constraint baked into the blocks, alpha written as 0 (ComfyUI and LyCORIS read alpha differently)"] += 1
        alpha = 0.0
    out = {"oft_blocks": blocks.contiguous(), "alpha": torch.tensor(alpha)}
    if scale is not None:
        ndim = len(src.weight_shape) if src.weight_shape is not None else (4 if src.kind == "conv2d" else 2)
        out["rescale"] = scale.reshape(-1, *[1] * (ndim - 1)).contiguous()
    return out


def _base_weight(src: _Source) -> Tensor:
    """The layer's original 2-D weight (before any merge), float64."""
    host = src.host
    w = host.original_weight if host.original_weight is not None else host.base_layer.weight
    w = w.detach()
    w = w.T if src.kind == "conv1d" else w.flatten(1)
    return w.to(torch.float64)


def _as_module_layout(w2d: Tensor, src: _Source) -> Tensor:
    if src.kind == "conv1d":
        return w2d.T.contiguous()
    return w2d.reshape(src.weight_shape).contiguous()


def _hra_lora(src: _Source) -> dict[str, Tensor]:
    """HRA as an exact LoRA for this base weight: ``W Q - W = (-W V) Y^T``, alpha = rank."""
    prep = HRA.prepare(src.config, src.params, src.buffers, 1.0)
    w = _base_weight(src)
    up = -(w @ prep.v.to(w.dtype))  # (out, r)
    down = prep.y.to(w.dtype).mT  # (r, fan_in)
    return _lora_tensors(up, down, src)


def _lora_tensors(up: Tensor, down: Tensor, src: _Source) -> dict[str, Tensor]:
    rank = up.shape[1]
    if src.kind == "conv2d":
        up = up.reshape(up.shape[0], rank, 1, 1)
        down = down.reshape(rank, *src.weight_shape[1:])
    return {
        "lora_up.weight": up.float().contiguous(),
        "lora_down.weight": down.float().contiguous(),
        "alpha": torch.tensor(float(rank)),
    }


def _delta(src: _Source) -> Tensor:
    """``W_eff - W`` of this adapter alone at strength 1 (float64, 2-D)."""
    w = _base_weight(src)
    return src.host.effective_weight([(src.adapter_name, 1.0)], weight=w) - w


def _layer_tensors(
    src: _Source, rotations: str, lora_rank: Optional[int], notes: Counter, errors: list[float]
) -> tuple[str, dict[str, Tensor]]:
    """(kind written, tensors by suffix) for one layer."""
    config = src.config
    rotation = src.method in (OFT, BOFT)
    exact_blocks = rotation and config.rotation_side == "output" and not getattr(config, "use_cayley_neumann", False)
    if rotation and rotations == "blocks" and not exact_blocks:
        why = (
            "it uses the Cayley-Neumann series (use_cayley_neumann=True) where LyCORIS uses exact Cayley"
            if config.rotation_side == "output"
            else "it rotates the layer input (PEFT's convention, W R^T) and LyCORIS/ComfyUI rotate the output (R W)"
        )
        raise CheckpointError(
            f"{src.component or 'model'}.{src.path}: this {config.method.upper()} adapter cannot be written as "
            f"oft_blocks: {why}. Export it as .diff (rotations='diff' or 'auto'), or train with "
            "rotation_side='output' for an exact LyCORIS file."
        )
    if exact_blocks and rotations != "diff":
        return "oft_blocks", _rotation_tensors(src, notes)
    if rotation and rotations == "auto":
        side = "output side, Cayley-Neumann" if config.rotation_side == "output" else "input side"
        notes[f"{config.method.upper()} ({side}) has no oft_blocks form: written as .diff / LoRA"] += 1
    if src.host is None:
        raise CheckpointError(
            f"{src.component or 'model'}.{src.path}: exporting {config.method} "
            f"{'(input side) ' if rotation else ''}needs the base model's weights (.diff / LoRA); pass the model (--model)."
        )
    if src.method is HRA and rotations != "diff":
        return "lora", _hra_lora(src)
    delta = _delta(src)
    if lora_rank:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(lora_rank, s.numel())
        up, down = u[:, :r] * s[:r], vh[:r]
        errors.append(float(torch.linalg.vector_norm(delta - up @ down) / torch.linalg.vector_norm(delta).clamp_min(1e-30)))
        return "lora", _lora_tensors(up, down, src)
    return "diff", {"diff": _as_module_layout(delta, src).float()}


def _live_sources(obj: Any, adapter_name: str) -> list[_Source]:
    out = []
    for component, model in components(obj).items():
        state = model.__dict__.get("_diffadapt")
        if state is None or adapter_name not in state.configs:
            continue
        for path, host in mdl.hosts(model):
            if adapter_name not in host.adapters:
                continue
            slot = host.adapters[adapter_name]
            out.append(_Source(
                component, path, slot.method, slot.config, slot.params(), slot.buffers_dict(),
                host.spec.out_features, tuple(host.base_layer.weight.shape), host.spec.kind, host, adapter_name,
            ))
    if not out:
        raise ValueError(f"No component of this {type(obj).__name__} has an adapter named {adapter_name!r}.")
    return out


def _file_sources(adapter) -> list[_Source]:
    """Sources from a saved adapter without a model: enough for output-side OFT/BOFT only."""
    out = []
    for component, (config, tensors) in adapter.components.items():
        method = get_method(config.method)
        suffixes = {v: k for k, v in method.peft_keys.items()}
        layers: dict[str, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            body = key.removeprefix(PREFIX)
            hit = next((s for s in suffixes if body.endswith("." + s)), None)
            if hit is not None:
                layers.setdefault(body[: -len(hit) - 1], {})[suffixes[hit]] = value.float()
        for path, params in layers.items():
            cfg = config.for_layer(path)
            buffers, out_features, kind = {}, 0, None
            if method is OFT:
                b = (1 + math.isqrt(1 + 8 * params["oft_R"].shape[1])) // 2
                buffers = {"triu_index": OFT.triu_index(b)}
                out_features = params["oft_R"].shape[0] * b
                if cfg.block_share:
                    out_features = 0
            elif method is BOFT:
                out_features = params["boft_R"].shape[1] * params["boft_R"].shape[-1]
                kind = "conv2d" if params["boft_s"].shape[0] == 1 and params["boft_s"].shape[1] > 1 else "linear"
            src = _Source(component, path, method, cfg, params, buffers, out_features, None, kind)
            if method is OFT and cfg.block_share and cfg.rotation_side == "output":
                raise CheckpointError(f"{component}.{path}: OFT with block_share needs the model (--model) to export.")
            out.append(src)
    return out


@torch.no_grad()
def lycoris_state_dict(
    obj: Any = None,
    adapter_name: str = "default",
    *,
    adapter=None,
    unet_names: str = "auto",
    rotations: str = "auto",
    lora_rank: Optional[int] = None,
) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Any]]:
    """(tensors, safetensors header, report) of an adapter in the LyCORIS / kohya / ComfyUI format.

    Give the pipeline or model ``obj`` holding ``adapter_name`` (needed for ``.diff`` and LoRA,
    which depend on the base weights), or a saved ``adapter`` (a PipelineAdapter) for output-side
    OFT/BOFT alone. ``rotations``: ``"auto"`` (output-side OFT/BOFT as ``oft_blocks``, everything
    else as ``.diff`` / LoRA), ``"blocks"`` (refuse what has no ``oft_blocks`` form), ``"diff"``.
    ``lora_rank``: write additive methods and input-side rotations as a rank-``r`` LoRA (truncated
    SVD of ``dW``; the largest relative Frobenius error goes into the report) instead of ``.diff``.
    ``unet_names``: see :func:`diffadapt.formats.names.community_namer`.
    """
    if rotations not in ("auto", "blocks", "diff"):
        raise ValueError(f"rotations must be 'auto', 'blocks' or 'diff', got {rotations!r}.")
    if obj is not None:
        sources = _live_sources(obj, adapter_name)
        mods = components(obj)
        classes = {n: type(m).__name__ for n, m in mods.items()}
        configs = {n: mdl.adapter_state(mods[n]).configs[adapter_name] for n in dict.fromkeys(src.component for src in sources)}
    else:
        sources = _file_sources(adapter)
        mods, classes = {}, dict(adapter.classes)
        configs = {n: c for n, (c, _) in adapter.components.items()}
    tensors: dict[str, Tensor] = {}
    notes: Counter = Counter()
    errors: list[float] = []
    kinds: Counter = Counter()
    namers = {
        n: names.community_namer(mods.get(n), classes.get(n), unet_names) for n in dict.fromkeys(x.component for x in sources)
    }
    for src in sources:
        name = _prefix(src.component, classes) + namers[src.component](src.path)
        kind, values = _layer_tensors(src, rotations, lora_rank, notes, errors)
        kinds[kind] += 1
        tensors.update({f"{name}.{k}": v for k, v in values.items()})
    report = {
        "layers": sum(kinds.values()),
        "written_as": dict(kinds),
        "max_relative_error": max(errors) if errors else 0.0,
        "notes": [f"{note} ({n} layers)" for note, n in notes.items()],
    }
    header = {
        "format": "pt",
        "ss_network_module": "lycoris.kohya",
        EXPORT_FORMAT: json.dumps({
            "diffadapt_version": __version__,
            "adapter": adapter_name,
            "components": {n: {"class": classes.get(n), "config": c.to_dict()} for n, c in configs.items()},
            "conventions": {
                "oft_blocks": "output side: W' = diag(rescale) P W; Q = A - A^T, r = (I+Q)(I-Q)^-1; 3-d: P = "
                              "blockdiag(r^T), 4-d: LyCORIS' butterfly of r; alpha = norm constraint "
                              "(alpha * out_features, 0 = none)",
                "diff": "W' = W + diff",
                "lora": "W' = W + alpha / rank * up @ down",
            },
            "report": report,
        }),
    }
    if len(kinds) == 1:
        algos = {src.method.name for src in sources}
        only = next(iter(kinds))
        algo = {"diff": "full", "lora": "lora"}.get(only) or ("boft" if "boft" in algos else "diag-oft")
        header["ss_network_args"] = json.dumps({"algo": algo})
    return tensors, header, report


def save_lycoris(obj: Any, path: Union[str, os.PathLike], adapter_name: str = "default", **kwargs) -> dict[str, Any]:
    """Write ``adapter_name`` of ``obj`` as one LyCORIS / kohya / ComfyUI ``.safetensors`` file;
    returns the report (kinds written, lossy error, notes). Options: :func:`lycoris_state_dict`."""
    tensors, header, report = lycoris_state_dict(obj, adapter_name, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return report


def write_lycoris_file(adapter: PipelineAdapter, path: Union[str, os.PathLike], **kwargs) -> dict[str, Any]:
    """Write a saved output-side OFT/BOFT adapter as a LyCORIS file without a model."""
    tensors, header, report = lycoris_state_dict(adapter=adapter, **kwargs)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return report
