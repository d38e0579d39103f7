#!/usr/bin/env bash
# The device check of the GPU path (issue 19), for a bare GPU machine with torch 2.11 (CUDA 13 build) and no
# network: configure and build with nvcc, run the CUDA tests (C++ and Python) and compute-sanitizer (memcheck
# and racecheck) on the kernel tests, then write the codec table to benchmarks/results/gpu_codec.md. Meant to
# finish in under 8 minutes on an H100 / H200 with 16 cores.
#
#   scripts/gpu_check.sh             on the GPU machine (PYTHON: the interpreter with torch; default python3)
#   scripts/gpu_check.sh --dry-run   anywhere: every step but the GPU ones (build, tests that skip, the table
#                                    script's no-GPU exit), to check the script itself
#
# It fails if a CUDA test skipped on a machine that has a GPU: a skip there means the kernels were not tested.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
BUILD=${BUILD:-build-gpu}
OUT=${OUT:-benchmarks/results}
export PATH=/usr/local/cuda/bin:$PATH
step() { echo "== $(date +%T) $*"; }

step "torch and the device"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())"
HAVE_GPU=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
if [[ $DRY == 0 && $HAVE_GPU == 0 ]]; then echo "gpu_check: no CUDA device (use --dry-run to check the script)"; exit 1; fi

step "configure and build (nvcc: $(command -v nvcc || echo missing))"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRADIVEQ_ENABLE_CUDA=ON -DGRADIVEQ_BUILD_BENCHMARKS=OFF \
  -DPython3_EXECUTABLE="$(command -v "$PYTHON" || echo "$PYTHON")" > "$BUILD.configure.log" 2>&1 || { tail -n 30 "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" --target gradiveq_tests _C

step "C++ CUDA tests"
FILTER='*Cuda*'
"$BUILD/tests/gradiveq_tests" --gtest_filter="$FILTER" 2>&1 | tee "$BUILD/cuda_tests.log" | tail -n 25
grep -q "FAILED TEST" "$BUILD/cuda_tests.log" && { echo "gpu_check: C++ CUDA tests failed"; exit 1; }
if [[ $DRY == 0 ]] && grep -q "^\[  SKIPPED \]" "$BUILD/cuda_tests.log"; then
  echo "gpu_check: CUDA tests skipped on a GPU machine"; exit 1
fi

step "Python CUDA tests"
PYTHONPATH=python "$PYTHON" -m pytest -q tests/python/test_cuda.py -rs 2>&1 | tee "$BUILD/cuda_pytest.log" | tail -n 8
if [[ $DRY == 0 ]] && grep -q "SKIPPED" "$BUILD/cuda_pytest.log"; then
  echo "gpu_check: Python CUDA tests skipped on a GPU machine"; exit 1
fi

if [[ $DRY == 0 ]]; then
  step "compute-sanitizer memcheck and racecheck on the kernel tests"
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$BUILD/tests/gradiveq_tests" \
      --gtest_filter='*CudaProjection*:*CudaMoments*:*CudaQsgd*:*CudaCasq*' > "$BUILD/sanitizer_$tool.log" 2>&1 \
      || { tail -n 30 "$BUILD/sanitizer_$tool.log"; echo "gpu_check: compute-sanitizer $tool failed"; exit 1; }
    tail -n 2 "$BUILD/sanitizer_$tool.log"
  done
else
  step "compute-sanitizer: $(command -v compute-sanitizer || echo 'not on this machine'), skipped (dry run)"
fi

step "codec table"
if [[ $DRY == 0 ]]; then
  PYTHONPATH=python "$PYTHON" benchmarks/gpu_codec.py --out "$OUT/gpu_codec.md"
else
  PYTHONPATH=python "$PYTHON" benchmarks/gpu_codec.py
fi
step "gpu_check: done"
