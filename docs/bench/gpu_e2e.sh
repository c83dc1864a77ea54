#!/usr/bin/env bash
# End-to-end benchmark on the GPU machine (torch + triton + transformers, no LlamaIndex): shim the package
# as docs/bench/gpu_session.sh does, then run sqattn_index.bench_e2e. Usage: bash docs/bench/gpu_e2e.sh OUT [args]
set -o pipefail
REPO=$(pwd)
OUT=${1:?output folder}; shift
mkdir -p "$OUT" /tmp/shim
rm -rf /tmp/shim/sqattn_index && cp -r "$REPO/sqattn_index" /tmp/shim/
ln -s "$REPO/kernels" /tmp/shim/sqattn_index/kernels
ln -s "$REPO/storage" /tmp/shim/sqattn_index/storage
python3 -c "import llama_index.core" 2>/dev/null || echo '"""sqattn_index (GPU shim)."""' > /tmp/shim/sqattn_index/__init__.py
export PYTHONPATH=/tmp/shim PYTHONUNBUFFERED=1
cp "$REPO/docs/bench/results.json" "$OUT/" 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
(cd /tmp && python3 -m sqattn_index.bench_e2e --out "$OUT" "$@") 2>&1 | tee "$OUT/e2e_console.txt"
