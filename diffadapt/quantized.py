"""Quantized bases, model- and pipeline-level: quantize a model or a pipeline's denoiser
(bitsandbytes), keep its quantized layers on their training kernels, bound and report the
requantization error of merges, and merge-or-keep-live for the faces. The per-layer knowledge
(detection, storage, dequantize / requantize, refusals) is :mod:`diffadapt.quantized_layers`;
its public names are re-exported here, so ``diffadapt.quantized`` is the one module users import.

Adapters on a quantized layer: live, the layer is a black box (rotations turn its input, deltas
are added to its output, nothing dequantized per step); merged, its weight is dequantized,
composed in float32 and requantized in its own format, with the added error reported and the
original packed storage kept for a bit-exact unmerge; a merge whose error is larger than the
limit (:func:`set_merge_limit`) times the adapter's own change is refused before anything changes.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Optional

import torch
from torch import nn

from diffadapt.model import adapter_state, hosts
from diffadapt.pipeline import adapted, merge_adapters, unmerge_adapters
from diffadapt.quantized_layers import (  # noqa: F401  (re-exported: the public names of quantized layers)
    BNB_4BIT,
    BNB_INT8,
    DEFAULT_MERGE_LIMIT,
    QUANTO,
    SUPPORTED,
    TORCHAO,
    UNSUPPORTED,
    MergeReport,
    QuantizedMergeError,
    QuantizedMergeWarning,
    Storage,
    UnsupportedQuantizedLayerError,
    callable_as_black_box,
    can_requantize,
    check_supported,
    dequantize,
    dequantized_weight,
    describe,
    is_quantized,
    kind,
    merge_limit,
    plan_merge,
    quantize_like,
    refusal,
    snapshot,
    storage,
    warn_merged,
    write,
)

def set_merge_limit(model: nn.Module, limit: float) -> None:
    """Refuse merges into quantized layers whose requantization error exceeds ``limit`` times the
    adapter's own change of the weight (default 1; ``float('inf')`` always merges, with the report)."""
    limit = float(limit)
    if not limit > 0:
        raise ValueError(f"The quantized merge limit must be a positive number, got {limit!r}.")
    adapter_state(model).quantized_merge_limit = limit


def merge_report(model: nn.Module) -> dict[str, MergeReport]:
    """Layer path -> :class:`MergeReport` of every quantized layer holding merged adapters now."""
    return {name: h.quant_report for name, h in hosts(model) if getattr(h, "quant_report", None) is not None}


# -- helpers for building quantized models ---------------------------------------------------------
def quantize_linear(layer: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A bitsandbytes copy of ``layer`` (``quant_type`` ``"nf4"``, ``"fp4"`` or ``"int8"``), quantized
    on ``layer``'s device."""
    import bitsandbytes as bnb

    device = layer.weight.device
    bias = layer.bias is not None
    if quant_type == "int8":
        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias, has_fp16_weights=False,
                                threshold=0.0, device="cpu")
    elif quant_type in ("nf4", "fp4"):
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias, quant_type=quant_type,
                              compress_statistics=double_quant, compute_dtype=compute_dtype, device="cpu")
    else:
        raise ValueError(f"quant_type must be 'nf4', 'fp4' or 'int8', got {quant_type!r}.")
    q.load_state_dict({k: v.detach().cpu() for k, v in layer.state_dict().items()})
    q = q.to(device)
    if quant_type != "int8" and layer.in_features % q.weight.quant_state.blocksize:
        # bitsandbytes' bf16 CPU inference kernel repacks the weight in blocks along a row and fails
        # on rows that are not whole blocks ("shape '[128, 0]' is invalid"): those layers keep the
        # dequantize + matmul path (what they run under autograd anyway)
        q.support_avx512bf16_for_cpu = False
    q.train(layer.training)
    for p in q.parameters():
        p.requires_grad_(False)
    return q


def float_copy(layer: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing with the dequantized weight of a quantized ``layer`` (the float
    reference; also what to merge into when a quantized merge is refused)."""
    w = dequantized_weight(layer)
    out = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out.train(layer.training).requires_grad_(False)


def quantize_model(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: Optional[torch.dtype] = None, device=None, skip=()) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (except those whose path is in ``skip`` or starts with
    ``skip`` + ``"."``) with its bitsandbytes copy (:func:`quantize_linear`), in place; each layer is
    moved to ``device`` (default: where it is) before it is quantized, so a float model on the CPU
    becomes a quantized one on the GPU without the float weights ever being there together. The
    layers diffusers' ``BitsAndBytesConfig`` would quantize (it converts every ``nn.Linear`` too),
    quantized in the same bitsandbytes layer types; returns the quantized layers' paths."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear
             and not any(n == s or n.startswith(s + ".") for s in skip)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = getattr(owner, child)
        if device is not None:
            layer = layer.to(device)
        setattr(owner, child, quantize_linear(layer, quant_type, double_quant, compute_dtype))
    return names


def _training_kernel_hook(module: nn.Module, args) -> None:
    module.training = True


def pin_training_kernels(model: nn.Module) -> list:
    """Make the bitsandbytes layers of ``model`` always run their training kernels, also under
    ``model.eval()`` (returns the hook handles; ``handle.remove()`` undoes it).

    For a training run that generates images between steps (validation, class images): on CPUs
    with AVX512-BF16, bitsandbytes' ``Linear4bit`` repacks its weight in place for a bf16 inference
    kernel at its first forward in eval mode without autograd, and forwards with autograd fail on
    the repacked weight afterwards ("a view of a leaf Variable that requires grad is being used in
    an in-place operation"). In train mode the layer computes with the dequantized weight (float
    exact) whatever autograd does; bitsandbytes layers have no dropout, so nothing else changes."""
    return [m.register_forward_pre_hook(_training_kernel_hook) for m in model.modules() if is_quantized(m)]


def quantize_pipeline(pipe: Any, quant_type: str, components: tuple = ("unet", "transformer")) -> dict[str, int]:
    """Quantize the Linear layers of ``pipe``'s denoiser (``components`` that it has) in place, on
    their device (:func:`quantize_model`); returns component -> quantized layers. For pipelines
    loaded in float (diffusers' ``BitsAndBytesConfig`` needs a GPU to load): adapters then load and
    switch live on the quantized layers as on float ones."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"Quantizing to {quant_type} needs bitsandbytes: pip install 'diffadapt[quantized]'.")
    done = {}
    for name in components:
        model = getattr(pipe, name, None)
        if isinstance(model, nn.Module):
            done[name] = len(quantize_model(model, quant_type))
            model.requires_grad_(False)
    if not done:
        raise ValueError(f"{type(pipe).__name__} has none of the components {list(components)} to quantize.")
    return done


def merge_or_keep_live(obj: Any, names=None) -> str:
    """``merge_adapters(obj, names)`` for a model or a pipeline with quantized layers, as one line
    to show: the requantization report when it merges (worst layer, how many), or, when a merge
    is refused (:class:`QuantizedMergeError`), every component unmerged and the adapters kept live
    (exact on the quantized layers) with the reason. Float-only models merge as usual ("")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizedMergeWarning)  # summarised in the returned line
        try:
            merge_adapters(obj, names)
        except QuantizedMergeError as exc:
            unmerge_adapters(obj)
            reason = str(exc).split(", so the merged model")[0].removeprefix("Refusing to merge ")
            return f"merge refused, adapters kept live on the quantized layers (exact): merging {reason}"
    models = adapted(obj) if not isinstance(obj, nn.Module) else {"": obj}
    reports = [r for m in models.values() for r in merge_report(m).values()]
    if not reports:
        return ""
    worst = max(reports, key=lambda r: r.relative_error)
    return (f"merged into {len(reports)} quantized layers (requantized): worst relative weight error "
            f"{worst.relative_error:.2e} at {worst.layer!r} ({worst.error_to_change:.2g}x the adapters' change); "
            "unmerging restores the quantized weights bit for bit")
