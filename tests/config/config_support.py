"""Helpers for the config tests: loading settings, client traffic that records every call,
etcd registration.

Import as ``from config_support import ...`` (this folder is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import argparse
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from backends import echo_stub, open_channel
from proxy_process import wait_for

from proxy.app import config
from proxy.app.config import ConfigError, ServeConfig
from proxy.app.wiring import check_serve
from proxy_examples.echo import echo_pb2

CALL_TIMEOUT_S = 10.0


def parse_flags(*argv: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser(exit_on_error=False)
    config.add_serve_flags(parser)
    return config.flag_values(parser.parse_args(list(argv)))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return str(path)


def load(*argv: str, env: dict[str, str] | None = None, serve: bool = False) -> ServeConfig:
    return config.load(parse_flags(*argv), env or {}, check=check_serve if serve else None)


def error_of(*argv: str, env: dict[str, str] | None = None, serve: bool = False) -> str:
    with pytest.raises(ConfigError) as caught:
        load(*argv, env=env, serve=serve)
    return str(caught.value)


def wait_serving(target: str) -> None:
    """Wait until a call through `target` succeeds."""
    request = echo_pb2.EchoRequest(message="probe")
    with open_channel(target) as channel:
        stub = echo_stub(channel)

        def answers() -> bool:
            try:
                stub.UnaryEcho(request, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError:
                return False
            return True

        wait_for(answers, f"a call through {target} to succeed", timeout_s=15.0)


class Traffic:
    """`callers` threads making UnaryEcho calls through `target` back to back until `stop`.

    `answers` holds, in the order they came, the backend that answered each call and the
    number of the call (calls are numbered as they start); `errors` every failure.
    """

    def __init__(self, target: str, callers: int = 4) -> None:
        self.channel = open_channel(target)
        self.stub = echo_stub(self.channel)
        self.answers: list[tuple[int, str]] = []
        self._started = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"caller-{i}", daemon=True)
            for i in range(callers)
        ]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(CALL_TIMEOUT_S + 5)
        self.channel.close()

    def _run(self) -> None:
        request = echo_pb2.EchoRequest(message="x")
        while not self._stop.is_set():
            with self._lock:
                number = self._started
                self._started += 1
            try:
                reply = self.stub.UnaryEcho(request, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as exc:
                with self._lock:
                    self.errors.append(f"{exc.code()}: {exc.details()}")
                continue
            with self._lock:
                self.answers.append((number, reply.backend))

    def started(self) -> int:
        """How many calls have started so far (the number the next one will get)."""
        with self._lock:
            return self._started

    def answered_from(self, first: int, calls: int) -> Counter[str] | None:
        """Which backends answered calls first..first+calls-1 (by start), once all have."""
        with self._lock:
            found = [backend for number, backend in self.answers if first <= number]
        return Counter(found[:calls]) if len(found) >= calls else None


def register(etcd: Any, key: str, address: str) -> None:
    """Put the value Go's etcd naming package writes under `key`."""
    etcd.etcdctl("put", key, json.dumps({"Op": 0, "Addr": address, "Metadata": None}))
