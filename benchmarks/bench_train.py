"""Training-step benchmark: diffadapt vs PEFT, side by side in one process, identical inputs.

Every variant gets its own deep copy of one frozen base model (random weights from a config) and
the same inputs. Measured per variant:

* ms/step: forward + MSE loss + backward + AdamW step (median over timed steps);
  the *floor* is the frozen model, forward + backward to the input only (no optimizer); the *dense
  floor* (when FourierFT or FRoD runs) adds the target weights' gradients, the least any method
  whose update is a dense d_out x d_in dW pays (no optimizer either).
  On the CPU the times are process CPU time (a busy neighbour does not inflate them; wall time
  is reported beside), on CUDA wall time with the device synchronised. Ratios are paired by
  timing round (median over rounds of the per-round ratio);
* ops/step: aten ops dispatched in one step (a proxy for kernel launches);
* peak memory: CUDA ``max_memory_allocated`` over the timed steps (absolute: weights, adapter,
  grads, optimizer states, activations); on CPU the peak bytes of live tensors during one step,
  counted by a dispatch-mode tracker (same categories, no allocator rounding);
* unmerged inference forward (eval, no_grad) and its ratio to the base model's;
* merge + unmerge of every adapted layer (diffadapt: merge_adapters/unmerge_adapters;
  PEFT: merge_adapter/unmerge_adapter);
* setup: seconds of the injection call (add_adapter / get_peft_model).

Modes::

    # everyday gauge, 2 busy CPU cores are enough (a few minutes)
    python benchmarks/bench_train.py --device cpu --model small
    # the issue's sizes, on an H100/H200
    python benchmarks/bench_train.py --device cuda --model sd15 --dtype bf16
    python benchmarks/bench_train.py --device cuda --model sd3 --dtype bf16          # grad ckpt on
    python benchmarks/bench_train.py --device cuda --model sd3 --dtype bf16 --skip peft:boft,peft:frod
    python benchmarks/bench_train.py --device cuda --model sd3 --dtype bf16 --methods boft,frod --impl peft
    # (PEFT's SD3 BOFT ~9 s/step and FRoD ~107 s init: a separate run keeps each under 10 min)

On the CPU all variants stay resident and are timed in interleaved rounds (each round visits every
variant, the order rotating), so a busy neighbour slows all of them alike; on CUDA variants run one
after the other (one model on the device at a time, so the peak memory is the variant's own).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: diffadapt
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/: common

import common as C  # noqa: E402

MIB = 2**20


# -- variants ------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    key: str  # "floor", "peft:lora", "da:oft", "peft:oft", ...
    label: str
    impl: str
    method: str
    peer: Optional[str] = None  # PEFT variant computing the same function (for "x PEFT same")
    extra: Optional[dict] = None  # config fields changed on top of METHOD_SETTINGS


def make_variants(methods: list[str], impl: str, extras: bool) -> list[Variant]:
    out = [Variant("floor", "floor (frozen, backward to input)", "-", "floor"),
           Variant("peft:lora", "PEFT LoRA r16", "peft", "lora")]
    if extras and set(methods) & DENSE_UPDATE:
        out.insert(1, Variant("dense", "dense floor (target weights' gradient, no update)", "-", "dense"))
    for m in methods:
        label = C.METHOD_LABELS[m]
        if impl in ("both", "da"):
            out.append(Variant(f"da:{m}", f"diffadapt {label}", "diffadapt", m, peer=f"peft:{m}"))
        if impl in ("both", "peft"):
            out.append(Variant(f"peft:{m}", f"PEFT {label}", "peft", m))
        if m == "oft" and extras:  # PEFT's default OFT (Cayley-Neumann), the reference row
            neumann = {"use_cayley_neumann": True}
            if impl in ("both", "da"):
                out.append(Variant("da:oft-neumann", "diffadapt OFT b32 Neumann", "diffadapt", "oft",
                                   peer="peft:oft-neumann", extra=neumann))
            if impl in ("both", "peft"):
                out.append(Variant("peft:oft-neumann", "PEFT OFT b32 Neumann (PEFT default)", "peft", "oft",
                                   extra=neumann))
    return out


# methods whose update is a dense d_out x d_in dW: their backward needs the weight gradient g^T x (a third
# GEMM per layer); the "dense" variant is that floor (forward + backward with the target weights' gradients)
DENSE_UPDATE = {"fourierft", "frod"}


def dense_targets(model, targets: list[str]) -> list[torch.nn.Parameter]:
    """The weights of the Linear layers PEFT's ``target_modules`` suffix rule picks."""
    return [m.weight for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]


class Runner:
    """One variant: its model copy, adapter, optimizer, and the operations to time."""

    def __init__(self, variant: Variant, master, spec: C.ModelSpec, args, inputs, target):
        self.v, self.spec, self.args = variant, spec, args
        self.inputs, self.target = inputs, target
        self.stats = C.Stats(variant.key, variant.label, variant.impl, variant.method)
        self.model = C.fresh_copy(master, args.device, args.grad_ckpt)
        self.peft_model = None
        self.opt = None
        self.dense: list[torch.nn.Parameter] = []
        self.forwards = self.prepares = 0  # eval forwards and the plan's preparations since watch_eval_prepares
        torch.manual_seed(1234)
        t0 = time.perf_counter()
        if variant.method == "floor":
            pass
        elif variant.method == "dense":
            self.dense = [w.requires_grad_(True) for w in dense_targets(self.model, spec.targets)]
            self.stats.layers = len(self.dense)
        elif variant.impl == "diffadapt":
            import diffadapt as da

            cfg = C.diffadapt_config(variant.method, spec.targets, **(variant.extra or {}))
            names = da.add_adapter(self.model, cfg, "default")
            self.stats.layers = len(names)
        else:
            from peft import get_peft_model
            from peft.tuners.tuners_utils import BaseTunerLayer

            cfg = (C.peft_lora_config(spec.targets) if variant.method == "lora"
                   else C.peft_config_for(variant.method, spec.targets, **(variant.extra or {})))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.peft_model = get_peft_model(self.model, cfg)
            self.model = self.peft_model.base_model.model  # adapted in place; call the diffusers model itself
            self.stats.layers = sum(isinstance(m, BaseTunerLayer) for m in self.model.modules())
            if variant.method == "boft":
                shapes = {tuple(p.shape) for n, p in self.model.named_parameters() if "boft_R" in n}
                used = sorted({s[0] for s in shapes})
                asked = C.METHOD_SETTINGS["boft"]["boft_n_butterfly_factor"]
                if used != [asked]:
                    self.stats.note = (f"PEFT BOFT ran with m={used[0] if len(used) == 1 else used} instead of "
                                       f"m={asked} (its fbd_cuda extension did not load; PEFT falls back silently)")
            if any("Failed to load the CUDA extension" in str(w.message) for w in caught) and not self.stats.note:
                self.stats.note = "PEFT: fbd_cuda extension failed to load"
        C.sync(args.device)
        self.stats.setup_s = time.perf_counter() - t0
        self.raw = self.model  # the verbs take the model itself
        if args.compile:  # the whole model, inductor (one graph per mode; warmup steps compile it)
            # every variant's structure is a recompile of the same forward code, two modes each: past dynamo's
            # default limit of 8 the later variants' frames would silently run eager
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.model = torch.compile(self.model, fullgraph=args.compile == "fullgraph")
        params = [p for p in self.raw.parameters() if p.requires_grad]
        self.stats.trainable = sum(p.numel() for p in params)
        if variant.method not in ("floor", "dense"):
            if not params:
                raise RuntimeError("no trainable parameters after injection")
            self.opt = torch.optim.AdamW(params, lr=1e-4)

    # -- operations ------------------------------------------------------------------------------------
    def step(self) -> None:
        if self.dense:  # dense floor: the target weights' gradients, no optimizer
            for w in self.dense:
                w.grad = None
            out = self.model(**self.inputs, return_dict=False)[0]
            F.mse_loss(out.float(), self.target.float()).backward()
            return
        if self.opt is None:  # floor: frozen model, gradient to the input only
            inputs = dict(self.inputs)
            x = inputs[self.spec.input_key].detach().requires_grad_(True)
            inputs[self.spec.input_key] = x
            out = self.model(**inputs, return_dict=False)[0]
            F.mse_loss(out.float(), self.target.float()).backward()
            return
        self.opt.zero_grad(set_to_none=True)
        out = self.model(**self.inputs, return_dict=False)[0]
        F.mse_loss(out.float(), self.target.float()).backward()
        self.opt.step()

    @torch.no_grad()
    def infer(self) -> None:
        self.model(**self.inputs, return_dict=False)
        self.forwards += 1

    @torch.no_grad()
    def merge_unmerge(self) -> None:
        if self.v.impl == "diffadapt":
            import diffadapt as da

            da.merge_adapters(self.raw)
            da.unmerge_adapters(self.raw)
        else:
            self.peft_model.merge_adapter()
            self.peft_model.unmerge_adapter()

    def measure_ops_and_memory(self) -> None:
        """One untimed step under the dispatch-mode tracker: aten op count, and on the CPU the peak
        bytes of live tensors (on CUDA the peak comes from max_memory_allocated instead)."""
        tracked = [self.model, *self.inputs.values(), self.target] + ([self.opt] if self.opt is not None else [])
        peak, self.stats.ops = C.cpu_peak_bytes(self.step, *tracked)
        if not self.args.device.startswith("cuda"):
            self.stats.peak_bytes = peak

    def recompiles_on_switch(self) -> None:
        """Compiled diffadapt models: frames compiled by a strength change and by an in-place
        hot-swap of the adapter's values (both should be 0), recorded in the variant's note."""
        import diffadapt as da

        counters = torch._dynamo.utils.counters["stats"]
        before = counters["unique_graphs"]
        da.set_adapter_strength(self.raw, "default", 0.5)
        self.step()
        after_strength = counters["unique_graphs"]
        with torch.no_grad():
            for p in da.adapter_parameters(self.raw, "default").values():
                p.mul_(0.99)  # what hotswap_adapter does: copy new values in place
        self.step()
        da.set_adapter_strength(self.raw, "default", 1.0)
        after_swap = counters["unique_graphs"]
        self.stats.note = (f"compiled graphs added by a strength change: {after_strength - before}, "
                           f"by a hot-swap: {after_swap - after_strength}")

    def _plan_counted(self) -> bool:
        """An uncompiled diffadapt model: its eval forwards should reuse the kept weights (under
        torch.compile the graph rebuilds the factors every forward by design)."""
        return self.v.impl == "diffadapt" and self.opt is not None and not self.args.compile

    def watch_eval_prepares(self) -> None:
        """Count the plan's factor preparations (and the eval forwards) from now on."""
        self.forwards = self.prepares = 0
        if not self._plan_counted():
            return
        import diffadapt as da

        plan = da.model.adapter_state(self.raw)
        prepare = type(plan).prepare

        def counted(*a, **k):
            self.prepares += 1
            return prepare(plan, *a, **k)

        plan.prepare = counted  # an instance attribute, removed again by note_eval_prepares

    def note_eval_prepares(self) -> None:
        if not self._plan_counted():
            return
        import diffadapt as da

        del da.model.adapter_state(self.raw).prepare  # the class's method again
        self.stats.note = ((self.stats.note + "; ") if self.stats.note else "") + (
            f"eval: factors prepared in {self.prepares} of {self.forwards} timed forwards")

    def close(self) -> None:
        self.model = self.raw = self.peft_model = self.opt = None


def error_text(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:160]}"


# -- the two schedules -------------------------------------------------------------------------------------


def _setup(variant, master, spec, args, inputs, target) -> tuple[Optional[Runner], C.Stats]:
    runner = None
    try:
        runner = Runner(variant, master, spec, args, inputs, target)
        for _ in range(args.warmup):
            runner.step()
        C.sync(args.device)
        return runner, runner.stats
    except Exception as exc:  # noqa: BLE001 - a crashing variant is a result ("crash")
        stats = C.Stats(variant.key, variant.label, variant.impl, variant.method, error=error_text(exc))
        if args.verbose:
            traceback.print_exc()
        traceback.clear_frames(exc.__traceback__)  # the frames hold the model copy (GPU memory)
        if runner is not None:
            runner.close()
        del runner, exc
        C.free(args.device)
        return None, stats


def run_resident(variants, master, spec, args, inputs, target, log) -> list[C.Stats]:
    """All variants alive at once; timings in interleaved rounds (CPU)."""
    runners: list[Runner] = []
    results: dict[str, C.Stats] = {}
    for v in variants:
        log(f"setup {v.key} ...")
        runner, stats = _setup(v, master, spec, args, inputs, target)
        results[v.key] = stats
        if runner is None:
            log(f"  {v.key}: {stats.error}")
            continue
        if not args.no_memory and not args.compile:
            runner.measure_ops_and_memory()
        if args.compile and v.impl == "diffadapt":
            runner.recompiles_on_switch()
        runners.append(runner)
        log(f"  {v.key}: setup {stats.setup_s:.2f} s, {stats.layers} layers, {stats.trainable} trainable")

    def rounds(op: str, n_rounds: int, per_round: int, slot: str) -> None:
        for r in range(n_rounds if runners else 0):
            order = runners[r % len(runners):] + runners[: r % len(runners)]
            for runner in order:
                if runner.stats.error:
                    continue
                fn = getattr(runner, op)
                try:
                    for _ in range(per_round):
                        runner.stats.add(slot, C.timed(fn, args.device), r)
                except Exception as exc:  # noqa: BLE001
                    runner.stats.error = f"{op}: {error_text(exc)}"
            log(f"{op} round {r + 1}/{n_rounds} done")

    rounds("step", args.rounds, args.steps, "step")
    for runner in runners:
        runner.model.eval()
        runner.infer()  # untimed: the first eval forward prepares and keeps the weights
        runner.watch_eval_prepares()
    rounds("infer", args.rounds, args.infer_steps, "infer")
    for runner in runners:
        runner.note_eval_prepares()
    mergers = [r for r in runners if r.opt is not None]
    for runner in mergers:  # one untimed merge + unmerge each (first-call costs)
        try:
            runner.merge_unmerge()
        except Exception as exc:  # noqa: BLE001
            runner.stats.note = (runner.stats.note + "; " if runner.stats.note else "") + f"merge: {error_text(exc)}"
    runners_all, runners[:] = list(runners), [r for r in mergers if "merge:" not in r.stats.note]
    rounds("merge_unmerge", args.rounds, args.merge_reps, "merge")
    for runner in runners_all:
        runner.close()
    return [results[v.key] for v in variants]


def run_sequential(variants, master, spec, args, inputs, target, log) -> list[C.Stats]:
    """One variant on the device at a time (CUDA): its peak memory is its own."""
    out = []
    for v in variants:
        C.free(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        log(f"{v.key}: setup + {args.warmup} warmup steps ...")
        runner, stats = _setup(v, master, spec, args, inputs, target)
        out.append(stats)
        if runner is None:
            log(f"  {v.key}: {stats.error}")
            continue
        try:
            if not args.no_memory:
                runner.measure_ops_and_memory()
            if args.device.startswith("cuda"):
                C.sync(args.device)
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.rounds * args.steps):
                stats.add("step", C.timed(runner.step, args.device))
            if args.device.startswith("cuda"):
                stats.peak_bytes = torch.cuda.max_memory_allocated()
            runner.opt and runner.opt.zero_grad(set_to_none=True)
            runner.model.eval()
            for i in range(2 + args.rounds * args.infer_steps):
                if i == 2:
                    runner.watch_eval_prepares()
                t = C.timed(runner.infer, args.device)
                if i >= 2:
                    stats.add("infer", t)
            runner.note_eval_prepares()
            if runner.opt is not None:
                runner.merge_unmerge()
                for _ in range(args.rounds * args.merge_reps):
                    stats.add("merge", C.timed(runner.merge_unmerge, args.device))
        except Exception as exc:  # noqa: BLE001
            stats.error = error_text(exc)
            if args.verbose:
                traceback.print_exc()
            traceback.clear_frames(exc.__traceback__)
            del exc
        log(f"  {v.key}: {C.median(stats.times['step']['wall']):.1f} ms/step" + (f"  ({stats.error})" if stats.error else ""))
        runner.close()
        del runner
    C.free(args.device)
    return out


# -- report ------------------------------------------------------------------------------------------------------


def _f(x: Optional[float], fmt: str = "{:.1f}") -> str:
    return "–" if x is None or x != x else fmt.format(x)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or a != a or b != b or b == 0:
        return None
    return a / b


def render(results: list[C.Stats], variants: list[Variant], args, header: dict[str, str]) -> str:
    by = {s.key: s for s in results}
    vmap = {v.key: v for v in variants}
    clock = args.clock

    def med(key: str, op: str = "step", which: Optional[str] = None) -> Optional[float]:
        """Median ms of ``op`` for a variant that ran it, else None."""
        s = by.get(key)
        xs = s.times[op][which or clock] if s else []
        return C.median(xs) if xs else None

    def peak(key):
        s = by.get(key)
        return s.peak_bytes / MIB if s and s.peak_bytes and not s.error else None

    def ratio(key: str, ref: str, op: str = "step") -> Optional[float]:
        """Paired by timing round (see common.paired_ratio)."""
        a, b = by.get(key), by.get(ref)
        if a is None or b is None or not a.ran(op) or not b.ran(op):
            return None
        return C.paired_ratio(a, b, op, clock)

    floor_mem, lora_mem = peak("floor"), peak("peft:lora")
    cuda = args.device.startswith("cuda")
    mem_head = "peak MiB" if cuda else "peak MiB (tensors)"
    step_head = "ms/step" if clock == "wall" else "ms/step (CPU time)"
    wall_col = clock != "wall"
    cols = ["variant", "layers", "trainable", step_head, "IQR"] + (["wall ms"] if wall_col else []) + [
        "× floor", "× LoRA", "× PEFT same", "ops/step", mem_head, "mem × LoRA", "mem × floor", "infer ms", "infer × base",
        "merge+unmerge ms", "setup s"]
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "--:|" * (len(cols) - 1)]
    notes = []
    for s in results:
        v = vmap[s.key]
        if not s.ran():
            lines.append(f"| {s.label} | | | crash |" + " |" * (len(cols) - 4))
            notes.append(f"{s.label}: **crash** — {s.error}")
            continue
        ms = med(s.key)
        same = "–"
        if v.peer:
            peer = by.get(v.peer)
            if peer is None:
                same = "n/a"
            elif not peer.ran():
                same = "crash"
            else:
                same = _f(ratio(s.key, v.peer), "{:.2f}")
                if peer.note and "m=" in peer.note:
                    same += " †"
        mem = peak(s.key)
        row = [
            s.label,
            str(s.layers) if s.method != "floor" else "–",
            f"{s.trainable:,}" if s.method != "floor" else "0",
            _f(ms),
            _f(C.spread(s.times["step"][clock]) * 100, "{:.0f}%"),
        ] + ([_f(med(s.key, "step", "wall"))] if wall_col else []) + [
            _f(ratio(s.key, "floor"), "{:.2f}"),
            _f(ratio(s.key, "peft:lora"), "{:.2f}"),
            same,
            f"{s.ops:,}" if s.ops else "–",
            _f(mem),
            _f(_ratio(mem, lora_mem), "{:.2f}"),
            _f(_ratio(mem, floor_mem), "{:.2f}"),
            _f(med(s.key, "infer")),
            _f(ratio(s.key, "floor", "infer"), "{:.2f}"),
            _f(med(s.key, "merge")),
            _f(s.setup_s, "{:.2f}") if s.method != "floor" else "–",
        ]
        lines.append("| " + " | ".join(row) + " |")
        if s.error:
            notes.append(f"{s.label}: error after some timings — {s.error}")
        if s.note:
            notes.append(f"{s.label}: {s.note}" + (" (marked †)" if "m=" in s.note else ""))

    # goal check for diffadapt's methods
    goals = ["", "Goal check (diffadapt; the speed issue's targets, PEFT LoRA r16 side by side):", "",
             "| method | step ≤ 1.00× LoRA | mem ≤ 1.05× LoRA | ops/step ≤ LoRA's | infer ≤ 1.15× base "
             "| merge+unmerge ≤ LoRA's | setup |", "|---|---|---|---|---|---|---|"]

    def mark(x, limit, fmt="{:.2f}"):
        if x is None:
            return "–"
        return ("✓ " if x <= limit else "✗ ") + fmt.format(x)

    def merge_cell(key):  # paired by round, like the step ratio (the medians in ms beside it)
        x = ratio(key, "peft:lora", "merge")
        return "–" if x is None else mark(x, 1.0, "{:.2f}×") + f" ({med(key, 'merge'):.1f} vs {lora_merge:.1f} ms)"

    lora = next((r for r in results if r.key == "peft:lora" and r.ran()), None)
    lora_ops = lora.ops if lora is not None else None
    lora_merge = med("peft:lora", "merge") if lora is not None else None
    for s in results:
        if s.impl != "diffadapt" or not s.ran():
            continue
        setup = f"{s.setup_s:.2f} s"
        if s.method == "frod":
            setup = mark(s.setup_s, 10.0, "{:.2f} s")
        goals.append("| " + " | ".join([
            s.label, mark(ratio(s.key, "peft:lora"), 1.0), mark(_ratio(peak(s.key), lora_mem), 1.05),
            mark(s.ops, lora_ops, "{:,}") if lora_ops else "–", mark(ratio(s.key, "floor", "infer"), 1.15),
            merge_cell(s.key) if lora_merge else "–", setup,
        ]) + " |")

    head = [f"- {k}: {v}" for k, v in header.items()]
    mem_note = ("peak = torch.cuda.max_memory_allocated() over the timed steps (weights, adapter, grads, "
                "optimizer states, activations)" if cuda else
                "peak = peak bytes of live tensors during one training step, counted by a dispatch-mode tracker "
                "(weights, adapter, grads, AdamW states, activations, temporaries; no allocator overhead) — "
                "the CPU analogue of max_memory_allocated, not RSS")
    clock_note = ("times are wall-clock with the device synchronised" if clock == "wall" else
                  "times are process CPU time (time.process_time) per call, which a busy neighbour does not "
                  "inflate; the median wall time is in 'wall ms'")
    foot = [
        "",
        "Columns: ms/step = median of forward + MSE + backward + AdamW (floor: frozen model, backward to the "
        "input only); ratios (× floor, × LoRA, × PEFT same, infer × base) are medians over the timing rounds of "
        "per-round ratios (variants interleave, so pairing by round cancels load drift); IQR = interquartile range / median of the step times (noise); × PEFT same = step time "
        "over PEFT's same method with the identical config (to_peft_dict); infer = unmerged eval forward under "
        "no_grad (× base = over the floor row's base model); ops/step = aten ops dispatched in one training step "
        "(forward + backward + AdamW; a proxy for kernel launches on a GPU); merge+unmerge = both calls on every adapted layer "
        "(the goal check compares it paired by round: the median of per-round ratios to LoRA's, the medians in ms beside); "
        f"setup = the injection call (add_adapter / get_peft_model); {mem_note}; {clock_note}.",
    ]
    if notes:
        foot += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(head + [""] + lines + foot + goals) + "\n"


# -- main ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--model", default="small", choices=sorted(C.MODELS))
    p.add_argument("--dtype", default=None, choices=sorted(C.DTYPES), help="default fp32 on cpu, bf16 on cuda")
    p.add_argument("--batch", type=int, default=None, help="default: the model's (small 2, sd15 4, sd3 2)")
    p.add_argument("--methods", default="oft,boft,hra,fourierft,frod")
    p.add_argument("--impl", default="both", choices=["both", "da", "peft"])
    p.add_argument("--no-extras", action="store_true", help="skip the OFT Cayley-Neumann pair")
    p.add_argument("--skip", default="", help="variant keys to leave out, e.g. peft:boft,peft:frod")
    p.add_argument("--no-lora", action="store_true", help="skip PEFT LoRA (ratios to LoRA become –)")
    p.add_argument("--no-floor", action="store_true", help="skip the floor (ratios to floor/base become –)")
    p.add_argument("--grad-ckpt", default="auto", choices=["auto", "on", "off"], help="auto: on for sd3")
    p.add_argument("--schedule", default="auto", choices=["auto", "resident", "sequential"],
                   help="auto: resident (interleaved rounds) on cpu, sequential on cuda")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (cpu 2, cuda 3)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (cpu 10, cuda 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant per round (cpu 2, cuda 10)")
    p.add_argument("--infer-steps", type=int, default=None, help="timed forwards per round (cpu 2, cuda 10)")
    p.add_argument("--merge-reps", type=int, default=None, help="timed merge+unmerge per round (cpu 2, cuda 5)")
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"],
                   help="timings reported: auto = process CPU time on cpu (robust on shared machines), wall on cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
    p.add_argument("--no-memory", action="store_true", help="skip the untimed tracker step (CPU memory, ops/step)")
    p.add_argument("--compile", nargs="?", const="graph", default=None, choices=["graph", "fullgraph"],
                   help="torch.compile (inductor) each whole model; 'fullgraph' refuses graph breaks. Ops/memory "
                        "are not tracked; diffadapt variants report recompiles on a strength change / hot-swap")
    p.add_argument("--out", default=None, help="also write the markdown report here")
    p.add_argument("--json", default=None, help="write raw numbers (every timing) here")
    p.add_argument("--verbose", action="store_true", help="tracebacks of crashing variants")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormal floats to zero on the CPU (slows saturated attention ~8x)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    spec = C.MODELS[args.model]
    args.batch = args.batch or spec.batch
    args.grad_ckpt = spec.grad_ckpt if args.grad_ckpt == "auto" else args.grad_ckpt == "on"
    args.clock = ("wall" if cuda else "cpu") if args.clock == "auto" else args.clock
    args.schedule = ("sequential" if cuda else "resident") if args.schedule == "auto" else args.schedule
    for name, cpu_default, cuda_default in (("warmup", 2, 3), ("rounds", 10, 1), ("steps", 2, 10),
                                            ("infer_steps", 2, 10), ("merge_reps", 2, 5)):
        if getattr(args, name) is None:
            setattr(args, name, cuda_default if cuda else cpu_default)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in C.METHOD_SETTINGS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(C.METHOD_SETTINGS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # PEFT's random FourierFT spectrum (x scaling 150) saturates the attention softmax of a random model;
    # on x86 CPUs the resulting denormal floats make SDPA's backward ~8x slower (112 vs 14 ms/step on the
    # small gauge) -- a CPU artefact of the weights' values, not a cost of any method (GPUs pay no such penalty).
    torch.set_flush_denormal(not args.keep_denormals)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA requested but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*progressbar.*")
    os.environ.setdefault("TQDM_DISABLE", "1")  # PEFT FRoD's progress bar

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    spec = C.MODELS[args.model]
    dtype = C.DTYPES[args.dtype]
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + (argv or sys.argv[1:]))
    t_start = time.perf_counter()
    log(f"building {spec.name} ({args.dtype}) ...")
    master = C.build_master(spec, dtype, args.device)
    inputs, target = C.make_inputs(spec, args.batch, dtype, args.device)
    variants = make_variants(args.methods, args.impl, not args.no_extras)
    skip = {k.strip() for k in args.skip.split(",") if k.strip()}
    skip |= {"peft:lora"} if args.no_lora else set()
    skip |= {"floor"} if args.no_floor else set()
    variants = [v for v in variants if v.key not in skip]
    run = run_resident if args.schedule == "resident" else run_sequential
    results = run(variants, master, spec, args, inputs, target, log)

    header = {
        "date": _dt.date.today().isoformat(),
        "command": f"`{command}`",
        "machine": C.machine(args.device),
        "versions": ", ".join(f"{k} {v}" for k, v in C.versions().items()),
        "model": spec.description,
        "settings": (f"{args.dtype}, batch {args.batch}, grad ckpt {'on' if args.grad_ckpt else 'off'}, "
                     f"targets {','.join(spec.targets)}; {args.schedule} schedule: warmup {args.warmup}, "
                     f"{args.rounds} rounds × {args.steps} steps (infer {args.infer_steps}, merge "
                     f"{args.merge_reps} per round); AdamW lr 1e-4; denormals "
                     + ("kept" if args.keep_denormals else "flushed to zero")
                     + (f"; torch.compile (inductor, {args.compile}) of every whole model" if args.compile else "")),
        "methods": "; ".join(f"{C.METHOD_LABELS[m]} = {C.METHOD_SETTINGS[m]}" for m in args.methods)
        + "; PEFT LoRA r=16, lora_alpha=16; other fields at each library's default, PEFT configs built with "
        "diffadapt's to_peft_dict (identical function)",
        "wall time": f"{time.perf_counter() - t_start:.0f} s",
    }
    report = render(results, variants, args, header)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "args": {k: v for k, v in vars(args).items()},
                       "results": [asdict(s) for s in results]}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
