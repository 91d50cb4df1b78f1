#!/usr/bin/env bash
# Installs faceserve into a virtualenv: the one install recipe, used by
# scripts/setup.sh (developers, CI) and by the Dockerfile (the image), so CI
# runs what the image runs. Idempotent: an existing virtualenv is reused,
# never recreated, and nothing in it is uninstalled.
#
#   scripts/install.sh [--venv DIR] [--extras LIST] [--torch-only] [--dry-run]
#
#   --venv DIR     the virtualenv (created with $PYTHON if missing; default .venv)
#   --extras LIST  pyproject extras, e.g. "test" (default: none)
#   --torch-only   only the pinned torch/torchvision step (the image caches it
#                  in a layer of its own, before the sources are copied)
#   --dry-run      print the commands in order, run nothing
#
# Environment: PYTHON (default python3) creates the virtualenv;
# TORCH_INDEX_URL, when set, is an extra index for torch/torchvision (the
# image uses PyTorch's CPU builds; same versions, no CUDA libraries).
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned here and in pyproject's dependencies (tests/unit/test_dockerfile.py
# checks that they agree): the build machines carry these wheels on disk, and
# a looser spec would pull a different multi-GB build.
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
# facenet-pytorch pins an old torch; its real needs are declared in pyproject.
FACENET_PIN=facenet-pytorch==2.6.0
IMPORT_CHECK="import torch, torchvision, facenet_pytorch, ray, faiss, cv2, onnxruntime"

venv=.venv
extras=""
torch_only=0
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv=${2:?--venv needs a directory}; shift 2 ;;
    --extras) extras=${2?--extras needs a list}; shift 2 ;;
    --torch-only) torch_only=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}

run() {
  echo "+ $*"
  if [ "$dry_run" = 0 ]; then "$@"; fi
}

if [ ! -x "$venv/bin/python" ]; then
  run "$PYTHON" -m venv "$venv"
fi
py="$venv/bin/python"

run "$py" -m pip install -q --upgrade pip
torch_index=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  torch_index=(--extra-index-url "$TORCH_INDEX_URL")
fi
run "$py" -m pip install -q "${torch_index[@]}" "${TORCH_PINS[@]}"
if [ "$torch_only" = 1 ]; then
  exit 0
fi
target=.
if [ -n "$extras" ]; then
  target=".[$extras]"
fi
run "$py" -m pip install -q -e "$target"
run "$py" -m pip install -q --no-deps "$FACENET_PIN"
if [[ ",$extras," == *",test,"* ]]; then
  # compreface-sdk pins requests-toolbelt 0.9.1 (broken under urllib3 2); pyproject's test
  # extras carry a working requests-toolbelt.
  run "$py" -m pip install -q --no-deps "compreface-sdk==0.6.0"
fi
run "$py" -c "$IMPORT_CHECK"
