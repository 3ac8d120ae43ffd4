"""Quantized weights held as tensor subclasses: torchao (``quantize_(model, Int8WeightOnlyConfig())``,
``IntxWeightOnlyConfig(weight_dtype=torch.int4, ...)``, ...) on a plain ``nn.Linear``, and
optimum-quanto's frozen ``QLinear`` (``quantize(model, weights=qint8 / qint4); freeze(model)``).

:mod:`diffadapt.quantized` asks this module about such layers and treats them as it treats
bitsandbytes layers: the layer is called as a black box by live adapters, initialisation and
merging see ``weight.dequantize()``, merges requantize with the library's own quantizer in the
layer's format. Nothing here imports torchao or optimum-quanto before such a layer is met.

Supported: weight-only quantization (activations stay float, so the layer is a differentiable
function of its input). A layer that also quantizes activations, a quanto layer not frozen yet, or
a torchao weight without ``dequantize`` is refused with the reason. Requantizing is implemented for
torchao's ``Int8Tensor`` and ``IntxUnpackedToInt8Tensor`` (the CPU int8 / int4 weight-only formats)
and every quanto weight; merging into other torchao formats (float8, the GPU int4 packings) is
refused before anything changes (the adapter stays live, or merge into a float copy).
"""

from __future__ import annotations

from types import SimpleNamespace

from torch import Tensor, nn

TORCHAO = "torchao"
QUANTO = "quanto"


def _root(cls: type) -> str:
    return (cls.__module__ or "").split(".")[0]


def _is_quanto_layer(module: nn.Module) -> bool:
    return any(_root(c) == "optimum" and c.__name__ == "QModuleMixin" for c in type(module).__mro__)


def state(module: nn.Module) -> tuple[str, str] | None:
    """``(kind, reason)`` for a torchao / quanto layer (kind ``""`` with a reason: refused), None
    for any other layer."""
    weight = getattr(module, "weight", None)
    if _is_quanto_layer(module):
        if getattr(module, "activation_qtype", None) is not None:
            return "", f"its activations are quantized too ({module.activation_qtype.name})"
        if getattr(module, "weight_qtype", None) is None or not getattr(module, "frozen", False):
            return "", "its weight is not frozen to a quantized tensor yet: call optimum.quanto.freeze(model) first"
        return QUANTO, ""
    if isinstance(weight, Tensor) and _root(type(weight)) == TORCHAO:
        if not hasattr(weight, "dequantize"):
            return "", f"a torchao {type(weight).__name__} weight without dequantize()"
        if getattr(weight, "act_quant_kwargs", None) is not None or getattr(weight, "activation_quantization", None):
            return "", f"its torchao {type(weight).__name__} weight quantizes activations too"
        return TORCHAO, ""
    return None


def dequantize(weight: Tensor) -> Tensor:
    """The float ``(out_features, in_features)`` weight, in the dtype it was quantized from."""
    return weight.dequantize()


def describe(module: nn.Module, kind: str) -> str:
    w = module.weight
    if kind == QUANTO:
        group = getattr(module, "weight_group_size", None)
        return f"optimum-quanto {type(module).__name__} ({module.weight_qtype.name} weights{f', group {group}' if group else ''})"
    bits = str(getattr(w, "target_dtype", None) or getattr(w, "qdata", w).dtype).removeprefix("torch.")
    return f"torchao {type(w).__name__} ({bits} weight-only, block {tuple(getattr(w, 'block_size', ()))})"


def can_requantize(module: nn.Module, kind: str) -> bool:
    """A merged weight can be written back in the layer's own format (:func:`quantize_like`)."""
    w = module.weight
    if kind == QUANTO or type(w).__name__ == "IntxUnpackedToInt8Tensor":
        return True
    return type(w).__name__ == "Int8Tensor" and tuple(w.block_size) in ((1, w.shape[1]), tuple(w.shape))


def _symmetric(weight: Tensor):
    from torchao.quantization.quant_primitives import MappingType

    zp = getattr(weight, "zero_point", None)
    return MappingType.SYMMETRIC if zp is None or not zp.any() else MappingType.ASYMMETRIC


def quantize_like(module: nn.Module, like: Tensor, kind: str, w2d: Tensor) -> Tensor:
    """``w2d`` quantized by the library in the format of the quantized weight ``like`` (same
    dtype, qtype, block / group size and mapping), not written."""
    w2d = w2d.to(like.dtype).contiguous()
    if kind == QUANTO:  # the layer's own quantizer (QModuleMixin.qweight) on a float weight
        spec = SimpleNamespace(weight=w2d, weight_qtype=module.weight_qtype, optimizer=module.optimizer,
                               weight_group_size=module.weight_group_size, activation_qtype=None)
        return type(module).qweight.fget(spec)
    cls = type(like)
    if cls.__name__ == "IntxUnpackedToInt8Tensor":
        return cls.from_hp(w2d, tuple(like.block_size), like.target_dtype, mapping_type=_symmetric(like))
    from torchao.quantization import PerRow, PerTensor

    granularity = PerRow() if tuple(like.block_size) == (1, like.shape[1]) else PerTensor()
    return cls.from_hp(w2d, granularity, mapping_type=_symmetric(like), reduce_range=getattr(like, "reduce_range", False))


def write(module: nn.Module, weight: Tensor) -> None:
    """Make ``weight`` (a quantized tensor) the layer's weight; the tensor it replaces is not changed."""
    module.weight = nn.Parameter(weight, requires_grad=False)


def inner_tensors(weight: Tensor) -> dict[str, Tensor]:
    """The plain tensors a quantized weight stores (its ``__tensor_flatten__`` leaves, packed ones
    unpacked to their stored bytes), to compare storage bit for bit."""
    names, _ = weight.__tensor_flatten__()
    out = {}
    for name in names:
        t = getattr(weight, name)
        if type(t) not in (Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            out.update({f"{name}.{k}": v for k, v in inner_tensors(t).items()})
        else:
            out[name] = t
    return out
