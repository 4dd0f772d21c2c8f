#!/usr/bin/env bash
# The GPU session: the Triton path's checks and the GPU targets of docs/performance.md in one
# device call, about 4 minutes on an H200. Every step runs under its own `timeout`, and the
# whole under a budget (default 230 s): a step that would start with less than 10 s left is
# skipped and says so, so one hung or failing step cannot eat the device time.
#
#     bash benchmarks/gpu_session.sh OUTDIR [BUDGET_SECONDS]     # from the repository root
#
# Writes only into OUTDIR (Triton's and normlab's caches go to a temporary directory):
#   steps.txt            each step: exit status, seconds, limit (124 = timed out)
#   machine.txt          nvidia-smi, torch / triton versions, SM count
#   gpu_check.txt        Triton vs reference (modules, fwd+bwd), adversarial inputs vs float64,
#                        NaN/Inf rule                       (benchmarks/gpu_check.py)
#   bench_fp32.md        `normlab bench`: layer ratios to cuDNN BN / native GN, %copy
#                        bandwidth, peak memory, LeNet-5 and ResNet-18 training steps
#   cuda_cases.txt       tests/triton_cases.py on the GPU (every interpreter case, -v)
#   compile.txt          torch.compile(conv → filtered BN → ReLU, fullgraph=True) vs eager
#   bench_bf16_channels_last.md   the layer table in bfloat16, channels_last
#   cuda_distributed.txt the CUDA/NCCL test of tests/test_distributed.py
# Needs torch with CUDA and triton; installs nothing.
set -uo pipefail
out=${1:-gpu-results}
budget=${2:-230}
mkdir -p "$out"
: > "$out/steps.txt"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
    TRITON_CACHE_DIR="$tmp/triton" NORMLAB_CACHE_DIR="$tmp/normlab"
unset TRITON_INTERPRET NORMLAB_KERNELS NORMLAB_TRITON_BN_SPLIT
py=${PYTHON:-python3}
start=$SECONDS

step() {  # step NAME LIMIT_S OUTFILE COMMAND...
    local name=$1 limit=$2 file=$3
    shift 3
    local left=$((budget - (SECONDS - start)))
    if ((left < 10)); then
        echo "$name: skipped, budget of ${budget}s spent" | tee -a "$out/steps.txt"
        return
    fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" > "$out/$file" 2>&1
    local rc=$?
    local note=""
    ((rc == 124 || rc == 137)) && note=" TIMED OUT"
    echo "$name: rc=$rc $((SECONDS - t0))s (limit ${limit}s)$note" | tee -a "$out/steps.txt"
}

step machine 30 machine.txt bash -c "nvidia-smi; $py -c \"import torch, triton; \
p = torch.cuda.get_device_properties(0); \
print('torch', torch.__version__, 'triton', triton.__version__, p.name, p.multi_processor_count, 'SMs')\""
step gpu_check 90 gpu_check.txt "$py" benchmarks/gpu_check.py --sections matrix,adversarial
step bench_fp32 60 bench_fp32.md "$py" -m normlab.cli bench --device cuda --rounds 20 --batch 128
step cuda_cases 75 cuda_cases.txt "$py" -m pytest tests/triton_cases.py -v -p no:cacheprovider \
    -o addopts= -W ignore::RuntimeWarning
step compile 45 compile.txt "$py" benchmarks/gpu_check.py --sections compile
step bench_bf16_cl 30 bench_bf16_channels_last.md "$py" -m normlab.cli bench --device cuda \
    --rounds 20 --dtype bfloat16 --channels-last --no-models
step cuda_distributed 30 cuda_distributed.txt "$py" -m pytest tests/test_distributed.py -q \
    -p no:cacheprovider -o addopts= -k cuda
echo "total $((SECONDS - start))s of ${budget}s" | tee -a "$out/steps.txt"
tail -n 2 "$out"/gpu_check.txt "$out"/cuda_cases.txt "$out"/compile.txt 2>/dev/null
