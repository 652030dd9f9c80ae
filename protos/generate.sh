#!/usr/bin/env bash
# Regenerates the committed Python code for protos/echo.proto into examples/proxy_examples/echo/.
# Run from anywhere; paths are resolved against the repository root.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

"$PYTHON" -m grpc_tools.protoc -Iprotos \
    --python_out=examples/proxy_examples/echo \
    --grpc_python_out=examples/proxy_examples/echo \
    --pyi_out=examples/proxy_examples/echo \
    protos/echo.proto

# protoc emits a top-level "import echo_pb2", which only works with examples/proxy_examples/echo on
# sys.path; make it package-relative so "import proxy_examples.echo" works from anywhere.
sed -i.bak 's/^import echo_pb2 as echo__pb2$/from proxy_examples.echo import echo_pb2 as echo__pb2/' \
    examples/proxy_examples/echo/echo_pb2_grpc.py
rm -f examples/proxy_examples/echo/echo_pb2_grpc.py.bak
grep -q '^from proxy_examples.echo import echo_pb2 as echo__pb2$' examples/proxy_examples/echo/echo_pb2_grpc.py
