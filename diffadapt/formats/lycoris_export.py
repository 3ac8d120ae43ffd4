"""Export to LyCORIS / kohya / ComfyUI / A1111 / Forge files: every diffadapt method (the format
and the mapping are described in :mod:`diffadapt.formats.lycoris`, which reads them).

Output-side OFT / BOFT go out as ``oft_blocks`` (``Q / 2``: a round trip keeps ``Q`` bit for bit;
a constraint some UI would apply differently is baked in, and ``alpha`` is a limit that binds in no
consumer); input-side rotations (PEFT's convention) as ``.diff``; HRA as an exact LoRA
(``W Q = W - (W V) Y^T``); FourierFT and FRoD as ``.diff`` or, with ``lora_rank``, as a
truncated-SVD LoRA whose error is reported.

What each consumer reads (checked against their loaders; ``consumer=`` picks forms for one of them,
the default picks forms every oft_blocks reader loads, and the header's ``consumers`` entry and a
warning say who cannot load the file and why):

* LyCORIS (and kohya sd-scripts through ``--network_module lycoris.kohya``, which the header
  names): 3-d blocks only with block size <= block count (its diag-oft rebuilds the layout as
  ``factorization(out, b)``, which swaps them otherwise); 4-d blocks only with an even block size,
  a power-of-two block count ``N`` and ``log2(N) + 1`` factors (identity factors pad). An OFT layer
  with more rows per block than blocks is written exactly as one 4-d factor of larger blocks
  (block-diagonal ``Q``, the other factors identity); what has no exact LyCORIS layout goes out as
  ``.diff`` (needs the base model) or is refused with the reason.
* ComfyUI: 3-d and 4-d blocks of any layout (ignores ``rescale`` on 3-d blocks), ``.diff``, LoRA.
* A1111: 3-d blocks in every version, 4-d blocks from 1.8 on (before: an error on every layer,
  caught and counted), never on SDXL's second text encoder's q/k/v (OpenCLIP's fused
  ``in_proj``); ``.diff`` and LoRA always. ``consumer="a1111"`` writes BOFT as ``.diff``.
* Forge (since its 2024-08 patcher rework): no ``oft_blocks`` at all; ``.diff`` and LoRA.
  ``consumer="forge"`` writes every rotation as ``.diff``.
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
from torch import Tensor

from diffadapt import model as mdl
from diffadapt._version import __version__
from diffadapt.artifact import PipelineAdapter, components
from diffadapt.checkpoint import PREFIX, CheckpointError
from diffadapt.methods import AdapterConfig, get_method
from diffadapt.methods.boft import BOFT
from diffadapt.methods.hra import HRA
from diffadapt.methods.oft import OFT
from diffadapt.formats import names, peft
from diffadapt.formats.lycoris import half_chunk_order

EXPORT_FORMAT = "diffadapt.lycoris-export"
CONSUMERS = ("lycoris", "comfyui", "a1111", "forge", "kohya")
# what strength s does to a file in each consumer (diffadapt's own strength: Cayley(s S))
STRENGTH = {
    "diffadapt": "rotations R(s) = Cayley(s S) (orthogonal at every s), additive W + s dW",
    "lycoris, kohya (lycoris.kohya)": "3-d oft_blocks: W + s (R^T W - W); 4-d: rescale B_s W, B_s's factors "
                                      "s r_i + (1 - s) I; .diff / LoRA: W + s dW",
    "a1111": "oft_blocks: W + s (P W - W), P the file's whole transform at s = 1 (3-d blocks R^T, 4-d butterfly, "
             "rescale); .diff / LoRA: W + s dW",
    "comfyui": "3-d oft_blocks: W + s^2 (R^T W - W); 4-d: W + s (rescale B_s W - W), B_s's factors "
               "s r_i + (1 - s) I; .diff / LoRA: W + s dW",
    "note": "all agree with diffadapt at s = 0 and s = 1 only (for rotations)",
}


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
    layer: Optional[mdl.LayerAdapter] = None  # the live layer (None: read from a file, no model)


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


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def lycoris_layout(blocks: Tensor) -> Optional[str]:
    """None if LyCORIS' own loader rebuilds this ``oft_blocks`` layout, else why not (one phrase)."""
    if blocks.dim() == 3:
        n, b = blocks.shape[0], blocks.shape[-1]
        if b > n:
            return f"its diag-oft swaps block size {b} > block count {n} ({n} blocks of {b} rows)"
        return None
    m, n, b = blocks.shape[0], blocks.shape[1], blocks.shape[-1]
    if b % 2 or not _is_pow2(n):
        return f"its BOFT needs an even block size and a power-of-two block count (here {n} blocks of {b})"
    if m != n.bit_length():
        return f"its BOFT wants log2({n}) + 1 = {n.bit_length()} factors, not {m}"
    return None


def _pad_factors(blocks: Tensor) -> Tensor:
    """4-d blocks with identity factors (A = 0) appended up to LyCORIS' log2(N) + 1 (they change nothing)."""
    full = blocks.shape[1].bit_length() if _is_pow2(blocks.shape[1]) else 0
    if full > blocks.shape[0]:
        blocks = torch.cat([blocks, blocks.new_zeros(full - blocks.shape[0], *blocks.shape[1:])])
    return blocks


def _as_one_factor(skew: Tensor) -> Tensor:
    """Natural-order skew blocks ``(N, b, b)`` of one output rotation (``W' = blockdiag(r_k^T) W``) ->
    the same rotation as 4-d blocks ``(m, N', b', b')`` read by LyCORIS: blocks of ``b'`` rows, ``b'`` a
    multiple of ``b`` with ``out / b'`` a power of two (``Q`` block-diagonal inside them: exact,
    Cayley keeps block-diagonal structure), identity factors after. None if no such ``b'``."""
    n, b = skew.shape[0], skew.shape[-1]
    out = n * b
    group = n // (n & -n)  # the odd part of n: b' = b * group * 2^j, N' = out / b' a power of two
    big = b * group
    if big % 2:
        big *= 2
    if out % big:
        return None
    per = big // b
    full = skew.new_zeros(out // big, big, big)
    for j in range(per):  # block-diagonal Q inside each big block
        full[:, j * b:(j + 1) * b, j * b:(j + 1) * b] = skew.reshape(out // big, per, b, b)[:, j]
    back = torch.argsort(half_chunk_order(big))
    return _pad_factors((-full / 2)[None][..., back, :][..., :, back])


def _rotation_tensors(src: _Source, notes: Counter, layout: str = "any") -> dict[str, Tensor]:
    """Output-side OFT/BOFT -> ``oft_blocks`` (+ ``rescale``) and ``alpha``, exactly.

    ``layout``: ``"any"`` (the natural 3-d / 4-d blocks) or ``"lycoris"`` (a layout LyCORIS' loader
    rebuilds, by exact re-layouts; CheckpointError if there is none)."""
    config = src.config
    skew = src.method.skew(config, src.params, src.buffers).detach().float()  # constraint applied
    scale = None
    if src.method is OFT:
        skew = skew.expand(src.out_features // skew.shape[-1], -1, -1) if config.block_share else skew
        natural = skew  # Q = A - A^T = S
    else:
        s = src.params["boft_s"].detach().float().reshape(-1)
        scale = None if bool((s == 1).all()) else s
        natural = skew[0] if skew.shape[0] == 1 and scale is None else None  # one factor, natural order: diag-oft
    if natural is not None:
        blocks = natural / 2
        if layout == "lycoris" and lycoris_layout(blocks) is not None:
            wide = _as_one_factor(natural)
            if wide is None or lycoris_layout(wide) is not None:
                raise CheckpointError(_no_layout(src, blocks))
            notes[f"{config.method.upper()} blocks larger than their count: written as one 4-d factor of wider "
                  "blocks LyCORIS rebuilds (exact, larger file)"] += 1
            blocks = wide
    else:
        back = torch.argsort(half_chunk_order(skew.shape[-1]))
        blocks = (-skew / 2)[..., back, :][..., :, back]  # Q = -S in LyCORIS' interleaved order
        padded = _pad_factors(blocks)
        if padded.shape[0] > blocks.shape[0]:
            notes["BOFT padded with identity factors to LyCORIS' log2(N)+1"] += 1
        blocks = padded
        if layout == "lycoris" and lycoris_layout(blocks) is not None:
            raise CheckpointError(_no_layout(src, blocks))
    norm = float(torch.linalg.vector_norm(blocks - blocks.mT))
    alpha = float(config.constraint)
    if alpha and norm + 1e-8 > alpha:  # ComfyUI clamps to alpha, LyCORIS to alpha * out: bake it
        notes["constraint baked into the blocks (ComfyUI and LyCORIS read alpha differently)"] += 1
        alpha = 0.0
    if not alpha:
        # every consumer reads alpha as a norm limit on Q = A - A^T: ComfyUI as the limit itself,
        # LyCORIS / A1111 / kohya as alpha * out_features, and A1111 / kohya clamp to it even at 0
        # (the rotation would vanish). A limit of at least twice the norm binds nowhere.
        alpha = max(1.0, 2.0 * norm)
    out = {"oft_blocks": blocks.contiguous(), "alpha": torch.tensor(alpha)}
    if scale is not None:
        ndim = len(src.weight_shape) if src.weight_shape is not None else (4 if src.kind == "conv2d" else 2)
        out["rescale"] = scale.reshape(-1, *[1] * (ndim - 1)).contiguous()
    return out


def _no_layout(src: _Source, blocks: Tensor) -> str:
    return (
        f"{src.component or 'model'}.{src.path}: no exact oft_blocks layout that LyCORIS loads for this "
        f"{src.config.method.upper()} (oft_blocks {tuple(blocks.shape)}, {src.out_features} output channels: "
        f"{lycoris_layout(blocks)}). Pass the base model (--model) to write it as .diff, or export for ComfyUI/A1111."
    )


def _base_weight(src: _Source) -> Tensor:
    """The layer's original 2-D weight (before any merge), float64."""
    w = src.layer.base_weight().detach()
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
    return src.layer.apply(w, 1.0) - w


_FUSED_QKV = re.compile(r"(^|\.)self_attn\.(q|k|v)_proj$")


def _is_4d(src: _Source) -> bool:
    """Whether this output-side OFT/BOFT layer's natural oft_blocks are 4-d (BOFT beyond one plain factor)."""
    if src.method is not BOFT:
        return False
    return src.params["boft_R"].shape[0] > 1 or not bool((src.params["boft_s"] == 1).all())


def _blocks_unread(src: _Source, consumer: Optional[str]) -> Optional[str]:
    """Why ``consumer`` would not apply this layer's oft_blocks (None: it would)."""
    if consumer == "forge":
        return "Forge reads no oft_blocks"
    if consumer == "a1111":
        if src.component == "text_encoder_2" and _FUSED_QKV.search(src.path):
            return "A1111 applies no oft_blocks to SDXL's text_encoder_2 q/k/v (OpenCLIP's fused in_proj)"
        if _is_4d(src):
            return "A1111 before 1.8 reads no 4-d (BOFT) oft_blocks"
    return None


def _layer_tensors(
    src: _Source, rotations: str, lora_rank: Optional[int], notes: Counter, errors: list[float],
    consumer: Optional[str] = None,
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
        unread = _blocks_unread(src, consumer)
        layout = "lycoris" if consumer in (None, "lycoris", "kohya") else "any"
        if unread is None:
            try:
                return "oft_blocks", _rotation_tensors(src, notes, layout)
            except CheckpointError:
                if src.layer is None or rotations == "blocks":
                    raise
            notes["no exact oft_blocks layout LyCORIS loads: written as .diff"] += 1
        elif src.layer is None or rotations == "blocks":
            if consumer == "a1111" and "1.8" in unread:  # A1111 1.8+ reads 4-d blocks: write them, say so
                notes[f"{unread}: written as oft_blocks anyway (A1111 1.8+ reads them; pass the model for .diff)"] += 1
                return "oft_blocks", _rotation_tensors(src, notes, layout)
            raise CheckpointError(
                f"{src.component or 'model'}.{src.path}: {unread}. Pass the base model (--model) to write this "
                f"{config.method.upper()} layer as .diff, or export it for another consumer."
            )
        else:
            notes[f"{unread}: written as .diff"] += 1
    elif rotation and rotations == "auto":
        side = "output side, Cayley-Neumann" if config.rotation_side == "output" else "input side"
        notes[f"{config.method.upper()} ({side}) has no oft_blocks form: written as .diff / LoRA"] += 1
    if src.layer is None:
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
        if mdl.adapter_config(model, adapter_name) is None:
            continue
        for layer in mdl.layer_adapters(model, adapter_name):
            out.append(_Source(
                component, layer.path, layer.method, layer.config, layer.params, layer.buffers,
                layer.spec.out_features, layer.weight_shape, layer.spec.kind, layer,
            ))
    if not out:
        raise ValueError(f"No component of this {type(obj).__name__} has an adapter named {adapter_name!r}.")
    return out


def _file_sources(adapter) -> list[_Source]:
    """Sources from a saved adapter without a model: enough for output-side OFT/BOFT only."""
    out = []
    for component, (config, tensors) in adapter.components.items():
        method = get_method(config.method)
        suffixes = {v: k for k, v in peft.keys(method.name).items()}
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


READERS = ("lycoris", "kohya", "comfyui", "a1111", "a1111<1.8", "forge")  # keys of the header's "consumers"
_SD_FAMILY = ("UNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection")


def _unread_by(kind: str, values: dict[str, Tensor], src: _Source, cls: str) -> dict[str, Optional[str]]:
    """For one written layer: reader -> None (applies it exactly at strength 1) or why not."""
    out: dict[str, Optional[str]] = dict.fromkeys(READERS)
    if cls not in _SD_FAMILY:  # DiTs: LyCORIS' own wrapper is the reader diffadapt checks
        for reader in READERS[1:]:
            out[reader] = f"not checked for {cls}"
    if kind == "oft_blocks":
        blocks = values["oft_blocks"]
        layout = lycoris_layout(blocks)
        if layout is not None:
            out["lycoris"] = out["kohya"] = f"LyCORIS: {layout}"
        if blocks.dim() == 3 and "rescale" in values:
            out["comfyui"] = "ComfyUI ignores rescale on 3-d blocks"
        if blocks.dim() == 4:
            out["a1111<1.8"] = "A1111 before 1.8 reads no 4-d (BOFT) oft_blocks"
        if src.component == "text_encoder_2" and _FUSED_QKV.search(src.path):
            out["a1111"] = out["a1111<1.8"] = "A1111 applies no oft_blocks to SDXL's text_encoder_2 q/k/v"
        out["forge"] = out["forge"] or "Forge reads no oft_blocks"
    if src.component == "text_encoder_2" and src.path == "text_projection":
        out["a1111"] = out["a1111<1.8"] = "A1111's SDXL text_encoder_2 has no text_projection layer"
    return out


def base_model_version(obj: Any, classes: dict[str, Optional[str]]) -> dict[str, str]:
    """kohya's ``ss_base_model_version`` / ``ss_v2`` for the model exported from (A1111 files a LoRA
    by them: SDXL only with ``sdxl_*``; anything else with metadata counts as SD1). {} if unknown."""
    mods = components(obj) if obj is not None else {}
    unet = next((m for m in mods.values() if type(m).__name__ == "UNet2DConditionModel"), None)
    names_ = set(classes.values())
    if (unet is not None and names.is_sdxl_unet(unet)) or (
        "CLIPTextModelWithProjection" in names_ and ("UNet2DConditionModel" in names_ or "CLIPTextModel" in names_)
    ):
        return {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}
    if "FluxTransformer2DModel" in names_:
        return {"ss_base_model_version": "flux1", "ss_v2": "False"}
    if unet is None and not names_ & {"UNet2DConditionModel", "CLIPTextModel"}:
        return {}
    width = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    if width is None:  # text encoder alone: SD2's OpenCLIP-H is 1024 wide, SD1's CLIP-L 768
        te = next((m for m in mods.values() if type(m).__name__ == "CLIPTextModel"), None)
        width = getattr(getattr(te, "config", None), "hidden_size", None)
    if width is None:
        return {}
    if width == 1024:
        scheduler = getattr(obj, "scheduler", None)
        v = getattr(getattr(scheduler, "config", None), "prediction_type", None) == "v_prediction"
        return {"ss_base_model_version": "sd_v2_v" if v else "sd_v2", "ss_v2": "True"}
    return {"ss_base_model_version": "sd_v1", "ss_v2": "False"}


@torch.no_grad()
def lycoris_state_dict(
    obj: Any = None,
    adapter_name: str = "default",
    *,
    adapter=None,
    unet_names: str = "auto",
    rotations: str = "auto",
    lora_rank: Optional[int] = None,
    consumer: Optional[str] = None,
) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Any]]:
    """(tensors, safetensors header, report) of an adapter in the LyCORIS / kohya / ComfyUI format.

    Give the pipeline or model ``obj`` holding ``adapter_name`` (needed for ``.diff`` and LoRA,
    which depend on the base weights), or a saved ``adapter`` (a PipelineAdapter) for output-side
    OFT/BOFT alone. ``rotations``: ``"auto"`` (output-side OFT/BOFT as ``oft_blocks``, everything
    else as ``.diff`` / LoRA), ``"blocks"`` (refuse what has no ``oft_blocks`` form), ``"diff"``.
    ``lora_rank``: write additive methods and input-side rotations as a rank-``r`` LoRA (truncated
    SVD of ``dW``; the largest relative Frobenius error goes into the report) instead of ``.diff``.
    ``unet_names``: see :func:`diffadapt.formats.names.community_namer`.
    ``consumer``: ``None`` (oft_blocks in layouts LyCORIS' loader rebuilds, which ComfyUI and A1111
    1.8+ read too), ``"lycoris"`` / ``"kohya"`` (the same), ``"comfyui"`` (oft_blocks as they are),
    ``"a1111"`` (BOFT and SDXL te2 q/k/v as ``.diff``: every A1111 version applies it), ``"forge"``
    (every rotation as ``.diff``). The report's and the header's ``consumers`` say, per reader,
    whether the file loads there exactly at strength 1; a warning names those where it does not.
    """
    if rotations not in ("auto", "blocks", "diff"):
        raise ValueError(f"rotations must be 'auto', 'blocks' or 'diff', got {rotations!r}.")
    if consumer is not None and consumer not in CONSUMERS:
        raise ValueError(f"consumer must be one of {', '.join(CONSUMERS)} or None, got {consumer!r}.")
    if obj is not None:
        sources = _live_sources(obj, adapter_name)
        mods = components(obj)
        classes = {n: type(m).__name__ for n, m in mods.items()}
        configs = {n: mdl.adapter_config(mods[n], adapter_name) for n in dict.fromkeys(src.component for src in sources)}
    else:
        sources = _file_sources(adapter)
        mods, classes = {}, dict(adapter.classes)
        configs = {n: c for n, (c, _) in adapter.components.items()}
    tensors: dict[str, Tensor] = {}
    notes: Counter = Counter()
    errors: list[float] = []
    kinds: Counter = Counter()
    unread: dict[str, Counter] = {r: Counter() for r in READERS}
    sizes: Counter = Counter()
    alphas: Counter = Counter()
    algos: set[str] = set()
    rescaled = False
    namers = {
        n: names.community_namer(mods.get(n), classes.get(n), unet_names) for n in dict.fromkeys(x.component for x in sources)
    }
    for src in sources:
        name = _prefix(src.component, classes) + namers[src.component](src.path)
        kind, values = _layer_tensors(src, rotations, lora_rank, notes, errors, consumer)
        kinds[kind] += 1
        tensors.update({f"{name}.{k}": v for k, v in values.items()})
        for reader, why in _unread_by(kind, values, src, classes.get(src.component) or "").items():
            if why is not None:
                unread[reader][why] += 1
        if kind == "oft_blocks":
            algos.add("boft" if values["oft_blocks"].dim() == 4 else "diag-oft")
            sizes[values["oft_blocks"].shape[-1]] += 1
            alphas[float(values["alpha"])] += 1
            rescaled = rescaled or "rescale" in values
        elif kind == "lora":
            algos.add("lora")
            sizes[values["lora_up.weight"].shape[1]] += 1
            alphas[float(values["alpha"])] += 1
        else:
            algos.add("full")
    layers = sum(kinds.values())
    readers = {}
    for reader, whys in unread.items():
        missed = sum(whys.values())
        readers[reader] = "loads" if not missed else (
            f"{missed} of {layers} layers not applied: " + "; ".join(f"{why} ({n})" for why, n in whys.items())
        )
    version = base_model_version(obj, classes)
    if not version:
        notes["base model family unknown (no model given): ss_base_model_version not written, "
              "A1111 files this as SD1; pass the model (--model)"] += 1
    report = {
        "layers": layers,
        "written_as": dict(kinds),
        "max_relative_error": max(errors) if errors else 0.0,
        "notes": [f"{note} ({n} layers)" for note, n in notes.items()],
        "consumers": readers,
    }
    args = {"algo": "+".join(sorted(algos))}
    if rescaled:
        args["rescaled"] = True
    header = {
        "format": "pt",
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(sizes.most_common(1)[0][0]) if sizes else "None",
        "ss_network_alpha": repr(alphas.most_common(1)[0][0]) if alphas else "None",
        "ss_network_args": json.dumps(args),
        **version,
        EXPORT_FORMAT: json.dumps({
            "diffadapt_version": __version__,
            "adapter": adapter_name,
            "consumer": consumer,
            "components": {n: {"class": classes.get(n), "config": c.to_dict()} for n, c in configs.items()},
            "conventions": {
                "oft_blocks": "output side: W' = diag(rescale) P W; Q = A - A^T, r = (I+Q)(I-Q)^-1; 3-d: P = "
                              "blockdiag(r^T), 4-d: LyCORIS' butterfly of r; alpha = norm constraint "
                              "(alpha * out_features, 0 = none)",
                "diff": "W' = W + diff",
                "lora": "W' = W + alpha / rank * up @ down",
                "strength": STRENGTH,
            },
            "consumers": readers,
            "report": report,
        }),
    }
    missing = {r: v for r, v in readers.items() if v != "loads" and "not checked" not in v}
    if missing:
        warnings.warn(
            "this export does not load exactly everywhere: "
            + " | ".join(f"{r}: {v}" for r, v in missing.items())
            + " (consumer='a1111'/'forge' or rotations='diff' with the base model write .diff, which all of them read)",
            stacklevel=3,
        )
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
