"""grpc-etcd-proxy: an L7 gRPC proxy that balances every call over backends found in etcd."""

__version__ = "0.1.0"
