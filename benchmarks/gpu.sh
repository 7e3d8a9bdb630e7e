#!/usr/bin/env bash
# Every GPU check and benchmark of flowtext in one command, on a CUDA machine:
#
#   bash benchmarks/gpu.sh            # logs and tables into ${OUT:-outputs/gpu}/
#
# Stages, most important first, each with its own time limit (seconds, the second field) so one
# slow or failing stage does not hide the others; the limits add up to about 8 minutes, cold
# Triton compilation and autotuning included (H200, 16 CPU cores):
#
# 1. attention (150 s): the fused kernel at L = 4096, d = 128, bf16 on the Evo single-stream
#    layout (vs SDPA with its dense mask), the two-stream layout (vs SDPA with its dense mask and
#    FlexAttention with a reused BlockMask) and the dense layout (forward vs SDPA without a mask,
#    i.e. torch's FlashAttention); autotuned (3 configurations per kernel). Writes attention.csv.
# 2. kernel-tests (210 s): T9 and the nn backend test natively, with ONE fixed tile configuration
#    (FLOWTEXT_TRITON_SINGLE_CONFIG=1) so they cannot stall on autotuning. Writes kernel-tests.xml.
# 3. training (45 s): plain Transformer vs the flow model (SDPA backend, bf16).
# 4. fit (60 s): a short bf16 fit of the tiny Evo config with the kernel as attention backend.
#
# stages.csv gets one row per stage (name, limit, rc, seconds); rc 124 means the limit was hit.
# STAGES="attention kernel-tests" bash benchmarks/gpu.sh runs only the named stages.
set -u
out=${OUT:-outputs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
py=${PYTHON:-$(command -v python || command -v python3)}
echo "stage,limit_s,rc,seconds" >"$out/stages.csv"

stage() {
    local name=$1 limit=$2
    shift 2
    if [[ -n "${STAGES:-}" && " $STAGES " != *" $name "* ]]; then
        return
    fi
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-40}" "$out/$name.log"
    echo "=== $name: rc=$rc after $((SECONDS - t0))s"
    echo "$name,$limit,$rc,$((SECONDS - t0))" >>"$out/stages.csv"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.log"

TAIL=80 stage attention 150 "$py" benchmarks/attention.py --lengths 4096 --dims 128 \
    --layouts evo two-stream --flex-layouts two-stream --csv "$out/attention.csv"
stage kernel-tests 210 env FLOWTEXT_TRITON_SINGLE_CONFIG=1 "$py" -m pytest -q -rfE \
    -p no:cacheprovider -p no:benchmark -n 12 --junitxml="$out/kernel-tests.xml" \
    tests/test_kernel.py tests/test_nn_triton.py
stage training 45 "$py" benchmarks/training.py --d-model 768 --layers 8 --heads 12 \
    --seq-len 1024 --batch 16 --iters 10 --amp
stage fit 60 "$py" -c "from flowtext.cli import main; raise SystemExit(main())" fit \
    --config experiments/configs/evo-tiny.yaml --trainer.precision=bf16-mixed \
    --model.init_args.net.attention_backend=triton --trainer.max_steps=200 \
    --trainer.val_check_interval=200 --trainer.default_root_dir=/tmp/flowtext-gpu-fit \
    --trainer.log_every_n_steps=50
cat "$out/stages.csv"
