"""The layer host's fused output products: an output scale and the bias after the base product,
with only the layer's output kept for backward (:class:`ScaleBias`), or folded into the base product
itself (:class:`ScaledLinear`). Plain autograd functions; :mod:`diffadapt.host` picks them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class ScaleBias(torch.autograd.Function):
    """``out = y * s + b`` keeping only ``out`` (the layer's output, which the next op often keeps
    anyway: attention's q/k/v, GEGLU's input) for backward instead of ``y``: ``d s = sum_t g (out -
    b) / s``, ``d y = g s``. ``(out - b) / s`` is ``y s / s`` to rounding (relative ``eps |out| /
    |y s|``); a channel whose scale is exactly 0 has lost ``y``, and gets no scale gradient."""

    @staticmethod
    def forward(ctx, y, s, inv, bias):  # inv = 1 / s (0 where s = 0), computed once per step
        s = as_dtype(s, y.dtype)
        out = y * s if bias is None else torch.addcmul(as_dtype(bias, y.dtype), y, s)
        ctx.save_for_backward(out, s, inv, bias)
        return out

    @staticmethod
    def backward(ctx, g):
        out, s, inv, bias = ctx.saved_tensors
        gy = g * as_dtype(s, g.dtype) if ctx.needs_input_grad[0] else None
        gs = gb = None
        tokens = tuple(range(g.dim() - 1))  # () for a 1-D input: nothing to sum (sum(()) sums all)
        if ctx.needs_input_grad[1]:
            ys = out if bias is None else out - as_dtype(bias, out.dtype)
            gs = g * ys
            gs = (gs.sum(tokens, dtype=inv.dtype) if tokens else gs.to(inv.dtype)) * inv
        if bias is not None and ctx.needs_input_grad[3]:
            gb = g.sum(tokens, dtype=bias.dtype) if tokens else g.to(bias.dtype)
        return gy, gs, None, gb


class ScaledLinear(torch.autograd.Function):
    """``out = (z W^T) * s + b`` as one product with the scaled weight ``diag(s) W`` (BOFT's output
    scale right after the base product): no pass over the output in forward, the scaled weight
    rebuilt in backward (``d_out d_in`` numbers, not kept). Backward keeps ``out`` as
    :class:`ScaleBias` does: ``dz = g diag(s) W``, ``d s = (sum_t g out - b sum_t g) / s`` (a channel
    whose scale is exactly 0 gets no scale gradient), ``d b = sum_t g`` -- two passes over the output
    where the unfused form takes five."""

    @staticmethod
    def forward(ctx, z, weight, s, inv, bias):  # inv = 1 / s (0 where s = 0), computed once per step
        ctx.in_shape, ctx.s_col = z.shape, as_dtype(s, z.dtype)[:, None]
        out = F.linear(z, as_dtype(weight, z.dtype) * ctx.s_col, None if bias is None else as_dtype(bias, z.dtype))
        ctx.save_for_backward(weight, inv, bias, out if ctx.needs_input_grad[2] else None)
        return out

    @staticmethod
    def backward(ctx, g):
        weight, inv, bias, out = ctx.saved_tensors
        tokens = tuple(range(g.dim() - 1))
        gz = gs = gb = gsum = None
        if ctx.needs_input_grad[0]:
            gz = (g.reshape(-1, g.shape[-1]) @ (as_dtype(weight, g.dtype) * as_dtype(ctx.s_col, g.dtype))).view(ctx.in_shape)
        if bias is not None and (ctx.needs_input_grad[2] or ctx.needs_input_grad[4]):
            gsum = g.sum(tokens, dtype=inv.dtype) if tokens else g.to(inv.dtype)
        if ctx.needs_input_grad[2]:
            acc = (g * out).sum(tokens, dtype=inv.dtype) if tokens else (g * out).to(inv.dtype)
            gs = (acc if bias is None else torch.addcmul(acc, as_dtype(bias, inv.dtype), gsum, value=-1)) * inv
        if bias is not None and ctx.needs_input_grad[4]:
            gb = as_dtype(gsum, bias.dtype)
        return gz, None, gs, None, gb
