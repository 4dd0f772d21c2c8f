#!/usr/bin/env bash
# Everything the GPU targets of docs/performance.md need, in one run (about 5 minutes on an
# H100), so a session with a lent GPU spends one device call on it:
#
#     bash benchmarks/gpu_session.sh "$OUT"        # from the repository root
#
# Writes into the given folder (default ./gpu-results): machine.txt, gpu_check.txt (Triton
# vs the reference path, forward + backward, 3 dtypes x 2 layouts), cuda_tests.txt (the
# CUDA/NCCL tests and the Triton interpreter tests), bench_*.md (the `normlab bench` tables:
# layer ratios to cuDNN BN / native GN, %copy bandwidth, peak memory, ResNet-18 and LeNet-5
# training steps) and split_sweep.txt (filtered BN time per forced NORMLAB_TRITON_BN_SPLIT,
# to check the bn_launch heuristic). Needs torch with CUDA and triton; nothing is installed.
set -uo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

{ nvidia-smi; "$py" -c "import torch, triton; p = torch.cuda.get_device_properties(0); \
print(torch.__version__, triton.__version__, p.name, p.multi_processor_count, 'SMs')"; } \
    > "$out/machine.txt" 2>&1
"$py" benchmarks/gpu_check.py > "$out/gpu_check.txt" 2>&1
"$py" -m pytest -p no:cacheprovider tests/test_distributed.py tests/test_kernels_triton.py \
    > "$out/cuda_tests.txt" 2>&1
bench() { "$py" -m normlab.cli bench --device cuda "$@"; }
bench --rounds 30 --batch 128 > "$out/bench_fp32.md" 2>&1
bench --rounds 30 --no-models --channels-last > "$out/bench_fp32_channels_last.md" 2>&1
bench --rounds 30 --dtype bfloat16 --channels-last --batch 128 > "$out/bench_bf16_channels_last.md" 2>&1
bench --rounds 30 --no-models --shape 256,64,56,56 > "$out/bench_fp32_large.md" 2>&1
for split in 1 2 4 8 16 32 64 128; do
    echo "NORMLAB_TRITON_BN_SPLIT=$split"
    NORMLAB_TRITON_BN_SPLIT=$split bench --rounds 20 --no-models | grep -E '^\| (fbn|bn \(torch\)) '
done > "$out/split_sweep.txt" 2>&1
tail -n 3 "$out"/*.txt
