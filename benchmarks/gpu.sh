#!/usr/bin/env bash
# Every GPU check and benchmark of flowtext in one command, on a CUDA machine:
#
#   bash benchmarks/gpu.sh            # logs into ${OUT:-outputs/gpu}/
#
# 1. the attention benchmark (fused kernel vs FlexAttention vs SDPA) at L = 4k, d = 128 on the
#    two-stream and Evo layouts (the full grid: python benchmarks/attention.py);
# 2. the training benchmark (plain Transformer vs the flow model, SDPA backend, bf16);
# 3. the kernel tests (T9 and the nn backend test) natively on the GPU, with autotuning;
# 4. a short bf16 fit of the tiny Evo config with the kernel as attention backend.
#
# Each stage has its own time limit (seconds, the second field), so one slow or failing stage does
# not hide the others; the whole script stays under ten minutes on an H100/H200.
set -u
out=${OUT:-outputs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

stage() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 60 "$out/$name.log"
    echo "=== $name: rc=$rc after $((SECONDS - t0))s"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch, triton, lightning; print('torch', torch.__version__, 'triton', \
triton.__version__, 'lightning', lightning.__version__)"
} 2>&1 | tee "$out/env.log"

# Ordered by what a short lease must see first; limits sized from the H200 run of 2026-11-27
# (cold Triton autotuning: about 1-2 minutes per new dtype and head dim).
stage attention-4k 200 python benchmarks/attention.py --lengths 4096 --dims 128 \
    --layouts two-stream evo
stage training 45 python benchmarks/training.py --d-model 768 --layers 8 --heads 12 \
    --seq-len 1024 --batch 16 --iters 10 --amp
stage kernel-tests 200 python -m pytest -v -p no:cacheprovider -p no:benchmark -n 14 \
    tests/test_kernel.py tests/test_nn_triton.py
stage fit 120 python -c "from flowtext.cli import main; raise SystemExit(main())" fit \
    --config experiments/configs/evo-tiny.yaml --trainer.precision=bf16-mixed \
    --model.init_args.net.attention_backend=triton --trainer.max_steps=300 \
    --trainer.val_check_interval=300 --trainer.default_root_dir=/tmp/flowtext-gpu-fit \
    --trainer.log_every_n_steps=50
