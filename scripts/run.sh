#!/usr/bin/env bash
# One command for a new machine: set up .venv and start faceserve on its
# embedded defaults (embedded PostgreSQL + local object store under ./data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export RAY_AUTH_MODE=disabled
exec faceserve start "$@"
