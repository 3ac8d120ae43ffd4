"""Quantized base layers, one layer at a time (bitsandbytes 4-bit NF4/FP4 and LLM.int8 Linear
layers; torchao and optimum-quanto weight-only quantized Linear layers through
:mod:`diffadapt.quantized_tensors`): what the runtime (:mod:`diffadapt.host`, targets, the plan)
asks of them. Model- and pipeline-level verbs and the builders are :mod:`diffadapt.quantized`.

* **Live adapters** treat the quantized layer as a black box: input rotations (OFT, BOFT, HRA)
  turn the input and call the quantized layer itself, output transforms and additive deltas
  (FourierFT, FRoD ``x dW^T``) are applied to its output. Nothing is dequantized per step, so the
  live adapter is exactly the adapter on the layer's own function.
* **Initialisation** (FRoD's bases, anything that reads the base weight) sees the dequantized
  float weight, computed once on the layer's device (:func:`dequantized_weight`).
* **Merging** dequantizes, composes the merged adapters in float32 and requantizes in the layer's
  own format (:func:`quantize_like`); the added quantization error is reported per layer
  (:class:`MergeReport`, and a :class:`QuantizedMergeWarning`). The original packed storage and
  its quant state are kept on the host, so unmerging restores them bit for bit. A merge whose
  requantization error is larger than ``limit`` times the adapter's own change of the weight
  (a typical adapter is smaller than a 4-bit code step, so rounding would mostly erase it) is
  refused before anything changes (:func:`refusal`).
* **Unsupported quantized layers** (other libraries, int8 / float8 weights on a plain Linear,
  bitsandbytes layers that are not quantized yet) are refused when an adapter is added or loaded,
  naming the layer and its type (:func:`check_supported`).

bitsandbytes is imported only when a bitsandbytes layer is met (``pip install diffadapt[quantized]``).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from diffadapt import quantized_tensors as QT
from diffadapt.methods.base import AdapterConfigError

BNB_4BIT = "bnb-4bit"
BNB_INT8 = "bnb-int8"
TORCHAO, QUANTO = QT.TORCHAO, QT.QUANTO  # quantized tensor-subclass weights (diffadapt.quantized_tensors)
UNSUPPORTED = "unsupported"
SUPPORTED = (BNB_4BIT, BNB_INT8, TORCHAO, QUANTO)
_TENSOR_KINDS = (TORCHAO, QUANTO)

# top-level packages whose modules are quantized layers (detected by name: nothing is imported)
_QUANT_PACKAGES = {
    "bitsandbytes", "torchao", "optimum", "quanto", "hqq", "auto_gptq", "gptqmodel", "awq", "exllama",
    "exllamav2", "eetq", "aqlm", "vptq", "compressed_tensors", "fbgemm_gpu", "higgs", "spqr", "bitnet",
}
_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                                        "float8_e8m0fnu", "float4_e2m1fn_x2") if hasattr(torch, n)}
DEFAULT_MERGE_LIMIT = 1.0


class UnsupportedQuantizedLayerError(AdapterConfigError):
    """A quantized layer type diffadapt cannot host adapters on (named, with its type)."""


class QuantizedMergeError(ValueError):
    """A merge into quantized layers refused before anything changed (the reason and what to do)."""


class QuantizedMergeWarning(UserWarning):
    """Merging into quantized layers added a requantization error (named per layer)."""


def _root(cls: type) -> str:
    return (cls.__module__ or "").split(".")[0]


def _bnb_class(module: nn.Module) -> Optional[str]:
    for cls in type(module).__mro__:
        if _root(cls) == "bitsandbytes" and cls.__name__ in ("Linear4bit", "Linear8bitLt"):
            return cls.__name__
    return None


def _state(module: nn.Module) -> tuple[str, str]:
    """``(kind, reason)``: kind is BNB_4BIT / BNB_INT8 / UNSUPPORTED / "" (not quantized)."""
    cls = _bnb_class(module)
    weight = getattr(module, "weight", None)
    if cls == "Linear4bit":
        if getattr(weight, "quant_state", None) is None or not getattr(weight, "bnb_quantized", True):
            return UNSUPPORTED, "its weight is not quantized yet: move the model to its device first"
        return BNB_4BIT, ""
    if cls == "Linear8bitLt":
        if getattr(weight, "dtype", None) != torch.int8:
            why = ("has_fp16_weights=True keeps float weights and requantizes them every call"
                   if getattr(weight, "has_fp16_weights", False) else "its weight is not quantized yet: move the model "
                   "to its device first")
            return UNSUPPORTED, why
        if _int8_scale(module) is None:
            return UNSUPPORTED, "its int8 weight has no scale (SCB)"
        return BNB_INT8, ""
    tensor_kind = QT.state(module)
    if tensor_kind is not None:
        return tensor_kind[0] or UNSUPPORTED, tensor_kind[1]
    if _root(type(module)) in _QUANT_PACKAGES:
        return UNSUPPORTED, f"a {_root(type(module))} layer"
    if isinstance(weight, Tensor):
        wtype = type(weight)
        if wtype not in (Tensor, nn.Parameter) and _root(wtype) != "torch":
            return UNSUPPORTED, f"its weight is a {wtype.__module__}.{wtype.__name__} tensor"
        if not weight.dtype.is_floating_point or weight.dtype in _FLOAT8:
            return UNSUPPORTED, f"its weight is {str(weight.dtype).removeprefix('torch.')}"
    return "", ""


def kind(module: nn.Module) -> str:
    """``"bnb-4bit"``, ``"bnb-int8"``, ``"torchao"``, ``"quanto"``, ``"unsupported"`` (a quantized
    layer diffadapt cannot adapt) or ``""`` (not quantized)."""
    return _state(module)[0]


def is_quantized(module: nn.Module) -> bool:
    """A supported quantized layer (adapters host it as a black box)."""
    return _state(module)[0] in SUPPORTED


def callable_as_black_box(module: nn.Module) -> bool:
    """Adapters may call the layer as a module (its input and output are the float activations)."""
    return is_quantized(module)


def can_requantize(module: nn.Module) -> bool:
    """A merged weight can be written back in the layer's own format (:func:`quantize_like`)."""
    k = kind(module)
    return k in (BNB_4BIT, BNB_INT8) or (k in _TENSOR_KINDS and QT.can_requantize(module, k))


def describe(module: nn.Module) -> str:
    """``"bitsandbytes Linear4bit (nf4, double-quantized)"`` and the like."""
    k = kind(module)
    name = f"{type(module).__module__.split('.')[0]} {type(module).__name__}"
    if k == BNB_4BIT:
        qs = module.weight.quant_state
        nested = qs.nested or getattr(qs, "original_nested", False)
        return f"{name} ({qs.quant_type}{', double-quantized' if nested else ''})"
    if k == BNB_INT8:
        return f"{name} (int8, threshold {getattr(module.state, 'threshold', 0.0):g})"
    if k in _TENSOR_KINDS:
        return QT.describe(module, k)
    return name


def check_supported(name: str, module: nn.Module) -> None:
    """Raise :class:`UnsupportedQuantizedLayerError` (one line, naming the layer and its type) for a
    quantized layer diffadapt cannot host; nothing for float or supported quantized layers."""
    k, reason = _state(module)
    if k == UNSUPPORTED:
        raise UnsupportedQuantizedLayerError(
            f"Module {name!r} is a quantized {type(module).__module__}.{type(module).__name__} ({reason}); diffadapt "
            "hosts adapters on float layers, bitsandbytes Linear4bit (nf4/fp4) and Linear8bitLt (int8 weights) layers "
            "and weight-only torchao / optimum-quanto (frozen QLinear) layers. Load this layer without quantization (or with bitsandbytes), or leave it out of target_modules."
        )


# -- weights ------------------------------------------------------------------------------------
def _bnb():
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:  # a bnb layer without bnb cannot exist, but say it clearly
        raise ImportError("bitsandbytes is needed for quantized layers: pip install 'diffadapt[quantized]'") from exc
    return bnbf


def _int8_scale(module: nn.Module) -> Optional[Tensor]:
    """The per-row absmax scale (``SCB``) of an int8 weight: on the weight before the first call,
    on the layer's matmul state after (bitsandbytes moves it)."""
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    return scb


@dataclass
class Storage:
    """A quantized layer's weight storage: the packed tensor and what decodes it (4-bit: the
    QuantState; int8: the per-row scale; torchao / quanto: the quantized weight tensor itself, no meta)."""

    kind: str
    data: Tensor
    meta: Any


def storage(module: nn.Module) -> Storage:
    """The layer's current storage (the live objects, not copies)."""
    k = kind(module)
    if k == BNB_4BIT:
        return Storage(k, module.weight.data, module.weight.quant_state)
    if k == BNB_INT8:
        return Storage(k, module.weight.data, _int8_scale(module))
    if k in _TENSOR_KINDS:
        return Storage(k, module.weight.detach(), None)
    raise TypeError(f"{type(module).__name__} is not a supported quantized layer")


def snapshot(module: nn.Module) -> Storage:
    """A copy of the layer's storage that nothing else holds (bitsandbytes mutates quant states in
    place, e.g. when it repacks a 4-bit weight for its CPU kernel): :func:`write` puts it back bit for bit."""
    s = storage(module)
    if s.kind in _TENSOR_KINDS:  # a quantized weight tensor is replaced on write, never changed in place
        return s
    return Storage(s.kind, s.data.detach().clone(), copy.deepcopy(s.meta) if s.kind == BNB_4BIT else s.meta.clone())


def dequantize(s: Storage) -> Tensor:
    """The float weight a storage decodes to, ``(out_features, in_features)``, on its device."""
    if s.kind in _TENSOR_KINDS:
        return QT.dequantize(s.data)
    if s.kind == BNB_INT8:
        return s.data.float() * (s.meta.float().unsqueeze(1) / 127.0)
    bnbf = _bnb()
    qs = s.meta
    if getattr(qs, "packing_format_for_cpu", False):  # bitsandbytes' AVX512-BF16 inference layout
        state = copy.deepcopy(qs)
        state.original_nested = False  # keep the (bf16) absmax the kernel uses, not a re-quantized one
        packed, state = bnbf._convert_weight_packed_for_cpu_inverse(s.data.clone(), state)
        state.absmax = qs.absmax.T.reshape(-1).float()
        state.dtype = qs.original_dtype
        return bnbf.dequantize_4bit(packed, state)
    return bnbf.dequantize_4bit(s.data, qs)


def dequantized_weight(module: nn.Module) -> Tensor:
    """The layer's weight as a float ``(out_features, in_features)`` tensor on its device, in the
    dtype it was quantized from (one dequantization; never called per step)."""
    return dequantize(storage(module))


def quantize_like(module: nn.Module, w2d: Tensor, like: Optional[Storage] = None) -> Storage:
    """``w2d`` quantized in the format of ``like`` (default: the layer's storage), not written."""
    like = like or storage(module)
    if like.kind in _TENSOR_KINDS:
        return Storage(like.kind, QT.quantize_like(module, like.data, like.kind, w2d), None)
    bnbf = _bnb()
    if like.kind == BNB_INT8:
        cb, scb, _ = bnbf.int8_vectorwise_quant(w2d.to(torch.float16).contiguous())
        return Storage(BNB_INT8, cb.to(like.data.device), scb.to(like.meta.dtype))
    qs = like.meta
    packed_cpu = getattr(qs, "packing_format_for_cpu", False)
    nested = getattr(qs, "original_nested", qs.nested) if packed_cpu else qs.nested
    dtype = qs.original_dtype if packed_cpu else qs.dtype
    storage_dtype = getattr(qs, "original_storage_type", None) or (torch.uint8 if packed_cpu else like.data.dtype)
    data, state = bnbf.quantize_4bit(
        w2d.to(dtype).contiguous(), blocksize=qs.blocksize, compress_statistics=nested, quant_type=qs.quant_type,
        quant_storage=storage_dtype,
    )
    return Storage(BNB_4BIT, data, state)


def write(module: nn.Module, s: Storage) -> None:
    """Make ``s`` the layer's storage (its tensors are taken, not copied)."""
    if s.kind in _TENSOR_KINDS:
        QT.write(module, s.data)
        return
    weight = module.weight
    if s.kind == BNB_4BIT:
        weight.data = s.data
        weight.quant_state = s.meta
        if getattr(module, "quant_state", None) is not None:
            module.quant_state = s.meta
        return
    if weight.data.shape == s.data.shape:
        weight.data.copy_(s.data)  # CB is the weight's data (also on the layer's state)
    else:
        weight.data = s.data
    current = _int8_scale(module)
    current.copy_(s.meta)


# -- merging ------------------------------------------------------------------------------------
@dataclass
class MergeReport:
    """One layer's requantization: relative weight error ``||Q(W_eff) - W_eff|| / ||W_eff||`` and its
    ratio to the adapter's own change ``||W_eff - W||`` (inf when the adapter changes nothing);
    ``cannot_requantize``: the layer's format has no requantizer (the merge is refused, errors nan)."""

    layer: str
    layer_type: str
    relative_error: float
    error_to_change: float
    cannot_requantize: bool = False


def plan_merge(name: str, module: nn.Module, original: Storage, w_eff: Tensor) -> tuple[Storage, MergeReport]:
    """``w_eff`` (float32, from the dequantized ``original``) requantized, with its report; nothing written
    (a format without a requantizer: no storage, a report that refuses the merge)."""
    if not can_requantize(module):
        return None, MergeReport(name, describe(module), math.nan, math.nan, cannot_requantize=True)
    new = quantize_like(module, w_eff, original)
    w0 = dequantize(original).to(w_eff.dtype)
    wq = dequantize(new).to(w_eff.dtype)
    err = (wq - w_eff).norm().item()
    change = (w_eff - w0).norm().item()
    rel = err / max(w_eff.norm().item(), 1e-30)
    ratio = err / change if change > 0 else (0.0 if err == 0 else math.inf)
    return new, MergeReport(name, describe(module), rel, ratio)


def merge_limit(plan) -> float:
    return getattr(plan, "quantized_merge_limit", DEFAULT_MERGE_LIMIT)



def refusal(reports: list[MergeReport], limit: float, names: list[str]) -> Optional[str]:
    """The one-line reason to refuse merging ``names`` (None: merge). Layers whose adapter changes
    nothing (ratio inf from requantization noise alone) never refuse; a layer whose format cannot
    be requantized always does."""
    cant = [r for r in reports if r.cannot_requantize]
    if cant:
        return (
            f"Refusing to merge {names} into quantized layers: {cant[0].layer!r} ({cant[0].layer_type}) cannot be "
            f"requantized in its format ({len(cant)} of {len(reports)} quantized layers), so the merged model cannot be "
            "written. Keep the adapters live (exact on the quantized layers), or merge into a float copy of the model "
            "(load it without quantization, or quantize it in a format diffadapt requantizes)."
        )
    bad = [r for r in reports if r.error_to_change > limit and math.isfinite(r.error_to_change)]
    if not bad:
        return None
    worst = max(bad, key=lambda r: r.error_to_change)
    return (
        f"Refusing to merge {names} into quantized layers: requantizing {worst.layer!r} ({worst.layer_type}) would add an "
        f"error {worst.error_to_change:.2g}x the adapters' own change of its weight (relative weight error "
        f"{worst.relative_error:.2e}; {len(bad)} of {len(reports)} quantized layers above the limit {limit:g}), so the "
        "merged model would lose most of the adapter. Keep the adapters live (exact on the quantized layers), or merge "
        "into a float copy of the model (load it without quantization); "
        "diffadapt.quantized.set_merge_limit(model, float('inf')) merges anyway."
    )


def warn_merged(reports: list[MergeReport]) -> None:
    if not reports:
        return
    worst = max(reports, key=lambda r: r.relative_error)
    more = f" ({len(reports)} quantized layers, diffadapt.quantized.merge_report(model) lists each)" if len(reports) > 1 else ""
    warnings.warn(
        f"Merging requantized {worst.layer!r} ({worst.layer_type}) with relative weight error "
        f"{worst.relative_error:.2e} ({worst.error_to_change:.2g}x the adapters' change){more}; the live adapters are "
        "exact and unmerging restores the quantized weights bit for bit.",
        QuantizedMergeWarning,
        stacklevel=4,
    )


# -- helpers for building quantized models ---------------------------------------------------------
