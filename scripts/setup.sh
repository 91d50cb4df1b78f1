#!/usr/bin/env bash
# Creates .venv and installs faceserve with everything it needs. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch/torchvision first, pinned: the build machines carry these wheels on
# disk; a looser spec would pull a different multi-GB build.
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e '.[test]'
# facenet-pytorch pins an old torch; its real needs are declared in pyproject.
python -m pip install -q --no-deps facenet-pytorch==2.6.0
python -c "import torch, torchvision, facenet_pytorch, ray, faiss, cv2, onnxruntime" 
echo "faceserve environment ready in .venv"
