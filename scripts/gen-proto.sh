#!/usr/bin/env bash
# Generates the Python gRPC code from proto/ into OUTDIR (default src/cocos_manager/proto).
# The staleness test runs this into a scratch folder and compares, so keep it deterministic.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/src/cocos_manager/proto}
py=${PYTHON:-$root/.venv/bin/python}
mkdir -p "$out"
"$py" -m grpc_tools.protoc -I "$root/proto" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$root/proto/manager.proto"
# protoc emits a top-level import; the package lives under cocos_manager.proto.
sed -i 's/^import manager_pb2 as manager__pb2$/from cocos_manager.proto import manager_pb2 as manager__pb2/' \
  "$out/manager_pb2_grpc.py"
[ -f "$out/__init__.py" ] || printf '"""Generated gRPC code: run `make proto` after editing proto/manager.proto."""\n' > "$out/__init__.py"
