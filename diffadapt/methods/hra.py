"""HRA: Householder reflection adaptation (Yuan et al. 2024, https://arxiv.org/abs/2405.17484).

Math
----
Trainable ``U = [u_1 .. u_r]`` of shape ``(fan_in, r)`` (PEFT key ``<path>.hra_u``), with
normalised columns ``y_i = u_i / ||u_i||`` and ``Y = [y_1 .. y_r]``.

* ``apply_GS=False``: ``Q = H_1 H_2 ... H_r`` with ``H_i = I - 2 y_i y_i^T``.
* ``apply_GS=True``: Gram-Schmidt the columns into ``Ũ`` and ``Q = I - 2 Ũ Ũ^T``. ``Ũ Ũ^T`` is
  the orthogonal projector onto ``span(U)``, independent of the column signs, so any
  orthonormal basis gives the same ``Q``; we take Householder QR's (``U = Ũ R``), which is as
  accurate as PEFT's modified Gram-Schmidt loop and one batched library call.

The effective weight is ``W_eff = W Q``, i.e. ``y = x Q^T W^T + b``.

Fast form (compact WY; nothing of size ``fan_in x fan_in`` is ever built)
-------------------------------------------------------------------------
Both cases are ``Q = I - Y T Y^T`` with a small ``r x r`` matrix ``T``:

* chain: ``T^{-1} = I/2 + striu(Y^T Y)`` (upper triangular with diagonal 1/2, never singular),
  the Schreiber-Van Loan / Joffrain et al. compact WY form of ``H_1 ... H_r``; it equals the
  column recurrence ``T_ii = 2``, ``T[:i, i] = -2 T[:i, :i] Y[:, :i]^T y_i``;
* Gram-Schmidt: ``Y = Ũ``, ``T = 2 I``.

``prepare_many`` builds ``Y`` and ``T`` in float32 for all layers of one shape at once (one
batched ``r x r`` triangular solve, or one batched QR) and returns, per layer, ``Y`` and ``V = Y T_a`` with ``T_a = a T`` (``a`` = strength). Then, at LoRA-rank
cost::

    rotate_input(x)    = x Q_a^T = x - (x Y) V^T
    apply_to_weight(W) = W Q_a   = W - (W V) Y^T

Strength ``a``: ``Q_a = I - a Y T Y^T = (1 - a) I + a Q`` -- the straight line from ``I`` to
``Q``. ``a = 0`` gives the base layer bit-exactly (``V = 0``), ``a = 1`` the trained adapter
exactly. In between ``Q_a`` is *not* orthogonal: an eigenvalue ``e^{i phi}`` of ``Q`` becomes
``1 - a + a e^{i phi}``, so a reflected direction (``phi = pi``; always present for odd ``r``
and for every direction of ``span(U)`` with ``apply_GS=True``) is scaled by ``1 - 2a`` and is
annihilated at ``a = 1/2``. A rotation by ``phi`` (what paired vectors from the identity init
turn into) is only shrunk, by at least ``cos(phi / 2)`` for ``0 <= a <= 1``; ``a > 1``
extrapolates. (A geodesic ``Q^a`` would need an ``r x r`` eigen/Schur step with host syncs and
has no real solution for ``det Q = -1``; not worth it.)

Initialisation (``init_weights=True``): columns in equal pairs ``u_1 = u_2, u_3 = u_4, ...``
(each half drawn like PEFT, Kaiming-uniform), so ``H_{2k-1} H_{2k} = I`` and ``Q = I``. This
needs an even ``r`` and the Householder chain: with odd ``r`` (``det Q = -1``) or with
``apply_GS=True`` (``Q`` is a reflection) the identity cannot be reached, and the config
raises ``AdapterConfigError`` instead of silently starting elsewhere, as PEFT does (PEFT
warns and draws random columns for odd ``r``; with ``apply_GS`` its paired init Gram-Schmidts
a rounding-noise vector into a random reflection). ``init_weights=False`` draws all columns
Kaiming-uniform (PEFT's behaviour), a random non-identity start.

Layers: nn.Linear, transformers Conv1D and nn.Conv2d of any kernel (``fan_in = in_channels /
groups * kh * kw``, PEFT's flattening order). PEFT itself has no Conv1D, no grouped conv and
only square kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Union

import torch
from torch import Tensor

from diffadapt.methods.base import AdapterConfig, AdapterConfigError, LayerSpec, Method

@dataclass
class HRAConfig(AdapterConfig):
    """PEFT's ``HRAConfig``: ``r`` Householder vectors per layer, optional Gram-Schmidt."""

    method: ClassVar[str] = "hra"

    r: int = field(
        default=8, metadata={"flag": "--hra_r", "help": "Householder reflections r (8; even for an identity init)."}
    )
    apply_GS: bool = field(
        default=False, metadata={"flag": "--hra_apply_GS", "help": "Gram-Schmidt orthogonalisation."}
    )

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise AdapterConfigError(f"{name}: r must be a positive integer, got r={self.r!r}.")
        if self.init_weights and self.apply_GS:
            raise AdapterConfigError(
                f"{name}: apply_GS=True with init_weights=True cannot start at the identity: with "
                "Gram-Schmidt Q = I - 2 U U^T is a reflection for every U (PEFT's paired init turns into a "
                "random reflection). Set init_weights=False for a random start, or use apply_GS=False with "
                "an even r for an identity start."
            )
        if self.init_weights and self.r % 2:
            raise AdapterConfigError(
                f"{name}: init_weights=True needs an even r (the identity init pairs equal Householder "
                f"vectors, H H = I), got r={self.r}. Use an even r such as r={self.r + 1}, or set "
                "init_weights=False for a random, non-identity start (what PEFT does for odd r)."
            )

    def check_layer(self, layer: LayerSpec) -> None:
        if layer.kind not in ("linear", "conv1d", "conv2d"):
            raise AdapterConfigError(
                f"HRA cannot adapt {layer.describe()}: layer kind {layer.kind!r} is not one of linear, conv1d, "
                "conv2d. Remove it from target_modules."
            )
        if self.apply_GS and self.r > layer.fan_in:
            raise AdapterConfigError(
                f"HRA with apply_GS=True cannot adapt {layer.describe()}: r={self.r} vectors cannot be "
                f"orthonormal in fan_in={layer.fan_in} dimensions. Use r <= {layer.fan_in} for this layer "
                "(overrides) or exclude it."
            )


class HRAFactors(NamedTuple):
    """``Q_a = I - v y^T``: ``y`` unit (GS: orthonormal) vectors, ``v = y (a T)``; (fan_in, r), fp32/64."""

    y: Tensor
    v: Tensor


def _kaiming_columns(rows: int, cols: int, like: Tensor) -> Tensor:
    """PEFT's ``kaiming_uniform_(a=sqrt(5))`` on a (rows, cols) tensor: U(-1/sqrt(cols), 1/sqrt(cols))."""
    bound = 1.0 / math.sqrt(cols)
    return torch.empty(rows, cols, dtype=like.dtype, device=like.device).uniform_(-bound, bound)


def wy_factors(u: Tensor, apply_gs: bool, strength: Union[float, Tensor] = 1.0) -> HRAFactors:
    """Compact WY factors of ``Q_a`` from ``u`` (..., fan_in, r); batched over leading dims.
    Always float32 or wider, also under autocast (the small solve has no bf16/fp16 kernel)."""
    with torch.autocast(u.device.type, enabled=False):
        u = u.to(torch.promote_types(u.dtype, torch.float32))
        if apply_gs:  # orthonormal basis of span(U), T = 2 I (QR cannot fail: no host-side check)
            y = torch.linalg.qr(u).Q
            return HRAFactors(y, y * (2.0 * strength))
        y = u / torch.linalg.vector_norm(u, dim=-2, keepdim=True)
        gram = y.mT @ y
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        t = torch.linalg.solve_triangular(0.5 * eye + torch.triu(gram, diagonal=1), eye, upper=True)
        return HRAFactors(y, y @ (t * strength))


class HRA(Method):
    """Householder reflection adaptation: ``W_eff = W Q_a`` with ``Q_a = I - a Y T Y^T``."""

    name: ClassVar[str] = "hra"
    config_class: ClassVar[type[AdapterConfig]] = HRAConfig
    multiplicative: ClassVar[bool] = True
    learning_rate: ClassVar[float] = 1e-4  # the training scripts' starting points (see Method)
    embedded_learning_rate: ClassVar[float] = 1e-3
    peft_reverses_order: ClassVar[bool] = True

    @classmethod
    def init_layer(
        cls, config: HRAConfig, layer: LayerSpec, weight: Tensor, shared: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``hra_u`` (fan_in, r) in float32 (float64 for a float64 weight), on the weight's device."""
        config.check_layer(layer)
        like = torch.empty(0, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
        if config.init_weights:  # pairs of equal columns: H_{2k-1} H_{2k} = I
            u = _kaiming_columns(layer.fan_in, config.r // 2, like).repeat_interleave(2, dim=1)
        else:
            u = _kaiming_columns(layer.fan_in, config.r, like)
        return {"hra_u": u}, {}

    @classmethod
    def prepare_many(cls, config: HRAConfig, params: list[dict[str, Tensor]], buffers: list[dict[str, Tensor]],
                     strength: Union[float, Tensor], training: bool = False) -> list[HRAFactors]:
        """The WY factors of all layers of one shape from one batched normalise / Gram / solve."""
        y, v = wy_factors(torch.stack([p["hra_u"] for p in params]), config.apply_GS, strength)
        return [HRAFactors(yg, vg) for yg, vg in zip(y.unbind(0), v.unbind(0))]

    @staticmethod
    def rotation_width(prep: HRAFactors) -> int:
        return 2 * prep.y.shape[-1]

    @staticmethod
    def rotate_input(x: Tensor, prep: HRAFactors) -> Tensor:
        """``x Q_a^T = x - (x Y) V^T`` in ``x``'s dtype (two thin matmuls, one fused subtract)."""
        y, v = prep.y.to(x.dtype), prep.v.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        return torch.addmm(x2, x2 @ y, v.mT, alpha=-1).view(x.shape)

    @staticmethod
    def apply_to_weight(weight: Tensor, prep: HRAFactors) -> Tensor:
        """``W Q_a = W - (W V) Y^T`` in ``W``'s dtype."""
        y, v = prep.y.to(weight.dtype), prep.v.to(weight.dtype)
        return torch.addmm(weight, weight @ v, y.mT, alpha=-1)
