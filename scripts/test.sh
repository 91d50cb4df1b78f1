#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite
# (unit tests, then integration tests against the real Ray Serve app,
# PostgreSQL at 127.0.0.1:5432, Redis at 127.0.0.1:6379 and an S3 server on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export RAY_AUTH_MODE=disabled
exec python -m pytest tests "$@"
