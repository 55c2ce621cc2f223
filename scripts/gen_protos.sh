#!/usr/bin/env bash
# Regenerate the gRPC stubs in specrouter/v1/ from protos/ (committed; tests check they are current).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.}"
"${SPECROUTER_VENV:-.venv}/bin/python" -m grpc_tools.protoc -Iprotos --python_out="$OUT" --grpc_python_out="$OUT" protos/specrouter/v1/*.proto
