"""Where a training step's time goes, per variant (torch.profiler, CPU by default).

For each variant (same model, inputs and settings as bench_train.py) it profiles a few steps and
prints, per step:

* the phases: forward, backward, AdamW (record_function around each), and inside the forward
  diffadapt's per-layer ``prepare`` (parameters -> rotation blocks / WY factors / ...) and its
  ``rotate_input`` / ``delta_output`` (the activation side), wrapped here from the outside;
* the backward nodes that cost most (``autograd::engine::evaluate_function: XBackward0``);
* the aten ops with the most self time, with their call counts (profiler overhead inflates
  every time here by a similar per-op amount; the counts are exact);
* for diffadapt variants, a split without the profiler (CPU time, medians): the adapted layers'
  forward + backward with ``prepare`` precomputed vs the base layers alone vs a LoRA r16 branch,
  and ``prepare`` on its own.

    python benchmarks/profile_step.py --variants peft:lora,da:oft,da:boft --steps 4

Variant keys are bench_train.py's: floor, peft:lora, da:<method>, peft:<method>.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train as B  # noqa: E402
import common as C  # noqa: E402


def instrument_diffadapt() -> None:
    """Label diffadapt's per-step pieces for the profiler (wrappers only; diffadapt is unchanged)."""
    from diffadapt import plan
    from diffadapt.methods import METHOD_NAMES, get_method

    orig_prepare = plan.AdapterPlan.prepare

    def prepare(self, names, training):
        with record_function("diffadapt.prepare"):
            return orig_prepare(self, names, training)

    plan.AdapterPlan.prepare = prepare
    for name in METHOD_NAMES:
        cls = get_method(name)
        for attr, label in (("rotate_input", "diffadapt.rotate_input"), ("delta_output", "diffadapt.delta_output"),
                            ("output_scale", "diffadapt.output_scale")):
            fn = getattr(cls, attr)

            def wrapped(*a, _fn=fn, _label=label, **k):
                with record_function(_label):
                    return _fn(*a, **k)

            setattr(cls, attr, staticmethod(wrapped))


class PhasedRunner(B.Runner):
    def step(self) -> None:
        import torch.nn.functional as F

        if self.opt is None:
            inputs = dict(self.inputs)
            inputs[self.spec.input_key] = inputs[self.spec.input_key].detach().requires_grad_(True)
            with record_function("phase.forward"):
                out = self.model(**inputs, return_dict=False)[0]
                loss = F.mse_loss(out.float(), self.target.float())
            with record_function("phase.backward"):
                loss.backward()
            return
        self.opt.zero_grad(set_to_none=True)
        with record_function("phase.forward"):
            out = self.model(**self.inputs, return_dict=False)[0]
            loss = F.mse_loss(out.float(), self.target.float())
        with record_function("phase.backward"):
            loss.backward()
        with record_function("phase.optimizer"):
            self.opt.step()


def summarize(prof, steps: int, top: int) -> str:
    events = prof.key_averages()
    per = 1e3 * steps  # profiler times are in us; report ms per step
    lines = []
    phases = {e.key: e for e in events if e.key.startswith(("phase.", "diffadapt."))}
    parts = []
    for key in ("phase.forward", "diffadapt.prepare", "diffadapt.rotate_input", "diffadapt.delta_output",
                "phase.backward", "phase.optimizer"):
        if key in phases:
            e = phases[key]
            parts.append(f"{key.split('.', 1)[1]} {e.cpu_time_total / per:.1f} ms ({e.count // steps} calls)")
    lines.append("  phases per step: " + "; ".join(parts))
    bw = sorted((e for e in events if e.key.startswith("autograd::engine::evaluate_function:")),
                key=lambda e: -e.cpu_time_total)[:top]
    lines.append("  top backward nodes (inclusive ms/step, calls/step):")
    for e in bw:
        name = e.key.split(":", 2)[-1].strip()
        lines.append(f"    {name:<38s} {e.cpu_time_total / per:7.2f}  {e.count // steps:5d}")
    aten_all = [e for e in events if e.key.startswith("aten::")]
    aten = sorted(aten_all, key=lambda e: -e.self_cpu_time_total)[:top]
    total_self = sum(e.self_cpu_time_total for e in aten_all)
    calls = sum(e.count for e in aten_all)
    lines.append(f"  aten ops: {total_self / per:.1f} ms self time/step over {calls // steps} calls/step (incl. nested); "
                 "top by self time (ms/step, calls/step):")
    for e in aten:
        lines.append(f"    {e.key:<38s} {e.self_cpu_time_total / per:7.2f}  {e.count // steps:5d}")
    device = [e for e in events if getattr(e, "self_device_time_total", 0) > 0]
    if device:  # CUDA: the GPU's own time, against the wall time the caller printed (launch-bound if far below)
        busy = sum(e.self_device_time_total for e in device)
        lines.append(f"  GPU busy {busy / per:.1f} ms/step over {sum(e.count for e in device) // steps} kernels/step; "
                     "top kernels by GPU time (ms/step, launches/step):")
        for e in sorted(device, key=lambda e: -e.self_device_time_total)[:top]:
            lines.append(f"    {e.key[:70]:<70s} {e.self_device_time_total / per:7.2f}  {e.count // steps:5d}")
        lines.append("  aten ops by the GPU time they launch (inclusive ms/step, calls/step):")
        for e in sorted(aten_all, key=lambda e: -getattr(e, "device_time_total", 0))[:top]:
            lines.append(f"    {e.key:<38s} {e.device_time_total / per:7.2f}  {e.count // steps:5d}")
    return "\n".join(lines)


def _detached(prep):
    """A copy of a method's per-step factors as fresh leaves (gradients still computed for them)."""
    def leaf(t):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return t.detach().requires_grad_(True)
        return t

    if isinstance(prep, tuple) and hasattr(prep, "_fields"):
        return type(prep)(*[leaf(t) for t in prep])
    return leaf(prep)


def split_costs(runner: "PhasedRunner", reps: int) -> str:
    """CPU ms per training step, summed over every adapted layer, of: the base layers alone
    (forward + backward to the input), the same layers with a PEFT-style LoRA r16 branch, the
    diffadapt layers with ``prepare`` precomputed (the activation side: rotate / delta, output
    scale, base GEMM), and ``prepare`` itself (forward + backward over all layers)."""
    import torch.nn.functional as F
    from diffadapt.host import weight_2d
    from diffadapt.model import adapter_state, hosts

    shapes: dict[str, tuple] = {}
    found = hosts(runner.model)
    def record(name):
        def hook(module, args):  # must return None (a returned value replaces the inputs)
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [h.register_forward_pre_hook(record(n)) for n, h in found]
    runner.step()
    for h in handles:
        h.remove()
    g = torch.Generator().manual_seed(0)
    plan = adapter_state(runner.model)
    layers = []
    for name, host in found:
        base = host.base_layer
        dev, dt = base.weight.device, base.weight.dtype
        x = torch.randn(shapes[name], generator=g).to(dev, dt).requires_grad_(True)
        gy = torch.randn(*shapes[name][:-1], base.out_features, generator=g).to(dev, dt)
        d_in, d_out = weight_2d(base).shape[1], base.out_features
        lora_a = (torch.randn(16, d_in, generator=g) * 0.01).to(dev, dt).requires_grad_(True)
        lora_b = (torch.randn(d_out, 16, generator=g) * 0.01).to(dev, dt).requires_grad_(True)
        layers.append((host, x, gy, lora_a, lora_b))

    def base_all():
        for host, x, gy, _, _ in layers:
            host.base_layer(x).backward(gy)

    def lora_all():
        for host, x, gy, a, b in layers:
            (host.base_layer(x) + F.linear(F.linear(x, a), b) * 1.0).backward(gy)

    def prepare_all():  # the plan's batched preparation of every layer, forward + backward
        outs = []
        for steps in plan.prepare(plan.live(), True):
            for _, prep in steps:
                fields = prep if isinstance(prep, tuple) else (prep,)
                outs += [t.sum() for t in fields if isinstance(t, torch.Tensor) and t.requires_grad]
        torch.stack(outs).sum().backward()

    fixed = [[(m, _detached(p)) for m, p in steps] for steps in plan.prepare(plan.live(), True)]

    def adapted_all():
        real = plan.steps_for
        plan.steps_for = lambda host: fixed[host.index]  # the host's own forward, preparation skipped
        try:
            for host, x, gy, _, _ in layers:
                host(x).backward(gy)
        finally:
            plan.steps_for = real

    ops = {"base layers": base_all, "LoRA r16 layers": lora_all, "diffadapt layers (prepare precomputed)":
           adapted_all, "diffadapt prepare (all layers)": prepare_all}
    times: dict[str, list[float]] = defaultdict(list)
    for fn in ops.values():
        fn()  # warm
    for r in range(reps):
        for key, fn in ops.items():
            runner.model.zero_grad(set_to_none=True)
            times[key].append(C.timed(fn, runner.args.device)[1 if not runner.args.device.startswith("cuda") else 0])
    med = {k: C.median(v) for k, v in times.items()}
    lines = [f"  split over {len(layers)} adapted layers (CPU ms per step, median of {reps}; forward + backward):"]
    for key in ops:
        lines.append(f"    {key:<42s} {med[key]:7.1f}")
    b0 = med["base layers"]
    lines.append(f"    => LoRA branch {med['LoRA r16 layers'] - b0:.1f}; diffadapt activation side "
                 f"{med['diffadapt layers (prepare precomputed)'] - b0:.1f} + prepare "
                 f"{med['diffadapt prepare (all layers)']:.1f} = "
                 f"{med['diffadapt layers (prepare precomputed)'] - b0 + med['diffadapt prepare (all layers)']:.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", choices=sorted(C.MODELS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=sorted(C.DTYPES))
    p.add_argument("--variants", default="floor,peft:lora,da:oft,da:boft,da:hra,da:fourierft,da:frod")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--split-reps", type=int, default=15, help="reps of the per-layer split (0: skip it)")
    p.add_argument("--no-profile", action="store_true", help="only the split timings")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormal floats to zero on the CPU (bench_train.py's default, kept alike)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # as bench_train.py: PEFT's random FourierFT spectrum saturates a random model's softmax and the
    # denormals it leaves make SDPA's backward slower on x86 CPUs (44 vs 25 ms/step on the small gauge)
    torch.set_flush_denormal(not args.keep_denormals)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    spec = C.MODELS[args.model]
    bargs = B.parse_args(["--device", args.device, "--model", args.model, "--dtype", args.dtype])
    instrument_diffadapt()
    master = C.build_master(spec, C.DTYPES[args.dtype], args.device)
    inputs, target = C.make_inputs(spec, bargs.batch, C.DTYPES[args.dtype], args.device)
    known = {v.key: v for v in B.make_variants(list(C.METHOD_SETTINGS), "both", True)}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for key in [k.strip() for k in args.variants.split(",") if k.strip()]:
        if key not in known:
            print(f"unknown variant {key!r}; known: {', '.join(known)}")
            return 2
        try:
            runner = PhasedRunner(known[key], master, spec, bargs, inputs, target)
            for _ in range(args.warmup):
                runner.step()
            C.sync(args.device)
            prof = None
            if not args.no_profile:
                with profile(activities=acts) as prof:
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        runner.step()
                    C.sync(args.device)
                    wall = (time.perf_counter() - t0) * 1e3 / args.steps
            split = split_costs(runner, args.split_reps) if args.split_reps and key.startswith("da:") else ""
        except Exception as exc:  # noqa: BLE001
            print(f"## {key}: {B.error_text(exc)}\n")
            continue
        print(f"## {key} ({known[key].label})")
        if prof is not None:
            print(f"  wall {wall:.1f} ms/step under the profiler")
            print(summarize(prof, args.steps, args.top))
        if split:
            print(split)
        print(flush=True)
        runner.close()
        C.free(args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
