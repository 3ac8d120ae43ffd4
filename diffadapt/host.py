"""AdapterHost: one wrapper layer, for every method, around one base Linear / Conv1D / Conv2d.

A host keeps several named adapters (``AdapterSlot``) and computes the layer with the active
ones composed in *activation order*: the first active adapter is the first to touch the
input. In weight terms, with ``f_k`` the weight map of adapter ``k``
(``W -> diag(s) W R^T`` for rotations, ``W -> W + dW`` for additive methods)::

    W_eff = f_1(f_2(... f_n(W)))

Unmerged, this is evaluated on activations: rotations turn the running input, additive
adapters add ``z_k @ dW_k^T`` (scaled by the output scales of the rotations before them), and
the base layer runs last on the fully rotated input. Merging writes exactly ``W_eff`` of the
merged adapters into the base weight; the original weight is kept on the host so unmerging
restores it bit for bit. Merged adapters are the innermost ones (``diffadapt.plan``). Which
adapters run, with which strengths, and their per-step factors (prepared for all layers at
once) come from the model's plan.
"""

from __future__ import annotations

import copy
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from diffadapt import quantized_layers as quantized
from diffadapt.fused import FoldedLinear, ScaleBias, ScaledLinear, as_dtype, compose
from diffadapt.methods.base import AdapterConfig, LayerSpec, Method

SUPPORTED_LAYERS = (nn.Linear, Conv1D, nn.Conv2d)


def layer_spec(name: str, module: nn.Module) -> LayerSpec:
    """Describe a supported base layer for the method math (an unsupported quantized layer is refused, named)."""
    quantized.check_supported(name, module)
    if isinstance(module, nn.Linear):
        return LayerSpec(name, "linear", module.out_features, module.in_features)
    if isinstance(module, Conv1D):
        return LayerSpec(name, "conv1d", module.nf, module.weight.shape[0])
    if isinstance(module, nn.Conv2d):
        return LayerSpec(
            name, "conv2d", module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size)
        )
    raise TypeError(
        f"Module {name!r} is a {type(module).__name__}; diffadapt adapts nn.Linear, transformers Conv1D and "
        "nn.Conv2d layers."
    )


def weight_2d(module: nn.Module) -> Tensor:
    """The base weight as ``(out_features, fan_in)`` (a view, no copy; for a quantized layer its
    dequantized copy, see :mod:`diffadapt.quantized`)."""
    if quantized.is_quantized(module):
        return quantized.dequantized_weight(module)
    return float_weight_2d(module)


def float_weight_2d(module: nn.Module) -> Tensor:
    """:func:`weight_2d` of a float layer (no quantization check: the forward's path, which
    ``torch.compile`` traces, asks the host's ``quantized`` flag instead)."""
    if isinstance(module, Conv1D):
        return module.weight.T
    return module.weight.flatten(1)


class SharedState(nn.Module):
    """Fixed tensors shared by a group of layers (e.g. FRoD's basis); one object, many users."""

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__()
        for key, value in tensors.items():
            self.register_buffer(key, value, persistent=False)


class AdapterSlot(nn.Module):
    """One named adapter on one layer: its config, trainable parameters and fixed buffers."""

    def __init__(
        self,
        method: type[Method],
        config: AdapterConfig,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        shared: Optional[SharedState] = None,
    ):
        super().__init__()
        self.method = method
        self.config = config
        self.param_names = tuple(params)
        for key, value in params.items():
            self.register_parameter(key, nn.Parameter(value))
        for key, value in buffers.items():
            self.register_buffer(key, value, persistent=False)
        self.shared = shared

    # called per layer and forward: the module's own dicts, not named_buffers()' generators
    def params(self) -> dict[str, Tensor]:
        return {key: self._parameters[key] for key in self.param_names}

    def buffers_dict(self) -> dict[str, Tensor]:
        out = {} if self.shared is None else {k: v for k, v in self.shared._buffers.items() if v is not None}
        out.update((k, v) for k, v in self._buffers.items() if v is not None)
        return out

    def prepare(self, strength: Union[float, Tensor], training: bool):
        return self.method.prepare(self.config, self.params(), self.buffers_dict(), strength, training)


# An outermost output scale s (BOFT's) is fused into the base product (ScaledLinear: the weight scaled in
# forward and again in backward, 2 d_out d_in multiplies) where the layer's tokens T are at least this many
# times d_in; with fewer it is applied to the output (ScaleBias: two more passes over it, 2 T d_out):
# SD1.5's 1280-wide layers at 64 tokens scale 20x fewer numbers that way.
_FUSED_SCALE_TOKENS = 1

# How many weight-path multiply-adds one of the activation path's rotation multiply-adds is worth
# (AdapterHost._rotates_weight): the weight path is one plain GEMM and one bmm over the weight's rows, the
# activation path strided bmm views of the tokens (small gauge, paired, x PEFT LoRA step: 1 -> 2 took
# BOFT 1.085 -> 1.035 and HRA 0.959 -> 0.915, OFT level; 3 and 5 no better; no sd15w layer flips).
_WEIGHT_PATH_GAIN = 2.0


def _sole_owner(weight: Tensor) -> bool:
    """Whether ``weight`` (a plain, contiguous parameter) is the only tensor on its storage, which
    it fills: then its data may be swapped for a merged tensor without anyone else seeing a change."""
    if type(weight.data) is not torch.Tensor or weight._base is not None or not weight.is_contiguous():
        return False
    storage = weight.untyped_storage()
    if storage.nbytes() != weight.numel() * weight.element_size():
        return False
    try:
        return torch._C._storage_Use_Count(storage._cdata) <= 2  # the tensor and ``storage`` here
    except (AttributeError, RuntimeError):  # a torch without the counter: copy, as before
        return False


class AdapterHost(nn.Module):
    """Wraps ``base_layer`` and hosts named adapters on it (see module docstring).

    What runs is the model's :class:`~diffadapt.plan.AdapterPlan`'s business (``plan``); the
    host holds the adapters' parameters, and the original base weight while adapters are merged.
    """

    def __init__(self, base_layer: nn.Module, name: str):
        super().__init__()
        self.base_layer = base_layer
        self.spec = layer_spec(name, base_layer)
        self.adapters = nn.ModuleDict()
        self.plan = None  # set by AdapterPlan.attach
        self.index = -1
        self.register_buffer("original_weight", None, persistent=False)
        self.swapped = False  # while merged: original_weight is the weight's own former tensor (see keep_original)
        # quantized base (diffadapt.quantized): called as a module; merges requantize, the original
        # packed storage is kept here while merged (restored bit for bit)
        self.quantized = quantized.is_quantized(base_layer)
        self.quant_original: Optional[quantized.Storage] = None
        self.quant_report: Optional[quantized.MergeReport] = None

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (for model code that reads ``layer.weight``, e.g. T5's
        feed-forward dtype check; adapters never change it while live)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    def add(self, adapter_name: str, slot: AdapterSlot) -> None:
        if adapter_name in self.adapters:
            raise ValueError(f"Layer {self.spec.name!r} already has an adapter named {adapter_name!r}.")
        self.adapters[adapter_name] = slot

    # -- weights ------------------------------------------------------------------------------
    compose = staticmethod(compose)  # f_1(...f_n(W)) of (method, factors) steps in activation order

    def effective_weight(self) -> Tensor:
        """The 2-D weight the layer computes with now (merged and live adapters)."""
        steps = self.plan.steps_for(self) if self.plan is not None else []
        return self.compose(weight_2d(self.base_layer), steps)

    def base_weight(self) -> Tensor:
        """The layer's own weight without any adapter (the kept original while merged)."""
        if self.quantized:  # dequantized, (out, in)
            return quantized.dequantize(self.quant_original or quantized.storage(self.base_layer))
        return self.original_weight if self.original_weight is not None else self.base_layer.weight

    @torch.no_grad()
    def bake(self, steps: list) -> None:
        """Write ``f_1(...f_n(W))`` of ``steps`` into the base weight, from the original weight
        (kept on the host, so :meth:`restore` is bit-exact); no steps = restore. The product is
        computed in float32 (float64 for a float64 model) and written once."""
        if not steps:
            self.restore()
            return
        if self.quantized:
            self.bake_quantized(self.plan_quantized_merge(steps))
            return
        self.bake_many([(self, steps)])

    @staticmethod
    @torch.no_grad()
    def bake_many(pairs: list) -> None:
        """:meth:`bake` of float hosts ``[(host, steps), ...]`` (steps never empty): every layer's
        product from its kept original (no restoring copy first), written by one foreach copy (an
        additive outermost step on a float32/64 weight: ``+ dW`` added straight into the weight)."""
        if not pairs:
            return
        weights = [host.base_layer.weight for host, _ in pairs]
        for (host, _), weight in zip(pairs, weights):
            host.keep_original(weight)
        rest = []
        for (host, steps), weight in zip(pairs, weights):
            original = host._as_2d(host.original_weight)
            compute = torch.float64 if original.dtype == torch.float64 else torch.float32
            (method, prep), inner = steps[0], steps[1:]  # the outermost step acts last
            inner_w = AdapterHost.compose(original.to(compute), inner) if inner else original.to(compute)
            if not method.multiplicative and method.delta_fields and original.dtype == compute:
                # an additive outermost step on a float32/64 weight: + dW straight into the weight, or
                # (swapped) into dW's own buffer, which becomes the weight -- the same sum either way
                dw = method.delta_weight(prep, compute)
                if not host.swapped:
                    torch.add(inner_w, dw, out=host._as_2d(weight))
                else:
                    rest.append((host, weight, dw.add_(inner_w) if _sole_owner(dw) else inner_w + dw))
            else:
                rest.append((host, weight, method.apply_to_weight(inner_w, prep)))
        copies = []
        for host, weight, new in rest:
            new = host._from_2d(new).to(weight.dtype)
            if host.swapped:  # the merged tensor becomes the weight; the former one stays as the original
                weight.data = new if new.is_contiguous() else new.contiguous()
            else:
                copies.append((weight, new))
        if copies:
            torch._foreach_copy_([w for w, _ in copies], [new for _, new in copies])

    def keep_original(self, weight: Tensor) -> None:
        """Keep the unmerged weight for a bit-exact unmerge. When nothing else holds the weight's
        storage (no view, no other tensor: a state_dict taken earlier, a tied weight, FSDP's flat
        parameter), the weight's own tensor is kept and merging installs a new one, unmerging puts
        the old one back -- no copies (at SD1.5 size a clone and a copy back were half of a
        merge+unmerge); otherwise a clone is kept and the merged values are copied in."""
        if self.original_weight is not None:
            return
        if _sole_owner(weight):
            self.original_weight, self.swapped = weight.data, True
        else:
            self.original_weight, self.swapped = weight.detach().clone(), False

    def _as_2d(self, weight: Tensor) -> Tensor:
        """A tensor shaped like the base weight as ``(out_features, fan_in)`` (a view)."""
        return weight.T if isinstance(self.base_layer, Conv1D) else weight.flatten(1)

    def _from_2d(self, w2d: Tensor) -> Tensor:
        """The inverse of :meth:`_as_2d`: ``(out_features, fan_in)`` back in the weight's layout."""
        return w2d.T if isinstance(self.base_layer, Conv1D) else w2d.reshape(self.base_layer.weight.shape)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original base weight back, bit-exactly."""
        if self.quant_original is not None:
            quantized.write(self.base_layer, self.quant_original)
            self.quant_original = self.quant_report = None
            self.clear_cache()
        if self.original_weight is None:
            return
        if self.swapped:
            self.base_layer.weight.data = self.original_weight
        else:
            self.base_layer.weight.copy_(self.original_weight)
        self.original_weight, self.swapped = None, False

    # quantized base layers: dequantize -> compose (float32) -> requantize; original storage kept
    @torch.no_grad()
    def plan_quantized_merge(self, steps: list) -> tuple[quantized.Storage, quantized.MergeReport]:
        """The requantized ``f_1(...f_n(W))`` of ``steps`` from the original storage, and its error
        report; nothing is written (the plan may refuse it first)."""
        original = self.quant_original or quantized.storage(self.base_layer)
        w = quantized.dequantize(original).float()
        return quantized.plan_merge(self.spec.name, self.base_layer, original, self.compose(w, steps))

    @torch.no_grad()
    def bake_quantized(self, merge: tuple[quantized.Storage, quantized.MergeReport]) -> None:
        if self.quant_original is None:
            self.quant_original = quantized.snapshot(self.base_layer)
        quantized.write(self.base_layer, merge[0])
        self.quant_report = merge[1]
        self.clear_cache()

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        preps = self.plan.steps_for(self) if self.plan is not None else ()
        if not preps:  # no live adapter: the base layer runs untouched (bit-exact)
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        keep = (not torch.is_grad_enabled() and not self.training and self.plan.keep_eval_weights
                and not self.quantized  # a quantized layer is called as a module, never dequantized per step
                and not torch.compiler.is_compiling())  # a compiled graph keeps no Python-side state
        if keep:  # generating: the kept W_eff, one plain layer call
            w = self._folded_weight(preps, x.dtype)
            if isinstance(base, nn.Conv2d):
                return base._conv_forward(x, w.reshape(base.weight.shape), base.bias)
            return F.linear(x, w, base.bias)
        if isinstance(base, nn.Conv2d):
            w = self.compose(weight_2d(base) if self.quantized else float_weight_2d(base), preps).to(x.dtype)
            return base._conv_forward(x, w.reshape(base.weight.shape), base.bias)
        if not self.quantized and self._rotates_weight(x, preps):  # many tokens for the width: F.linear(x, f(W))
            w = self.compose(float_weight_2d(base), preps).to(x.dtype)
            return F.linear(x, w, None if base.bias is None else as_dtype(base.bias, x.dtype))
        # forward sweep: rotate the input, remember each adapter's per-step factors; additive
        # adapters after the last rotation may fold W + dW into the base product instead;
        # backward sweep: y = T_1(... T_k(base(z_n)) + d_k ...), bias last (never transformed)
        last_rotation = -1
        for i, (method, _) in enumerate(preps):
            if method.multiplicative:
                last_rotation = i
        z, steps, folds = x, [], []
        for i, (method, prep) in enumerate(preps):
            if method.multiplicative:
                z = method.rotate_input(z, prep)
                steps.append((method, prep, None))
            elif (i > last_rotation and not self.quantized and method.delta_fields and method.may_fold(prep)
                  and method.fold_into_weight(z, prep)):
                folds.append((method, prep))
            else:
                steps.append((method, prep, method.delta_output(z, prep)))
        if all(delta is None and method.output_is_identity(prep) for method, prep, delta in steps):
            return self._base_product(z, folds, base.bias)  # nothing after the base product: bias fused
        scale = None  # an outermost pure output scale (BOFT's s) is fused with the bias
        if steps and steps[0][2] is None and torch.is_grad_enabled():
            scale = steps[0][0].scale_only(steps[0][1])
            steps = steps[1:] if scale is not None else steps
        if (scale is not None and not steps and not folds and not self.quantized
                and z.numel() // z.shape[-1] >= _FUSED_SCALE_TOKENS * z.shape[-1]):  # s (z W^T) + b, one product
            return ScaledLinear.apply(z, float_weight_2d(base), *scale, base.bias)
        y = self._base_product(z, folds)
        for method, prep, delta in reversed(steps):
            y = method.transform_output(y, prep) if delta is None else y + delta.to(y.dtype)
        if scale is not None:
            return ScaleBias.apply(y, *scale, base.bias)
        if base.bias is not None:
            y = y + base.bias
        return y

    def _rotates_weight(self, x: Tensor, preps: list) -> bool:
        """Whether this layer's rotations (every live step a rotation) are cheaper applied to the
        weight than to the activations (a shape test, no host sync). A rotation of width ``k`` of
        the ``d`` rotated features costs ``T d k`` multiply-adds on the ``T`` token rows and ``3 T d k``
        with its backward; on the weight, ``c d k`` for the other side's ``c`` channels, three
        times with backward, plus the weight's gradient ``g^T x``, ``T d_out d_in`` (one GEMM,
        on the CPU the cheapest multiply-adds there are: _WEIGHT_PATH_GAIN weighs them)."""
        if not all(method.multiplicative for method, _ in preps):
            return False
        tokens = x.numel() // x.shape[-1]
        d_out, d_in = self.spec.out_features, self.spec.fan_in
        act = weight = 0
        for method, prep in preps:
            k = method.rotation_width(prep)
            if k is None:
                return False
            other, d = (d_in, d_out) if method.rotates_output(prep) else (d_out, d_in)
            act, weight = act + tokens * d * k, weight + other * d * k
        if not torch.is_grad_enabled():
            return weight <= act
        return tokens * d_out * d_in + 3 * weight <= _WEIGHT_PATH_GAIN * 3 * act

    def _base_product(self, z: Tensor, folds: list, bias: Optional[Tensor] = None) -> Tensor:
        """``z W_eff^T (+ bias)`` for the additive adapters ``folds`` folded into the base weight
        (under autograd with ``dW`` rebuilt in backward where the method has a cheap adjoint). A
        quantized layer is called as the module itself (its own kernel, nothing folded), its own
        bias taken out again unless ``bias`` is asked for: the bias is added last, after the output
        maps, as for every layer."""
        if self.quantized:
            y = self.base_layer(z)
            if bias is not None or self.base_layer.bias is None:
                return y
            return y - self.base_layer.bias.to(y.dtype)
        w = float_weight_2d(self.base_layer)
        bias = None if bias is None else as_dtype(bias, z.dtype)
        if not folds:
            return F.linear(z, w.to(z.dtype), bias)
        if torch.is_grad_enabled() and all(m.delta_weight_backward is not None for m, _ in folds):
            factors = [getattr(prep, f) for method, prep in folds for f in method.delta_fields]
            return FoldedLinear.apply(z, w, bias, tuple(folds), *factors)
        return F.linear(z, self.compose(w, folds).to(z.dtype), bias)  # a method without an adjoint

    def _folded_weight(self, folds: list, dtype: torch.dtype) -> Tensor:
        """``W_eff`` of ``folds`` (``(method, factors)`` steps) in ``dtype`` (eager only), kept while the factors
        (the plan reuses them while parameters and strengths are unchanged) and the base weight
        stay the same: in eval a live adapter costs one weight copy per layer instead of work per
        forward (``set_keep_eval_weights(model, False)`` turns the copy off; merging needs none)."""
        weight = self.base_layer.weight
        key = (weight._version, weight.data_ptr(), dtype, len(folds))
        cached = self.__dict__.get("_weight_cache")
        if cached is not None and cached[0] == key and all(a[1] is b[1] for a, b in zip(cached[1], folds)):
            return cached[2]
        w = self.compose(float_weight_2d(self.base_layer), folds).to(dtype)  # never quantized (see forward)
        self.__dict__["_weight_cache"] = (key, list(folds), w)
        self.plan.weights_kept = True
        return w

    def clear_cache(self) -> None:
        self.__dict__.pop("_weight_cache", None)

    def extra_repr(self) -> str:
        if self.plan is None:
            return f"adapters={list(self.adapters)}"
        live = ", ".join(f"{n}@{self.plan.strength(n):g}" for n in self.plan.live() if n in self.adapters) or "-"
        merged = ", ".join(n for n in self.plan.merged if n in self.adapters) or "-"
        return f"adapters={list(self.adapters)}, live=[{live}], merged=[{merged}]"


class SavedModuleHost(nn.Module):
    """PEFT's ``modules_to_save``: a trainable copy of a whole module per adapter.

    The copy of the first chosen adapter with a non-zero strength that has one replaces the
    module (merged or not: merging leaves copies as they are); disabled adapters and strength 0
    use the original module. A copy cannot be blended.
    """

    def __init__(self, original: nn.Module, name: str):
        super().__init__()
        self.original_module = original
        self.name = name
        self.copies = nn.ModuleDict()
        self.plan = None  # set by AdapterPlan.attach

    def add(self, adapter_name: str) -> nn.Module:
        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        self.copies[adapter_name] = clone
        return clone

    def chosen(self) -> Optional[str]:
        if self.plan is None or self.plan.disabled:
            return None
        return next((n for n, s in self.plan.order if n in self.copies and s != 0.0), None)

    def forward(self, *args, **kwargs):
        name = self.chosen()
        module = self.copies[name] if name is not None else self.original_module
        return module(*args, **kwargs)
