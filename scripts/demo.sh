#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh) and run the embedded demo: synthetic dataset ->
# train RT-DETR-GhostNetV3 (demo config) -> COCO mAP -> fold and check -> predictions picture.
# Extra arguments go to `rtdetr demo` (e.g. --output demo_output).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m rtdetr demo "$@"
