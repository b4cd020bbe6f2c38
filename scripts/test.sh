#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh) and run the whole test suite on this machine.
# Without a GPU, Triton kernels run through the Triton interpreter and GPU-only tests are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
# The compiled CPU backend must be present: its absence fails the tests instead of skipping them.
export GHOSTKERNELS_REQUIRE_EXTENSION=1
# (nproc obeys OMP_NUM_THREADS: count the processors without it)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
workers=$(( cpus < 4 ? cpus : 4 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -n "$workers" --durations=15 "$@"
