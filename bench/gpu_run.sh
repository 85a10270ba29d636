#!/usr/bin/env bash
# The GPU benchmark of BENCHMARKS.md §4 as one prepared run, sized for a 15-minute device lease (one
# command of at most 10 minutes: the four limits below add up to 570 s). From the repository root there:
#
#   bash bench/gpu_run.sh            # results into $OUT (device tool) or ./gpu-results
#
# The device image has torch, transformers, accelerate and safetensors but no diffusers/lycoris-lora
# (and another peft). Carry them as wheels, made here once (.whl/ is git-ignored; name it in `carry`):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 lycoris-lora==4.1.3 peft==0.21.2 toml==0.10.2
#
# Each configuration has its own time limit, so one that runs long (or runs out of memory) leaves the
# others' results, and its own .json/.md keep every variant it finished (bench.py rewrites them after each
# variant, marked partial); every table is printed and written as .md and .json (8 files come back).
# Override for a CPU smoke test of the script itself:
#   PYTHON=.venv/bin/python MODEL=tiny DEVICE=cpu DTYPE=fp32 RES=64 OUT=/tmp/smoke bash bench/gpu_run.sh
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-sdxl}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
RES=${RES:-1024}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PYTHON" -c "import torch, diffusers, peft, lycoris; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'peft', peft.__version__, 'lycoris', lycoris.__version__)"; } 2>&1 | tee "$OUT/env.txt"

run() {  # name, seconds, bench.py flags...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$PYTHON" bench/bench.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
        --resolution "$RES" --rank 8 --json "$OUT/$name.json" --markdown "$OUT/$name.md" "$@" \
        || echo "== $name: exit status $? (124: over its time limit)"
}

# 1. bs1: every variant, inference too (the anchors: floor 172 ms / 11.2 GiB, PEFT LoHa 624 ms / 13.6 GiB)
run sdxl-bs1 230 --batch_size 1 --steps 6 --warmup 2 --infer_steps 5
# 2. bs4: ours against PEFT (the goal is <= 0.6x PEFT LoHa)
run sdxl-bs4 120 --batch_size 4 --steps 5 --warmup 2 --infer_steps 0 \
    --variants floor loha-grouped loha-merged peft-loha
# 3. bs1 with gradient checkpointing
run sdxl-bs1-ckpt 100 --batch_size 1 --steps 5 --warmup 2 --infer_steps 0 --gradient_checkpointing \
    --variants floor loha-grouped loha-merged peft-loha
# 4. is torch.compile's gradient right on this GPU? (on CPU it is not; train_loha_sdxl.py refuses it there)
echo "== compile-check (limit 120s)"
timeout 120 "$PYTHON" bench/compile_check.py --device "$DEVICE" 2>&1 | tee "$OUT/compile-check.txt"
ls -la "$OUT"
