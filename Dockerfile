# grpc-etcd-proxy in a container.
#
#   docker build -t grpc-etcd-proxy .
#   docker run --rm -p 50051:50051 grpc-etcd-proxy --etcd http://etcd:2379 --target my-service
#   docker run --rm -p 50051:50051 grpc-etcd-proxy --backend 10.0.0.7:50051 --backend 10.0.0.8:50051
#
# Without arguments it prints `serve --help`: only the user knows where etcd or the backends
# are.

# ---- build: the project's wheel, plus wheels of everything it depends on
FROM python:3.11-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir --disable-pip-version-check build
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m build --wheel --outdir /dist \
    && pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels /dist/*.whl

# ---- run: the wheels installed offline, run as an unprivileged user
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --disable-pip-version-check --no-index --find-links /tmp/wheels \
        grpc-etcd-proxy \
    && rm -rf /tmp/wheels \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin proxy
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 50051
# --listen comes first so that the arguments given to `docker run` replace only CMD; a later
# --listen overrides this one (argparse keeps the last). Inside a container the CLI's default,
# 127.0.0.1, would be unreachable from outside.
ENTRYPOINT ["grpc-etcd-proxy", "serve", "--listen", "0.0.0.0:50051"]
CMD ["--help"]
