"""A method defined outside diffadapt, in this one file: a learned per-output-channel scale.

    W_eff = diag(1 + a g) W,      y = (1 + a g) * (x W^T) + bias      (a = strength)

``dummy_g`` (out_features,) starts at ``init_scale`` (0: the base layer). It is multiplicative
with an identity input rotation, so the runtime's multiplicative paths (fused scale, merge)
carry it. tests/test_dummy_method.py registers it with ``diffadapt.methods.register``.

Nothing else is declared: saved, it is a PEFT-layout folder under its own names
(:func:`diffadapt.formats.peft.own_format`); PEFT itself has no such method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Optional, Union

import torch
from torch import Tensor

from diffadapt.methods import AdapterConfig, AdapterConfigError, LayerSpec, Method


@dataclass
class DummyScaleConfig(AdapterConfig):
    method: ClassVar[str] = "dummyscale"

    init_scale: float = field(default=0.0, metadata={"flag": "--dummy_init_scale", "help": "starting g (0: the base)."})
    note: str = "untouched"  # no metadata: no flag (--adapter_config sets it)

    def validate(self) -> None:
        super().validate()
        v = self.init_scale
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise AdapterConfigError(f"DummyScaleConfig: init_scale must be a finite number, got init_scale={v!r}.")

    def check_layer(self, layer: LayerSpec) -> None:
        if layer.kind not in ("linear", "conv1d", "conv2d"):
            raise AdapterConfigError(f"DummyScale cannot adapt {layer.describe()}.")


class ScalePrep(NamedTuple):
    scale: Tensor  # (out_features,) 1 + a g


class DummyScale(Method):
    name: ClassVar[str] = "dummyscale"
    config_class: ClassVar[type[AdapterConfig]] = DummyScaleConfig
    multiplicative: ClassVar[bool] = True
    learning_rate: ClassVar[float] = 3e-3
    embedded_learning_rate: ClassVar[float] = 5e-3
    training_defaults: ClassVar[dict[str, Any]] = {"note": "from the scripts"}

    @classmethod
    def init_layer(cls, config, layer, weight, shared):
        g = torch.full((layer.out_features,), float(config.init_scale), dtype=torch.float32, device=weight.device)
        return {"dummy_g": g.to(torch.promote_types(weight.dtype, torch.float32))}, {}

    @classmethod
    def prepare_many(cls, config, params, buffers, strength: Union[float, Tensor], training: bool = False):
        g = torch.stack([p["dummy_g"] for p in params])
        return [ScalePrep(s) for s in (1 + g * strength).unbind(0)]

    @staticmethod
    def rotate_input(x: Tensor, prep: ScalePrep) -> Tensor:
        return x

    @staticmethod
    def output_scale(prep: ScalePrep) -> Optional[Tensor]:
        return prep.scale

    @staticmethod
    def apply_to_weight(weight: Tensor, prep: ScalePrep) -> Tensor:
        return weight * prep.scale.to(weight.dtype)[:, None]


def make_config(**kw) -> DummyScaleConfig:
    """The small config the shared contract checks use."""
    return DummyScaleConfig(init_scale=0.3, **kw)
