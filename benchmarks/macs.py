"""Multiply-adds of one training step: what FRoD's dense basis costs against LoRA's low rank.

Counts, per gauge of ``bench_train.py`` (the same models, inputs and target layers), the
multiply-adds (MACs) of the adapted linears' own work -- forward plus the gradient to the input --
and on top of it what each adapter adds per step: PEFT LoRA r16 ``3 T r (d_in + d_out)``
(forward, input gradient and the two factors' gradients); FRoD the cheaper of its two exact forms
per layer, as FRoD's CPU runtime picks and computes it (:func:`frod_extra`: the weight path -- the weight
gradient ``T d_out d_in``, building ``dW = U M V^T`` and its adjoint ``U^T G V``, with S sparse on wide
layers -- or the basis path -- ``x V``, the core, ``U`` and their backward, the core sparse on wide layers). The floor (the frozen model, gradient to the
input) comes from ``torch.utils.flop_counter`` on one step. The lower bound on FRoD's step over
LoRA's is then ``(floor + FRoD's extra) / (floor + LoRA's extra)`` at equal arithmetic speed.

    python benchmarks/macs.py --models small sd15w
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common as C  # noqa: E402

from diffadapt.methods import frod as F  # noqa: E402
from diffadapt.methods.frod import path_costs, sparse_nnz  # noqa: E402

LORA_RANK = 16


def layer_shapes(spec, model, inputs) -> list[tuple[str, int, int, int]]:
    """(name, tokens, d_out, d_in) of every target Linear in one forward."""
    rows = []

    def hook(name):
        def record(module, args, out):
            x = args[0]
            rows.append((name, x.numel() // x.shape[-1], module.out_features, module.in_features))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in spec.targets)]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return rows


def frod_extra(tokens: int, d_out: int, d_in: int, rate: float = 0.01) -> int:
    """FRoD's multiply-adds on top of the frozen layer in the form its CPU runtime takes: the weight path
    with S sparse from ``_SPARSE_WEIGHT_MIN_WIDTH`` (``path_costs`` with ``nnz``), the basis path with the
    sparse core where ``_sparse_core`` takes it (three of its five ``T d_in^2`` GEMMs become sparse
    products of ``T nnz`` elements, ``_SPARSE_MACS`` each), the dense forms elsewhere."""
    nnz = sparse_nnz(d_in, rate)
    density_ok = nnz * 10 <= d_in * d_in
    weight_nnz = nnz if density_ok and d_in >= F._SPARSE_WEIGHT_MIN_WIDTH else None
    weight, basis = path_costs(tokens, d_out, d_in, weight_nnz)
    if density_ok and d_in >= F._SPARSE_CORE_MIN_WIDTH and tokens <= 4 * d_in:
        basis = tokens * d_in * (2 * d_out + 2 * d_in) + 3 * F._SPARSE_MACS * tokens * nnz
    return weight if F.uses_weight_path(tokens, d_out, d_in, weight_nnz) else basis


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["small", "sd15w"], choices=sorted(C.MODELS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| gauge | layers | adapted linears fwd+dx (M MAC) | floor step (M MAC) | LoRA r16 extra | FRoD extra | "
          "FRoD extra / LoRA's | FLOP-bound FRoD / LoRA step |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for name in args.models:
        spec = C.MODELS[name]
        torch.manual_seed(0)
        model = spec.build()
        inputs = spec.inputs(spec.batch, torch.Generator().manual_seed(0))
        rows = layer_shapes(spec, model, inputs)
        base = sum(2 * t * o * i for _, t, o, i in rows)
        lora = sum(3 * t * LORA_RANK * (i + o) for _, t, o, i in rows)
        frod = sum(frod_extra(t, o, i) for _, t, o, i in rows)
        x = inputs[spec.input_key].detach().requires_grad_(True)
        with FlopCounterMode(display=False) as counter:
            model(**{**inputs, spec.input_key: x}, return_dict=False)[0].float().sum().backward()
        floor = counter.get_total_flops() / 2
        print(f"| {name} | {len(rows)} | {base / 1e6:,.0f} | {floor / 1e6:,.0f} | {lora / 1e6:,.0f} | {frod / 1e6:,.0f} | "
              f"{frod / lora:.1f}x | {(floor + frod) / (floor + lora):.2f} |")


if __name__ == "__main__":
    main()
