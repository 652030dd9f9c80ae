"""Echo gRPC service used by the proxy's tests, demo and load tests.

The generated code lives in :mod:`proxy_examples.echo.echo_pb2` and
:mod:`proxy_examples.echo.echo_pb2_grpc` (regenerate with ``protos/generate.sh``); the servicer
and ``serve()`` live in :mod:`proxy_examples.echo.server`.
"""
