#!/usr/bin/env bash
# The checks that need a CUDA GPU: the device tests (tests/device: every CUDA path against
# the CPU) and the GPU benchmarks. Results land in $OUT (default ./gpu_out); copy the
# *.json / *.md into benchmarks/results to commit them.
#
#   bash scripts/gpu_checks.sh            # everything (needs torch with CUDA, kornia, timm, pytest)
#   bash scripts/gpu_checks.sh jitter     # only PatchJitter: its device tests and GPU benchmark
#                                         # (fits one 10-minute call of a lent GPU)
#   bash scripts/gpu_checks.sh matching   # only matching: its device tests (Triton engine, one
#                                         # compile) and the GPU step benchmark (a few minutes)
#   bash scripts/gpu_checks.sh training   # only the training step: the fused loss and training
#                                         # device tests, bench_fused_loss (the loss's engines
#                                         # alone) and bench_gpu_throughput (DINO, PW-Self
#                                         # fused / matched / unfused, ViT-S/16 and ViT-B/16)
set -u -o pipefail
PART=${1:-all}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L
$PY -c "import torch, kornia, timm; print('torch', torch.__version__, 'kornia', kornia.__version__,
'timm', timm.__version__, torch.cuda.get_device_name())" || exit 1
status=0
if [ "$PART" = jitter ]; then
    tests=tests/device/test_patch_jitter_on_device.py
elif [ "$PART" = matching ]; then
    tests=tests/device/test_matching_on_device.py
elif [ "$PART" = training ]; then
    tests="tests/device/test_fused_loss_on_device.py tests/device/test_training_on_device.py"
else
    tests=tests/device
fi
echo "== device tests ($tests)"
# shellcheck disable=SC2086  # $tests may hold several paths
timeout "${TESTS_TIMEOUT:-420}" $PY -m pytest -q -p no:cacheprovider -x --durations=5 $tests \
    2>&1 | tee "$OUT/device_tests.log" | tail -25 || status=1
{
if [ "$PART" = all ] || [ "$PART" = training ]; then
    echo "== the last layer + loss alone: unfused, fused torch and Triton row pass (issue 20)"
    timeout 150 $PY benchmarks/bench_fused_loss.py --device cuda --chunk-sizes 512 4096 \
        --out "$OUT" || status=1
    echo "== training throughput (issues 6, 20)"
    # three interleaved rounds: one run's step times move by up to 17% on a shared machine
    timeout "${THROUGHPUT_TIMEOUT:-450}" $PY benchmarks/bench_gpu_throughput.py \
        --rounds "${THROUGHPUT_ROUNDS:-3}" --out "$OUT" || status=1
fi
if [ "$PART" = all ] || [ "$PART" = jitter ]; then
    echo "== PatchJitter: Triton and torch engines, float32 and bfloat16 (issues 3, 14)"
    timeout 300 $PY benchmarks/bench_patch_jitter.py --gpu-only --out "$OUT" || status=1
fi
if [ "$PART" = all ] || [ "$PART" = matching ]; then
    echo "== match_patches: fused Triton and torch engines vs EsViT (issues 2, 15)"
    timeout 180 $PY benchmarks/bench_matching.py --device cuda --repeat 30 --out "$OUT" || status=1
fi
} 2>&1 | tee "$OUT/bench.log"
exit $status
