"""The contract between one method's math and the adapter runtime.

A method is one file under ``diffadapt/methods/`` holding

* a config dataclass (subclass of :class:`AdapterConfig`) with the method's hyper-parameters,
  field-level validation (``validate``) and layer-level validation (``check_layer``), and
* a stateless :class:`Method` subclass: pure tensor functions, no ``nn.Module`` bookkeeping.

The runtime (``diffadapt.host``) owns parameters and buffers, decides when to call what, and
composes several adapters on one layer. It talks to every method through this contract only.

Conventions
-----------
* ``x`` is a batch of activations with the feature dimension last, ``(..., in_features)``.
* ``W`` is the layer weight as a 2-D matrix ``(out_features, fan_in)``: ``nn.Linear.weight``,
  ``transformers`` ``Conv1D.weight.T``, or ``nn.Conv2d.weight.flatten(1)`` (``fan_in =
  in_channels/groups * kh * kw``). The layer computes ``y = x @ W.T + b``.
* A *multiplicative* method (OFT, BOFT, HRA) has ``W_eff = P @ W @ R.T`` with ``R`` acting
  on the input side and ``P`` an optional linear map of the output features (BOFT's scale
  ``diag(s)``; an output-side rotation), i.e. ``y = ((x @ R) @ W.T) @ P.T + b`` -- the bias
  is never transformed. ``rotate_input`` computes ``x @ R``; ``transform_output`` computes
  ``y @ P.T`` (default: ``y * output_scale`` or ``y``); ``apply_to_weight`` returns
  ``P @ W @ R.T`` (merge, and conv layers).
* An *additive* method (FourierFT, FRoD) has ``W_eff = W + dW``. ``delta_output`` computes
  ``x @ dW.T`` and ``apply_to_weight`` returns ``W + dW``.
* ``strength`` (a float or 0-d tensor) scales the adapter: 0 must give the base layer exactly
  and 1 the trained adapter exactly; each method documents what happens in between.
* ``prepare_many`` runs once per forward of the model for all layers of one shape group
  (``stack_key``) and turns their parameters into the small per-step factors (rotation
  blocks, WY factors, ...) in one batched op sequence; ``prepare`` is its one-layer case.
  Everything else takes its output. It must not sync with the host (no ``.item()``, no
  Python branching on tensor values) so that the whole forward compiles with
  ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Hashable, Optional, Union

from torch import Tensor

from diffadapt import patterns


def pattern_matches(pattern: str, name: str, field: str = "pattern") -> bool:
    """``pattern`` is a module-name suffix (``"attn1.to_q"``) or a full-match regex (bounded:
    see :mod:`diffadapt.patterns`; ``field`` names it in a refusal)."""
    if name == pattern or name.endswith("." + pattern):
        return True
    return patterns.fullmatch(pattern, name, field)


def _strings(value: Any) -> bool:
    return isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)


class AdapterConfigError(ValueError):
    """A config that cannot work: a bad value, or a value that does not fit a layer."""


@dataclass(frozen=True)
class LayerSpec:
    """What a method may know about the layer it adapts."""

    name: str  # dotted module path, used in error messages
    kind: str  # "linear" | "conv1d" (transformers Conv1D) | "conv2d"
    out_features: int
    in_features: int  # input features (linear) or in_channels // groups (conv2d)
    kernel_size: tuple[int, ...] = ()

    @property
    def fan_in(self) -> int:
        """Width of the 2-D weight matrix ``W`` (out_features, fan_in)."""
        return self.in_features * math.prod(self.kernel_size)

    def describe(self) -> str:
        shape = f"{self.out_features}x{self.fan_in}"
        if self.kernel_size:
            k = "x".join(map(str, self.kernel_size))
            shape += f" (conv {self.in_features} channels, kernel {k})"
        return f"{self.name!r} [{self.kind}, weight {shape}]"


def layer_index_pattern(layers_pattern: str) -> str:
    """PEFT's regex for the block index after a ``layers_pattern`` component (``re.match``)."""
    return rf"(?:^|.*?\.){layers_pattern}\.(\d+)\."


# Fields every config has: which layers to adapt (PEFT's names and meanings).
TARGETING_FIELDS = (
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "overrides",
)


@dataclass
class AdapterConfig:
    """Base of every method's config.

    Targeting follows PEFT: ``target_modules`` is a list of module-name suffixes, a regex
    string (full match), or ``"all-linear"``; ``exclude_modules`` likewise removes modules;
    ``layers_to_transform`` / ``layers_pattern`` restrict to some block indices.
    ``overrides`` maps a regex or suffix to a dict of field values for matching layers
    (generalises PEFT's ``rank_pattern`` / ``n_frequency_pattern``).
    """

    method: ClassVar[str] = ""

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    init_weights: bool = True
    fan_in_fan_out: bool = False
    bias: str = "none"

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Check field values on their own. Subclasses extend (and call super)."""
        if self.bias != "none":
            raise AdapterConfigError(
                f"{type(self).__name__}: bias={self.bias!r} is not supported; diffadapt adapters leave "
                "biases frozen (bias='none')."
            )
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise AdapterConfigError(f"{type(self).__name__}: target_modules is an empty list.")
        self._check_targeting()
        if isinstance(self.target_modules, str):
            for key in ("layers_to_transform", "layers_pattern"):
                if getattr(self, key) not in (None, [], ""):
                    raise AdapterConfigError(
                        f"{type(self).__name__}: {key} cannot be used when target_modules is a string "
                        f"({self.target_modules!r}), as in PEFT; list the module-name suffixes instead, e.g. "
                        "target_modules=['to_q', 'to_v'], or put the block index into the regex."
                    )

    def _check_targeting(self) -> None:
        """Types of the targeting fields, and every regex in them bounded (:mod:`diffadapt.patterns`):
        they may come from a downloaded file."""
        name = type(self).__name__
        for key in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str) and not _strings(value):
                raise AdapterConfigError(
                    f"{name}: {key} must be a string or a list of strings, got {patterns.shorten(value)}."
                )
        if self.modules_to_save is not None and not _strings(self.modules_to_save):
            raise AdapterConfigError(
                f"{name}: modules_to_save must be a list of strings, got {patterns.shorten(self.modules_to_save)}."
            )
        layers = self.layers_to_transform
        if layers is not None and not (
            isinstance(layers, int) and not isinstance(layers, bool)
            or isinstance(layers, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        ):
            raise AdapterConfigError(
                f"{name}: layers_to_transform must be an integer or a list of integers, got {patterns.shorten(layers)}."
            )
        if not isinstance(self.overrides, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and all(isinstance(f, str) for f in v)
            for k, v in self.overrides.items()
        ):
            raise AdapterConfigError(
                f"{name}: overrides must map patterns to {{field: value}} dicts, got {patterns.shorten(self.overrides)}."
            )
        fields = self.per_layer_fields()
        for key, values in self.overrides.items():
            bad = sorted(set(values) - fields)
            if bad:
                why = self.per_layer_reason or f"they are not per-layer fields of {name}"
                raise AdapterConfigError(
                    f"{name}: override {patterns.shorten(key)} sets {patterns.shorten(bad)}; {why} (allowed per "
                    f"layer: {sorted(fields)})."
                )
        checks = [("overrides key", k) for k in self.overrides]
        checks += [("modules_to_save", p) for p in self.modules_to_save or []]
        for key in ("target_modules", "exclude_modules"):
            value = getattr(self, key)
            if isinstance(value, str) and value != "all-linear":
                checks.append((key, value))
        try:
            for where, pattern in checks:
                patterns.check_pattern(pattern, where)
            lp = self.layers_pattern
            for pattern in [lp] if isinstance(lp, str) else lp or []:
                patterns.check_pattern(layer_index_pattern(pattern), "layers_pattern", full=False)
        except patterns.UnsafePatternError as exc:
            raise AdapterConfigError(f"{name}: {exc}") from None
        for key, values in self.overrides.items():  # each override's values, checked now, not per layer later
            try:
                dataclasses.replace(self, overrides={}, **values)
            except AdapterConfigError as exc:
                raise AdapterConfigError(f"{name}: override {patterns.shorten(key)}: {exc}") from None

    per_layer_reason: ClassVar[str] = ""  # why a method limits what overrides may set (for the error)

    @classmethod
    def per_layer_fields(cls) -> set[str]:
        """The fields ``overrides`` may set: every field but the targeting ones (a method sharing
        state across layers narrows it)."""
        return {f.name for f in dataclasses.fields(cls)} - set(TARGETING_FIELDS)

    def check_layer(self, layer: LayerSpec) -> None:
        """Raise AdapterConfigError naming ``layer`` if this config cannot adapt it."""

    # -- per-layer values -----------------------------------------------------------------
    def for_layer(self, name: str) -> "AdapterConfig":
        """This config with the ``overrides`` that match module ``name`` applied."""
        changes: dict[str, Any] = {}
        for pattern, values in self.overrides.items():
            if pattern_matches(pattern, name, "overrides key"):
                changes.update(values)
        if not changes:
            return self
        return dataclasses.replace(self, overrides={}, **changes)

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["method"] = self.method
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names and k != "method")
        if unknown:
            raise AdapterConfigError(f"{cls.__name__}: unknown config fields {unknown}.")
        return cls(**{k: v for k, v in data.items() if k in names})


class Method:
    """Stateless math of one method. Every function is a classmethod/staticmethod."""

    name: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]]
    multiplicative: ClassVar[bool]
    # PEFT composes several active adapters of this method in the opposite order to diffadapt's
    # (measured against PEFT 0.21: HRA and BOFT do, OFT does not); set_adapters(order="peft") uses it
    peft_reverses_order: ClassVar[bool] = False

    # -- training defaults (the training scripts' --learning_rate and config starting points) --------
    # Starting points, not tuned results. On a real model (SD-size layers): FourierFT trains raw spectral
    # coefficients (large steps), the rotation methods small skew / Householder parameters, FRoD a spectrum.
    learning_rate: ClassVar[float] = 1e-4
    # On the embedded model (layers 32-128 wide), from a sweep at 800 steps (benchmarks/RESULTS.md,
    # "Quality"): the rotation methods and FRoD need about 10x the real-model value to learn the
    # subject in minutes, FourierFT (scaling 150 over a 64x64 spectrum) 10x less.
    embedded_learning_rate: ClassVar[float] = 1e-3
    # config fields the scripts set differently from the config's (PEFT's) default; the scripts'
    # --adapter_config and flags override them
    training_defaults: ClassVar[dict[str, Any]] = {}

    # -- injection time -------------------------------------------------------------------
    @classmethod
    def init_shared(
        cls, config: AdapterConfig, layers: list[LayerSpec], weights: list[Tensor]
    ) -> list[dict[str, Tensor]]:
        """State shared by several layers, computed once for the whole model (FRoD's bases).

        Returns one dict per layer (the same dict object for layers that share). The default
        is no shared state.
        """
        return [{} for _ in layers]

    @classmethod
    def init_layer(
        cls, config: AdapterConfig, layer: LayerSpec, weight: Tensor, shared: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Return ``(params, buffers)`` for one layer: trainable tensors and fixed ones.

        ``weight`` is the 2-D base weight (see module docstring), on the model's device.
        Buffers must be regenerable from the config, the base weight and ``shared``; they
        are never saved.
        """
        raise NotImplementedError

    # -- every step -----------------------------------------------------------------------
    @classmethod
    def prepare(
        cls,
        config: AdapterConfig,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        strength: Union[float, Tensor],
        training: bool = False,
    ) -> Any:
        """Turn parameters into the per-step factors used below (dropout happens here)."""
        return cls.prepare_many(config, [params], [buffers], strength, training)[0]

    @classmethod
    def stack_key(cls, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> Optional[Hashable]:
        """Layers of one adapter whose keys are equal (and not None) share one :meth:`prepare_many`
        call: their parameters have equal shapes, dtypes and devices (and the buffers the batched
        math needs are the same). Default: the parameters' shapes, dtype and device."""
        return tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in params.items())

    @classmethod
    def prepare_many(
        cls,
        config: AdapterConfig,
        params: list[dict[str, Tensor]],
        buffers: list[dict[str, Tensor]],
        strength: Union[float, Tensor],
        training: bool = False,
    ) -> list[Any]:
        """:meth:`prepare` for several layers with equal :meth:`stack_key` (same config), as one
        batched op sequence; returns one factor object per layer, in order. Must equal the
        per-layer math (the runtime calls this once per shape group and step)."""
        raise NotImplementedError

    # multiplicative methods
    @staticmethod
    def rotate_input(x: Tensor, prep: Any) -> Tensor:  # x @ R
        raise NotImplementedError

    @staticmethod
    def output_scale(prep: Any) -> Optional[Tensor]:  # s (out_features,) or None
        return None

    @staticmethod
    def rotation_width(prep: Any) -> Optional[int]:
        """Multiply-adds per rotated feature of one row (a block rotation's block width, a WY
        form's ``2 r``): the runtime's cost model for rotating the weight instead of the
        activations. None (the default): always the activation path."""
        return None

    @staticmethod
    def rotates_output(prep: Any) -> bool:
        """Whether the rotation acts on the output channels (else on the input features)."""
        return False

    @classmethod
    def transform_output(cls, y: Tensor, prep: Any) -> Tensor:  # y @ P.T (bias not included)
        s = cls.output_scale(prep)
        return y if s is None else y * s.to(y.dtype)

    @classmethod
    def output_is_identity(cls, prep: Any) -> bool:
        """True when :meth:`transform_output` returns ``y`` unchanged for ``prep`` (a method that
        overrides ``transform_output`` overrides this too): the runtime then adds the bias inside
        the base product (one fused GEMM + bias, no separate pass over the output)."""
        return cls.output_scale(prep) is None

    @staticmethod
    def scale_only(prep: Any) -> Optional[tuple[Tensor, Tensor]]:
        """``(s, 1/s)`` (``1/s`` = 0 where ``s`` = 0) when :meth:`transform_output` is exactly
        ``y * s``: the runtime then fuses it with the bias and keeps only the layer's output for
        backward. None (the default): ``transform_output`` runs as written."""
        return None

    # additive methods
    @staticmethod
    def delta_output(x: Tensor, prep: Any) -> Tensor:  # x @ dW.T
        raise NotImplementedError

    @staticmethod
    def fold_into_weight(x: Tensor, prep: Any) -> bool:
        """Additive methods: True when ``F.linear(x, W + dW)`` is the cheaper exact form for these
        activations (a shape test, no host sync). The runtime then folds ``apply_to_weight``
        into the base product instead of adding ``delta_output`` (one GEMM forward and one
        weight-gradient GEMM backward instead of two and three). If the method has a cheap
        :meth:`delta_weight_backward`, the runtime rebuilds ``dW`` in backward instead of
        keeping ``W + dW`` alive, so the layer saves no more than LoRA's, unless
        :meth:`keep_folded_weight` says keeping it is worth its bytes."""
        return False

    @staticmethod
    def may_fold(prep: Any) -> bool:
        """Additive methods: False when ``W + dW`` is not this step's function (e.g. dropout on the
        adapter branch). Without autograd the runtime folds (and keeps) ``W + dW`` whenever allowed."""
        return True

    # additive methods that fold: the prep fields dW is built from, dW, and dW's adjoint
    delta_fields: ClassVar[tuple[str, ...]] = ()

    @staticmethod
    def delta_weight(prep: Any, dtype: Any) -> Tensor:
        """``dW`` ``(out_features, fan_in)`` in ``dtype``, differentiable in ``delta_fields``."""
        raise NotImplementedError

    delta_weight_backward: ClassVar[Optional[Any]] = None
    """Optional ``(prep, grad_dW) -> gradients of the delta_fields``: the adjoint of
    :meth:`delta_weight`. The runtime then rebuilds ``dW`` in backward -- or, where
    :meth:`keep_folded_weight` says so, keeps ``W + dW`` from forward."""

    @staticmethod
    def keep_folded_weight(x: Tensor, prep: Any) -> bool:
        """Folded additive methods: True when the layer keeps ``W + dW`` from forward for its backward
        instead of rebuilding it from the factors (a shape test on the activations ``x``, no host sync):
        FRoD always (its rebuild ``U M V^T`` costs GEMMs of its own), FourierFT where ``W + dW`` is no
        larger than ``x``. Default False: rebuild, the layer saving no more than LoRA's."""
        return False

    # both
    @staticmethod
    def apply_to_weight(weight: Tensor, prep: Any) -> Tensor:
        """The effective 2-D weight: ``diag(s) W R^T`` or ``W + dW`` (merge and conv path)."""
        raise NotImplementedError
