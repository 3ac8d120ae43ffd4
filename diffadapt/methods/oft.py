"""OFT: orthogonal fine-tuning (Qiu et al. 2023, https://arxiv.org/abs/2306.07280), PEFT >= 0.18 format.

Math
----
``d`` = fan_in, ``b`` block size, ``r = d / b`` blocks (PEFT's ``r``). Trainable ``oft_R`` of
shape ``(r, b(b-1)/2)`` (PEFT key ``<path>.oft_R.weight``; ``(1, ...)`` with ``block_share``): the
strict upper triangle of each block in row-major (``torch.triu_indices(b, b, 1)``) order, ``U``,
with ``S = U - U^T`` (no 1/2, unlike BOFT). Each block ``Q`` acts as ``x_blk @ Q``::

    exact Cayley  (use_cayley_neumann=False):  Q = (I - S)(I + S)^{-1}
    Cayley-Neumann (use_cayley_neumann=True, n = num_cayley_neumann_terms), PEFT's truncation:
        Q = I + 2(S + S^2 + ... + S^k) + S^{k+1},  k = max(n - 2, 2)   (n > 2; so n = 3 and
        n = 4 agree; n = 2: I + 2S, n = 1: I), a truncation of (I + S)(I - S)^{-1}

so the Neumann matrix approximates the *transpose* of the exact one: the same ``oft_R`` under
the two settings rotates (about) oppositely; to convert a file between them negate ``oft_R``.
Neumann ``Q`` is orthogonal only up to the truncation error (``O(|S|^n)``).

    W_eff = W R^T,  R = blockdiag(Q_1 .. Q_r),  y = (x R) W^T + bias

computed by the runtime OFT shares with BOFT (:mod:`diffadapt.methods._orthogonal`): a bmm of the
``(r, T, b)`` view with the blocks; conv2d of any kernel through ``apply_to_weight`` on
``weight.flatten(1)``.

* ``coft`` (constrained OFT): each block's skew matrix is clamped to the Frobenius ball of
  radius ``eps / sqrt(rows of oft_R)``: ``S <- S * min(1, radius / |S|_F)``. PEFT overwrites
  the parameter in place with the projection on every forward; diffadapt projects functionally
  in ``prepare`` (same output for any stored ``oft_R``; the gradient flows through the
  projection instead of PEFT's projected-gradient step, so training trajectories may differ).
* ``block_share``: one block for all ``r`` positions.
* ``module_dropout = p`` (training only): ``int(p r)`` random blocks become the identity, as
  PEFT documents. PEFT 0.21 builds that dropout layer but never calls it (a no-op there).

Output side (``rotation_side="output"``, LyCORIS' ``diag-oft`` / kohya's OFT): the same blocks
rotate the output channels, ``W_eff = R W`` (``d = out_features``), bias untouched -- see
:mod:`diffadapt.methods._orthogonal`.
LyCORIS' ``oft_blocks`` ``A`` (full ``b x b``) act as ``(I - Q)(I + Q)^{-1}``, ``Q = A - A^T``,
which is exact Cayley here with ``S = Q``: ``oft_R`` holds ``Q``'s upper triangle. ``constraint``
is LyCORIS' norm limit (see :mod:`~diffadapt.methods._orthogonal`; not with ``block_share``, which
LyCORIS does not have).

Strength ``a``: the skew matrix is scaled, ``Q_a = Cayley(a S)`` (or Neumann(``a S``)): exactly
``I`` at ``a = 0`` and the trained blocks at ``a = 1``; orthogonal for every ``a`` with exact Cayley.

Defaults: diffadapt's ``use_cayley_neumann`` default is **False** (exact, orthogonal Cayley; one
batched inverse per shape group and step, no host sync), PEFT's is True. Every saved
``adapter_config.json`` carries the field explicitly, so PEFT computes the same function;
reading a PEFT config (:mod:`diffadapt.formats.peft.oft`) fills a missing field with PEFT's default (True), which is what
PEFT computes for such files.

Layer fit follows PEFT: a block size (or ``r``) that does not divide fan_in is replaced by the
nearest divisor, with a warning (files written by PEFT rely on this, e.g. 4-channel convs).
PEFT's own un-merged Conv2d forward for kernels > 1 (unfold, rotate, *fold*) is not
``conv(x, W R^T)`` (nor the base layer at init, since fold sums overlapping patches); diffadapt
always computes ``conv(x, W R^T)``, which is what PEFT's merge produces.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffadapt.methods._orthogonal import (
    OrthogonalConfig, OrthogonalMethod, cayley, check_int, check_kind, check_prob,
    compute_dtype, limit_norm, rotated_dim
)
from diffadapt.methods.base import AdapterConfig, AdapterConfigError, LayerSpec


def nearest_divisor(n: int, p: int) -> int:
    """PEFT's adjustment of a block size / count ``p`` that does not divide ``n``: the closest
    divisor of ``n`` (the lower one on ties), ``n`` itself when ``p >= n``."""
    if p >= n:
        return n
    lower = next(q for q in range(p, 0, -1) if n % q == 0)
    higher = next(q for q in range(p, n + 1) if n % q == 0)
    return lower if p - lower <= higher - p else higher


@dataclass
class OFTConfig(OrthogonalConfig):
    """PEFT's ``OFTConfig`` (set exactly one of ``r`` / ``oft_block_size``); see module docstring
    for the ``use_cayley_neumann`` default, ``rotation_side`` and ``constraint`` (LyCORIS; not in
    PEFT, so such configs refuse PEFT export)."""

    method: ClassVar[str] = "oft"

    r: int = field(default=0, metadata={"flag": "--oft_r", "help": "number of blocks (0: use the block size)."})
    oft_block_size: int = field(default=32, metadata={"flag": "--oft_block_size", "help": "block size (32)."})
    module_dropout: float = 0.0
    coft: bool = field(default=False, metadata={"flag": "--oft_coft", "help": "constrained OFT."})
    eps: float = field(default=6e-5, metadata={"flag": "--oft_eps", "help": "COFT radius."})
    block_share: bool = field(default=False, metadata={"flag": "--oft_block_share", "help": "share one block."})
    use_cayley_neumann: bool = field(
        default=False, metadata={"flag": "--use_cayley_neumann", "help": "Cayley-Neumann series instead of exact."}
    )
    num_cayley_neumann_terms: int = 5
    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        check_int(name, "r", self.r, 0)
        check_int(name, "oft_block_size", self.oft_block_size, 0)
        check_int(name, "num_cayley_neumann_terms", self.num_cayley_neumann_terms, 1)
        check_prob(name, "module_dropout", self.module_dropout)
        if self.constraint and self.block_share:
            raise AdapterConfigError(
                f"{name}: constraint (LyCORIS' norm limit over all of a layer's blocks) cannot be combined with "
                "block_share=True (one block for all positions, which LyCORIS does not have). Drop one of them."
            )
        if (self.r == 0) == (self.oft_block_size == 0):
            raise AdapterConfigError(
                f"{name}: set exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) to a "
                "positive value and the other to 0 (r x oft_block_size = the layer's fan_in)."
            )
        if self.coft and not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise AdapterConfigError(
                f"{name}: coft=True needs a positive eps (the radius of the allowed rotation), got eps={self.eps!r}."
            )

    def layout(self, layer: LayerSpec) -> tuple[int, int]:
        """``(r, b)`` for ``layer``, adjusted to divisors of the rotated dimension (fan_in, or
        out_features on the output side) as PEFT does (with a warning)."""
        check_kind("OFT", layer)
        dim, d = rotated_dim(layer, self.rotation_side)
        key, given = ("oft_block_size", self.oft_block_size) if self.oft_block_size else ("r", self.r)
        fitted = given if d % given == 0 else nearest_divisor(d, given)
        if fitted != given:
            warnings.warn(
                f"OFT on {layer.describe()}: {key}={given} does not divide {dim}={d}; using {key}={fitted} "
                "for this layer (as PEFT does)."
            )
        return (d // fitted, fitted) if key == "oft_block_size" else (fitted, d // fitted)

    def check_layer(self, layer: LayerSpec) -> None:
        self.layout(layer)


def neumann(skew: Tensor, terms: int) -> Tensor:
    """PEFT's Cayley-Neumann blocks ``I + 2(S + ... + S^k) + S^{k+1}``, ``k = max(n-2, 2)`` (n > 2)."""
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
    if terms == 1:
        return eye.expand(skew.shape)
    q = eye + 2.0 * skew
    if terms > 2:
        power = skew @ skew
        q = q + 2.0 * power
        for _ in range(3, terms - 1):
            power = power @ skew
            q = q + 2.0 * power
        q = q + power @ skew
    return q


def coft_project(vec: Tensor, eps: float) -> Tensor:
    """Clamp each block's ``|S|_F = sqrt(2) |vec|`` to ``eps / sqrt(rows)`` (PEFT's COFT projection);
    ``vec`` is ``(..., rows, b(b-1)/2)``."""
    radius = eps / math.sqrt(vec.shape[-2])
    norm = math.sqrt(2.0) * torch.linalg.vector_norm(vec, dim=-1, keepdim=True)
    return vec * (radius / norm.clamp_min(radius))


def packed_skew(vec: Tensor, triu_index: Tensor) -> Tensor:
    """``S = U - U^T`` ``(rows, b, b)`` from packed upper triangles ``vec`` ``(rows, b(b-1)/2)``;
    ``triu_index``: the flat positions of the packed entries (``OFT.triu_index``)."""
    rows, n = vec.shape
    b = (1 + math.isqrt(1 + 8 * n)) // 2
    upper = vec.new_zeros(rows, b * b).index_copy(1, triu_index, vec).view(rows, b, b)
    return upper - upper.mT


class OFT(OrthogonalMethod):
    """``W_eff = W R_a^T`` (or ``R_a W`` on the output side) with ``R_a = blockdiag(Cayley(a S_k))``:
    one block-diagonal factor, no scale."""

    name: ClassVar[str] = "oft"
    config_class: ClassVar[type[AdapterConfig]] = OFTConfig
    learning_rate: ClassVar[float] = 1e-4  # the training scripts' starting points (see Method)
    embedded_learning_rate: ClassVar[float] = 1e-3
    peft_reverses_order: ClassVar[bool] = False
    dropout_field: ClassVar[str] = "module_dropout"

    @classmethod
    def init_layer(
        cls, config: OFTConfig, layer: LayerSpec, weight: Tensor, shared: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``oft_R`` zeros (identity) or N(0, 0.1) (PEFT's inits); buffer ``triu_index``: flat
        positions of the packed upper-triangle entries in a ``b x b`` block."""
        r, b = config.layout(layer)
        vec = torch.zeros(1 if config.block_share else r, b * (b - 1) // 2,
                          dtype=compute_dtype(weight.dtype), device=weight.device)
        if not config.init_weights:
            vec.normal_(0.0, 0.1)
        return {"oft_R": vec}, {"triu_index": cls.triu_index(b, weight.device)}

    @staticmethod
    def triu_index(b: int, device: Any = None) -> Tensor:
        """Flat positions in a ``b x b`` block of the packed strict upper triangle (row-major)."""
        rows, cols = torch.triu_indices(b, b, 1, device=device)
        return rows * b + cols

    @classmethod
    def stack_key(cls, params: dict[str, Tensor], buffers: dict[str, Tensor]):
        return (*super().stack_key(params, buffers), buffers["triu_index"].device)

    @classmethod
    def skews(cls, config: OFTConfig, params: list[dict[str, Tensor]], buffers: list[dict[str, Tensor]]) -> Tensor:
        """``S = U - U^T`` ``(G, rows, b, b)`` of G layers' ``oft_R``, coft / constraint applied."""
        vec = torch.stack([p["oft_R"] for p in params])
        vec = vec.to(compute_dtype(vec.dtype))
        if config.coft:
            vec = coft_project(vec, config.eps)
        g, rows, _ = vec.shape
        skew = packed_skew(vec.flatten(0, 1), buffers[0]["triu_index"])
        skew = skew.view(g, rows, *skew.shape[1:])
        return limit_norm(skew, config.constraint, rows * skew.shape[-1])

    @classmethod
    def rotation_blocks(cls, config: OFTConfig, skew: Tensor) -> Tensor:
        """All layers' blocks from one batched Cayley inverse (or the Neumann series), as one factor."""
        if config.use_cayley_neumann:
            blocks = neumann(skew, config.num_cayley_neumann_terms)
        else:
            blocks = cayley(skew)
        return blocks[:, None]  # (G, 1, rows, b, b): one factor
