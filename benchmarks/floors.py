"""Kernel floors: what a method's own math costs against LoRA's on this machine, with no runtime around it.

Where a method stays above PEFT LoRA's step or merge time, this says whether any runtime could close
the gap on the machine at hand, by timing the bare tensor math both ways (CPU time, one thread,
variants interleaved round by round, medians):

* **step** (``--model small``, the speed gauge's adapted linears: shapes and token counts recorded
  from one forward, as ``macs.py`` does), per layer, forward + backward with the upstream gradient
  given:

  - ``base``: the frozen layer (gradient to the input where the input needs one);
  - ``PEFT LoRA r16``: PEFT's own LoRA layer around it (what the gauge's LoRA step runs);
  - ``bare LoRA r16``: plus the bare branch ``(x A^T) B^T`` with both factors trained (no dropout, no
    scaling multiply: cheaper than PEFT's own);
  - ``FourierFT``: the least FourierFT can do -- dW as one ``irfft2`` of its spectrum folded into
    the base weight (``W + dW`` kept for backward, never rebuilt), the weight gradient ``g^T x``
    and its adjoint, one ``rfft2`` read at the n frequencies -- one autograd function;
  - ``output scale``: the base layer times a trained per-channel scale (BOFT's ``boft_s``) through
    diffadapt's fused ``ScaledLinear``, the one op BOFT adds to OFT's rotation.

  Summed over the gauge's layers, PEFT's LoRA layers are swapped for FourierFT's math in LoRA's
  measured step: ``floor = (LoRA step - sum(PEFT LoRA layer) + sum(FourierFT math)) / LoRA step``
  (extras over the base layer) -- the ratio a FourierFT with a free runtime would have on this
  machine. The scale's column is what BOFT pays on top of a rotation as cheap as OFT's.
* **merge** (``--model sd15``: the real SD1.5 UNet's 160 attention and feed-forward linears,
  shapes from its config on the meta device), per weight shape: FourierFT's merge floor, one
  ``irfft2`` of the d_out x d_in spectrum plus the add (unmerge restores the kept original: free),
  and FRoD's, ``W + U M V^T`` at 1 % couplings, both with its dense core (two GEMMs, associated the
  cheaper way) and in the runtime's form (S in compressed-row form from 256 wide: one GEMM and a
  sparse product), against LoRA r16's merge + unmerge, two in-place ``addmm_``; times the layer
  count of each shape.

* **FRoD adjoint** (``--model sd15`` shapes): the S-cell adjoint of FRoD's weight path,
  ``dM = U^T G V`` at the diagonal and the 1 % cells, in the runtime's form (from 256 wide one GEMM
  and the second product sampled at the cells; narrower, two GEMMs), against two dense GEMMs then a
  gather of nnz numbers (the tenth pass's form) and the form before it (one GEMM ``G V``, then
  ``nnz`` rows of ``U^T`` and ``(G V)^T`` gathered and multiplied: nnz x d_out elements each), per
  weight shape and over the UNet.

* **FRoD injection** (``--model sd15`` shapes): the joint decomposition of every sharing group
  (FRoD's ``group_key``: role and shape), timed alone with the runtime's batched routine, and
  PEFT's sparse-pattern draw -- what injecting FRoD costs before any per-layer work.

    python benchmarks/floors.py                 # all parts
    python benchmarks/floors.py --part merge --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_train as B
import common as C
from macs import layer_shapes

from diffadapt.fused import ScaledLinear
from diffadapt.methods.fourierft import FourierFT, FourierPrep, delta_weight
from diffadapt.methods._frod_basis import _basis_batched, _csr_layout, _draw_pattern  # the injection's own steps
from diffadapt.methods.frod import FRoD, FRoDPrep, sparse_nnz

RANK = 16
N_FREQ = 1000


def _interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median CPU ms of each callable, the callables interleaved in every round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[key].append((time.process_time() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


class _FourierMin(torch.autograd.Function):
    """``y = x (W + dW)^T + b`` with dW one irfft2 of the spectrum's half-grid, ``W + dW`` kept;
    backward: ``g (W + dW)``, ``G = g^T x`` and FourierFT's own adjoint of ``G`` (one rfft2)."""

    @staticmethod
    def forward(ctx, x, weight, bias, coef, buffers):
        ctx.prep = FourierPrep(coef, buffers, *weight.shape, "dense")
        w_eff = weight + FourierFT.delta_weight(ctx.prep, weight.dtype)
        ctx.save_for_backward(x, w_eff)
        return torch.addmm(bias, x, w_eff.mT)

    @staticmethod
    def backward(ctx, g):
        x, w_eff = ctx.saved_tensors
        gx = g @ w_eff if ctx.needs_input_grad[0] else None
        (gc,) = FourierFT.delta_weight_backward(ctx.prep, g.mT @ x)
        return gx, None, None, gc, None


def _step_shape(tokens: int, d_out: int, d_in: int, grad: bool, gen: torch.Generator, rounds: int) -> dict:
    """Median CPU ms of one layer's forward + backward, per variant (module docstring)."""
    x = torch.randn(tokens, d_in, generator=gen).requires_grad_(grad)
    g = torch.randn(tokens, d_out, generator=gen)
    w, b = torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5, torch.randn(d_out, generator=gen)
    a = (torch.randn(RANK, d_in, generator=gen) * 0.01).requires_grad_(True)
    bb = (torch.randn(d_out, RANK, generator=gen) * 0.01).requires_grad_(True)
    buffers = FourierFT.position_buffers(d_out, d_in, N_FREQ, 777, torch.device("cpu"))
    coef = (torch.randn(N_FREQ, generator=gen) * 1e-3).requires_grad_(True)
    s = (1 + 0.1 * torch.randn(d_out, generator=gen)).requires_grad_(True)
    inv = s.detach().reciprocal()
    peft_layer = _peft_lora_layer(w, b)
    forward = {
        "base": lambda: F.linear(x, w, b),
        "peft": lambda: peft_layer(x),
        "lora": lambda: F.linear(x, w, b) + F.linear(F.linear(x, a), bb),
        "fourierft": lambda: _FourierMin.apply(x, w, b, coef, buffers),
        "scale": lambda: ScaledLinear.apply(x, w, s, inv, b),
    }
    fns = {k: (lambda f=f: f().backward(g)) for k, f in forward.items()}
    if not grad:
        fns["base"] = forward["base"]  # nothing to differentiate in the frozen layer
    return _interleaved(fns, rounds)


def _peft_lora_layer(w: torch.Tensor, b: torch.Tensor) -> torch.nn.Module:
    """PEFT's own LoRA r16 layer around a Linear holding ``w``, ``b`` (what the gauge's LoRA step runs)."""
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0]))
    with torch.no_grad():
        base[0].weight.copy_(w)
        base[0].bias.copy_(b)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"]))
    return model.base_model.model[0]


def step_floors(rounds: int, lora_rounds: int) -> list[str]:
    spec = C.MODELS["small"]
    master = C.build_master(spec, torch.float32, "cpu")
    inputs, target = C.make_inputs(spec, spec.batch, torch.float32, "cpu")
    rows = layer_shapes(spec, master, inputs)
    # cross-attention keys/values read the (frozen) text states: no input gradient there
    groups = Counter((t, o, i, not (".attn2.to_k" in n or ".attn2.to_v" in n)) for n, t, o, i in rows)
    gen = torch.Generator().manual_seed(0)
    table, total = [], Counter()
    for (tokens, d_out, d_in, grad), count in sorted(groups.items(), key=lambda kv: -kv[1]):
        m = _step_shape(tokens, d_out, d_in, grad, gen, rounds)
        extra = {k: (m[k] - m["base"]) * 1e3 for k in ("peft", "lora", "fourierft", "scale")}  # us per layer
        for k, v in extra.items():
            total[k] += v * count / 1e3
        table.append(f"| {d_out} × {d_in}, {tokens} tokens{'' if grad else ', no dx'} | {count} | {m['base'] * 1e3:.0f} | "
                     f"{extra['peft']:.0f} | {extra['lora']:.0f} | {extra['fourierft']:.0f} | {extra['scale']:.0f} |")
    lora_step = _lora_step(spec, master, inputs, target, lora_rounds)
    floor = (lora_step + total["fourierft"] - total["peft"]) / lora_step
    return [
        "### Step floors (small gauge, per layer: forward + backward, CPU µs; extras over the base layer)",
        "",
        ("| layer (d_out × d_in, tokens) | layers | base | PEFT LoRA r16 layer | bare LoRA r16 branch | "
         "FourierFT math (n 1000) | output scale |"),
        "|---|--:|--:|--:|--:|--:|--:|",
        *table,
        (f"| **sum over the gauge's layers, ms per step** | {sum(groups.values())} | – | {total['peft']:.1f} | "
         f"{total['lora']:.1f} | "
         f"{total['fourierft']:.1f} | {total['scale']:.1f} |"),
        "",
        f"PEFT LoRA r16's whole step on this machine, same process: {lora_step:.1f} ms (median of {lora_rounds}).",
        "",
        (f"- FourierFT floor: (LoRA step − PEFT's LoRA layers' {total['peft']:.1f} + FourierFT's math "
         f"{total['fourierft']:.1f}) / LoRA step = **{floor:.2f}× LoRA** -- its FFTs and weight gradient alone, "
         "nothing else of a runtime (against the bare LoRA branch: "
         f"{(lora_step + total['fourierft'] - total['lora']) / lora_step:.2f}×)."),
        (f"- Output scale (BOFT's boft_s on top of a rotation as fast as OFT's): +{total['scale']:.1f} ms = "
         f"**+{total['scale'] / lora_step:.2f}× LoRA's step**."),
    ]


def _lora_step(spec, master, inputs, target, rounds: int) -> float:
    args = argparse.Namespace(device="cpu", grad_ckpt=False, compile=None, warmup=2, verbose=False)
    runner = B.Runner(B.Variant("peft:lora", "PEFT LoRA r16", "peft", "lora"), master, spec, args, inputs, target)
    for _ in range(2):
        runner.step()
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        runner.step()
        times.append((time.process_time() - t0) * 1e3)
    return statistics.median(times)


def _frod_prep(d_out: int, d_in: int, gen: torch.Generator) -> FRoDPrep:
    """Random FRoD factors at 1 % cells with the group's compressed-row layout, as the runtime holds
    them (so its forms, sparse where :func:`_sparse_weight` says so, are the ones timed)."""
    nnz = sparse_nnz(d_in, 0.01)
    cells = _draw_pattern(d_in, nnz, gen)
    layout = _csr_layout(cells, d_in)
    return FRoDPrep(torch.randn(d_in, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen),
                    torch.randn(d_in, generator=gen), torch.randn(nnz, generator=gen), cells[0], cells[1], 0.0,
                    (layout["s_order"], layout["s_crow"]))


def _merge_shape(d_out: int, d_in: int, gen: torch.Generator, rounds: int) -> dict:
    w = torch.randn(d_out, d_in, generator=gen)
    a, b = torch.randn(RANK, d_in, generator=gen), torch.randn(d_out, RANK, generator=gen)
    buffers = FourierFT.position_buffers(d_out, d_in, N_FREQ, 777, torch.device("cpu"))
    coef = torch.randn(N_FREQ, generator=gen)

    def fourier():
        delta_weight(coef, buffers, d_out, d_in, torch.float32).add_(w)

    def lora():
        w.addmm_(b, a)
        w.addmm_(b, a, alpha=-1)

    frod = _frod_prep(d_out, d_in, gen)
    dense = frod._replace(layout=None)  # the dense core and two GEMMs (before the eleventh pass)

    def frod_merge():
        FRoD.apply_to_weight(w, frod)

    def frod_dense():
        FRoD.apply_to_weight(w, dense)

    return _interleaved({"fourierft": fourier, "lora": lora, "frod": frod_merge, "frod_dense": frod_dense}, rounds)


def _sd15_targets() -> list[tuple[str, torch.nn.Linear]]:
    """The real SD1.5 UNet's adapted linears (built on the meta device: shapes only)."""
    with torch.device("meta"):
        unet = C.MODELS["sd15"].build()
    targets = C.MODELS["sd15"].targets
    return [(n, m) for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]


def merge_floors(rounds: int) -> list[str]:
    shapes = Counter((m.out_features, m.in_features) for _, m in _sd15_targets())
    gen = torch.Generator().manual_seed(0)
    table, tot = [], Counter()
    for (d_out, d_in), count in sorted(shapes.items(), key=lambda kv: kv[0][0] * kv[0][1]):
        m = _merge_shape(d_out, d_in, gen, rounds)
        for k, v in m.items():
            tot[k] += v * count
        table.append(f"| {d_out} × {d_in} | {count} | {m['lora']:.2f} | {m['fourierft']:.2f} | "
                     f"{m['fourierft'] / m['lora']:.1f} | {m['frod_dense']:.1f} | {m['frod']:.1f} | "
                     f"{m['frod'] / m['lora']:.0f} |")
    return [
        "### Merge floors (real SD1.5 UNet shapes; CPU ms per layer)",
        "",
        ("| weight (d_out × d_in) | layers | LoRA r16 merge + unmerge (2 addmm_) | FourierFT merge (irfft2 + add) | × | "
         "FRoD merge, dense core (W + U M Vᵀ, 1 %) | FRoD merge, runtime (S sparse from 256 wide) | × |"),
        "|---|--:|--:|--:|--:|--:|--:|--:|",
        *table,
        (f"| **whole UNet, ms** | {sum(shapes.values())} | {tot['lora']:.0f} | {tot['fourierft']:.0f} | "
         f"**{tot['fourierft'] / tot['lora']:.1f}** | {tot['frod_dense']:.0f} | {tot['frod']:.0f} | "
         f"**{tot['frod'] / tot['lora']:.0f}** |"),
    ]


def _gathered_adjoint(prep: FRoDPrep, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The S-cell adjoint as the runtime computed it until 2026-12-04: one GEMM and row gathers of the
    transposed factors, in chunks of 32 M gathered elements (to bound its transients)."""
    gvt = prep.V.mT @ grad.mT  # (G V)^T
    ut = prep.U.mT.contiguous()  # the runtime stored U column-major for these row gathers
    chunk = max(1, (1 << 25) // ut.shape[1])
    parts = [(ut.index_select(0, r) * gvt.index_select(0, c)).sum(1)
             for r, c in zip(prep.rows.split(chunk), prep.cols.split(chunk))]
    return (ut * gvt).sum(1), torch.cat(parts)


def adjoint_floors(rounds: int) -> list[str]:
    shapes = Counter((m.out_features, m.in_features) for _, m in _sd15_targets())
    gen = torch.Generator().manual_seed(0)
    table, tot = [], Counter()
    for (d_out, d_in), count in sorted(shapes.items(), key=lambda kv: kv[0][0] * kv[0][1]):
        prep = _frod_prep(d_out, d_in, gen)
        nnz, dense = prep.rows.numel(), prep._replace(layout=None)
        grad = torch.randn(d_out, d_in, generator=gen)
        got, ref = FRoD.delta_weight_backward(prep, grad), _gathered_adjoint(prep, grad)
        err = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, ref))
        m = _interleaved({"runtime": lambda: FRoD.delta_weight_backward(prep, grad),
                          "gemm": lambda: FRoD.delta_weight_backward(dense, grad),
                          "gather": lambda: _gathered_adjoint(prep, grad)}, rounds)
        for k, v in m.items():
            tot[k] += v * count
        table.append(f"| {d_out} × {d_in} | {count} | {nnz:,} | {m['runtime']:.2f} | {m['gemm']:.2f} | "
                     f"{m['gather']:.2f} | {m['gemm'] / m['runtime']:.1f} | {err:.0e} |")
    return [
        "### FRoD's S-cell adjoint (real SD1.5 UNet shapes, 1 % cells; CPU ms per layer, fp32)",
        "",
        ("| weight (d_out × d_in) | layers | nnz | runtime (one GEMM + cells sampled from 256 wide) | "
         "U^T G V, 2 GEMMs (tenth pass) | G V + row gathers (before) | 2 GEMMs / runtime | rel. diff to gathers |"),
        "|---|--:|--:|--:|--:|--:|--:|--:|",
        *table,
        (f"| **whole UNet, ms per step** | {sum(shapes.values())} | | {tot['runtime']:.0f} | {tot['gemm']:.0f} | "
         f"{tot['gather']:.0f} | **{tot['gemm'] / tot['runtime']:.1f}** | |"),
    ]


def inject_floors() -> list[str]:
    """FRoD's injection on the real SD1.5 UNet: the joint decompositions its definition needs, one per
    sharing group (role and shape, as FRoD's ``group_key``), each timed alone on random weights with
    the runtime's own batched routine (float64 Gram / Cholesky / eigh for tall stacks, float32 full SVD
    for wide ones), and PEFT's sparse-pattern draw (a CPU ``randperm`` of ``d_in (d_in - 1)`` cells)."""
    from diffadapt.methods.base import LayerSpec

    groups = Counter(
        (FRoD.group_key(LayerSpec(n, "linear", m.out_features, m.in_features)), m.out_features, m.in_features)
        for n, m in _sd15_targets()
    )
    buckets = Counter((count, d_out, d_in) for (_, d_out, d_in), count in groups.items())
    gen = torch.Generator().manual_seed(0)
    table, total, draws = [], 0.0, 0.0
    for (n, d_out, d_in), k in sorted(buckets.items(), key=lambda kv: kv[0][0] * kv[0][1] * kv[0][2] ** 2):
        wide = n * d_out < d_in
        w = torch.randn(1, n, d_out, d_in, generator=gen, dtype=torch.float32 if wide else torch.float64)
        t0 = time.process_time()
        _basis_batched(w, 1e-3)
        one = time.process_time() - t0
        t0 = time.process_time()
        _draw_pattern(d_in, sparse_nnz(d_in, 0.01), torch.Generator().manual_seed(0))
        draw = time.process_time() - t0
        total, draws = total + one * k, draws + draw * k
        form = f"full SVD of {n * d_out} × {d_in}" if wide else f"Gram + eigh of {d_in} × {d_in}"
        table.append(f"| {n} × ({d_out} × {d_in}) | {k} | {form} | {one:.2f} | {draw:.2f} |")
    return [
        "### FRoD injection floor (real SD1.5 UNet, the decompositions alone; CPU s, one thread)",
        "",
        "| group (layers × weight) | groups | decomposition | s per group | pattern draw s |",
        "|---|--:|---|--:|--:|",
        *table,
        f"| **all {sum(buckets.values())} groups** | | | **{total:.1f}** | **{draws:.1f}** |",
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["step", "merge", "adjoint", "inject", "all"], default="all")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds per step shape (merge: a tenth, at least 3)")
    p.add_argument("--lora-rounds", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    v = C.versions()
    print(f"- machine: {C.machine('cpu')}\n- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + "\n")
    if args.part in ("step", "all"):
        print("\n".join(step_floors(args.rounds, args.lora_rounds)) + "\n")
    if args.part in ("merge", "all"):
        print("\n".join(merge_floors(max(3, args.rounds // 10))) + "\n")
    if args.part in ("adjoint", "all"):
        print("\n".join(adjoint_floors(max(3, args.rounds // 10))) + "\n")
    if args.part in ("inject", "all"):
        print("\n".join(inject_floors()))


if __name__ == "__main__":
    main()
