"""BOFT: butterfly orthogonal fine-tuning (Liu et al. 2024, https://arxiv.org/abs/2311.06243).

Math
----
``d`` = fan_in, ``b`` block size, ``N = d / b`` blocks, ``m`` butterfly factors. Trainable
``boft_R`` of shape ``(m, N, b, b)`` (only its skew part is used) and ``boft_s``, the output
scale (``(d_out, 1)``; ``(1, d_out)`` on conv2d layers, PEFT's layout). Per block::

    S = (R - R^T) / 2,      Q = Cayley(S) = (I - S)(I + S)^{-1}

(the Cayley transform, the norm ``constraint``, the two rotation sides, the batched float32
inverse and the shared runtime are :mod:`diffadapt.methods._orthogonal`'s, shared with OFT).

Factor ``i`` is ``M_i = P_i blockdiag(Q_i[0..N-1]) P_i^T`` with the butterfly permutation
``P_i``: cut ``d`` into runs of ``b 2^i``, each run into ``2^{i+1}`` chunks of ``b/2`` and list
the even chunks, then the odd ones (``P_0 = I``). So block ``k`` of run ``r`` of factor ``i``
pairs chunk ``k`` with chunk ``k + 2^i`` of that run. With ``R = M_{m-1} ... M_0``::

    W_eff = diag(s) W R^T,          y = s * ((x R) W^T) + bias.

Fast form (nothing ``d x d`` is built, no index buffers): a permutation ``P_i`` is a reshape
+ axis swap (``x P_i`` = ``x.view(runs, 2, 2^i, b/2)`` with the two middle axes swapped); each
factor is one ``bmm`` of a block-major view with the ``b x b`` blocks (see
:func:`butterfly_rotate`). Factor ``i`` only mixes inside runs of ``b 2^i``, so the whole
product ``R`` is block-diagonal with ``N / 2^(m-1)`` blocks of ``B = b 2^(m-1)``: every step
builds those blocks once (:func:`merge_factors`, a butterfly over ``B`` identity rows) and the
activations and weights go through ONE strided bmm with them, OFT's path -- about the flops of
the ``m`` factors, one saved activation instead of ``m`` permuted copies.

Strength ``a``: ``Q_a = Cayley(a S)`` (orthogonal for every ``a``; ``a = 0`` gives ``I`` exactly)
and ``s_a = lerp(1, s, a) = 1 + a (s - 1)`` (``torch.lerp`` returns ``1`` at ``a = 0`` and ``s``
at ``a = 1`` exactly, and it works for any sign of ``s``).

Dropout (``boft_dropout = p``, training only, PEFT's semantics): one factor drawn at random
gets ``int(p N)`` of its blocks, drawn at random, replaced by the identity.

Output side (``rotation_side="output"``, the LyCORIS / ComfyUI / kohya convention): the same
blocks, butterflies and scale rotate the layer's *output* channels instead, ``d = out_features``::

    W_eff = diag(s) R W,            y = s * ((x W^T) R^T) + bias       (bias never rotated)

(``butterfly_rotate`` with ``transpose``: factor 0 acts first, as LyCORIS' factor loop does).
LyCORIS' ``oft_blocks`` ``A`` map exactly onto this (``diffadapt.formats.lycoris``): its block
``(I + Q)(I - Q)^{-1}``, ``Q = A - A^T``, is ours for ``S = -Q``; its butterfly lists the two
half-chunks of a block interleaved where ours concatenates them (a fixed permutation of each
block, which Cayley commutes with); its ``rescale`` is ``s``. ``constraint`` is LyCORIS' norm
limit over all ``m N`` blocks of a layer (``d = N b``).

PEFT differences: without its JIT CUDA extension (every CPU machine, and current torch on GPU)
PEFT silently trains ``m = 1`` while its config still says ``m``; such files hold ``boft_R`` of
shape ``(1, N, b, b)``. :meth:`BOFTConfig.for_saved_factors` gives the config PEFT really used.
PEFT has no Conv1D, no grouped conv and only square kernels; diffadapt has all three.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Union

import torch
from torch import Tensor

from diffadapt.methods._orthogonal import (
    OrthogonalConfig, OrthogonalMethod, RotationFactors, block_rotate, cayley, check_int, check_kind, check_prob,
    compute_dtype, group_blocks, group_count, grouped_rotation, limit_norm, rotated_dim
)
from diffadapt.methods.base import AdapterConfig, AdapterConfigError, LayerSpec


def merge_factors(blocks: Tensor) -> Tensor:
    """The butterfly product of ``(G, m, N, b, b)`` factor blocks as ONE block-diagonal rotation
    per layer, ``(G, N / 2^(m-1), B, B)`` with ``B = b 2^(m-1)``: factor ``i`` only mixes inside
    runs of ``b 2^i``, so ``R = M_{m-1} .. M_0`` keeps every aligned run of ``B`` features to
    itself. Its blocks are ``E R`` for the "block identity" ``E = [I_B I_B ..]`` (``B x d``), one
    :func:`butterfly_rotate` of ``B`` rows over all G layers side by side (runs never cross a
    layer boundary, so the G layers are one wide layer of ``G N`` blocks)."""
    g, m, n, b, _ = blocks.shape
    if m == 1:
        return blocks[:, 0]
    big = b * 2 ** (m - 1)
    runs = n * b // big
    eye = torch.eye(big, dtype=blocks.dtype, device=blocks.device).repeat(1, g * runs)  # (B, G d)
    rows = butterfly_rotate(eye, blocks.transpose(0, 1).reshape(m, g * n, b, b))  # E R, row r: R[r, :]
    return rows.view(big, g * runs, big).transpose(0, 1).reshape(g, runs, big, big)


def butterfly_rotate(x: Tensor, blocks: Tensor, transpose: bool = False) -> Tensor:
    """``x @ R`` (or ``x @ R^T`` with ``transpose``) for ``R = M_{m-1} ... M_0``.

    ``x`` is ``(..., d)``; ``blocks`` ``(m, N, b, b)`` with ``N b = d`` (``N = 1`` is broadcast
    over all blocks: OFT's ``block_share``). No ``d x d`` matrix, no index buffers:

    * ``m = 1``: :func:`~diffadapt.methods._orthogonal.block_rotate`, one bmm on the strided
      ``(N, T, b)`` view of ``x``, one copy back.
    * ``m > 1``: feature-major, on ``(N, b, T)`` views (token axis innermost, so the copies
      move long rows): each factor is ``bmm(Q^T, u)``. Factor ``i``'s block ``(run, k)`` holds
      chunks ``k`` and ``k + 2^i`` of its run, so between factors the layout changes by swapping
      two axes of a 6-d view: ``m + 1`` copies in all (the first and last also transpose).
    """
    m, _, b, _ = blocks.shape
    if m == 1:
        return block_rotate(x, blocks[0], transpose)
    d = x.shape[-1]
    n, h = d // b, b // 2
    right = blocks.to(x.dtype).expand(m, n, b, b)  # rows are right-multiplied: x_blk @ Q
    if transpose:
        right = right.mT
    left = right.mT  # x M = (M^T x^T)^T
    order = list(range(m)) if transpose else list(range(m - 1, -1, -1))
    zt = x.reshape(-1, d).T  # (d, T) view
    t = zt.shape[1]
    first, last = 2 ** order[0], 2 ** order[-1]
    if first == 1:
        u = zt.reshape(n, b, t)
    else:  # (run, pair bit, chunk, h, T) -> (run, chunk, pair bit, h, T)
        u = zt.view(d // (b * first), 2, first, h, t).transpose(1, 2).reshape(n, b, t)
    for j, i in enumerate(order):
        if j:  # factor order[j-1] -> i: view (run, bit, chunk, bit', h, T), swap the two pair bits
            big = 2 ** max(i, order[j - 1])
            u = u.view(d // (b * big), 2, big // 2, 2, h, t).transpose(1, 3).reshape(n, b, t)
        u = torch.bmm(left[i], u)
    if last == 1:
        return u.permute(2, 0, 1).contiguous().view(x.shape)  # row-major like x: same GEMM downstream
    return u.view(d // (b * last), last, 2, h, t).permute(4, 0, 2, 1, 3).contiguous().view(x.shape)


class _Split(torch.autograd.Function):
    """``x.split(sizes, dim)`` whose backward is ONE ``cat`` of the pieces' gradients (autograd's
    own writes every piece into a zero tensor: three ops per piece)."""

    @staticmethod
    def forward(ctx, x, sizes, dim):
        ctx.dim, ctx.sizes, ctx.like = dim, sizes, (x.shape, x.dtype, x.device)
        return x.split(sizes, dim)

    @staticmethod
    def backward(ctx, *grads):
        shape, dtype, device = ctx.like
        parts = [
            g if g is not None else torch.zeros(*shape[: ctx.dim], n, *shape[ctx.dim + 1:], dtype=dtype, device=device)
            for g, n in zip(grads, ctx.sizes)
        ]
        return torch.cat(parts, ctx.dim), None, None


class _Cat(torch.autograd.Function):
    """``torch.cat(xs, dim)`` whose backward is ONE ``split``, each piece made contiguous once (autograd's
    own slices every piece, and a strided piece costs its parameter's gradient two more ops)."""

    @staticmethod
    def forward(ctx, dim, *xs):
        ctx.dim, ctx.sizes = dim, [x.shape[dim] for x in xs]
        return torch.cat(xs, dim)

    @staticmethod
    def backward(ctx, g):
        return None, *(piece.contiguous() for piece in g.split(ctx.sizes, ctx.dim))


def _tracked(*xs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def split(x: Tensor, sizes: list[int], dim: int = 0) -> tuple[Tensor, ...]:
    """Ragged :meth:`Tensor.split` for the per-layer slices of a wide batch (one backward op)."""
    return _Split.apply(x, sizes, dim) if _tracked(x) else x.split(sizes, dim)


def cat(xs: list[Tensor], dim: int = 0) -> Tensor:
    """:func:`torch.cat` of the layers' parameters into a wide batch (one backward op)."""
    return _Cat.apply(dim, *xs) if _tracked(*xs) else torch.cat(xs, dim)


# -- BOFT ----------------------------------------------------------------------------------------
@dataclass
class BOFTConfig(OrthogonalConfig):
    """PEFT's ``BOFTConfig``: set exactly one of ``boft_block_size`` / ``boft_block_num``.

    ``rotation_side="output"`` rotates the output channels (LyCORIS' convention; block size and
    number then divide ``out_features``), ``constraint`` is LyCORIS' norm limit (module
    docstring). Neither exists in PEFT: such configs refuse PEFT export.
    """

    method: ClassVar[str] = "boft"

    boft_block_size: int = field(default=4, metadata={"flag": "--boft_block_size", "help": "block size b (4)."})
    boft_block_num: int = field(
        default=0, metadata={"flag": "--boft_block_num", "help": "number of blocks (0: use the block size)."}
    )
    boft_n_butterfly_factor: int = field(
        default=1, metadata={"flag": "--boft_n_butterfly_factor", "help": "butterfly factors m (1)."}
    )
    boft_dropout: float = field(
        default=0.0, metadata={"flag": "--boft_dropout", "help": "multiplicative dropout (0)."}
    )
    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        check_int(name, "boft_block_size", self.boft_block_size, 0)
        check_int(name, "boft_block_num", self.boft_block_num, 0)
        check_int(name, "boft_n_butterfly_factor", self.boft_n_butterfly_factor, 1)
        check_prob(name, "boft_dropout", self.boft_dropout)
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise AdapterConfigError(
                f"{name}: set exactly one of boft_block_size ({self.boft_block_size}) and boft_block_num "
                f"({self.boft_block_num}) to a positive value and the other to 0 (block size x block "
                "number = the layer's fan_in)."
            )

    def layout(self, layer: LayerSpec) -> tuple[int, int, int]:
        """``(m, N, b)`` for ``layer``; raises AdapterConfigError naming the layer if it does not fit."""
        check_kind("BOFT", layer)
        dim, d = rotated_dim(layer, self.rotation_side)
        m = self.boft_n_butterfly_factor
        given = f"boft_block_size={self.boft_block_size}" if self.boft_block_size else f"boft_block_num={self.boft_block_num}"
        if d % (self.boft_block_size or self.boft_block_num):
            raise AdapterConfigError(
                f"BOFT cannot adapt {layer.describe()}: {given} does not divide {dim}={d}. Pick a divisor "
                f"of {dim} (set it for this layer with overrides) or exclude the layer."
            )
        b = self.boft_block_size or d // self.boft_block_num
        n = d // b
        if m > 1 and (b % 2 or m - 1 > n.bit_length() or n % 2 ** (m - 1)):
            power = f"2^{m - 1}" + (f"={2 ** (m - 1)}" if m <= 64 else "")  # never a 10^4-digit number
            raise AdapterConfigError(
                f"BOFT cannot adapt {layer.describe()}: boft_n_butterfly_factor={m} needs an even block size "
                f"and a block count divisible by {power}, but {given} gives {n} blocks of "
                f"size {b}. Lower boft_n_butterfly_factor or change the block size for this layer."
            )
        return m, n, b

    def check_layer(self, layer: LayerSpec) -> None:
        self.layout(layer)

    def for_saved_factors(self, n_factors: int) -> "BOFTConfig":
        """The config PEFT actually trained for a saved ``boft_R`` with ``n_factors`` factors.

        PEFT without its CUDA extension drops to one factor but saves the requested
        ``boft_n_butterfly_factor``; the tensor shape tells the truth.
        """
        if n_factors == self.boft_n_butterfly_factor:
            return self
        warnings.warn(
            f"BOFT file says boft_n_butterfly_factor={self.boft_n_butterfly_factor} but its boft_R holds "
            f"{n_factors} factor(s) (PEFT without its CUDA extension silently uses 1); using {n_factors}."
        )
        return dataclasses.replace(self, boft_n_butterfly_factor=n_factors)


class BOFT(OrthogonalMethod):
    """``W_eff = diag(s_a) W R_a^T`` (input side) or ``diag(s_a) R_a W`` (output side), ``R_a`` the
    butterfly product of ``Cayley(a S)`` blocks."""

    name: ClassVar[str] = "boft"
    config_class: ClassVar[type[AdapterConfig]] = BOFTConfig
    learning_rate: ClassVar[float] = 1e-4  # the training scripts' starting points (see Method)
    embedded_learning_rate: ClassVar[float] = 2e-3
    peft_reverses_order: ClassVar[bool] = True
    dropout_field: ClassVar[str] = "boft_dropout"

    @classmethod
    def init_layer(
        cls, config: BOFTConfig, layer: LayerSpec, weight: Tensor, shared: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``boft_R`` zeros (identity) or N(0, 0.1); ``boft_s`` ones or N(1, 0.1) (PEFT's inits)."""
        m, n, b = config.layout(layer)
        kw = dict(dtype=compute_dtype(weight.dtype), device=weight.device)
        r = torch.zeros(m, n, b, b, **kw)
        s = torch.ones((1, layer.out_features) if layer.kind == "conv2d" else (layer.out_features, 1), **kw)
        if not config.init_weights:
            r.normal_(0.0, 0.1)
            s.normal_(1.0, 0.1)
        return {"boft_R": r, "boft_s": s}, {}

    @classmethod
    def skews(cls, config: BOFTConfig, params: list[dict[str, Tensor]], buffers: list[dict[str, Tensor]]) -> Tensor:
        """``S = (R - R^T) / 2`` ``(G, m, N, b, b)`` of G layers' ``boft_R``, constraint applied."""
        r = torch.stack([p["boft_R"] for p in params])
        r = r.to(compute_dtype(r.dtype))
        return limit_norm(0.5 * (r - r.mT), config.constraint, r.shape[2] * r.shape[-1])

    @classmethod
    def rotation_blocks(cls, config: BOFTConfig, skew: Tensor) -> Tensor:
        """All layers' ``m N`` Cayley blocks from one batched inverse."""
        return cayley(skew)  # (..., b, b) batches of any shape

    @classmethod
    def stack_key(cls, params: dict[str, Tensor], buffers: dict[str, Tensor]):
        """Layers with one factor count and block size share a batch whatever their widths (see
        :meth:`prepare_many`)."""
        r, s = params["boft_R"], params["boft_s"]
        return (r.shape[0], r.shape[-1], r.dtype, r.device, s.dtype)

    @classmethod
    def prepare_many(cls, config: BOFTConfig, params: list[dict[str, Tensor]], buffers: list[dict[str, Tensor]],
                     strength: Union[float, Tensor], training: bool = False) -> list[RotationFactors]:
        """Layers of one shape: one stack (:meth:`OrthogonalMethod.prepare_many`). Layers of several
        widths: ONE wide layer, their blocks side by side -- a butterfly run never crosses a layer
        (each layer's ``N`` is a multiple of ``2^(m-1)``), so one Cayley inverse and one merge serve
        them all -- unless the norm constraint or dropout need each layer apart: one stack per shape."""
        shapes = [(tuple(p["boft_R"].shape), tuple(p["boft_s"].shape)) for p in params]
        if len(set(shapes)) == 1:
            return super().prepare_many(config, params, buffers, strength, training)
        m, b = params[0]["boft_R"].shape[0], params[0]["boft_R"].shape[-1]
        merged_counts = [p["boft_R"].shape[1] // 2 ** (m - 1) for p in params]
        groups = {group_count(b * 2 ** (m - 1), [c]) for c in merged_counts}  # each layer's own grouping
        if config.constraint or (training and config.boft_dropout > 0) or len(groups) > 1:
            out: list = [None] * len(params)
            for shape in dict.fromkeys(shapes):
                idx = [i for i, s in enumerate(shapes) if s == shape]
                preps = super().prepare_many(config, [params[i] for i in idx], [buffers[i] for i in idx], strength, training)
                for i, prep in zip(idx, preps):
                    out[i] = prep
            return out
        ns = [p["boft_R"].shape[1] for p in params]
        wide = [{"boft_R": cat([p["boft_R"] for p in params], 1)}]
        blocks = cls.rotation_blocks(config, cls.skews(config, wide, buffers[:1]) * strength)[0]  # (m, sum N, b, b)
        per = 2 ** (blocks.shape[0] - 1)  # blocks of b per merged block
        g = groups.pop()  # the same for every layer here: groups never straddle two layers
        rotations = split(group_blocks(merge_factors(blocks[None])[0], g), [n // per // g for n in ns])
        d_outs = [p["boft_s"].numel() for p in params]
        ss = [p["boft_s"] for p in params]  # (d_out, 1), a Conv2d's (1, d_out): one flatten after the cat
        dims = {0 if t.shape[-1] == 1 else 1 for t in ss}
        flat = cat(ss, dims.pop()).flatten() if len(dims) == 1 else cat([t.flatten() for t in ss])
        scale, inv = cls.scales(flat, strength)
        out = config.rotation_side == "output"
        return [
            RotationFactors(b, r, sc, out, i)
            for b, r, sc, i in zip(split(blocks, ns, 1), rotations, split(scale, d_outs), inv.split(d_outs))
        ]

    @classmethod
    def factors(
        cls, config: BOFTConfig, params: list[dict[str, Tensor]], blocks: Tensor, strength: Union[float, Tensor]
    ) -> list[RotationFactors]:
        """The factors merged into one block-diagonal rotation each, the scales ``lerp(1, s, a)``."""
        scale, inv = cls.scales(torch.stack([p["boft_s"] for p in params]).flatten(1), strength)
        out = config.rotation_side == "output"
        # unbind, not indexing: one backward node for all layers (an index's backward writes a full stack)
        rotation = grouped_rotation(merge_factors(blocks))  # (G, N'/g, g B, g B)
        return [
            RotationFactors(b, r, sc, out, i)
            for b, r, sc, i in zip(blocks.unbind(0), rotation.unbind(0), scale.unbind(0), inv.unbind(0))
        ]

    @staticmethod
    def scales(s: Tensor, strength: Union[float, Tensor]) -> tuple[Tensor, Tensor]:
        """``lerp(1, s, a)`` and its reciprocal (0 where the scale is 0, no gradient) for the
        runtime's fused backward, for all layers at once."""
        a = strength.to(s.dtype) if isinstance(strength, Tensor) else strength
        scale = torch.lerp(torch.ones_like(s), s, a)
        with torch.no_grad():
            inv = torch.where(scale != 0, scale, 1).reciprocal_().masked_fill_(scale == 0, 0)
        return scale, inv
