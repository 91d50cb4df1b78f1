#!/usr/bin/env bash
# Creates .venv and installs faceserve with everything it needs, the test
# tools included. Idempotent. The steps live in scripts/install.sh, which the
# Dockerfile runs too (without the test extras), so CI installs what the
# image runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --venv .venv --extras test
echo "faceserve environment ready in .venv"
