#!/usr/bin/env bash
# End-to-end benchmark on the GPU machine (torch + triton + transformers, no LlamaIndex): shim the package
# (gpu_shim.sh), then run sqattn_index.bench_e2e. Usage: bash docs/bench/gpu_e2e.sh OUT [args]
set -o pipefail
OUT=${1:?output folder}; shift
. "$(dirname "$0")/gpu_shim.sh"
mkdir -p "$OUT"
cp "$REPO/docs/bench/results.json" "$OUT/" 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
(cd /tmp && python3 -m sqattn_index.bench_e2e --out "$OUT" "$@") 2>&1 | tee "$OUT/e2e_console.txt"
