#!/usr/bin/env python
"""Peak memory and step time of a training step on a quantized base (bitsandbytes nf4 / int8
Linear layers, ``diffadapt.quantized.quantize_model``, as ``--quantize_base`` does) against the
float32 base, for a couple of methods, printed as a markdown table with ratios.

Memory: peak bytes of live CPU tensors during one step (forward, backward, AdamW step), weights,
optimizer state and inputs included (``common.cpu_peak_bytes``); on a GPU, ``max_memory_allocated``.
Time: median wall / process-CPU ms per step over ``--steps`` steps after one warm-up.

    python benchmarks/bench_quantized.py --model small --methods oft fourierft --steps 5
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import diffadapt as da  # noqa: E402
from diffadapt import quantized as Q  # noqa: E402


def variant(master, quant, method, spec, device, grad_ckpt):
    model = copy.deepcopy(master)
    if quant != "float32":
        Q.quantize_model(model, quant, device=device)
        Q.pin_training_kernels(model)
    model.to(device).train()
    if grad_ckpt:
        model.enable_gradient_checkpointing()
    torch.manual_seed(7)
    da.add_adapter(model, common.diffadapt_config(method, spec.targets), "a")
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def run(args):
    spec = common.MODELS[args.model]
    device = args.device
    master = common.build_master(spec, torch.float32, "cpu")
    inputs, target = common.make_inputs(spec, spec.batch, torch.float32, device)
    rows = []
    for method in args.methods:
        for quant in ("float32", *args.quant):
            model, opt = variant(master, quant, method, spec, device, args.grad_ckpt)

            def step():
                out = model(**inputs, return_dict=False)[0]
                torch.nn.functional.mse_loss(out.float(), target.float()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()  # warm-up: optimizer state exists, kernels chosen
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                step()
                peak = torch.cuda.max_memory_allocated()
            else:
                peak, _ = common.cpu_peak_bytes(step, model, opt, *inputs.values(), target)
            times = [common.timed(step, device) for _ in range(args.steps)]
            weights = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
            rows.append({"method": method, "base": quant, "peak": peak, "weights": weights,
                         "wall": common.median([w for w, _ in times]), "cpu": common.median([c for _, c in times])})
            del model, opt
            common.free(device)
    return spec, rows


def table(rows) -> str:
    lines = ["| method | base | weights MiB | peak MiB | peak vs float32 | step ms (wall) | step ms (CPU) | "
             "CPU time vs float32 |", "|---|---|---|---|---|---|---|---|"]
    ref = {r["method"]: r for r in rows if r["base"] == "float32"}
    for r in rows:
        f = ref[r["method"]]
        lines.append(f"| {common.METHOD_LABELS[r['method']]} | {r['base']} | {r['weights'] / 2**20:.2f} | "
                     f"{r['peak'] / 2**20:.2f} | {r['peak'] / f['peak']:.2f}x | {r['wall']:.1f} | {r['cpu']:.1f} | "
                     f"{r['cpu'] / f['cpu']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", choices=list(common.MODELS))
    parser.add_argument("--methods", nargs="+", default=["oft", "fourierft"], choices=list(common.METHOD_SETTINGS))
    parser.add_argument("--quant", nargs="+", default=["nf4", "int8"], choices=["nf4", "fp4", "int8"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec, rows = run(args)
    v = common.versions()
    import bitsandbytes

    print(f"Model: {spec.description}. Device: {common.machine(args.device)}. "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {v['torch']}, diffusers "
          f"{v['diffusers']}, bitsandbytes {bitsandbytes.__version__}; {args.steps} timed steps after one warm-up"
          f"{', gradient checkpointing' if args.grad_ckpt else ''}.\n")
    print(table(rows))


if __name__ == "__main__":
    main()
