"""BOFT: butterfly orthogonal fine-tuning (Liu et al. 2024, https://arxiv.org/abs/2311.06243).

Math
----
``d`` = fan_in, ``b`` block size, ``N = d / b`` blocks, ``m`` butterfly factors. Trainable
``boft_R`` of shape ``(m, N, b, b)`` (only its skew part is used) and ``boft_s``, the output
scale (``(d_out, 1)``; ``(1, d_out)`` on conv2d layers, PEFT's layout). Per block::

    S = (R - R^T) / 2,      Q = (I - S)(I + S)^{-1}            (PEFT's Cayley; orthogonal)

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
the ``m`` factors, one saved activation instead of ``m`` permuted copies. The blocks of all
layers of one shape come from one batched inverse (``inv_ex``, no host sync) in float32 (float64 for
float64 params), cast to the activation / weight dtype where used. Conv2d of any kernel goes
through ``apply_to_weight`` on ``weight.flatten(1)`` (PEFT's flattening order).

Strength ``a``: ``Q_a = Cayley(a S)`` (orthogonal for every ``a``; ``a = 0`` gives ``I`` exactly)
and ``s_a = lerp(1, s, a) = 1 + a (s - 1)`` (``torch.lerp`` returns ``1`` at ``a = 0`` and ``s``
at ``a = 1`` exactly, and it works for any sign of ``s``).

Dropout (``boft_dropout = p``, training only, PEFT's semantics): one factor drawn at random
gets ``int(p N)`` of its blocks, drawn at random, replaced by the identity.

Output side (``rotation_side="output"``, the LyCORIS / ComfyUI / kohya convention): the same
blocks, butterflies and scale rotate the layer's *output* channels instead, ``d = out_features``::

    W_eff = diag(s) R W,            y = s * ((x W^T) R^T) + bias       (bias never rotated)

computed by :meth:`BOFT.transform_output` on the activations (``butterfly_rotate`` with
``transpose``: factor 0 acts first, as LyCORIS' factor loop does); ``rotate_input`` is the
identity. LyCORIS' ``oft_blocks`` ``A`` map exactly onto this (``diffadapt.formats.lycoris``):
its block ``(I + Q)(I - Q)^{-1}``, ``Q = A - A^T``, is ours for ``S = -Q``; its butterfly lists
the two half-chunks of a block interleaved where ours concatenates them (a fixed permutation of
each block, which Cayley commutes with); its ``rescale`` is ``s``.

``constraint = c > 0`` (LyCORIS' ``constraint`` network argument, saved as each module's
``.alpha``; either side): all the layer's skew matrices are scaled together so that their joint
Frobenius norm is at most ``c * d`` -- ``S <- S * c d / max(|S|_F + 1e-8, c d)``, LyCORIS'
formula, differentiable, no host sync. ``0`` = no constraint. The strength scales the
constrained ``S``.

PEFT differences: without its JIT CUDA extension (every CPU machine, and current torch on GPU)
PEFT silently trains ``m = 1`` while its config still says ``m``; such files hold ``boft_R`` of
shape ``(1, N, b, b)``. :meth:`BOFTConfig.for_saved_factors` gives the config PEFT really used.
PEFT has no Conv1D, no grouped conv and only square kernels; diffadapt has all three.

The helpers :func:`cayley`, :func:`drop_blocks` and :func:`butterfly_rotate` are shared with
OFT (``oft.py``), BOFT's one-factor case.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Optional, Union

import torch
from torch import Tensor

from diffadapt.methods.base import AdapterConfig, AdapterConfigError, LayerSpec, Method

LAYER_KINDS = ("linear", "conv1d", "conv2d")
ROTATION_SIDES = ("input", "output")


# -- shared config helpers (OFT uses them too) ----------------------------------------------------
def check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AdapterConfigError(f"{owner}: {name} must be an integer >= {minimum}, got {name}={value!r}.")


def check_prob(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise AdapterConfigError(f"{owner}: {name} is a probability in [0, 1), got {name}={value!r}.")


def check_kind(method: str, layer: LayerSpec) -> None:
    if layer.kind not in LAYER_KINDS:
        raise AdapterConfigError(
            f"{method} cannot adapt {layer.describe()}: layer kind {layer.kind!r} is not one of "
            f"{', '.join(LAYER_KINDS)}. Remove it from target_modules."
        )


def check_rotation(owner: str, side: Any, constraint: Any) -> None:
    """Validate ``rotation_side`` and LyCORIS' norm ``constraint`` (OFT and BOFT)."""
    if side not in ROTATION_SIDES:
        raise AdapterConfigError(
            f"{owner}: rotation_side must be 'input' (PEFT's convention, W R^T) or 'output' (LyCORIS / "
            f"ComfyUI's, R W), got rotation_side={side!r}."
        )
    if isinstance(constraint, bool) or not isinstance(constraint, (int, float)) or not (
        math.isfinite(constraint) and constraint >= 0
    ):
        raise AdapterConfigError(
            f"{owner}: constraint is LyCORIS' norm limit (a number >= 0, 0 = none), got constraint={constraint!r}."
        )


def rotated_dim(layer: LayerSpec, side: str) -> tuple[str, int]:
    """Name and size of the dimension a rotation acts on: fan_in (input side) or out_features."""
    return ("fan_in", layer.fan_in) if side == "input" else ("out_features", layer.out_features)


# -- shared math -------------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 parameters, float64 for float64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def cayley(skew: Tensor) -> Tensor:
    """``Q = (I - S)(I + S)^{-1} = 2 (I + S)^{-1} - I`` for a batch ``(..., b, b)`` of skew ``S``.

    One batched ``inv_ex`` (its backward is two batched matmuls, where a solve's backward is
    another batched LU solve: about a third less time on CPU for OFT's 32x32 blocks); ``I + S``
    is always invertible for skew ``S``, so the error check (a host sync) is skipped.
    """
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
    return 2.0 * torch.linalg.inv_ex(eye + skew)[0] - eye


def limit_norm(skew: Tensor, constraint: float, dim: int) -> Tensor:
    """LyCORIS' constraint, per layer: scale each ``skew[g]`` (leading dim: layers) so that
    ``|skew[g]|_F <= constraint * dim``.

    ``S * r / max(|S|_F + 1e-8, r)`` with ``r = constraint * dim``: LyCORIS' ``S * r / (|S|_F + 1e-8)``
    where that is smaller than ``S``, exactly ``S`` otherwise (``r / r == 1``); no host sync.
    """
    if not constraint:
        return skew
    radius = float(constraint) * dim
    norm = torch.linalg.vector_norm(skew.flatten(1), dim=1) + 1e-8
    scale = radius / torch.clamp(norm, min=radius)
    return skew * scale.view(-1, *[1] * (skew.dim() - 1))


def drop_blocks(blocks: Tensor, p: float) -> Tensor:
    """PEFT's multiplicative dropout on ``(G, m, N, b, b)`` blocks of G layers: in one random
    factor of each layer, ``int(p N)`` random blocks become the identity. Random draws stay on
    the device (one draw for all layers)."""
    g, m, n, b, _ = blocks.shape
    k = int(p * n)
    if k == 0:
        return blocks
    dev = blocks.device
    chosen = torch.rand(g, n, device=dev).argsort(dim=1) < k  # exactly k True per layer, at random places
    factor = torch.arange(m, device=dev) == torch.randint(m, (g, 1), device=dev)  # (G, m)
    mask = (factor[:, :, None] & chosen[:, None, :])[..., None, None]
    return torch.where(mask, torch.eye(b, dtype=blocks.dtype, device=dev), blocks)


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

    * ``m = 1``: one bmm on the strided ``(N, T, b)`` view of ``x``, one copy back.
    * ``m > 1``: feature-major, on ``(N, b, T)`` views (token axis innermost, so the copies
      move long rows): each factor is ``bmm(Q^T, u)``. Factor ``i``'s block ``(run, k)`` holds
      chunks ``k`` and ``k + 2^i`` of its run, so between factors the layout changes by swapping
      two axes of a 6-d view: ``m + 1`` copies in all (the first and last also transpose).
    """
    m, _, b, _ = blocks.shape
    d = x.shape[-1]
    n, h = d // b, b // 2
    right = blocks.to(x.dtype).expand(m, n, b, b)  # rows are right-multiplied: x_blk @ Q
    if transpose:
        right = right.mT
    if m == 1:
        return torch.bmm(x.reshape(-1, n, b).transpose(0, 1), right[0]).transpose(0, 1).reshape(x.shape)
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


# -- BOFT ----------------------------------------------------------------------------------------
@dataclass
class BOFTConfig(AdapterConfig):
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
    rotation_side: str = "input"
    constraint: float = 0.0

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        check_int(name, "boft_block_size", self.boft_block_size, 0)
        check_int(name, "boft_block_num", self.boft_block_num, 0)
        check_int(name, "boft_n_butterfly_factor", self.boft_n_butterfly_factor, 1)
        check_prob(name, "boft_dropout", self.boft_dropout)
        check_rotation(name, self.rotation_side, self.constraint)
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


class RotationFactors(NamedTuple):
    """Per-step factors of one layer: ``blocks`` ``(m, N, b, b)`` (the factors' blocks, compute
    dtype), ``scale`` ``(d_out,)`` or None; ``output``: the blocks rotate the output channels
    (``rotation_side="output"``); ``merged`` ``(1, N', B, B)``: the whole rotation as one
    block-diagonal factor (:func:`merge_factors`), what the activations and weights go through."""

    blocks: Tensor
    scale: Optional[Tensor]
    output: bool = False
    merged: Optional[Tensor] = None
    inv_scale: Optional[Tensor] = None  # 1 / scale (0 where scale is 0), for the runtime's fused backward

    @property
    def rotation(self) -> Tensor:
        return self.blocks if self.merged is None else self.merged


class BOFT(Method):
    """``W_eff = diag(s_a) W R_a^T`` (input side) or ``diag(s_a) R_a W`` (output side), ``R_a`` the
    butterfly product of ``Cayley(a S)`` blocks."""

    name: ClassVar[str] = "boft"
    config_class: ClassVar[type[AdapterConfig]] = BOFTConfig
    multiplicative: ClassVar[bool] = True
    learning_rate: ClassVar[float] = 1e-4  # the training scripts' starting points (see Method)
    embedded_learning_rate: ClassVar[float] = 2e-3
    peft_reverses_order: ClassVar[bool] = True

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
    def prepare_many(
        cls,
        config: BOFTConfig,
        params: list[dict[str, Tensor]],
        buffers: list[dict[str, Tensor]],
        strength: Union[float, Tensor],
        training: bool = False,
    ) -> list[RotationFactors]:
        """All layers' ``m N`` blocks from one batched Cayley solve, merged into one factor each."""
        r = torch.stack([p["boft_R"] for p in params])
        skew = cls._skews(config, r) * strength
        blocks = cayley(skew.flatten(0, 2)).view(skew.shape)
        if training and config.boft_dropout > 0:
            blocks = drop_blocks(blocks, config.boft_dropout)
        merged = merge_factors(blocks)
        s = torch.stack([p["boft_s"] for p in params])
        a = strength.to(s.dtype) if isinstance(strength, Tensor) else strength
        scale = torch.lerp(torch.ones_like(s), s, a).flatten(1)
        out = config.rotation_side == "output"
        with torch.no_grad():  # one batched reciprocal for all layers' fused backward
            inv = torch.where(scale != 0, scale, 1).reciprocal_().masked_fill_(scale == 0, 0).unbind(0)
        # unbind, not indexing: one backward node for all layers (an index's backward writes a full stack)
        return [
            RotationFactors(b, sc, out, m[None], i)
            for b, sc, m, i in zip(blocks.unbind(0), scale.unbind(0), merged.unbind(0), inv)
        ]

    @staticmethod
    def _skews(config: BOFTConfig, r: Tensor) -> Tensor:
        """``S`` ``(G, m, N, b, b)`` of G layers' ``boft_R`` at strength 1, constraint applied."""
        r = r.to(compute_dtype(r.dtype))
        return limit_norm(0.5 * (r - r.mT), config.constraint, r.shape[2] * r.shape[-1])

    @classmethod
    def skew(cls, config: BOFTConfig, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
        """The skew matrices ``S`` ``(m, N, b, b)`` at strength 1, constraint applied (compute dtype)."""
        return cls._skews(config, params["boft_R"][None])[0]

    @staticmethod
    def rotate_input(x: Tensor, prep: RotationFactors) -> Tensor:
        """``x @ R`` in ``x``'s dtype (the identity for output-side rotations)."""
        return x if prep.output else butterfly_rotate(x, prep.rotation)

    @staticmethod
    def output_scale(prep: RotationFactors) -> Optional[Tensor]:
        return prep.scale

    @staticmethod
    def scale_only(prep: RotationFactors) -> Optional[tuple[Tensor, Tensor]]:
        return None if prep.output or prep.inv_scale is None else (prep.scale, prep.inv_scale)

    @classmethod
    def transform_output(cls, y: Tensor, prep: RotationFactors) -> Tensor:
        """``y @ P^T``: ``y * s`` (input side) or ``(y @ R^T) * s`` (output side), in ``y``'s dtype."""
        if prep.output:
            y = butterfly_rotate(y, prep.rotation, transpose=True)
        return y if prep.scale is None else y * prep.scale.to(y.dtype)

    @staticmethod
    def apply_to_weight(weight: Tensor, prep: RotationFactors) -> Tensor:
        """``diag(s) W R^T`` (input side) or ``diag(s) R W`` (output side) in ``W``'s dtype."""
        if prep.output:
            w = butterfly_rotate(weight.mT, prep.rotation, transpose=True).mT
        else:
            w = butterfly_rotate(weight, prep.rotation, transpose=True)
        return w if prep.scale is None else w * prep.scale.to(w.dtype)[:, None]
