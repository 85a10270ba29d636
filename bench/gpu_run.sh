#!/usr/bin/env bash
# Everything that needs a GPU, as one prepared command for a 15-minute device lease (the limits below add up
# to 535 s, under 9 minutes on one H100). From the repository root there:
#
#   bash bench/gpu_run.sh            # results into $OUT (device tool) or ./gpu-results
#
# 1. A CUDA smoke run of the trainer on the tiny pipeline: bf16, 8-bit AdamW where bitsandbytes is present,
#    gradient checkpointing, --compile, fp8 base weights; then a resume (without --compile: one compilation is
#    enough, and it is the flag a resume may drop) and infer.py with an fp8 base.
# 2. The SDXL tables (bench.py, timed, with torch.cuda.max_memory_allocated): bs1 with inference, bs4, bs1 with
#    gradient checkpointing, fp8 base with and without it; then compare.md puts each measured peak beside the
#    exact estimate of bench/results/count-sdxl-*.json (the same configuration counted on fake tensors).
# 3. Is torch.compile's gradient right on this GPU (bench/compile_check.py)?
#
# The device image has torch, transformers, accelerate and safetensors but not diffusers, lycoris-lora, the
# right peft, matplotlib or bitsandbytes. Carry them as wheels, made here once (.whl/ is git-ignored; name it
# in `carry`):
#
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --no-deps -d .whl diffusers==0.42.1 lycoris-lora==4.1.3 peft==0.21.2 toml==0.10.2 bitsandbytes==0.50.2 \
#       matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil
#
# Each part has its own time limit, so one that runs long (or out of memory) leaves the others' results; at
# most 8 files come back (env.txt, smoke.txt, 5 tables as .json, compare.md; compile-check goes to smoke.txt).
# Override for a CPU check of the script itself:
#   PYTHON=.venv/bin/python MODEL=tiny DEVICE=cpu DTYPE=fp32 RES=64 COMPILE="--compile --compile_backend aot_eager" \
#       OUT=/tmp/smoke bash bench/gpu_run.sh
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-sdxl}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
RES=${RES:-1024}
COMPILE=${COMPILE:---compile}
PRECISION=$([ "$DTYPE" = fp32 ] && echo no || echo "$DTYPE")
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HOME=$WORK/hf

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PYTHON" -c "import torch, diffusers, peft, lycoris; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'peft', peft.__version__, 'lycoris', lycoris.__version__)"; } 2>&1 | tee "$OUT/env.txt"

# 1. the trainer on CUDA (the tiny pipeline is built here: nothing is downloaded)
{
    echo "== smoke (limit 150s)"
    "$PYTHON" -c "from loha.tiny_sdxl import build_tiny_sdxl_pipeline as b; b('$WORK/tiny')" >/dev/null
    eightbit=$("$PYTHON" -c "import bitsandbytes" 2>/dev/null && echo "--optimizer AdamW8bit")
    train() {
        "$PYTHON" train_loha_sdxl.py --pretrained_model_name_or_path "$WORK/tiny" --train_data_dir examples/data \
            --resolution 64 --train_batch_size 2 --mixed_precision "$PRECISION" --gradient_checkpointing \
            --base_precision fp8 $eightbit --checkpointing_steps 3 --output_dir "$WORK/out" --report_to none \
            --feature_cache_dir "$WORK/cache" --cache_latents "$@" 2>&1 | grep -v "it/s\]\|step/s\]" | tail -12
    }
    timeout 150 bash -c "set -o pipefail; $(declare -f train); PYTHON=$PYTHON WORK=$WORK PRECISION=$PRECISION \
        COMPILE='$COMPILE' eightbit='$eightbit'; \
        train --max_train_steps 3 $COMPILE && train --max_train_steps 5 --resume_from_checkpoint latest --no-compile && \
        $PYTHON infer.py --checkpoint $WORK/out --base_precision fp8 --prompt 'a cat' --num_inference_steps 4 \
            --output_dir $WORK/images && echo 'smoke: trained, resumed and rendered on' $DEVICE" \
        || echo "== smoke: exit status $? (124: over its time limit)"
    echo "== compile-check (limit 40s)"
    timeout 40 "$PYTHON" bench/compile_check.py --device "$DEVICE" 2>&1 | tail -20
} 2>&1 | tee "$OUT/smoke.txt"

run() {  # name, seconds, bench.py flags...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$PYTHON" bench/bench.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
        --resolution "$RES" --rank 8 --json "$OUT/$name.json" "$@" \
        || echo "== $name: exit status $? (124: over its time limit)"
}

# 2. the tables (anchors on one H200: floor 172 ms / 11.2 GiB, PEFT LoHa 624 ms / 13.6 GiB)
run sdxl-bs1 130 --batch_size 1 --steps 5 --warmup 2 --infer_steps 3
run sdxl-bs4 70 --batch_size 4 --steps 4 --warmup 2 --infer_steps 0 --variants floor loha-grouped peft-loha
run sdxl-bs1-ckpt 65 --batch_size 1 --steps 4 --warmup 2 --infer_steps 0 --gradient_checkpointing \
    --variants floor loha-grouped peft-loha peft-lora
run sdxl-bs1-fp8 40 --batch_size 1 --steps 4 --warmup 2 --infer_steps 0 --base_precision fp8 \
    --variants floor loha-grouped
run sdxl-bs1-ckpt-fp8 40 --batch_size 1 --steps 4 --warmup 2 --infer_steps 0 --base_precision fp8 \
    --gradient_checkpointing --variants floor loha-grouped

# measured peak beside the exact estimate of the same configuration
"$PYTHON" - "$OUT" "$MODEL$RES" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
at_scale = sys.argv[2] == "sdxl1024"  # the counted estimates are SDXL's at 1024²
pairs = {"sdxl-bs1": "count-sdxl-attn", "sdxl-bs1-ckpt": "count-sdxl-attn-ckpt", "sdxl-bs1-fp8": "count-sdxl-attn-fp8",
         "sdxl-bs1-ckpt-fp8": "count-sdxl-attn-ckpt-fp8", "sdxl-bs4": "count-sdxl-attn-bs4"}
rows = ["| table | variant | step median ms | measured peak GiB | estimate GiB | estimate / measured |", "|---|---|---|---|---|---|"]
for name, counted in pairs.items():
    try:
        measured = json.loads((out / f"{name}.json").read_text())["results"]
    except (OSError, ValueError, KeyError):
        rows.append(f"| {name} | (no result) | | | | |")
        continue
    estimates = {}
    if at_scale and counted and Path(f"bench/results/{counted}.json").is_file():
        counts = json.loads(Path(f"bench/results/{counted}.json").read_text())["counts"]
        estimates = {v: r["peak"]["bytes"] for v, r in counts.items() if r.get("peak")}
    for variant, r in measured.items():
        peak, est = r.get("peak_memory_bytes"), estimates.get(variant)
        ratio = f"{est / peak:.3f}" if peak and est else ""
        rows.append(f"| {name} | {variant} | {1000 * r.get('step_median_s', float('nan')):.1f} | "
                    f"{peak / 2**30 if peak else float('nan'):.2f} | {est / 2**30 if est else float('nan'):.2f} | {ratio} |")
(out / "compare.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
ls -la "$OUT"
rm -rf "$WORK"
