"""The TLS settings: listener specs, per-target backend TLS tables, route_allow, and the checks
between them. Files are only read when serving (see tests/tls), so paths here need not exist.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from config_support import error_of, load, write

from proxy.app.config import BackendTLS, ListenAddress

CERT = ("--tls-cert", "/c.pem", "--tls-key", "/k.pem")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("127.0.0.1:1", ListenAddress("127.0.0.1", 1)),
        ("tls:0.0.0.0:8443", ListenAddress("0.0.0.0", 8443, tls=True)),
        ("h2c::50051", ListenAddress("0.0.0.0", 50051, tls=False)),
        ("tls:[::1]:8443", ListenAddress("::1", 8443, tls=True)),
        ("unix:/run/p.sock", ListenAddress(path="/run/p.sock", tls=False)),
        ("unix:///run/p.sock", ListenAddress(path="/run/p.sock", tls=False)),
    ],
)
def test_listen_specs(spec: str, expected: ListenAddress) -> None:
    cfg = load("--listen", spec, *CERT)
    assert cfg.listen == (expected,)
    # What a supervisor hands its workers reads back the same.
    assert load("--listen", str(expected), *CERT).listen == (expected,)


def test_a_bare_address_is_tls_only_with_a_certificate() -> None:
    bare = ListenAddress("127.0.0.1", 1)
    assert load("--listen", "127.0.0.1:1").is_tls(bare) is False
    assert load("--listen", "127.0.0.1:1", *CERT).is_tls(bare) is True
    both = load("--listen", "127.0.0.1:1", "--listen", "h2c:127.0.0.1:2", *CERT)
    assert [both.is_tls(a) for a in both.listen] == [True, False]


def test_several_listeners_from_each_source(tmp_path: Path) -> None:
    env = {"GRPC_ETCD_PROXY_LISTEN": "h2c:127.0.0.1:1,unix:/tmp/x.sock"}
    assert load(env=env).listen == (
        ListenAddress("127.0.0.1", 1, tls=False),
        ListenAddress(path="/tmp/x.sock", tls=False),
    )
    path = write(tmp_path, 'listen = ["tls:127.0.0.1:1", "h2c:127.0.0.1:2"]\ntls_cert = "/c"\n')
    cfg = load("--config", path, "--tls-key", "/k")
    assert cfg.listen == (
        ListenAddress("127.0.0.1", 1, tls=True),
        ListenAddress("127.0.0.1", 2, tls=False),
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--listen", "tls:127.0.0.1:1"], "--listen: tls:127.0.0.1:1 is a TLS listener: it needs"),
        (["--tls-cert", "/c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "/ca.pem"], "--tls-client-ca: no TLS listener"),
        (["--backend-ca", "/ca.pem"], "--backend-ca needs --backend-tls"),
        (["--backend-tls", "--backend-cert", "/c"], "--backend-cert and --backend-key go together"),
        (
            [*CERT, "--route-allow", "echo.Echo=spiffe://x/y"],
            "--route-allow: client identities come from client certificates",
        ),
        (["--listen", "unix:/tmp/x.sock", "--workers", "2"], "needs --workers 1"),
        (["--listen", "unix:relative.sock"], "expected unix:/ABSOLUTE/PATH"),
    ],
)
def test_bad_tls_combinations_name_the_settings(argv: list[str], expected: str) -> None:
    message = error_of(*argv)
    assert expected in message, message


def test_route_allow_from_flags_environment_and_file(tmp_path: Path) -> None:
    tls = (*CERT, "--tls-client-ca", "/ca.pem")
    flags = load(*tls, "--route-allow", "a.A=spiffe://x/1", "--route-allow", "a.A=web")
    assert flags.route_allow == (("a.A", "spiffe://x/1"), ("a.A", "web"))
    env = load(*tls, env={"GRPC_ETCD_PROXY_ROUTE_ALLOW": "a.A=spiffe://x/1,b.B=web"})
    assert env.route_allow == (("a.A", "spiffe://x/1"), ("b.B", "web"))
    path = write(tmp_path, '[route_allow]\n"a.A" = ["spiffe://x/1", "web"]\n"b.B" = "cn"\n')
    assert load("--config", path, *tls).route_allow == (
        ("a.A", "spiffe://x/1"),
        ("a.A", "web"),
        ("b.B", "cn"),
    )


def test_per_target_tables(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'backend_tls = true\nbackend_ca = "/ca.pem"\n'
        '[targets.payments]\nbackend_server_name = "payments.internal"\n'
        'backend_cert = "/c.pem"\nbackend_key = "/k.pem"\n'
        "[targets.legacy]\nbackend_tls = false\n",
    )
    cfg = load("--config", path)
    assert cfg.targets == (
        ("payments", BackendTLS(server_name="payments.internal", cert="/c.pem", key="/k.pem")),
        ("legacy", BackendTLS(enabled=False)),
    )


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[targets.a]\nbackend_sni = 'x'\n", "targets.a: backend_sni: unknown setting"),
        ("[targets.a]\nbackend_tls = 'yes'\n", "targets.a.backend_tls: expected true or false"),
        ("targets = 3\n", "targets: expected tables [targets.NAME]"),
        ("[targets]\na = 1\n", "targets.a: expected a table"),
    ],
)
def test_bad_target_tables_name_the_key(tmp_path: Path, toml: str, expected: str) -> None:
    message = error_of("--config", write(tmp_path, toml))
    assert expected in message, message


def test_targets_is_a_file_only_setting() -> None:
    message = error_of(env={"GRPC_ETCD_PROXY_TARGETS": "x"})
    assert "GRPC_ETCD_PROXY_TARGETS: unknown setting" in message, message
