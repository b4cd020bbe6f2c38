#!/usr/bin/env bash
# The test suite again on the GPU machine's software stack (torch 2.11.0+cu130, triton 3.6.0:
# /work/.library's device notes), here on the CPU. The main suite runs on torch 2.14.1 and
# triton 3.8; a C++ API the older torch headers lack, or Triton code that triton 3.6 cannot
# compile for sm_90, would otherwise first show up in a device session, whose minutes are few.
#
#   bash scripts/test_device_stack.sh [pytest args...]
#
# It builds the extension (CUDA kernels included) against torch 2.11 in a copy of the tree (the
# built .so has the same file name for both torch versions) and runs the whole suite there with
# the interpreter for Triton and the sm_90 ahead-of-time compile with triton 3.6's ptxas.
# DEVICE_STACK_VENV (default .venv-device-stack) and DEVICE_STACK_TREE (default
# build/device-stack-tree) say where the environment and the copy go.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${DEVICE_STACK_VENV:-$ROOT/.venv-device-stack}
TREE=${DEVICE_STACK_TREE:-$ROOT/build/device-stack-tree}
PY=${PYTHON:-python3}
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# numpy < 2.4: triton 3.6's interpreter converts 1-element arrays with int(), which NumPy 2.4
# rejects ("only 0-dimensional arrays can be converted"); compiled Triton code is unaffected.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  "torch==2.11.0" "torchvision==0.26.0" "triton==3.6.0" "numpy<2.4" setuptools wheel ninja \
  pyyaml scipy tqdm pillow pytest pytest-xdist pytest-benchmark pycocotools timm onnx onnxruntime
"$VENV/bin/python" -c "import torch, triton; print('device stack: torch', torch.__version__, \
'(CUDA', torch.version.cuda + ') triton', triton.__version__)"
echo "device stack installed in $(( $(date +%s) - start )) s"

# A fresh copy of the tracked (and untracked, not ignored) files; the object files of an earlier
# run (under build/) are kept, so unchanged sources do not recompile.
mkdir -p "$TREE"
find "$TREE" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard | grep -zv '^\.ci/' \
  | tar --null -cf - -T - | tar -xf - -C "$TREE"
cd "$TREE"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  GHOSTKERNELS_CUDA=${GHOSTKERNELS_CUDA:-1} "$VENV/bin/python" setup.py -q build_ext --inplace
echo "ghostkernels built against the device stack in $(( $(date +%s) - start )) s"
(cd / && PYTHONPATH="$TREE" "$VENV/bin/python" -m ghostkernels)

export GHOSTKERNELS_REQUIRE_EXTENSION=1
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
workers=$(( cpus < 4 ? cpus : 4 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PYTHONPATH="$TREE" "$VENV/bin/python" -m pytest -n "$workers" -p no:cacheprovider -q "$@"
