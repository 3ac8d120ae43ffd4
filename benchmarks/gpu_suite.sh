#!/usr/bin/env bash
# The GPU tables of the speed issue, in one go, for a bare GPU machine that has torch, transformers,
# accelerate, peft and safetensors but not diffusers. On an H200 (2026-12-04) the parts took SD1.5 165 s,
# SD3 ~250 s (its diffadapt rows alone 114 s) and switching 95 s: about 8.5 minutes in all.
#
# On a machine with network, first put the wheels beside this script (they travel with the tree;
# peft is carried too so that the PEFT side is the version of the CPU tables):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d benchmarks/wheels diffusers==0.42.1 peft==0.21.2 importlib_metadata==8.7.0
# then, on the GPU machine, from the repository root:
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
# Writes sd15.md / sd3.md / switch_sd15.md (+ .json), frod_forms.md and a log into OUT_DIR (default: gpu_results/),
# most important first (SD1.5, SD3, switching), each part under its own time limit so that one slow
# part cannot take the others' time.
# SMOKE=1 runs the same sequence on the CPU on small models (seconds): a check of the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/diffadapt-site benchmarks/wheels/*.whl || exit 2
    export PYTHONPATH="/tmp/diffadapt-site:$PYTHONPATH"
elif ! python3 -c "import diffusers" 2>/dev/null; then
    echo "no diffusers and no benchmarks/wheels/*.whl (see the header)"; exit 2
fi
if [ "${SMOKE:-0}" = 1 ]; then
    dev=cpu; sd15=small; sd3=sd3small; sw=tiny; quick="--warmup 1 --rounds 1 --steps 2 --infer-steps 2 --merge-reps 1"
    sd3quick="$quick"; sched="--schedule sequential"
else
    dev=cuda; sd15=sd15; sd3=sd3; sw=sd15; quick=""; sd3quick="--steps 6 --infer-steps 5 --merge-reps 3"; sched=""
fi
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee "$out/log"
if [ "$dev" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee -a "$out/log"
    # PEFT's BOFT needs its fbd_cuda extension for m > 1; with torch 2.11's headers it does not compile
    # (2026-12-04, H200: "no suitable conversion function from DeprecatedTypeProperties to ScalarType"),
    # and PEFT then runs m = 1 silently -- the table marks that row with a dagger
fi
run() {  # run LIMIT_S ARGS...: one part under its own limit, its tail into the log
    local limit=$1; shift
    echo "== $* (limit ${limit} s)" | tee -a "$out/log"
    local t0=$SECONDS
    timeout "$limit" python3 "$@" 2>&1 | grep -v -e "UserWarning" -e "warnings.warn" | tail -n 80 | tee -a "$out/log"
    echo "== $((SECONDS - t0)) s" | tee -a "$out/log"
}
# SD1.5 UNet, bf16, batch 4, 512 px: every method, PEFT's same method, PEFT LoRA (PEFT's FRoD cannot build a
# UNet -- mixed widths in one category -- and is left out)
run 210 benchmarks/bench_train.py --device $dev --model $sd15 --dtype bf16 --no-extras --skip peft:frod $sched $quick \
    --out "$out/sd15.md" --json "$out/sd15.json"
# SD3-medium, bf16, batch 2, 1024 px, gradient checkpointing; PEFT's BOFT (~9 s/step) and FRoD (~107 s init) left out
run 270 benchmarks/bench_train.py --device $dev --model $sd3 --dtype bf16 --no-extras --skip peft:boft,peft:frod \
    $sched $sd3quick --out "$out/sd3.md" --json "$out/sd3.json"
# switching at SD1.5 size: toggle, merge-switch, merge+unmerge vs PEFT (and PEFT LoRA)
run 110 benchmarks/bench_switch.py --model $sw --device $dev --dtype bf16 --methods oft,boft,hra,fourierft,frod --repeat 5 \
    > "$out/switch_sd15.md"
# FRoD's dense and sparse forms per layer shape on this device (the sparse weight path stays off CUDA until this
# says where it pays; the sparse core's CUDA crossover is read off the same table)
if [ "$dev" = cuda ]; then forms="--device cuda --models sd15 sd3"; else forms="--device cpu --models small --reps 1"; fi
run 60 benchmarks/frod_forms.py $forms > "$out/frod_forms.md"
echo "done: $out" | tee -a "$out/log"
