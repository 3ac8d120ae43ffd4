"""FRoD's shared bases: the joint decompositions and sparse patterns of a group of layers, and each
layer's ``U`` / ``Lambda0`` solved from the basis actually used (the math: :mod:`diffadapt.methods.frod`).

Precision and devices of the shared basis: decompositions run on the weights' device, batched
over groups of equal (N, d_out, d_in). The wide (SVD) branch runs in float32 (float64 for float64
weights); the tall branch's Gram / Cholesky route squares the condition number, so on the CPU it runs
in float64 (still 3-4x faster than a float32 Householder QR there), on CUDA in float32. Nothing the
additive form needs depends on V's rounding -- U and Lambda0 are solved in float64 from the V actually
stored, so init is the base exactly, and V only has to be a well-conditioned basis. PEFT runs them
one category at a time in float32 on CPU; its V is *not* a stable function of the weights (sign
flips, and arbitrary bases of (near-)degenerate eigenspaces, e.g. every single-layer group has
``T = I/(1+alpha)``), so a batched V differs from PEFT's. ``projection_mode="peft"`` is PEFT's own
sharing and op sequence: one basis per PEFT category (not per role and shape), from one weight per
block index, float32 on the CPU -- V bit-equal to PEFT's (same torch/CPU build); it refuses models
PEFT cannot build (a category mixing input widths, e.g. SD UNets); a PEFT file's config selects it
(its file side: :mod:`diffadapt.formats.peft.frod`).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffadapt.methods.base import AdapterConfig, AdapterConfigError, LayerSpec

_MAX_BATCH_ELEMS = 1 << 27  # elements of the (G, N, d_in, d_in) Gram stack decomposed at once


def peft_category(module_name: str) -> str:
    """PEFT's sharing category of a module path (``_category_from_key``): the last two path
    components joined by ``_`` (only the last one if the one before is a block index), with
    BERT's ``attention.output.dense`` renamed ``attention_output``. Names the
    ``base_model.frod_V.<category>`` / ``frod_s_indices`` / ``frod_s_size`` keys of PEFT files."""
    parts = module_name.split(".")
    if len(parts) == 1 or parts[-2].isdigit():
        return parts[-1]
    if parts[-2:] == ["output", "dense"] and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return f"{parts[-2]}_{parts[-1]}"


def _peft_block_index(name: str, fallback: int) -> int:
    """PEFT's order of layers inside a category: the index after a ``layers`` component, else
    the first numeric component, else the layer's position among the targets."""
    parts = name.split(".")
    if "layers" in parts and parts.index("layers") + 1 < len(parts) and parts[parts.index("layers") + 1].isdigit():
        return int(parts[parts.index("layers") + 1])
    return next((int(p) for p in parts if p.isdigit()), fallback)


def sparse_nnz(d_in: int, sparse_rate: float) -> int:
    """PEFT's count of off-diagonal S entries (at least one when sparse_rate > 0)."""
    off = d_in * (d_in - 1)
    nnz = min(int(d_in * d_in * sparse_rate), off)
    return max(1, nnz) if sparse_rate > 0 and off > 0 else nnz


def _draw_pattern(d: int, nnz: int, generator: torch.Generator) -> Tensor:
    """(2, nnz) rows/cols: PEFT's ``randperm`` over the row-major off-diagonal cells, decoded
    arithmetically (cell k -> row k // (d-1), column p = k % (d-1), skipping the diagonal)."""
    if nnz == 0:
        return torch.empty(2, 0, dtype=torch.long)
    k = torch.randperm(d * (d - 1), generator=generator)[:nnz]
    rows = k // (d - 1)
    p = k - rows * (d - 1)
    return torch.stack([rows, p + (p >= rows).long()])


@contextlib.contextmanager
def _large_matrix_solvers(device: torch.device):
    """On CUDA, cuSOLVER for the decompositions: torch's default heuristic sends batched LU / inverse
    to MAGMA's batched routines, which are made for small matrices (MAGMA warns so) and crawl at
    d_in = 1536-6144 (SD3's groups); cuSOLVER factors each matrix of the batch at full speed."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library("cusolver")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_linalg_library(previous)


def _basis_batched(w: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """V for G groups at once: ``w`` (G, N, d_out, d_in) -> (V (G, d_in, d_in), ok (G,))."""
    G, N, o, i = w.shape
    if N * o < i:
        return _full_right_basis(w.reshape(G, N * o, i)), torch.ones(G, dtype=torch.bool)
    # Q_n^T Q_n without forming Q: with A^T A = sum_n C_n = L L^T (C_n = W_n^T W_n, R = L^T), Q_n = W_n L^{-T},
    # so (Q_n^T Q_n + alpha I)^{-1} = L^T (C_n + alpha L L^T)^{-1} L and T = L^T X L with X the mean of N
    # inverses of symmetric positive definite matrices (Cholesky): GEMMs, no per-member triangular solves
    # (2x faster than inverting Q_n^T Q_n + alpha I, 3-4x faster than Householder QR on the CPU; float64
    # keeps the squared condition number harmless); rank-deficient stacks use QR.
    gram = w.mT @ w  # (G, N, i, i)
    total = gram.sum(1)
    low, info = torch.linalg.cholesky_ex(total)
    eye = torch.eye(i, dtype=w.dtype, device=w.device)
    if bool((info == 0).all()):
        c, info = torch.linalg.cholesky_ex(gram + alpha * total[:, None])
        ok = (info == 0).all(1)
        x = torch.cholesky_inverse(torch.where(ok[:, None, None, None], c, eye)).sum(1) / N
        r = low.mT
        t = r @ x @ low
    else:
        q, r = torch.linalg.qr(w.reshape(G, N * o, i))
        q = q.reshape(G, N, o, i)
        inv, info = torch.linalg.inv_ex(q.mT @ q + alpha * eye)
        ok = (info == 0).all(1)
        t = inv.sum(1) / N
    t = torch.where(ok[:, None, None], t, eye)  # eigh must not see a failed inverse
    return r.mT @ torch.linalg.eigh(t).eigenvectors, ok.cpu()


def _full_right_basis(a: Tensor) -> Tensor:
    """All ``d_in`` right singular vectors of wide ``a`` (G, m, d_in), m < d_in, as columns, the
    row space's in descending singular-value order and then an orthonormal basis of the null space:
    ``a^T = Q [R; 0]`` (complete QR) and ``R R^T = P S^2 P^T`` (eigh of the small Gram matrix) give
    ``a = Z S (Q_1 P)^T``, so ``V = [Q_1 P, Q_2]`` -- orthonormal to the working precision whatever
    the Gram's rounding does to the vectors of near-equal singular values (any basis of their span is
    as good). CPU, one thread, fp32, 3 x 1280 x 5120: 13.3 s against 24.0 s for a full SVD of ``a``
    (the SVD of R alone 16.3 s); the null-space basis is as arbitrary as the SVD's."""
    m = a.shape[-2]
    q, r = torch.linalg.qr(a.mT, mode="complete")
    r = r[..., :m, :]
    p = torch.linalg.eigh(r @ r.mT).eigenvectors.flip(-1)
    return torch.cat([q[..., :m] @ p, q[..., m:]], dim=-1)


def _basis_peft(mats: list[Tensor], alpha: float) -> tuple[Tensor, bool]:
    """PEFT's exact float32 CPU op sequence for one category (batched inv rounds differently)."""
    stacked = torch.cat(mats, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        return torch.linalg.svd(stacked, full_matrices=True)[2].T, True
    q, r = torch.linalg.qr(stacked)
    i, o = r.shape[1], mats[0].shape[0]
    t, ok = torch.zeros(i, i, dtype=r.dtype), True
    for n in range(len(mats)):
        qn = q[n * o : (n + 1) * o, :]
        inv, info = torch.linalg.inv_ex(qn.T @ qn + alpha * torch.eye(i, dtype=r.dtype))
        t += inv
        ok = ok and int(info) == 0
    if not ok:
        return r, False
    t /= len(mats)
    return r.T @ torch.linalg.eigh(t)[1], ok


class _GroupBasis(dict):
    """A group's shared tensors (``{"V", "indices"}``, registered once as buffers) and, while the
    slots are being built, each member layer's ``(U, Lambda0)`` from :func:`_solve_members`."""

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__(tensors)
        if "s_order" not in self:
            self.update(_csr_layout(self["indices"], self["V"].shape[0]))
        self.members: dict[str, tuple[Tensor, Tensor]] = {}


def _csr_layout(indices: Tensor, d: int) -> dict[str, Tensor]:
    """Where the S cells sit in compressed-row form, for S and for S^T (derived from the pattern
    once per group): ``s_order`` (2, nnz) lists the cells in row-major order of S / of S^T,
    ``s_crow`` (2, d + 1) holds the row pointers of each."""
    rows, cols = indices[0], indices[1]
    order = [torch.argsort(a * d + b, stable=True) for a, b in ((rows, cols), (cols, rows))]
    crow = torch.zeros(2, d + 1, dtype=torch.long, device=indices.device)
    crow[0, 1:] = torch.bincount(rows, minlength=d).cumsum(0)
    crow[1, 1:] = torch.bincount(cols, minlength=d).cumsum(0)
    return {"s_order": torch.stack(order), "s_crow": crow}


def _u_and_lambda(b: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``B = W V^{-T}`` (float64) -> U = B / ||B[:, j]||, Lambda0, rounded through float32 as PEFT."""
    lam0 = b.norm(dim=0)
    u = b / torch.where(lam0 > 1e-12, lam0, math.inf)  # columns of norm <= 1e-12: zero (one pass over B)
    return u.float().to(dtype), lam0.float().to(dtype)


def _solve_members(shared: list[_GroupBasis], layers: list[LayerSpec], weights: list[Tensor]) -> list[_GroupBasis]:
    """``B = W V^{-T}`` for every layer, in float64, with one LU of each group's V and one solve
    for all its members (the per-layer solve used to redo the O(d_in^3) factorisation N times)."""
    members: dict[int, list[int]] = {}
    for j, sh in enumerate(shared):
        members.setdefault(id(sh), []).append(j)
    for js in members.values():
        sh = shared[js[0]]
        v64 = sh["V"].to(torch.float64)
        rhs = torch.empty(v64.shape[0], sum(weights[j].shape[0] for j in js), dtype=torch.float64, device=v64.device)
        for j, part in zip(js, rhs.split([weights[j].shape[0] for j in js], dim=1)):
            part.copy_(weights[j].detach().mT)  # converted in the copy
        with _large_matrix_solvers(v64.device):
            lu, pivots, info = torch.linalg.lu_factor_ex(v64)
            if int(info) == 0:
                b = torch.linalg.lu_solve(lu, pivots, rhs).mT  # V^{-1} W^T, transposed
            else:  # singular V (a loaded one): PEFT's fallback
                b = rhs.mT @ torch.linalg.pinv(v64, rtol=1e-6).mT
        for j, part in zip(js, b.split([weights[j].shape[0] for j in js])):
            sh.members[layers[j].name] = _u_and_lambda(part.to(weights[j].device), weights[j].dtype)
    return shared


def group_key(layer: LayerSpec) -> str:
    """Sharing group: role (path without numeric components) and weight shape."""
    role = ".".join(p for p in layer.name.split(".") if not p.isdigit())
    return f"{role}@{layer.out_features}x{layer.fan_in}"


def fast_bases(config: AdapterConfig, layers: list[LayerSpec], weights: list[Tensor]) -> list[_GroupBasis]:
    """``projection_mode="fast"`` (``config`` a ``FRoDConfig``): one basis per group (:func:`group_key`), the groups of equal
    ``(N, d_out, d_in)`` decomposed at once on the weights' device; patterns drawn in PEFT's
    sorted-category order."""
    groups: dict[str, list[int]] = {}
    for j, layer in enumerate(layers):
        groups.setdefault(group_key(layer), []).append(j)
    for members in groups.values():
        members.sort(key=lambda j: _peft_block_index(layers[j].name, j))
    order = sorted(groups, key=lambda k: (min(peft_category(layers[j].name) for j in groups[k]), k))

    bases: dict[str, Tensor] = {}
    buckets: dict[tuple, list[str]] = {}
    for k in order:
        first = weights[groups[k][0]]
        buckets.setdefault((len(groups[k]), *first.shape, first.device), []).append(k)
    alpha = config.regularization_alpha
    failed = []
    bar = tqdm(total=len(order), desc="FRoD joint decompositions", unit="group", disable=not config.progressbar)
    for (n, o, i, device), keys in buckets.items():
        bar.set_postfix(layers=n, shape=f"{o}x{i}")
        first = weights[groups[keys[0]][0]]
        wide = n * o < i  # the SVD branch: float32 is accurate there and 1.5-2x faster
        dtype = torch.float64 if device.type == "cpu" and not wide else torch.promote_types(first.dtype, torch.float32)
        step = max(1, _MAX_BATCH_ELEMS // (n * i * (i + o)))
        for s in range(0, len(keys), step):
            chunk = keys[s : s + step]
            w = torch.empty(len(chunk), n, o, i, dtype=dtype, device=device)
            for g, k in enumerate(chunk):
                for m, j in enumerate(groups[k]):
                    w[g, m].copy_(weights[j].detach())  # converted in the copy
            with _large_matrix_solvers(device):
                v, ok = _basis_batched(w, alpha)
            bases.update(zip(chunk, v))
            failed += [k for k, good in zip(chunk, ok.tolist()) if not good]
            bar.update(len(chunk))
    bar.close()
    if failed:
        where = ", ".join(layers[j].describe() for j in groups[failed[0]])
        raise AdapterConfigError(
            f"FRoD: the joint basis of {where} is singular with regularization_alpha={alpha} (Q_i^T Q_i + "
            "alpha I has no inverse); use a positive value (PEFT default 1e-3)."
        )
    gen = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    shared: dict[str, dict[str, Tensor]] = {}
    for k in order:
        first = weights[groups[k][0]]
        d = first.shape[1]
        idx = _draw_pattern(d, sparse_nnz(d, config.sparse_rate), gen)
        shared[k] = _GroupBasis({"V": bases[k].to(device=first.device, dtype=first.dtype), "indices": idx.to(first.device)})
    return _solve_members([shared[group_key(layer)] for layer in layers], layers, weights)


def peft_bases(config: AdapterConfig, layers: list[LayerSpec], weights: list[Tensor]) -> list[_GroupBasis]:
    """``projection_mode="peft"``: PEFT's own sharing (``FrodModel._init_frod_projections``): one
    basis per category (:func:`peft_category`), decomposed in float32 on the CPU from one weight per block index
    -- the last target layer of that category with that index (:func:`_peft_block_index`), as
    PEFT's ``weights[block][category]`` keeps it -- in ascending block order; patterns drawn
    category by category in sorted order. PEFT cannot build a category whose layers differ in
    input width (it concatenates them), so neither does this mode."""
    cats = [peft_category(layer.name) for layer in layers]
    by_block: dict[int, dict[str, int]] = {}
    for j, layer in enumerate(layers):
        by_block.setdefault(_peft_block_index(layer.name, j), {})[cats[j]] = j
    alpha = config.regularization_alpha
    gen = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    shared: dict[str, dict[str, Tensor]] = {}
    for cat in tqdm(sorted(set(cats)), desc="FRoD joint decompositions (PEFT mode)", unit="category",
                    disable=not config.progressbar):
        widths = sorted({layers[j].fan_in for j, c in enumerate(cats) if c == cat})
        if len(widths) > 1:
            raise AdapterConfigError(
                f"FRoD projection_mode='peft': PEFT shares one basis per category {cat!r}, but its layers have "
                f"input widths {widths} (PEFT itself fails on this model). Use projection_mode='fast' (bases per "
                "role and shape, saved in the file) or target layers of one width per category."
            )
        members = [by_block[b][cat] for b in sorted(by_block) if cat in by_block[b]]
        V, good = _basis_peft([weights[j].detach().float().cpu() for j in members], alpha)
        if not good:
            where = ", ".join(layers[j].describe() for j in members)
            raise AdapterConfigError(
                f"FRoD: the joint basis of {where} (PEFT category {cat!r}) is singular with "
                f"regularization_alpha={alpha} (Q_i^T Q_i + alpha I has no inverse); use a positive value "
                "(PEFT default 1e-3)."
            )
        first = weights[members[0]]
        idx = _draw_pattern(widths[0], sparse_nnz(widths[0], config.sparse_rate), gen)
        shared[cat] = _GroupBasis({"V": V.to(device=first.device, dtype=first.dtype), "indices": idx.to(first.device)})
    return _solve_members([shared[c] for c in cats], layers, weights)


def given_bases(layers: list[LayerSpec], weights: list[Tensor], bases: list[dict[str, Tensor]]) -> list[_GroupBasis]:
    """Like :func:`fast_bases` with each layer's ``{"V", "indices"}`` given (one dict object for
    the layers of a group, on their device) instead of computed."""
    groups: dict[int, _GroupBasis] = {}
    return _solve_members([groups.setdefault(id(b), _GroupBasis(b)) for b in bases], layers, weights)


def member_solution(shared: dict[str, Tensor], layer: LayerSpec, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(U, Lambda0)`` of one layer: the one its group solved (taken, so it is not kept twice), or
    solved now from ``shared["V"]`` (a group dict built elsewhere)."""
    solved = shared.members.pop(layer.name, None) if isinstance(shared, _GroupBasis) else None
    if solved is None:
        solved = _solve_members([_GroupBasis(shared)], [layer], [weight])[0].members[layer.name]
    return solved
