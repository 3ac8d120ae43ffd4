"""Where a compiled training step's time goes: floor, PEFT LoRA r16 and diffadapt methods on the small
gauge, each whole UNet ``torch.compile``d (inductor), 8 interleaved timed steps (process CPU time,
median) and a torch.profiler table of 3 steps each (aten ops by self time):

    python benchmarks/profile_compiled.py floor,lora,oft
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

torch.set_num_threads(1)
torch.set_flush_denormal(True)
spec = C.MODELS["small"]
master = C.build_master(spec, torch.float32, "cpu")
inputs, TGT = C.make_inputs(spec, spec.batch, torch.float32, "cpu")


def variant(kind):
    model = C.fresh_copy(master, "cpu", False)
    if kind == "lora":
        from peft import get_peft_model
        model = get_peft_model(model, C.peft_lora_config(spec.targets)).base_model.model
    elif kind != "floor":
        import diffadapt as da
        da.add_adapter(model, C.diffadapt_config(kind, spec.targets), "default")
    cm = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    tgt = TGT
    def step():
        if opt is None:
            x = inputs[spec.input_key].detach().requires_grad_(True)
            out = cm(**{**inputs, spec.input_key: x}, return_dict=False)[0]
        else:
            opt.zero_grad(set_to_none=True)
            out = cm(**inputs, return_dict=False)[0]
        F.mse_loss(out, tgt).backward()
        if opt:
            opt.step()
    return step


steps = {k: variant(k) for k in (sys.argv[1] if len(sys.argv) > 1 else "floor,lora,oft").split(",")}
for k, s in steps.items():
    t = time.time(); s(); s(); print(k, "compiled+2 warm in %.0f s" % (time.time() - t), flush=True)
times = {k: [] for k in steps}
for r in range(8):
    for k, s in steps.items():
        t = time.process_time(); s(); times[k].append(time.process_time() - t)
for k in steps: print(k, "median ms %.1f" % (1000 * sorted(times[k])[4]))
for k, s in steps.items():
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            s()
    print("=====", k)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
