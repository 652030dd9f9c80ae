#!/usr/bin/env bash
# Regenerates the committed Python code for protos/echo.proto into proxy/echo/.
# Run from anywhere; paths are resolved against the repository root.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

"$PYTHON" -m grpc_tools.protoc -Iprotos \
    --python_out=proxy/echo \
    --grpc_python_out=proxy/echo \
    --pyi_out=proxy/echo \
    protos/echo.proto

# protoc emits a top-level "import echo_pb2", which only works with proxy/echo on
# sys.path; make it package-relative so "import proxy.echo" works from anywhere.
sed -i.bak 's/^import echo_pb2 as echo__pb2$/from proxy.echo import echo_pb2 as echo__pb2/' \
    proxy/echo/echo_pb2_grpc.py
rm -f proxy/echo/echo_pb2_grpc.py.bak
grep -q '^from proxy.echo import echo_pb2 as echo__pb2$' proxy/echo/echo_pb2_grpc.py
