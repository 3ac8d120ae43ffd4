"""What OFT (``oft.py``) and BOFT (``boft.py``) share: Cayley blocks, one block-diagonal rotation, the
norm constraint, block dropout, config checks, and :class:`OrthogonalMethod`, their common base.

Math
----
``d`` is the rotated dimension (fan_in, or out_features on the output side), ``b`` the block size.
Each method turns its trainable parameters into skew matrices ``S`` (``b x b``, ``S^T = -S``) and
each ``S`` into an orthogonal block by Cayley's transform (PEFT's form)::

    Q = (I - S)(I + S)^{-1} = 2 (I + S)^{-1} - I                       (:func:`cayley`)

``x_blk @ Q`` rotates one block of ``b`` features. The method's rotation ``R`` is reached by
:meth:`OrthogonalMethod.prepare_many` as ONE block-diagonal matrix per layer (BOFT merges its
butterfly factors into one, ``boft.merge_factors``), so activations and weights go through one
strided ``bmm`` of the ``(N, T, b)`` view with the blocks (:func:`block_rotate`); nothing ``d x d``
is built. With a scale ``s`` (BOFT's; None for OFT)::

    input side  (PEFT's convention):                W_eff = diag(s) W R^T,   y = s * ((x R) W^T) + bias
    output side (LyCORIS / ComfyUI / kohya's):      W_eff = diag(s) R W,     y = s * ((x W^T) R^T) + bias

the bias is never rotated; on the output side ``rotate_input`` is the identity and
``transform_output`` rotates the activations. Conv2d of any kernel goes through
``apply_to_weight`` on ``weight.flatten(1)`` (PEFT's flattening order).

The blocks of all layers of one shape come from one batched inverse (no host sync: :func:`cayley`) in
float32 (float64 for float64 parameters, :func:`compute_dtype`), cast to the activation / weight
dtype where used. Strength ``a`` scales ``S``: ``Q_a = Cayley(a S)`` is orthogonal for every ``a``
and exactly ``I`` at ``a = 0``.

``constraint = c > 0`` (LyCORIS' ``constraint`` network argument, saved as each module's
``.alpha``; either side): all the layer's skew matrices are scaled together so that their joint
Frobenius norm is at most ``c * d`` -- ``S <- S * c d / max(|S|_F + 1e-8, c d)``, LyCORIS'
formula, differentiable, no host sync (:func:`limit_norm`). ``0`` = no constraint. The strength
scales the constrained ``S``.

Dropout (training only, PEFT's multiplicative dropout, :func:`drop_blocks`): in one factor drawn at
random (OFT has one), ``int(p N)`` of its blocks, drawn at random, become the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Optional, Union

import torch
from torch import Tensor

from diffadapt.methods.base import AdapterConfig, AdapterConfigError, LayerSpec, Method

LAYER_KINDS = ("linear", "conv1d", "conv2d")
ROTATION_SIDES = ("input", "output")


# -- config helpers ------------------------------------------------------------------------------
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


# -- block math ----------------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 parameters, float64 for float64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def cayley(skew: Tensor) -> Tensor:
    """``Q = (I - S)(I + S)^{-1} = 2 (I + S)^{-1} - I`` for a batch ``(..., b, b)`` of skew ``S``:
    one autograd node (:class:`_Cayley`) around one batched inverse, whose backward is two batched
    matmuls (a solve's backward would be another batched LU solve). ``I + S`` is always invertible
    for skew ``S``, so no error check (a host sync) is made."""
    return _Cayley.apply(skew.reshape(-1, *skew.shape[-2:])).view(skew.shape)


# CPU, one thread, fp32, (I + S)^{-1} of B blocks, inv_ex -> block_inverse: b 16 (B 3000) 12.7 -> 11.3 ms,
# b 24 (2000) 25 -> 19, b 32 (3000) 79 -> 35, b 32 (264) 5.7 -> 2.9, b 64 (1000) 124 -> 50, b 256 (20) 47 -> 14;
# from 32 wide on (a leaf of 16 or less goes to inv_ex)
_BLOCK_INVERSE_MIN_SIZE = 32
_BLOCK_INVERSE_LEAF = 16


def _inverse(m: Tensor) -> Tensor:
    """``m^{-1}`` of ``I + S`` blocks ``(B, b, b)``: :func:`block_inverse` on the CPU from
    ``_BLOCK_INVERSE_MIN_SIZE`` rows, else one batched ``inv_ex`` (a single call: what narrow blocks and
    launch-bound devices want)."""
    if m.device.type == "cpu" and m.shape[-1] >= _BLOCK_INVERSE_MIN_SIZE:
        return block_inverse(m)
    return torch.linalg.inv_ex(m)[0]


def block_inverse(m: Tensor) -> Tensor:
    """``m^{-1}`` of a batch ``(B, n, n)`` of matrices whose symmetric part is positive definite
    (``I + S``, S skew), by recursive 2 x 2 block elimination without pivoting: with
    ``m = [[A, B], [C, D]]`` and the Schur complement ``Z = D - C A^{-1} B``::

        m^{-1} = [[A^{-1} + A^{-1} B Z^{-1} C A^{-1},  -A^{-1} B Z^{-1}],
                  [-Z^{-1} C A^{-1},                     Z^{-1}         ]]

    Every block it inverts keeps a symmetric part ``>= I`` (``A`` is a principal block of ``I + S``;
    ``Z``'s symmetric part is ``I + B^T sym(A^{-1}) B`` here, since ``C = -B^T``), so each has an
    inverse of norm <= 1 and no pivot is needed. Leaves of ``_BLOCK_INVERSE_LEAF`` or fewer rows go
    to ``inv_ex``; the rest is batched matmuls. Float32 error: LAPACK's (1-4e-7) while ``|S|_2 <= 20``
    (every plane turned up to 174 degrees; trained OFT blocks sit at ``|S| << 1``), growing as
    ``eps |S|^2`` beyond (the pivoted LU's as ``eps |S|``): 2.5e-6 at ``|S|_2 = 60``."""
    n = m.shape[-1]
    if n <= _BLOCK_INVERSE_LEAF:
        return torch.linalg.inv_ex(m)[0]
    h = n // 2
    a, b, c, d = m[:, :h, :h], m[:, :h, h:], m[:, h:, :h], m[:, h:, h:]
    ai = block_inverse(a)
    aib = torch.bmm(ai, b)
    zi = block_inverse(torch.baddbmm(d, c, aib, alpha=-1))
    cai = torch.bmm(c, ai)
    out = torch.empty_like(m)
    top_right = torch.baddbmm(b, aib, zi, beta=0, alpha=-1)  # -A^{-1} B Z^{-1} (b: only a shape, beta=0)
    out[:, :h, h:] = top_right
    out[:, h:, :h] = torch.baddbmm(c, zi, cai, beta=0, alpha=-1)
    out[:, :h, :h] = torch.baddbmm(ai, top_right, cai, alpha=-1)
    out[:, h:, h:] = zi
    return out


class _Cayley(torch.autograd.Function):
    """``Q = 2 (I + S)^{-1} - I`` of ``(B, b, b)`` blocks as one node: forward forms ``I + S``, inverts
    it (:func:`_inverse`) and turns ``X`` into ``Q`` in place; backward (inv's adjoint, ``dQ = 2 dX``):
    ``dS = -2 X^T G X^T = -(1/2) (Q + I)^T G (Q + I)^T``, with only ``Q`` kept. In the skew's dtype
    (float32 or wider), also under autocast (whose bf16 matmuls would lose the inverse's precision)."""

    @staticmethod
    def forward(ctx, skew):
        with torch.autocast(skew.device.type, enabled=False):
            m = skew.clone()
            m.diagonal(dim1=-2, dim2=-1).add_(1.0)
            q = _inverse(m).mul_(2.0)
            q.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        ctx.save_for_backward(q)
        return q

    @staticmethod
    def backward(ctx, g):
        (q,) = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            g = g.to(q.dtype)
            p = q.clone()
            p.diagonal(dim1=-2, dim2=-1).add_(1.0)  # 2 X
            pt = p.mT
            return torch.baddbmm(g, torch.bmm(pt, g), pt, beta=0, alpha=-0.5)


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


def block_rotate(x: Tensor, blocks: Tensor, transpose: bool = False) -> Tensor:
    """``x @ R`` (or ``x @ R^T`` with ``transpose``) for ``R = blockdiag(blocks)``.

    ``x`` is ``(..., d)``, ``blocks`` ``(N, b, b)`` with ``N b = d`` (``N = 1`` is broadcast over
    all blocks: OFT's ``block_share``): one bmm on the strided ``(N, T, b)`` view of ``x``, one copy
    back, in ``x``'s dtype.
    """
    b = blocks.shape[-1]
    n = x.shape[-1] // b
    right = blocks.to(x.dtype)  # rows are right-multiplied: x_blk @ Q
    right = right if right.shape[0] == n else right.expand(n, b, b)
    if transpose:
        right = right.mT
    return torch.bmm(x.reshape(-1, n, b).transpose(0, 1), right).transpose(0, 1).reshape(x.shape)


GROUP_WIDTH = 16  # rotations of smaller blocks run as block-diagonal blocks of up to this width


def group_count(b: int, counts: list[int], width: Optional[int] = None) -> int:
    """How many ``b x b`` blocks go into one block-diagonal block: the largest power of two ``g``
    with ``g b <= width`` (default GROUP_WIDTH) that divides every layer's block count in ``counts``."""
    width = GROUP_WIDTH if width is None else width
    g = 1
    while b * g * 2 <= width and all(c % (g * 2) == 0 for c in counts):
        g *= 2
    return g


def group_blocks(blocks: Tensor, g: int) -> Tensor:
    """``(..., K, b, b)`` blocks as ``(..., K/g, g b, g b)`` block-diagonal ones (zeros between),
    differentiable: the same rotation, for a bmm with a wider inner size, which runs faster
    (CPU, one thread, 8-blocks as 16-blocks: activations 512x64 fwd+bwd 448 -> 292 us, 128x512
    932 -> 528 us; merging 1280x5120 33 -> 22 ms, 320x1280 1.2 -> 0.5 ms)."""
    if g == 1:
        return blocks
    *lead, k, b, _ = blocks.shape
    q = blocks.reshape(*lead, k // g, g, b, b).movedim(-3, -1)  # (..., K/g, b, b, g)
    big = torch.diag_embed(q)  # (..., K/g, b_i, b_j, g, g), nonzero where the two g indices agree
    return big.movedim(-2, -4).movedim(-1, -2).reshape(*lead, k // g, g * b, g * b)


def grouped_rotation(rotation: Tensor) -> Tensor:
    """``(G, N, B, B)`` per-layer rotations with their small blocks grouped (:func:`group_blocks`);
    a single shared block (``N = 1``, broadcast over the layer) stays as it is."""
    if rotation.shape[1] == 1:
        return rotation
    return group_blocks(rotation, group_count(rotation.shape[-1], [rotation.shape[1]]))


@dataclass
class OrthogonalConfig(AdapterConfig):
    """The fields OFT and BOFT share: which side of the layer rotates, and LyCORIS' norm limit."""

    rotation_side: str = "input"
    constraint: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_rotation(type(self).__name__, self.rotation_side, self.constraint)


class RotationFactors(NamedTuple):
    """Per-step factors of one layer: ``blocks`` ``(m, N, b, b)`` (the factors' blocks, compute
    dtype; ``m = 1`` for OFT); ``rotation`` ``(N', B, B)``: the whole rotation as one
    block-diagonal factor, what the activations and weights go through (OFT: ``blocks[0]``; BOFT:
    its factors merged, ``boft.merge_factors``; blocks under 16 wide grouped block-diagonally up to
    16, :func:`group_blocks`); ``scale`` ``(d_out,)`` or None; ``output``: the
    blocks rotate the output channels (``rotation_side="output"``)."""

    blocks: Tensor
    rotation: Tensor
    scale: Optional[Tensor] = None
    output: bool = False
    inv_scale: Optional[Tensor] = None  # 1 / scale (0 where scale is 0), for the runtime's fused backward


class OrthogonalMethod(Method):
    """The rotation runtime of OFT and BOFT (module docstring). A subclass supplies its math:
    :meth:`skews` (parameters -> skew matrices), :meth:`rotation_blocks` (skew -> blocks), where it
    has more than blocks :meth:`factors` (blocks -> :class:`RotationFactors`: BOFT's merge and
    scale), and names its dropout field. Its config has ``rotation_side`` and ``constraint``
    (:func:`check_rotation`)."""

    multiplicative: ClassVar[bool] = True
    dropout_field: ClassVar[str]  # the config field holding :func:`drop_blocks`' probability

    # -- the method's own math ------------------------------------------------------------------
    @classmethod
    def skews(cls, config: AdapterConfig, params: list[dict[str, Tensor]], buffers: list[dict[str, Tensor]]) -> Tensor:
        """The skew matrices of G stacked layers at strength 1, constraint applied (compute dtype):
        ``(G, ..., b, b)``, the leading dimension over layers."""
        raise NotImplementedError

    @classmethod
    def rotation_blocks(cls, config: AdapterConfig, skew: Tensor) -> Tensor:
        """``(G, m, N, b, b)`` orthogonal blocks of :meth:`skews` (already scaled by the strength)."""
        raise NotImplementedError

    @classmethod
    def factors(
        cls, config: AdapterConfig, params: list[dict[str, Tensor]], blocks: Tensor, strength: Union[float, Tensor]
    ) -> list[RotationFactors]:
        """One :class:`RotationFactors` per layer from the ``(G, m, N, b, b)`` blocks; default: the
        blocks alone, no scale (OFT)."""
        out = config.rotation_side == "output"
        rotation = grouped_rotation(blocks[:, 0])
        return [RotationFactors(b, r, None, out) for b, r in zip(blocks.unbind(0), rotation.unbind(0))]

    # -- shared ---------------------------------------------------------------------------------
    @classmethod
    def prepare_many(cls, config: AdapterConfig, params: list[dict[str, Tensor]], buffers: list[dict[str, Tensor]],
                     strength: Union[float, Tensor], training: bool = False) -> list[RotationFactors]:
        """All layers' blocks from one batched op sequence (one Cayley inverse, or OFT's series)."""
        blocks = cls.rotation_blocks(config, cls.skews(config, params, buffers) * strength)
        p = getattr(config, cls.dropout_field)
        if training and p > 0:
            blocks = drop_blocks(blocks, p)
        return cls.factors(config, params, blocks, strength)

    @classmethod
    def skew(cls, config: AdapterConfig, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
        """One layer's skew matrices at strength 1, constraint applied (compute dtype)."""
        return cls.skews(config, [params], [buffers])[0]

    @staticmethod
    def rotate_input(x: Tensor, prep: RotationFactors) -> Tensor:
        """``x @ R`` in ``x``'s dtype (the identity for output-side rotations)."""
        return x if prep.output else block_rotate(x, prep.rotation)

    @staticmethod
    def output_scale(prep: RotationFactors) -> Optional[Tensor]:
        return prep.scale

    @staticmethod
    def rotation_width(prep: RotationFactors) -> int:
        return prep.rotation.shape[-1]

    @staticmethod
    def rotates_output(prep: RotationFactors) -> bool:
        return prep.output

    @staticmethod
    def output_is_identity(prep: RotationFactors) -> bool:
        return not prep.output and prep.scale is None

    @staticmethod
    def scale_only(prep: RotationFactors) -> Optional[tuple[Tensor, Tensor]]:
        return None if prep.output or prep.inv_scale is None else (prep.scale, prep.inv_scale)

    @classmethod
    def transform_output(cls, y: Tensor, prep: RotationFactors) -> Tensor:
        """``y @ P^T``: ``y * s`` (input side) or ``(y @ R^T) * s`` (output side), in ``y``'s dtype."""
        if prep.output:
            y = block_rotate(y, prep.rotation, transpose=True)
        return y if prep.scale is None else y * prep.scale.to(y.dtype)

    @staticmethod
    def apply_to_weight(weight: Tensor, prep: RotationFactors) -> Tensor:
        """``diag(s) W R^T`` (input side) or ``diag(s) R W`` (output side) in ``W``'s dtype."""
        if prep.output:
            w = block_rotate(weight.mT, prep.rotation, transpose=True).mT
        else:  # (W R^T)^T = R W^T block by block: one bmm on row blocks of the strided W^T
            d_out, d_in = weight.shape
            blocks = prep.rotation.to(weight.dtype)
            n, b = d_in // blocks.shape[-1], blocks.shape[-1]
            right = weight.mT.reshape(n, b, d_out)
            if torch.compiler.is_compiling() or (  # a graph cannot write into a strided out=
                    torch.is_grad_enabled() and (weight.requires_grad or blocks.requires_grad)):
                w = torch.bmm(blocks.expand(n, b, b), right).view(d_in, d_out).mT  # the caller's copy lays it out
            else:  # merging: written straight into a (d_out, d_in)-contiguous weight (one allocation, no
                # copy: at SD1.5 size the second weight-sized buffer was half of a merge's time, in page faults)
                g = group_count(b, [n])
                blocks, n, b = group_blocks(blocks.expand(n, b, b), g), n // g, b * g
                w = torch.empty(d_out, d_in, dtype=weight.dtype, device=weight.device)
                torch.bmm(blocks, weight.mT.reshape(n, b, d_out), out=w.mT.view(n, b, d_out))
        return w if prep.scale is None else w * prep.scale.to(w.dtype)[:, None]
