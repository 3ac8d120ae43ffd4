"""Switching cost at generation time: diffadapt vs PEFT, side by side in one process.

For each method, two adapters A and B of that method are put on the same UNet (diffadapt) and
on a copy of it (PEFT, same config), then we time:

* toggle       — make B active instead of A, adapters live (no weights touched);
* merge-switch — the model runs merged with A; switch to merged B (unmerge A + merge B);
* merge+unmerge of every adapted layer.

    python benchmarks/bench_switch.py --model tiny            # CPU, seconds
    python benchmarks/bench_switch.py --model sd15 --device cuda --dtype bf16

Prints a markdown table (median ms over --repeat runs, one thread on CPU; on the CPU the clock is the
process CPU time, which a busy neighbour does not inflate). Each method's merge+unmerge is also timed
paired with PEFT LoRA's, round by round on the same machine state: "× LoRA (paired)" is the median of the
per-round ratios (the issue's point-5 check).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from peft import get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: diffadapt
import diffadapt as da  # noqa: E402
from diffadapt.formats import peft as peft_format  # noqa: E402

MODELS = {
    "tiny": dict(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        attention_head_dim=8, norm_num_groups=8,
    ),
    "sd15": dict(
        sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
        attention_head_dim=8,
    ),
}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
METHODS = {
    "oft": dict(oft_block_size=32, r=0),
    "boft": dict(boft_block_size=4, boft_n_butterfly_factor=2),
    "hra": dict(r=8),
    "fourierft": dict(n_frequency=1000),
    "frod": dict(sparse_rate=0.01, progressbar=False),
}


CLOCK = time.perf_counter  # main() picks time.process_time on the CPU


def once(fn, sync) -> float:
    sync()
    t0 = CLOCK()
    fn()
    sync()
    return (CLOCK() - t0) * 1e3


def timed(fn, sync, repeat):
    return statistics.median(once(fn, sync) for _ in range(repeat))


def paired(fn, reference, sync, repeat) -> float:
    """Median over rounds of ``fn``'s time / ``reference``'s, the two run back to back each round."""
    return statistics.median(once(fn, sync) / once(reference, sync) for _ in range(repeat))


def noise_(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p) * 0.01)


def bench_lora(base, sync, repeat):
    """PEFT LoRA r16 on the same targets: the reference row (setup = one injection)."""
    from peft import LoraConfig

    row = {"method": "PEFT LoRA r16 (reference)"}
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    theirs = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
                            adapter_name="A")
    sync()
    row["setup s"] = time.perf_counter() - t0
    theirs.add_adapter("B", LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))

    def peft_cycle():
        theirs.base_model.merge_adapter()
        theirs.base_model.unmerge_adapter()

    row["PEFT merge+unmerge ms"] = timed(peft_cycle, sync, repeat)
    return row, peft_cycle


def bench_method(base, method, kwargs, sync, repeat, with_peft=True, lora_cycle=None):
    cfg = da.get_method(method).config_class(target_modules=TARGETS, **kwargs)
    if method == "oft" and min(base.config.block_out_channels) < 32:
        cfg = da.get_method(method).config_class(target_modules=TARGETS, oft_block_size=8, r=0)
    row = {"method": method}

    ours = copy.deepcopy(base)
    t0 = time.perf_counter()
    da.add_adapter(ours, cfg, "A")
    sync()
    row["setup s"] = time.perf_counter() - t0  # one injection
    da.add_adapter(ours, cfg, "B")
    for i, name in enumerate("AB"):
        noise_(da.adapter_parameters(ours, name).values(), i)
    state = iter(["A", "B"] * repeat * 2)
    row["toggle ms"] = timed(lambda: da.set_adapters(ours, next(state)), sync, repeat)
    da.set_adapters(ours, "A")
    da.merge_adapters(ours)
    row["merge-switch ms"] = timed(lambda: da.set_adapters(ours, next(state)), sync, repeat)
    da.unmerge_adapters(ours)

    def cycle():
        da.merge_adapters(ours)
        da.unmerge_adapters(ours)

    row["merge+unmerge ms"] = timed(cycle, sync, repeat)
    if lora_cycle is not None:
        row["merge+unmerge × LoRA (paired)"] = paired(cycle, lora_cycle, sync, repeat)

    if not with_peft:
        return row
    peft_cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_format.peft_type(cfg.method)]
    try:
        theirs = get_peft_model(copy.deepcopy(base), peft_cls(**peft_format.to_peft_dict(cfg)), adapter_name="A")
        theirs.add_adapter("B", peft_cls(**peft_format.to_peft_dict(cfg)))
    except Exception as exc:  # PEFT's FRoD crashes on UNets (mixed widths in one category)
        row.update({"PEFT toggle ms": f"crash ({type(exc).__name__})", "PEFT merge-switch ms": "-", "PEFT merge+unmerge ms": "-"})
        return row
    row["PEFT toggle ms"] = timed(lambda: theirs.set_adapter(next(state)), sync, repeat)
    theirs.set_adapter("A")
    theirs.base_model.merge_adapter()

    def peft_merge_switch():
        name = next(state)
        theirs.base_model.unmerge_adapter()
        theirs.set_adapter(name)
        theirs.base_model.merge_adapter()

    row["PEFT merge-switch ms"] = timed(peft_merge_switch, sync, repeat)
    theirs.base_model.unmerge_adapter()

    def peft_cycle():
        theirs.base_model.merge_adapter()
        theirs.base_model.unmerge_adapter()

    row["PEFT merge+unmerge ms"] = timed(peft_cycle, sync, repeat)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bf16"])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-peft-same", action="store_true",
                        help="skip PEFT's own implementation of each method (PEFT LoRA stays; PEFT BOFT at SD1.5 size takes minutes)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):  # random init on the device (seconds for SD1.5 on a GPU, not a CPU minute)
        base = UNet2DConditionModel(**MODELS[args.model])
    base = base.to(dtype).eval()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    global CLOCK
    CLOCK = time.perf_counter if args.device.startswith("cuda") else time.process_time
    lora_row, lora_cycle = bench_lora(base, sync, args.repeat)
    rows = [lora_row]
    print(rows[-1], flush=True)
    for m in args.methods.split(","):
        rows.append(bench_method(base, m, METHODS[m], sync, args.repeat, with_peft=not args.no_peft_same,
                                 lora_cycle=lora_cycle))
        print(rows[-1], flush=True)
    keys = list(dict.fromkeys(k for row in rows[1:] + rows[:1] for k in row))
    clock = "wall" if args.device.startswith("cuda") else "process CPU"
    print(f"\nUNet {args.model}, {args.device}, {args.dtype}, targets {','.join(TARGETS)}; median of {args.repeat} "
          f"({clock} time)\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.2f}" if isinstance(row.get(k), float) else str(row.get(k, "-")) for k in keys) + " |")


if __name__ == "__main__":
    main()
