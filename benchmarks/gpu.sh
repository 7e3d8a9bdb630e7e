#!/usr/bin/env bash
# Every GPU check and benchmark of flowtext in one command, on a CUDA machine:
#
#   bash benchmarks/gpu.sh            # logs and tables into ${OUT:-outputs/gpu}/
#   DRY_RUN=1 bash benchmarks/gpu.sh  # every stage on the CPU: tiny shapes, Triton's interpreter,
#                                     # limits x8 (LIMIT_SCALE); checks every command line
#
# Stages, most important first, each with its own time limit (seconds, the second field) so one
# slow or failing stage does not hide the others; the limits add up to 12.5 minutes, cold
# Triton compilation, autotuning and torch.compile included (H200, 16 CPU cores):
#
# 1. attention (150 s): the fused kernel at L = 4096, d = 128, bf16 on the Evo single-stream
#    layout (vs SDPA with its dense mask), the two-stream layout (vs SDPA with its dense mask and
#    FlexAttention with a reused BlockMask) and the dense layout (forward vs SDPA without a mask,
#    i.e. torch's FlashAttention); autotuned (3 configurations per kernel). Writes attention.csv.
# 2. kernel-tests (210 s): T9 and the nn backend test natively, with ONE fixed tile configuration
#    (FLOWTEXT_TRITON_SINGLE_CONFIG=1) so they cannot stall on autotuning. Writes kernel-tests.xml.
# 3. training (60 s): plain Transformer vs the flow model's single stream and two-stream AR per
#    step (SDPA backend, bf16, d768 L1024 8 layers, interleaved rounds). Writes training.csv.
# 4. training-compile (180 s): the same with the backbones compiled (FlowTransformerConfig.compile;
#    the plain model's layers too), eager rows alongside. Writes training-compile.csv.
# 5. training-triton (90 s): the same with the fused kernel as the flow model's attention
#    (autotuned, cold). Writes training-triton.csv.
# 6. fit (60 s): a short bf16 fit of the tiny Evo config with the kernel as attention backend.
#
# stages.csv gets one row per stage (name, limit, rc, seconds); rc 124 means the limit was hit.
# STAGES="attention kernel-tests" bash benchmarks/gpu.sh runs only the named stages.
set -u
out=${OUT:-outputs/gpu}
limit_scale=${LIMIT_SCALE:-1}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-$(command -v python || command -v python3)}
echo "stage,limit_s,rc,seconds" >"$out/stages.csv"

# Sizes of each stage; a dry run shrinks them and runs the kernels in Triton's CPU interpreter.
attention_args=(--lengths 4096 --dims 128 --layouts evo two-stream --flex-layouts two-stream)
kernel_tests=(-n 12 tests/test_kernel.py tests/test_nn_triton.py)
train_args=(--d-model 768 --layers 8 --heads 12 --seq-len 1024 --batch 16 --iters 5 --rounds 2
    --amp --models plain single ar2)
fit_args=(--trainer.precision=bf16-mixed --trainer.max_steps=200 --trainer.val_check_interval=200)
if [[ -n "${DRY_RUN:-}" ]]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    limit_scale=${LIMIT_SCALE:-8}  # the interpreter and CPU compilation are slow
    attention_args=(--quick --layouts two-stream)
    kernel_tests=(tests/test_kernel.py tests/test_nn_triton.py -k "summaries_are_reusable")
    train_args=(--d-model 32 --layers 1 --heads 2 --seq-len 16 --batch 2 --iters 1 --rounds 1
        --warmup 1 --models plain single ar2)
    mapfile -t tiny < <("$py" -c "from flowtext.training import TINY_OVERRIDES as t; print(*t, sep='\n')")
    fit_args=(--trainer.max_steps=2 --trainer.val_check_interval=2 --trainer.accelerator=cpu "${tiny[@]}")
else
    unset TRITON_INTERPRET
fi

stage() {
    local name=$1 limit=$(($2 * limit_scale))
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
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.log"

TAIL=80 stage attention 150 "$py" benchmarks/attention.py "${attention_args[@]}" \
    --csv "$out/attention.csv"
stage kernel-tests 210 env FLOWTEXT_TRITON_SINGLE_CONFIG=1 "$py" -m pytest -q -rfE \
    -p no:cacheprovider -p no:benchmark --junitxml="$out/kernel-tests.xml" "${kernel_tests[@]}"
stage training 60 "$py" benchmarks/training.py "${train_args[@]}" --csv "$out/training.csv"
stage training-compile 180 "$py" benchmarks/training.py "${train_args[@]}" --compile \
    --csv "$out/training-compile.csv"
stage training-triton 90 "$py" benchmarks/training.py "${train_args[@]}" --backend triton \
    --csv "$out/training-triton.csv"
stage fit 60 "$py" -c "from flowtext.cli import main; raise SystemExit(main())" fit \
    --config experiments/configs/evo-tiny.yaml --model.init_args.net.attention_backend=triton \
    --trainer.default_root_dir=/tmp/flowtext-gpu-fit --trainer.log_every_n_steps=50 "${fit_args[@]}"
cat "$out/stages.csv"
