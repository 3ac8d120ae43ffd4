"""The layer host's fused products: an output scale and the bias after the base product, with only
the layer's output kept for backward (:class:`ScaleBias`), or folded into the base product itself
(:class:`ScaledLinear`); additive adapters folded into the base product with ``dW`` rebuilt in
backward (:class:`FoldedLinear`). Plain autograd functions; :mod:`diffadapt.host` picks them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def compose(weight: Tensor, steps: list) -> Tensor:
    """``f_1(...f_n(W))`` for ``steps`` ``[(method, factors), ...]`` in activation order."""
    for method, prep in reversed(steps):
        weight = method.apply_to_weight(weight, prep)
    return weight


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


class FoldedLinear(torch.autograd.Function):
    """``y = x (f_1(..f_k(W)))^T (+ b)`` for additive adapters ``f_i(W) = W + dW_i`` folded into the base
    product, with every ``dW_i`` rebuilt in backward from its few factors (``delta_fields``)
    instead of keeping ``W + dW`` alive: the layer saves ``x`` (as LoRA does) and the factors.
    Backward: ``grad x = g W_eff``, and ``G = g^T x``, the gradient of every ``dW_i``, goes to the
    factors through the method's adjoint (:meth:`Method.delta_weight_backward`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, folds, *factors):  # factors: inputs so that gradients reach them
        ctx.folds = folds  # their preps hold the same factor tensors
        w_eff = as_dtype(compose(weight, folds), x.dtype)
        keep = ctx.needs_input_grad[0] and any(method.keep_folded_weight(x, prep) for method, prep in folds)
        ctx.save_for_backward(x, weight, w_eff if keep else None)  # kept: its rebuild would cost GEMMs
        return F.linear(x, w_eff, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight, w_eff = ctx.saved_tensors
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        gx = gb = None
        if ctx.needs_input_grad[0]:
            w_eff = compose(weight, ctx.folds) if w_eff is None else w_eff
            gx = (g2 @ as_dtype(w_eff, g.dtype)).view(x.shape)
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        gw = g2.mT @ x2  # the gradient of W_eff, so of every dW_i
        grads = [t for method, prep in ctx.folds for t in method.delta_weight_backward(prep, gw)]
        return gx, (as_dtype(gw, weight.dtype) if ctx.needs_input_grad[1] else None), gb, None, *grads
