"""FRoD's dense and sparse forms on one device: where S as a compressed-row matrix pays, per layer shape.

FRoD runs its sparse couplings S either through dense ``d_in x d_in`` products or as a CSR matrix
(``diffadapt.methods.frod``: the basis path's core, ``_sparse_core``, and the weight path's ``dW`` build and
adjoint, ``_sparse_weight``). Their thresholds were measured on a CPU with one thread; this times both forms of
every layer of a gauge on the device at hand, so that the CUDA crossovers can be read off (the sparse weight
path is kept off CUDA until they are):

* the shapes and token counts of the gauge's adapted linears come from one forward on the meta device (no
  weights, seconds even for SD3), the path per layer from ``uses_weight_path``;
* weight-path layers: ``dW`` (build) and ``U^T G V`` at the cells (adjoint), float32, dense vs sparse;
* basis-path layers: the core ``h M^T`` forward + backward in the activation dtype, dense vs sparse;
* random factors at 1 % cells; medians of ``--reps`` timed calls after warmups, CUDA events on a GPU,
  process CPU time on the CPU; per shape and summed over the gauge's layers.

    python benchmarks/frod_forms.py --device cuda --models sd15 sd3      # ~30 s on an H200
    python benchmarks/frod_forms.py --device cpu --models small           # a check of the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common as C  # noqa: E402
from macs import layer_shapes  # noqa: E402

from diffadapt.methods import _frod_basis as basis  # noqa: E402
from diffadapt.methods import frod as F  # noqa: E402


def meta_shapes(name: str) -> Counter:
    """``{(tokens, d_out, d_in): layers}`` of the gauge's adapted linears (its batch and inputs)."""
    spec = C.MODELS[name]
    with torch.device("meta"):
        model = spec.build()
    inputs = {k: v.to("meta") for k, v in C.make_inputs(spec, spec.batch, torch.float32, "cpu")[0].items()}
    return Counter((t, o, i) for _, t, o, i in layer_shapes(spec, model, inputs))


def prep_for(d_out: int, d_in: int, device: str, gen: torch.Generator) -> F.FRoDPrep:
    nnz = F.sparse_nnz(d_in, 0.01)
    cells = basis._draw_pattern(d_in, nnz, gen)
    layout = basis._csr_layout(cells, d_in)
    t = [torch.randn(d_in, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen),
         torch.randn(d_in, generator=gen), torch.randn(nnz, generator=gen)]
    v, u, lam, vals = (x.to(device) for x in t)
    rows, cols = cells.to(device)
    return F.FRoDPrep(v, u, lam, vals, rows, cols, 0.0, (layout["s_order"].to(device), layout["s_crow"].to(device)))


def timer(device: str, reps: int, warmup: int = 2):
    def run(fn) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.process_time()
                fn()
                times.append((time.process_time() - t0) * 1e3)
        return statistics.median(times)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["sd15", "sd3"], choices=sorted(C.MODELS))
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="activations (default: bf16 on cuda)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    act = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    time_it = timer(args.device, args.reps)
    name_dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU, one thread"
    print(f"# FRoD's dense and sparse forms on {name_dev} (torch {torch.__version__}; activations {act}; "
          f"ms per call, median of {args.reps})\n")
    gen = torch.Generator().manual_seed(0)
    threshold = F._SPARSE_CORE_MIN_WIDTH
    for model in args.models:
        shapes = meta_shapes(model)
        print(f"## {model}: {sum(shapes.values())} adapted linears\n")
        print("| tokens × d_out × d_in | layers | path | dense | sparse | dense / sparse |")
        print("|---|--:|---|--:|--:|--:|")
        total = Counter()
        for (t, o, i), n in sorted(shapes.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
            prep = prep_for(o, i, args.device, gen)
            dense = prep._replace(layout=None)
            weight = F.uses_weight_path(t, o, i, prep.rows.numel())
            if weight:  # dW's build and its adjoint, float32 as the runtime computes them
                g = torch.randn(o, i, generator=gen).to(args.device)
                u, v = prep.U, prep.V

                def run_dense():
                    F._delta_weight(dense, torch.float32)
                    F.FRoD.delta_weight_backward(dense, g)

                def run_sparse():
                    F._sparse_delta_weight(prep, torch.float32)
                    F._sparse_adjoint(prep, u, g, v)
            else:  # the basis path's core, forward + backward
                h = torch.randn(t, i, generator=gen).to(args.device, act).requires_grad_(True)
                lam, vals = prep.lam.requires_grad_(True), prep.vals.requires_grad_(True)
                grad = torch.randn(t, i, generator=gen).to(args.device, act)

                def core(width):
                    def run():
                        F._SPARSE_CORE_MIN_WIDTH = width  # the form, whatever the CPU-measured threshold says
                        try:
                            torch.autograd.grad(F._CoreProduct.apply(h, lam, vals, prep), (h, lam, vals), grad)
                        finally:
                            F._SPARSE_CORE_MIN_WIDTH = threshold
                    return run

                run_dense, run_sparse = core(1 << 30), core(1)
                F._SPARSE_CORE_MIN_WIDTH = 1
                possible = F._sparse_core(h, prep)  # also needs T <= 4 d_in and <= 10 % cells
                F._SPARSE_CORE_MIN_WIDTH = threshold
                if not possible:
                    a = time_it(run_dense)
                    total["dense"] += a * n
                    total["sparse"] += a * n
                    total["best"] += a * n
                    print(f"| {t} × {o} × {i} | {n} | basis | {a:.3f} | – (T > 4 d_in) | – |")
                    continue
            a, b = time_it(run_dense), time_it(run_sparse)
            total["dense"] += a * n
            total["sparse"] += b * n
            total["best"] += min(a, b) * n
            print(f"| {t} × {o} × {i} | {n} | {'weight' if weight else 'basis'} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
        print(f"| **all layers** | {sum(shapes.values())} | | {total['dense']:.1f} | {total['sparse']:.1f} | "
              f"{total['dense'] / total['sparse']:.2f} (best per shape {total['best']:.1f}) |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
