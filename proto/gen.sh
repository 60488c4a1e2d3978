#!/usr/bin/env bash
# Regenerate the committed gRPC stubs: proto/gen.sh [OUTDIR] (default: proto/ itself).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
py=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m grpc_tools.protoc -Ivirtmig/proto="$here" --python_out="$tmp" --grpc_python_out="$tmp" \
  --pyi_out="$tmp" "$here/virtmig.proto"
mkdir -p "$out"
cp "$tmp"/virtmig/proto/virtmig_pb2.py "$tmp"/virtmig/proto/virtmig_pb2.pyi \
  "$tmp"/virtmig/proto/virtmig_pb2_grpc.py "$out"/
