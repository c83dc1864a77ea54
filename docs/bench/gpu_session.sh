#!/usr/bin/env bash
# Run the kernel tests and the benchmark on a CUDA machine that has torch + triton but not this package
# installed: a shim folder maps kernels/ and storage/ into sqattn_index as the installed package does.
# Usage (from the repository root): bash docs/bench/gpu_session.sh OUT_DIR [bench arguments...]
set -o pipefail
REPO=$(pwd)
OUT=${1:?output folder}; shift
mkdir -p "$OUT" /tmp/shim
rm -rf /tmp/shim/sqattn_index && cp -r "$REPO/sqattn_index" /tmp/shim/
ln -s "$REPO/kernels" /tmp/shim/sqattn_index/kernels
ln -s "$REPO/storage" /tmp/shim/sqattn_index/storage
# The GPU image has no llama_index: keep the package __init__ from importing the LlamaIndex layer there.
python3 -c "import llama_index.core" 2>/dev/null || echo '"""sqattn_index (GPU shim: LlamaIndex layer not imported)."""' > /tmp/shim/sqattn_index/__init__.py
export PYTHONPATH=/tmp/shim PYTHONUNBUFFERED=1
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
