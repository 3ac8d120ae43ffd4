"""FRoD: a shared rotated basis per layer category, trainable spectrum and sparse coupling.

Math (W is ``(d_out, d_in)``; x a row of activations, ``y = x W^T``)
---------------------------------------------------------------------
Shared basis, one per *group* of layers with the same role (module path without its numeric
components, e.g. ``down_blocks.attentions.transformer_blocks.attn1.to_q``) **and** weight shape.
With the group's weights ``W_1..W_N`` (in PEFT's block order) stacked as ``A = [W_1; ..; W_N]``::

    if N d_out >= d_in:  A = Q R (reduced QR),  Q = [Q_1; ..; Q_N]
                         T = 1/N sum_i (Q_i^T Q_i + alpha I)^{-1}        (alpha = regularization_alpha)
                         T = E diag(.) E^T (eigh),   V = R^T E
    else:                A = P Sigma Vh (full SVD),  V = Vh^T   (computed as a complete QR of A^T
                         and eigh of the small R R^T: :func:`_full_right_basis`)
Sparse pattern, one per group: ``nnz = floor(d_in^2 sparse_rate)`` distinct off-diagonal
positions ``(r_m, c_m)`` -- the first ``nnz`` entries of CPU ``randperm(d_in (d_in - 1))`` over
the row-major list of off-diagonal cells, from ONE generator seeded with ``projection_prng_key``
and drawn group by group in the order of PEFT's sorted category names.

Per layer (float64): ``B = W V^{-T}``, ``Lambda0 = ||B[:, j]||`` (column norms), ``U = B / Lambda0``,
so ``W = U diag(Lambda0) V^T``. Trainable: ``frod_lambda_l`` (d_in,) = Lambda (init Lambda0) and
``frod_lambda_s_values`` (nnz,) = s (init 0), ``S[r_m, c_m] = s_m``. PEFT replaces W by
``U (Lambda + S) V^T``; we keep it additive, equal to that up to the reconstruction rounding::

    dW = U (diag(Lambda - Lambda0) + S) V^T,        W_eff = W + a dW      (a = strength)

so init is the base layer *exactly* and ``a`` interpolates (0 = base bit-exactly, 1 = trained
adapter, in between the spectrum and couplings move linearly: ``Lambda0 + a (Lambda - Lambda0)``,
``a S``). Dropout (``frod_dropout``, training only) acts on the adapter branch's input, as PEFT.

Forward, exact either way (:func:`uses_weight_path` picks by a multiply-add count, no host
sync), with the core ``M = diag(a (Lambda - Lambda0)) + a S``:

* few tokens, ``((x V) M^T) U^T``. ``h M^T``, its input gradient ``g M`` and ``dM = g^T h`` at the
  cells go through a dense ``d_in x d_in`` core scattered per call (rebuilt in backward rather
  than kept) -- or, on wide layers (:func:`_sparse_core`), through S as a compressed-row sparse
  matrix (MKL / cuSPARSE products, a sampled product for the cells), which skips three of the
  path's five ``T d_in^2`` GEMMs: 18x cheaper at d_in 5120, T 64. Not under ``torch.compile``.
* many tokens, ``x dW^T`` with ``dW = (U M) V^T``, whose adjoint is the dense ``d_in x d_in``
  product ``U^T G V`` (two GEMMs, associated the cheaper way) read at the diagonal and the cells --
  or, on layers at least 256 wide on the CPU (:func:`_sparse_weight`), one GEMM each and a product
  with S in compressed-row form (``U M = U diag + U S``, the adjoint's second product sampled at the
  cells): 1.5x faster at 1280x1280, 1.7x at 1280x5120. Merges build dW the same way.

Measured and dropped (CPU, one thread, fp32): reading the adjoint's cells by gathering ``nnz`` rows of
``U^T`` and ``(G V)^T`` (one GEMM fewer) -- each gathered element costs ~200 GEMM multiply-adds, so
at 1 % density the gathers cost 1.3-5.3x the second GEMM at SD1.5 widths (1280x1280 151 vs 53 ms,
10240x1280 1,266 vs 238 ms) and their transients grew with ``nnz x d_out``; ``U M`` from ``nnz``
scattered rows of ``U^T`` (no dense core: 1280x1280 175 vs 103 ms); a gather / ``index_add`` for
``(x V) S^T`` (d=320, T=4096: 95 vs 79 ms).

The shared bases' construction, precision and devices: :mod:`diffadapt.methods._frod_basis`.

PEFT computes U from *its own* V when it creates a layer and never from a loaded one, so only
``"peft"``-mode files give diffadapt's outputs in PEFT (saving a ``"fast"`` one warns). Trained S
values only mean something with the very V they were trained on: ``"fast"`` needs
``save_projection=True``; ``"peft"`` may leave V out for PEFT (and diffadapt) to regenerate.
Only nn.Linear and transformers Conv1D are supported (PEFT's scope).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from diffadapt.methods._frod_basis import fast_bases, given_bases, group_key, member_solution, peft_bases
from diffadapt.methods._frod_basis import peft_category as peft_category  # public here: PEFT files' keys
from diffadapt.methods._frod_basis import sparse_nnz as sparse_nnz  # public here: the pattern's size
from diffadapt.methods.base import AdapterConfig, AdapterConfigError, LayerSpec, Method

_PER_LAYER_FIELDS = {"frod_dropout", "init_weights"}  # the rest is shared by a whole group
@dataclass
class FRoDConfig(AdapterConfig):
    """PEFT's ``FrodConfig`` (same fields, defaults and meanings).

    ``progressbar`` shows a tqdm bar over the groups' decompositions; ``save_projection`` tells checkpoint
    I/O to write V and the S pattern (recommended: V is not reproducible across devices/dtypes);
    ``fan_in_fan_out`` is kept for PEFT files only (the runtime hands W as (out, in));
    ``runtime_offload_base_weight`` must be False (a PEFT memory trick the runtime does not do).
    ``overrides`` may only set ``frod_dropout`` / ``init_weights``: the rest is shared per group.
    ``projection_mode`` (diffadapt only, never written to PEFT): ``"fast"`` = decompositions on
    the weights' device, batched, float32 (float64 weights: float64), one basis per role and shape;
    ``"peft"`` = PEFT's categories and float32 CPU sequence, V equal to PEFT's (slower; the mode whose
    files PEFT reproduces).
    """

    method: ClassVar[str] = "frod"
    per_layer_reason: ClassVar[str] = "FRoD shares V and the S pattern across a group of layers"

    @classmethod
    def per_layer_fields(cls) -> set[str]:
        return set(_PER_LAYER_FIELDS)

    sparse_rate: float = field(
        default=0.01, metadata={"flag": "--sparse_rate", "help": "share of off-diagonal couplings (0.01)."}
    )
    regularization_alpha: float = field(
        default=1e-3, metadata={"flag": "--regularization_alpha", "help": "basis regularisation (1e-3)."}
    )
    projection_prng_key: int = field(
        default=0, metadata={"flag": "--projection_prng_key", "help": "seed of the sparse pattern (0)."}
    )
    save_projection: bool = True
    frod_dropout: float = field(default=0.0, metadata={"flag": "--frod_dropout", "help": "dropout (0)."})
    progressbar: bool = True
    runtime_offload_base_weight: bool = False
    projection_mode: str = field(
        default="fast",
        metadata={"flag": "--frod_projection_mode", "help": "'fast' (batched bases, saved in the file; default) or 'peft' (PEFT's "
                  "own bases, so that PEFT reproduces the saved adapter)."},
    )

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not number(self.sparse_rate) or not 0 <= self.sparse_rate <= 1:
            raise AdapterConfigError(f"{name}: sparse_rate={self.sparse_rate!r} must be in [0, 1] (PEFT default 0.01).")
        if not number(self.regularization_alpha) or self.regularization_alpha < 0:
            raise AdapterConfigError(
                f"{name}: regularization_alpha={self.regularization_alpha!r} must be a finite number >= 0 "
                "(PEFT default 1e-3; 0 fails on layers with d_out < d_in)."
            )
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise AdapterConfigError(f"{name}: projection_prng_key={self.projection_prng_key!r} must be an int seed.")
        if not number(self.frod_dropout) or not 0 <= self.frod_dropout < 1:
            raise AdapterConfigError(f"{name}: frod_dropout={self.frod_dropout!r} must be in [0, 1).")
        for flag in ("save_projection", "progressbar", "fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, flag), bool):
                raise AdapterConfigError(f"{name}: {flag}={getattr(self, flag)!r} must be True or False.")
        if self.runtime_offload_base_weight is not False:
            raise AdapterConfigError(
                f"{name}: runtime_offload_base_weight={self.runtime_offload_base_weight!r} is not supported: "
                "diffadapt keeps base weights where the model puts them (its additive form needs W). Use False."
            )
        if self.projection_mode not in ("fast", "peft"):
            raise AdapterConfigError(f"{name}: projection_mode={self.projection_mode!r}; choose 'fast' or 'peft'.")
        if self.projection_mode == "fast" and not self.save_projection:
            raise AdapterConfigError(
                f"{name}: save_projection=False needs projection_mode='peft': a file without its bases is rebuilt "
                "from the weights with PEFT's recipe on load, and a 'fast' (batched, per role and shape) "
                "basis is not that one. Keep save_projection=True, or use projection_mode='peft'."
            )

    def check_layer(self, layer: LayerSpec) -> None:
        if layer.kind not in ("linear", "conv1d"):
            raise AdapterConfigError(
                f"FRoD cannot adapt {layer.describe()}: only nn.Linear and transformers Conv1D layers are "
                f"supported (like PEFT), not {layer.kind!r}. Remove it from target_modules (SD1.x proj_in/proj_out "
                "are 1x1 Conv2d)."
            )


class FRoDPrep(NamedTuple):
    V: Tensor  # (d_in, d_in) shared basis
    U: Tensor  # (d_out, d_in)
    lam: Tensor  # (d_in,) a (Lambda - Lambda0)
    vals: Tensor  # (nnz,) a s
    rows: Tensor  # (nnz,) r_m
    cols: Tensor  # (nnz,) c_m
    dropout: float  # probability, 0 outside training
    layout: Optional[tuple[Tensor, Tensor]] = None  # (s_order, s_crow) of the group (_frod_basis._csr_layout)


def path_costs(tokens: int, d_out: int, d_in: int, nnz: Optional[int] = None) -> tuple[int, int]:
    """Multiply-adds of forward + backward on top of the frozen layer's (T tokens, o = d_out,
    i = d_in) for ``(weight path, basis path)``: the weight path pays the weight gradient ``gᵀx``
    (T o i), dW (``min(i^2 (i + o), 2 o i^2)``) and its adjoint ``U^T G V`` (``i^2 (o + min(o, i))``);
    the basis path ``x V``, the dense core and ``U`` with their backward (2 T o i + 5 T i^2).
    ``nnz`` given: dW and its adjoint run with S sparse (:func:`_sparse_weight`), one GEMM each
    (``o i^2``) and a sparse product of ``nnz x min(o, i)``, counted as ``_SPARSE_MACS`` multiply-adds
    per element."""
    if nnz is None:
        build = min(d_in * d_in * (d_in + d_out), 2 * d_out * d_in * d_in)
        adjoint = d_in * d_in * (d_out + min(d_out, d_in))
    else:
        build = adjoint = d_out * d_in * d_in + _SPARSE_MACS * nnz * min(d_out, d_in)
    weight = tokens * d_out * d_in + build + adjoint
    return weight, tokens * d_in * (2 * d_out + 5 * d_in)


def uses_weight_path(tokens: int, d_out: int, d_in: int, nnz: Optional[int] = None) -> bool:
    """Build dW per call rather than go through the basis when that costs fewer multiply-adds
    (:func:`path_costs`; the rule before, ``T >= d_out``, sent e.g. a 1024x128 layer at T = 256
    the long way)."""
    weight, basis = path_costs(tokens, d_out, d_in, nnz)
    return weight <= basis


def _core(p: FRoDPrep, dtype: torch.dtype) -> Tensor:
    """diag(lam) + S as a dense (d_in, d_in) matrix (repeated cells add, as PEFT's coalesce)."""
    return _core_of(p.lam, p.vals, p.rows, p.cols, dtype)


_SPARSE_CORE_MIN_WIDTH = 512  # below it the dense core's GEMMs win (CPU, one thread)
_SPARSE_WEIGHT_MIN_WIDTH = 256  # dW's build and adjoint: below it the two dense GEMMs win (CPU, one thread)
_SPARSE_MACS = 30  # what one element of a compressed-row product costs, in GEMM multiply-adds (CPU, fp32)


def _sparse_weight(p: FRoDPrep) -> bool:
    """True when ``dW = U M V^T`` and its adjoint ``U^T G V`` (at the cells) run cheaper with S as a
    compressed-row matrix: one GEMM each (``o i^2``) and a sparse product of ``nnz x min(o, i)``
    instead of two GEMMs -- ``U M = U diag(lam) + U S`` when ``o < i``, else ``M V^T = diag(lam) V^T
    + S V^T``; the adjoint's second GEMM becomes a sampled product at the cells. Measured (CPU, one
    thread, fp32, 1 % cells, build / adjoint): 1280x1280 44 / 43 -> 29 / 28 ms, 1280x5120 743 / 666
    -> 446 / 402, 320x1280 12.5 / 10.4 -> 7.0 / 6.9, 128x512 0.91 / 0.78 -> 0.62 / 0.59, 64x256 0.13 /
    0.10 -> 0.11 / 0.11; the dense GEMMs win below 256 wide (128x128 0.07 vs 0.08 ms, 1024x128 0.22
    vs 0.26). A shape test (no host sync); eager CPU only (sparse tensors do not trace; on CUDA the
    crossover is not measured)."""
    d = p.V.shape[0]
    return (
        p.layout is not None
        and d >= _SPARSE_WEIGHT_MIN_WIDTH
        and p.rows.numel() * 10 <= d * d
        and p.V.device.type == "cpu"
        and not torch.compiler.is_compiling()
    )


def _weight_nnz(p: FRoDPrep) -> Optional[int]:
    """The S cells the weight path's cost counts as sparse products (:func:`path_costs`), or None."""
    return p.rows.numel() if _sparse_weight(p) else None


def _sparse_core(h: Tensor, p: FRoDPrep) -> bool:
    """True when ``h M^T`` runs cheaper with S as a compressed-row sparse matrix than through the dense
    ``d_in x d_in`` core (a shape test, no host sync). Measured (CPU, one thread, fp32, forward +
    backward of the core at 1 % cells): T 64 x 5120 314 -> 17 ms, 256 x 2560 106 -> 17, 64 x 1280
    6.4 -> 1.2, 512 x 512 4.9 -> 2.4; the dense core wins below 512 wide (128 x 128 0.10 vs 0.13 ms),
    at more than 4 d_in tokens (4096 x 640 58 vs 67 ms) and is kept above 10 % cells. Eager CPU and
    CUDA only: sparse tensors do not trace under ``torch.compile``."""
    d = h.shape[-1]
    return (
        p.layout is not None
        and d >= _SPARSE_CORE_MIN_WIDTH
        and h.numel() <= 4 * d * d
        and p.rows.numel() * 10 <= d * d
        and h.device.type in ("cpu", "cuda")
        and not torch.compiler.is_compiling()
    )


def _csr(crow: Tensor, col: Tensor, values: Tensor, d: int) -> Tensor:
    """A ``d x d`` compressed-row matrix (the layout is FRoD's own, already checked: no invariant
    checks; torch's one-time "beta" notice about sparse CSR kept out of the user's log)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, (d, d), check_invariants=False)


def _sparse_apply(h: Tensor, lam: Tensor, vals: Tensor, p: FRoDPrep, side: int) -> Tensor:
    """``h M^T`` (side 0) or ``h M`` (side 1) with S in compressed-row form, in float32 at least:
    ``h diag(lam) + (S h^T)^T`` (or ``S^T``)."""
    ct = torch.promote_types(h.dtype, torch.float32)
    order, crow = p.layout
    idx = (p.cols, p.rows)[side].index_select(0, order[side])
    d = h.shape[-1]
    s = _csr(crow[side], idx, vals.to(ct).index_select(0, order[side]), d)
    flat = h.reshape(-1, d).to(ct)
    out = flat * lam.to(ct) + (s @ flat.mT).mT
    return out.to(h.dtype).reshape(h.shape)


def _sparse_cells(g: Tensor, h: Tensor, p: FRoDPrep) -> Tensor:
    """``(g^T h)[r_m, c_m]`` for every listed cell (sampled dense-dense product), in float32 at least."""
    ct = torch.promote_types(h.dtype, torch.float32)
    order, crow = p.layout
    d = h.shape[-1]
    pattern = _csr(crow[0], p.cols.index_select(0, order[0]), torch.zeros(order.shape[1], dtype=ct, device=h.device), d)
    g2, h2 = g.reshape(-1, d).to(ct), h.reshape(-1, d).to(ct)
    got = torch.sparse.sampled_addmm(pattern, g2.mT.contiguous(), h2, beta=0.0).values()
    return torch.empty_like(got).index_copy_(0, order[0], got)


def _core_apply(h: Tensor, lam: Tensor, vals: Tensor, p: FRoDPrep) -> Tensor:
    """``h M^T``, sparse where :func:`_sparse_core` says so, else through the dense core."""
    if _sparse_core(h, p):
        return _sparse_apply(h, lam, vals, p, 0)
    return F.linear(h, _core_of(lam, vals, p.rows, p.cols, h.dtype))


class _CoreProduct(torch.autograd.Function):
    """``h M^T`` for the core ``M = diag(lam) + S`` without keeping the dense ``d_in x d_in`` M for
    backward (it is rebuilt there, or never built where S runs sparse; only ``h`` and the few core
    values are saved): ``dh = g M``, ``dM = g^T h`` read at the diagonal and at the S cells."""

    @staticmethod
    def forward(ctx, h, lam, vals, prep):
        ctx.prep = prep._replace(lam=None, vals=None)  # the pattern and its layout (buffers)
        ctx.save_for_backward(h, lam, vals)
        return _core_apply(h, lam, vals, prep)

    @staticmethod
    def backward(ctx, g):
        h, lam, vals = ctx.saved_tensors
        p = ctx.prep
        if _sparse_core(h, p):
            gh = _sparse_apply(g, lam, vals, p, 1) if ctx.needs_input_grad[0] else None
            glam = (g * h).reshape(-1, h.shape[-1]).sum(0).to(lam.dtype) if ctx.needs_input_grad[1] else None
            gvals = _sparse_cells(g, h, p).to(vals.dtype) if ctx.needs_input_grad[2] else None
            return gh, glam, gvals, None
        gh = g @ _core_of(lam, vals, p.rows, p.cols, g.dtype) if ctx.needs_input_grad[0] else None
        gm = g.reshape(-1, g.shape[-1]).mT @ h.reshape(-1, h.shape[-1])  # (d_in, d_in), transient
        glam = gm.diagonal().to(lam.dtype) if ctx.needs_input_grad[1] else None
        gvals = gm[p.rows, p.cols].to(vals.dtype) if ctx.needs_input_grad[2] else None
        return gh, glam, gvals, None


def _core_of(lam: Tensor, vals: Tensor, rows: Tensor, cols: Tensor, dtype: torch.dtype) -> Tensor:
    m = torch.diag(lam.to(dtype))
    return m.index_put((rows, cols), vals.to(dtype), accumulate=True)


def _delta_weight(p: FRoDPrep, dtype: torch.dtype) -> Tensor:
    """``dW = U M V^T``, associated the cheaper way: ``U (M V^T)`` costs ``d_in^2 (d_in + d_out)``
    multiply-adds, ``(U M) V^T`` ``2 d_out d_in^2`` (CPU, one thread, fp32: 1024x128 0.39 vs 0.71 ms;
    the same at d_out = d_in; 128x512 3.6 vs 1.4 ms); with S sparse (:func:`_sparse_weight`) when no
    gradient has to flow through the build (merges and the folded product, whose adjoint is
    :meth:`FRoD.delta_weight_backward`)."""
    if _sparse_weight(p) and not (torch.is_grad_enabled() and (p.lam.requires_grad or p.vals.requires_grad)):
        return _sparse_delta_weight(p, dtype)
    u, core, vt = p.U.to(dtype), _core(p, dtype), p.V.to(dtype).mT
    return u @ (core @ vt) if u.shape[0] > u.shape[1] else (u @ core) @ vt


def _sparse_delta_weight(p: FRoDPrep, dtype: torch.dtype) -> Tensor:
    """``dW`` with the core's S as a compressed-row matrix, in float32 at least: ``(U diag(lam) +
    (S^T U^T)^T) V^T`` when ``d_out < d_in``, else ``U (diag(lam) V^T + S V^T)``."""
    ct = torch.promote_types(dtype, torch.float32)
    (d_out, d), (order, crow) = p.U.shape, p.layout
    u, vt, lam, vals = p.U.to(ct), p.V.to(ct).mT, p.lam.to(ct), p.vals.to(ct)
    if d_out < d:
        st = _csr(crow[1], p.rows.index_select(0, order[1]), vals.index_select(0, order[1]), d)
        return (((st @ u.mT).mT + u * lam) @ vt).to(dtype)
    s = _csr(crow[0], p.cols.index_select(0, order[0]), vals.index_select(0, order[0]), d)
    return (u @ (s @ vt + lam[:, None] * vt)).to(dtype)


def _sparse_adjoint(p: FRoDPrep, u: Tensor, g: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``U^T G V`` at the diagonal and the S cells as ``a @ b`` with one GEMM in ``a`` or ``b`` (the
    cheaper association) and the other product only sampled at the cells."""
    a, b = (u.mT @ g, v) if u.shape[0] >= u.shape[1] else (u.mT, g @ v)
    return (a * b.mT).sum(1).to(p.lam.dtype), _sparse_cells(a.mT, b, p).to(p.vals.dtype)


class FRoD(Method):
    name: ClassVar[str] = "frod"
    config_class: ClassVar[type[AdapterConfig]] = FRoDConfig
    multiplicative: ClassVar[bool] = False
    learning_rate: ClassVar[float] = 1e-3  # the training scripts' starting points (see Method)
    embedded_learning_rate: ClassVar[float] = 1e-2

    group_key = staticmethod(group_key)

    @classmethod
    def init_shared(
        cls, config: FRoDConfig, layers: list[LayerSpec], weights: list[Tensor]
    ) -> list[dict[str, Tensor]]:
        """``{"V": (d_in, d_in) in the weight dtype, "indices": (2, nnz) long}`` per layer; the
        same dict (same tensors) for all layers of a group (see ``projection_mode``)."""
        for layer in layers:
            config.check_layer(layer)
        return (peft_bases if config.projection_mode == "peft" else fast_bases)(config, layers, weights)

    @classmethod
    def shared_from_bases(
        cls, config: FRoDConfig, layers: list[LayerSpec], weights: list[Tensor], bases: list[dict[str, Tensor]]
    ) -> list[dict[str, Tensor]]:
        """Like :meth:`init_shared` with each layer's ``{"V", "indices"}`` given (one dict object for
        the layers of a group, on their device) instead of computed."""
        return given_bases(layers, weights, bases)

    @classmethod
    def init_layer(cls, config, layer, weight, shared):
        V, idx = shared["V"], shared["indices"]
        u, lam0 = member_solution(shared, layer, weight)
        lam = lam0.clone()
        vals = torch.zeros(idx.shape[1], device=weight.device, dtype=weight.dtype)
        if not config.init_weights:  # PEFT's random start, same RNG order
            vals.normal_(0.0, 0.1)
            lam.add_(torch.randn_like(lam) * 0.1)
        params = {"frod_lambda_l": lam, "frod_lambda_s_values": vals}
        return params, {"V": V, "indices": idx, "U": u, "lambda0": lam0}

    @classmethod
    def prepare_many(cls, config, params, buffers, strength: Union[float, Tensor], training: bool = False):
        lam0 = torch.stack([b["lambda0"] for b in buffers])
        lam = (torch.stack([p["frod_lambda_l"] for p in params]) - lam0) * strength
        vals = torch.stack([p["frod_lambda_s_values"] for p in params]) * strength
        p = config.frod_dropout if training else 0.0
        return [
            FRoDPrep(b["V"], b["U"], lg, vg, b["indices"][0], b["indices"][1], p,
                     (b["s_order"], b["s_crow"]) if "s_order" in b else None)
            for lg, vg, b in zip(lam.unbind(0), vals.unbind(0), buffers)
        ]

    @staticmethod
    def may_fold(prep: FRoDPrep) -> bool:
        return prep.dropout == 0  # dropout acts on the adapter branch's input

    @classmethod
    def fold_into_weight(cls, x: Tensor, prep: FRoDPrep) -> bool:
        d_out, d_in = prep.U.shape
        return cls.may_fold(prep) and uses_weight_path(x.numel() // d_in, d_out, d_in, _weight_nnz(prep))

    @staticmethod
    def delta_output(x: Tensor, prep: FRoDPrep) -> Tensor:
        if prep.dropout > 0:
            x = F.dropout(x, prep.dropout, training=True)
        d_out, d_in = prep.U.shape
        through = torch.is_grad_enabled() and (prep.lam.requires_grad or prep.vals.requires_grad)
        if uses_weight_path(x.numel() // d_in, d_out, d_in, None if through else _weight_nnz(prep)):
            return F.linear(x, _delta_weight(prep, x.dtype))  # autograd through a dense build
        h = x @ prep.V.to(x.dtype)
        if torch.is_grad_enabled() and (prep.lam.requires_grad or prep.vals.requires_grad or h.requires_grad):
            core = _CoreProduct.apply(h, prep.lam, prep.vals, prep)  # the d_in^2 core not kept
        else:
            core = _core_apply(h, prep.lam, prep.vals, prep)
        return F.linear(core, prep.U.to(x.dtype))

    delta_fields: ClassVar[tuple[str, ...]] = ("lam", "vals")
    @staticmethod
    def keep_folded_weight(x: Tensor, prep: FRoDPrep) -> bool:
        return True  # the layer keeps W + dW, not U M, M and W + dW

    @staticmethod
    def delta_weight(prep: FRoDPrep, dtype: torch.dtype) -> Tensor:
        return _delta_weight(prep, dtype)

    @staticmethod
    def delta_weight_backward(prep: FRoDPrep, grad: Tensor) -> tuple[Tensor, Tensor]:
        """``dM = U^T G V`` read at the diagonal (``lam``) and at the S cells (``vals``) for
        ``G = dL/d(dW)``: two GEMMs, ``(U^T G) V`` (``d_out d_in^2 + d_in^3`` multiply-adds) when
        ``d_out >= d_in``, else ``U^T (G V)`` (``2 d_out d_in^2``), then a gather of ``nnz`` numbers;
        with S sparse (:func:`_sparse_weight`) the second product only at the diagonal and the cells.
        The folded linear's backward calls it, so nothing of ``dW``'s build is kept from forward."""
        dtype = torch.promote_types(grad.dtype, torch.float32)
        u, g, v = prep.U.to(dtype), grad.to(dtype), prep.V.to(dtype)
        if _sparse_weight(prep):
            return _sparse_adjoint(prep, u, g, v)
        dm = (u.mT @ g) @ v if u.shape[0] >= u.shape[1] else u.mT @ (g @ v)
        return dm.diagonal().to(prep.lam.dtype), dm[prep.rows, prep.cols].to(prep.vals.dtype)

    @staticmethod
    def apply_to_weight(weight: Tensor, prep: FRoDPrep) -> Tensor:
        """``W + a dW``, dW built in float32 at least (float64 for float64 weights)."""
        dtype = torch.promote_types(weight.dtype, torch.float32)
        return (weight.to(dtype) + _delta_weight(prep, dtype)).to(weight.dtype)
