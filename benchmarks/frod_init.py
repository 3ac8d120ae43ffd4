"""FRoD's injection arithmetic (``FRoD.init_shared``: the groups' joint decompositions, the sparse
patterns and every layer's U solve) on a gauge's target layers, one frod.py against another,
interleaved by round, process CPU time, one thread:

    git show <rev>:diffadapt/methods/frod.py > /tmp/frod_old.py
    python benchmarks/frod_init.py --model sd15 --old /tmp/frod_old.py --rounds 2
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common as C  # noqa: E402

from diffadapt.host import layer_spec  # noqa: E402
from diffadapt.methods import frod as current  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sd15", choices=sorted(C.MODELS))
    p.add_argument("--old", help="another frod.py to time beside the installed one")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    variants = [("current", current)]
    if args.old:
        found = importlib.util.spec_from_file_location("frod_old", args.old)
        old = importlib.util.module_from_spec(found)
        sys.modules["frod_old"] = old  # dataclasses look their module up
        found.loader.exec_module(old)
        variants.insert(0, ("old", old))
    spec = C.MODELS[args.model]
    torch.manual_seed(0)
    model = spec.build()
    mods = [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in spec.targets)]
    layers, weights = [layer_spec(n, m) for n, m in mods], [m.weight.detach() for _, m in mods]
    print(f"{args.model}: {len(layers)} layers; torch {torch.__version__}, one thread")
    for rnd in range(args.rounds):
        for label, mod in variants:
            t0, w0 = time.process_time(), time.perf_counter()
            mod.FRoD.init_shared(mod.FRoDConfig(progressbar=False), layers, weights)
            print(f"round {rnd} {label}: init_shared {time.process_time() - t0:.1f} s CPU "
                  f"({time.perf_counter() - w0:.1f} s wall)", flush=True)


if __name__ == "__main__":
    main()
