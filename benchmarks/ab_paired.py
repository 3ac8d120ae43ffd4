"""Paired A/B of one runtime constant: the same adapted model steps (and merges) with the code as it is
and with one module attribute patched, alternating step by step, interleaved with PEFT LoRA r16's steps
in the same process (CPU time, one thread, medians of per-round ratios).

    python benchmarks/ab_paired.py --model small --method frod \\
        --patch diffadapt.methods.frod._SPARSE_WEIGHT_MIN_WIDTH=1073741824 --rounds 20 --merge 30

prints ``step current`` / ``step patched`` (ms, x LoRA with quartiles) and, with ``--merge N``, the
same for merge + unmerge. One model for both variants, so setup, weights and optimizer state are
shared; what differs is the patched attribute only. A comparison of code paths, not a gauge run:
record gauge numbers with ``bench_train.py``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import statistics as st
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def cpu_ms(fn, n: int) -> float:
    t = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t) / n * 1e3


def summary(name: str, xs: list[float], lora: list[float]) -> str:
    ratios = [a / b for a, b in zip(xs, lora)]
    q = st.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return f"{name}: {st.median(xs):.1f} ms  x LoRA {st.median(ratios):.3f} (q1-q3 {q[0]:.3f}-{q[2]:.3f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(C.MODELS), default="small")
    p.add_argument("--method", choices=sorted(C.METHOD_SETTINGS), required=True)
    p.add_argument("--patch", required=True, help="module.attribute=python-literal, e.g. "
                   "diffadapt.methods.frod._SPARSE_WEIGHT_MIN_WIDTH=1073741824")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    p.add_argument("--merge", type=int, default=0, help="rounds of merge + unmerge (0: none)")
    p.add_argument("--no-step", action="store_true")
    args = p.parse_args(argv)
    target, value = args.patch.split("=", 1)
    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    current, patched = getattr(module, attr), ast.literal_eval(value)

    import diffadapt as da
    from peft import get_peft_model

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as bench_train.py: a saturated random model's denormals, not a method's cost
    spec = C.MODELS[args.model]
    master = C.build_master(spec, torch.float32, "cpu")
    inputs, target_t = C.make_inputs(spec, spec.batch, torch.float32, "cpu")
    lora_model = C.fresh_copy(master, "cpu", False)
    peft_model = get_peft_model(lora_model, C.peft_lora_config(spec.targets))
    lora_model = peft_model.base_model.model
    model = C.fresh_copy(master, "cpu", False)
    t0 = time.perf_counter()
    da.add_adapter(model, C.diffadapt_config(args.method, spec.targets), "default")
    print(f"{args.model}, {args.method}: injection {time.perf_counter() - t0:.1f} s; patch {target}: "
          f"{current!r} (current) vs {patched!r}", flush=True)

    def optimizer(m):
        return torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)

    opts = {id(lora_model): optimizer(lora_model), id(model): optimizer(model)}

    def step(m):
        o = opts[id(m)]
        o.zero_grad(set_to_none=True)
        F.mse_loss(m(**inputs, return_dict=False)[0], target_t).backward()
        o.step()

    def use(name):
        setattr(module, attr, current if name == "current" else patched)

    def interleave(rounds, lora_op, op, n):
        times = {"lora": [], "current": [], "patched": []}
        for name in ("current", "patched"):
            use(name)
            op()
        lora_op()
        for r in range(rounds):
            times["lora"].append(cpu_ms(lora_op, n))
            for name in (("current", "patched") if r % 2 == 0 else ("patched", "current")):
                use(name)
                times[name].append(cpu_ms(op, n))
        use("current")
        return times

    if not args.no_step:
        t = interleave(args.rounds, lambda: step(lora_model), lambda: step(model), args.steps)
        print(f"PEFT LoRA r16 step {st.median(t['lora']):.1f} ms")
        for name in ("current", "patched"):
            print(summary(f"step {name}", t[name], t["lora"]), flush=True)
    if args.merge:
        def merge():
            da.merge_adapters(model)
            da.unmerge_adapters(model)

        def lora_merge():
            peft_model.merge_adapter()
            peft_model.unmerge_adapter()

        with torch.no_grad():
            t = interleave(args.merge, lora_merge, merge, 1)
        print(f"PEFT LoRA r16 merge+unmerge {st.median(t['lora']):.1f} ms")
        for name in ("current", "patched"):
            print(summary(f"merge+unmerge {name}", t[name], t["lora"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
