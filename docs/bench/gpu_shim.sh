# Sourced by the GPU scripts (gpu_session.sh, gpu_e2e.sh) and usable alone (`. docs/bench/gpu_shim.sh`, from the
# repository root): the GPU machine has torch + triton + transformers but not this package, so a shim folder
# maps sqattn_index/, kernels/ and storage/ into one importable sqattn_index, as the install does.
REPO=$(pwd)
mkdir -p /tmp/shim
rm -rf /tmp/shim/sqattn_index && cp -r "$REPO/sqattn_index" /tmp/shim/
ln -s "$REPO/kernels" /tmp/shim/sqattn_index/kernels
ln -s "$REPO/storage" /tmp/shim/sqattn_index/storage
# No llama_index there: keep the package __init__ from importing the LlamaIndex layer.
python3 -c "import llama_index.core" 2>/dev/null || echo '"""sqattn_index (GPU shim: LlamaIndex layer not imported)."""' > /tmp/shim/sqattn_index/__init__.py
export PYTHONPATH=/tmp/shim PYTHONUNBUFFERED=1
