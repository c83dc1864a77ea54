#!/usr/bin/env bash
# Run the kernel tests and the benchmark on a CUDA machine that has torch + triton but not this package
# installed: gpu_shim.sh maps kernels/ and storage/ into sqattn_index as the installed package does.
# Usage (from the repository root): bash docs/bench/gpu_session.sh OUT_DIR [bench arguments...]
set -o pipefail
OUT=${1:?output folder}; shift
. "$(dirname "$0")/gpu_shim.sh"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ -z "$SKIP_TESTS" ]; then
  { echo "\$ pytest -m gpu -v tests/test_kernels.py"; pytest -m gpu -v -p no:cacheprovider tests/test_kernels.py;
    if [ -z "$GPU_TESTS_ONLY" ]; then
      echo; echo "\$ pytest -m 'not gpu' -v tests/test_kernels.py"; pytest -m "not gpu" -v -p no:cacheprovider tests/test_kernels.py;
    fi
  } 2>&1 | tee "$OUT/gpu_kernel_tests.txt" | tail -n 25
fi
if [ -z "$SKIP_BENCH" ]; then
  # --append merges into the committed table: start from it
  case " $* " in *" --append "*) mkdir -p "$OUT/bench"; cp "$REPO/docs/bench/results.json" "$OUT/bench/" ;; esac
  (cd /tmp && python3 -m sqattn_index.bench --out "$OUT/bench" "$@") 2>&1 | tee "$OUT/bench_log.txt"
fi
