"""Reference forward for one adapter on one layer, written from the method contract only.

Method tests use it to compare a method's math with PEFT before the runtime wraps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from diffadapt.methods.base import LayerSpec


def layer_spec(name: str, module: nn.Module) -> LayerSpec:
    if isinstance(module, nn.Linear):
        return LayerSpec(name, "linear", module.out_features, module.in_features)
    if isinstance(module, Conv1D):
        return LayerSpec(name, "conv1d", module.nf, module.weight.shape[0])
    if isinstance(module, nn.Conv2d):
        return LayerSpec(
            name, "conv2d", module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size)
        )
    raise TypeError(type(module))


def weight_2d(module: nn.Module) -> torch.Tensor:
    if isinstance(module, Conv1D):
        return module.weight.T
    return module.weight.flatten(1)


def init(method, config, module, name="layer"):
    spec = layer_spec(name, module)
    config.check_layer(spec)
    shared = method.init_shared(config, [spec], [weight_2d(module).detach()])[0]
    params, buffers = method.init_layer(config, spec, weight_2d(module).detach(), shared)
    params = {k: nn.Parameter(v) for k, v in params.items()}
    return spec, params, {**shared, **buffers}  # what AdapterSlot.buffers_dict hands the method


def forward(method, config, module, params, buffers, x, strength=1.0, training=False):
    """Unmerged forward of ``module`` with one adapter, as the runtime composes it."""
    prep = method.prepare(config, params, buffers, strength, training)
    W = weight_2d(module)
    if isinstance(module, nn.Conv2d):
        W_eff = method.apply_to_weight(W, prep).reshape(module.weight.shape)
        return module._conv_forward(x, W_eff, module.bias)
    b = module.bias
    if method.multiplicative:
        y = method.transform_output(F.linear(method.rotate_input(x, prep), W), prep)
    else:
        y = F.linear(x, W) + method.delta_output(x, prep)
    return y if b is None else y + b


def merged_forward(method, config, module, params, buffers, x, strength=1.0):
    prep = method.prepare(config, params, buffers, strength, False)
    W_eff = method.apply_to_weight(weight_2d(module), prep)
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, W_eff.reshape(module.weight.shape), module.bias)
    return F.linear(x, W_eff, module.bias)


class Holder(nn.Module):
    """A one-layer model, so PEFT can wrap a bare layer under the name ``layer``."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)
