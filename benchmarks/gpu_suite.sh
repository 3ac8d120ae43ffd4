#!/usr/bin/env bash
# The GPU tables of the speed issue, in one go (< 8 min on one H100/H200), for a bare GPU machine
# that has torch, transformers, accelerate, peft and safetensors but not diffusers.
#
# On a machine with network, first put the wheels beside this script (they travel with the tree):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d benchmarks/wheels diffusers==0.42.1
# then, on the GPU machine, from the repository root:
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
# Writes sd15.md / sd3.md / switch_sd15.md (+ .json) and a log into OUT_DIR (default: gpu_results/).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c "import diffusers" 2>/dev/null; then
    ls benchmarks/wheels/*.whl >/dev/null 2>&1 || { echo "no diffusers and no benchmarks/wheels/*.whl (see the header)"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/diffadapt-site benchmarks/wheels/*.whl || exit 2
    export PYTHONPATH="/tmp/diffadapt-site:${PYTHONPATH:-}"
fi
python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name(0))" | tee "$out/log"
run() { echo "== $*" | tee -a "$out/log"; timeout 200 python3 "$@" 2>&1 | tail -n 60 | tee -a "$out/log"; }
# SD1.5 UNet, bf16, batch 4, 512 px: every method, PEFT's same method, PEFT LoRA
run benchmarks/bench_train.py --device cuda --model sd15 --dtype bf16 --no-extras --out "$out/sd15.md" --json "$out/sd15.json"
# SD3-medium, bf16, batch 2, 1024 px, gradient checkpointing; PEFT's BOFT (~9 s/step) and FRoD (~107 s init) left out
run benchmarks/bench_train.py --device cuda --model sd3 --dtype bf16 --no-extras --skip peft:boft,peft:frod \
    --out "$out/sd3.md" --json "$out/sd3.json"
# switching at SD1.5 size: toggle, merge-switch, merge+unmerge vs PEFT (and PEFT LoRA)
run benchmarks/bench_switch.py --model sd15 --device cuda --dtype bf16 --methods oft,boft,hra,fourierft,frod --repeat 5 \
    > "$out/switch_sd15.md"
echo "done: $out" | tee -a "$out/log"
