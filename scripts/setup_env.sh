#!/usr/bin/env bash
# Create .venv (if missing) with torch, the test/eval extras, and build ghostkernels._C in place.
#   GHOSTKERNELS_CUDA=auto|0|1 (see setup.py); CUDA_HOME defaults to /usr/local/cuda when present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# The CUDA build of torch 2.14.1 (from the local package store where there is one); it lets the
# CUDA kernels compile and link even on a machine without a GPU.
python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q --disable-pip-version-check setuptools wheel ninja numpy pyyaml scipy \
  tqdm pillow pytest pytest-benchmark pytest-xdist pycocotools timm onnx onnxruntime
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Rebuild only when a source is newer than the built extension, it does not import, or CUDA is
# required (GHOSTKERNELS_CUDA=1) and it was built without.
so=$(ls ghostkernels/_C*.so 2>/dev/null | head -n 1 || true)
if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -print -quit)" ] \
    && (cd / && python -c "import os, ghostkernels._C as c
assert c.WITH_CUDA or os.environ.get('GHOSTKERNELS_CUDA', 'auto') != '1'") 2>/dev/null; then
  echo "ghostkernels._C is up to date ($so)"
else
  start=$(date +%s)
  python -m pip install -q --disable-pip-version-check --no-build-isolation --use-pep517 \
    --no-deps -e .
  echo "ghostkernels built in $(( $(date +%s) - start )) s"
fi
python -m ghostkernels
