"""The gRPC-Web settings: defaults, the three sources, bad values, and what the listener
builds from them."""

from __future__ import annotations

from pathlib import Path

from config_support import error_of, load, write

from proxy.core.grpcweb import DEFAULT_HTTP1_MAX_BODY_SIZE
from proxy.runtime.listener import web_settings


def test_defaults_on_with_no_origin_allowed() -> None:
    cfg = load()
    assert cfg.grpc_web is True
    assert cfg.cors_allowed_origins == ()
    assert cfg.http1_max_body_size == DEFAULT_HTTP1_MAX_BODY_SIZE
    web = web_settings(cfg.server_options())
    assert web is not None
    assert not web.cors.allows(b"https://app.example")


def test_flags_environment_and_file(tmp_path: Path) -> None:
    cfg = load(
        "--cors-allowed-origins", "https://a.example/", "--cors-allowed-origins", "*",
        "--cors-allow-headers", "X-Pin", "--http1-max-header-size", "4096",
    )  # fmt: skip
    assert cfg.cors_allowed_origins == ("https://a.example", "*")
    assert cfg.cors_allow_headers == ("x-pin",)
    options = cfg.server_options()
    assert options.http1_max_header_size == 4096
    env = load(env={"GRPC_ETCD_PROXY_GRPC_WEB": "off",
                    "GRPC_ETCD_PROXY_CORS_EXPOSE_HEADERS": "x-a,x-b"})  # fmt: skip
    assert env.grpc_web is False and env.cors_expose_headers == ("x-a", "x-b")
    assert web_settings(env.server_options()) is None
    path = write(tmp_path, 'grpc_web = false\ncors_allowed_origins = ["http://localhost:5173"]\n')
    from_file = load("--config", path)
    assert from_file.grpc_web is False
    assert from_file.cors_allowed_origins == ("http://localhost:5173",)
    assert load("--config", path, "--grpc-web").grpc_web is True


def test_bad_values_name_the_setting() -> None:
    assert "--cors-allowed-origins" in error_of("--cors-allowed-origins", "app.example")
    assert "expected an origin" in error_of("--cors-allowed-origins", "https://a.example/path")
    assert "expected a header name" in error_of("--cors-allow-headers", "bad name")
    assert "--http1-max-body-size" in error_of("--http1-max-body-size", "0")
