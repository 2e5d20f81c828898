#!/usr/bin/env bash
# The GPU benchmark run, prepared to work unattended on a CUDA host (H100, 16 cores) in under 10 minutes.
# Installs nothing: it uses the repository's .venv (carried along) and whatever it finds (TensorRT,
# onnxruntime CUDA provider); what is missing is skipped and said so in the results.
#
#   bench/gpu/run.sh            # results in $OUT (or ./gpu-results): BENCHMARKS-gpu.md, *.json, logs/
#   bench/gpu/run.sh --dry-run  # checks imports, tools and flags (works on a CPU host), times nothing
#
# Steps, each under its own time limit, skipped when the overall budget (BUDGET_S, default 570 s) is
# too short for it: host facts; the random fused resnet101+resnet152 model; the TensorRT FP16 plan
# (batch 1-64, cached under $WORK/trt-cache and reused by every later step); bench/inference.py
# (batches 1, 8, 32, 64: torch eager FP32 baseline, torch FP16 channels-last with and without CUDA
# graphs, onnxruntime CUDA if present, TensorRT); the parity check on 200 real cxr3 images (CXR3_DIR,
# else var/cxr3-sample made by `python bench/gpu/report.py sample-cxr3 --out var/cxr3-sample`);
# bench/e2e.py --quick on uncompressed and on JPEG 2000 RG1 instances; bench/train.py --quick;
# bench/triton_fleet.py (1, 2, 4 workers on one tritonserver, when var/pytriton is there); torch.compile last
# (slow to compile); then the Markdown fragment.
set -u -o pipefail

cd "$(dirname "$0")/../.."
REPO=$(pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
export PATH="$(dirname "$PY"):$PATH"
# This checkout first: an editable install made elsewhere may point at another path.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$REPO/gpu-results}
WORK=${WORK:-$(mktemp -d /tmp/cxr-gpu-bench.XXXXXX)}
BUDGET_S=${BUDGET_S:-570}
mkdir -p "$OUT/logs"
STEPS="$OUT/logs/steps.txt"
: > "$STEPS"

if [ "${1:-}" = "--dry-run" ]; then
    "$PY" bench/gpu/report.py dry-run 2>&1 | tee "$OUT/logs/dry-run.log"
    exit "${PIPESTATUS[0]}"
fi

# step NAME LIMIT_S NEEDS_S COMMAND...: run COMMAND under `timeout LIMIT_S` when NEEDS_S seconds are left.
step() {
    local name=$1 limit=$2 needs=$3
    shift 3
    local left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt "$needs" ]; then
        echo "$name: skipped, ${left}s left of the budget (needs ${needs}s)" | tee -a "$STEPS"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local started=$SECONDS
    echo "== $name (limit ${limit}s)" >&2
    timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc, $((SECONDS - started))s$([ $rc -eq 124 ] && echo ' (time limit)')" | tee -a "$STEPS"
    tail -n 3 "$OUT/logs/$name.log" >&2
    return 0
}

"$PY" bench/gpu/report.py env > "$OUT/env.json" 2> "$OUT/logs/env.log"
nvidia-smi > "$OUT/logs/nvidia-smi.txt" 2>&1 || true
cat "$OUT/env.json" >&2
HAS_TRT=$("$PY" -c "import json,sys; print(1 if json.load(open(sys.argv[1])).get('tensorrt') else 0)" "$OUT/env.json")

MODEL=${MODEL_DIR:-$WORK/model}
CACHE=$WORK/trt-cache
[ -d "$MODEL" ] || step model 180 60 "$PY" bench/gpu/report.py model --out "$MODEL"

if [ "$HAS_TRT" = 1 ]; then
    step trt-plan 300 60 "$PY" bench/gpu/report.py build-plan --model-dir "$MODEL" --cache "$CACHE" --max-batch 64
    sed -n '/^{/,/^}/p' "$OUT/logs/trt-plan.log" > "$OUT/plan.json"
else
    echo "trt-plan: skipped, tensorrt does not import (torch CUDA and onnxruntime only)" | tee -a "$STEPS"
fi

step inference 200 60 "$PY" bench/inference.py --model-dir "$MODEL" --trt-cache "$CACHE" \
    --batches 1,8,32,64 --json "$OUT/inference.json"

CXR3=${CXR3_DIR:-$REPO/var/cxr3-sample}
if [ -d "$CXR3" ]; then
    step parity 120 40 "$PY" bench/inference.py --model-dir "$MODEL" --trt-cache "$CACHE" \
        --parity 200 --cxr3 "$CXR3" --json "$OUT/parity.json"
else
    echo "parity: skipped, no cxr3 images (set CXR3_DIR or carry var/cxr3-sample)" | tee -a "$STEPS"
fi

step e2e-uncompressed 120 60 "$PY" bench/e2e.py --quick --model "$MODEL" --trt-cache "$CACHE" \
    --max-batch 64 --json "$OUT/e2e-uncompressed.json"
step e2e-j2k 120 60 "$PY" bench/e2e.py --quick --data j2k-lossless --model "$MODEL" --trt-cache "$CACHE" \
    --max-batch 64 --json "$OUT/e2e-j2k.json"
step train 90 45 "$PY" bench/train.py --quick
# Triton (issue 19): workers sharing one tritonserver beside the local engine. Needs the nvidia-pytriton
# wheel's server in var/pytriton and onnxruntime in var/triton-py (tests/run installs both; too big to carry).
if [ -x var/pytriton/pytriton/tritonserver/bin/tritonserver ] && [ -d var/triton-py/onnxruntime ]; then
    step triton 150 90 "$PY" bench/triton_fleet.py --model-dir "$MODEL" --images 256 --batch 32 --workers 1,2,4 \
        --json "$OUT/triton.json"
else
    echo "triton: skipped, no tritonserver in var/pytriton or onnxruntime in var/triton-py" | tee -a "$STEPS"
fi
step inference-compile 150 90 "$PY" bench/inference.py --model-dir "$MODEL" \
    --backends torch-cuda,torch-cuda-fp16-compile --batches 64 --runs 5 --json "$OUT/inference-compile.json"

"$PY" bench/gpu/report.py markdown --out "$OUT" > /dev/null 2> "$OUT/logs/markdown.log" \
    || echo "markdown: failed, see logs/markdown.log" | tee -a "$STEPS"
echo "done in ${SECONDS}s; results in $OUT" | tee -a "$STEPS"
