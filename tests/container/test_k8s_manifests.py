"""deploy/kubernetes: the manifests parse, agree with each other and with the image, and their
settings are ones the proxy accepts. The probes are checked against a running proxy in
test_probe_paths.py."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
from dockerfile_model import REPO_ROOT, read_dockerfile

from proxy.app.config import ListenAddress, ServeConfig, add_serve_flags, flag_values, load

yaml = pytest.importorskip("yaml", reason="needs PyYAML (the dev extra: pip install -e '.[dev]')")

MANIFESTS = sorted((REPO_ROOT / "deploy" / "kubernetes").glob("*.yaml"))
REQUIRED = {"apiVersion", "kind", "metadata"}


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in MANIFESTS:
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return docs


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def container() -> dict[str, Any]:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    found: dict[str, Any] = containers[0]
    return found


def named_ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container()["ports"]}


def effective_config() -> ServeConfig:
    """What the container runs with: the image's environment, the manifest's env and args,
    read by the proxy's own configuration loader (unknown flags or variables fail here)."""
    env = read_dockerfile()[-1].env()
    env.update({e["name"]: e["value"] for e in container().get("env", []) if "value" in e})
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_serve_flags(parser)
    return load(flag_values(parser.parse_args(container().get("args", []))), env)


def test_there_are_manifests() -> None:
    assert MANIFESTS, "no deploy/kubernetes/*.yaml"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: Path(p).name)
def test_every_document_parses_and_is_a_kubernetes_object(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs
    for doc in docs:
        assert doc.keys() >= REQUIRED, doc.keys()
        assert doc["metadata"]["name"]


def test_deployment_runs_three_replicas_of_the_image_entrypoint() -> None:
    deployment = one("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    # Arguments only: the image's ENTRYPOINT (`grpc-etcd-proxy serve`) stays.
    assert "command" not in container()


def test_the_proxy_settings_are_valid_and_point_at_etcd() -> None:
    config = effective_config()
    assert config.etcd == "http://etcd:2379"
    assert config.target
    assert config.listen == (ListenAddress("0.0.0.0", named_ports()["grpc"]),)
    assert config.admin == ("0.0.0.0", named_ports()["admin"])


def test_the_grace_period_outlasts_the_drain() -> None:
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > effective_config().drain_timeout
    # The proxy drains on SIGTERM itself; a preStop hook would only delay it.
    assert "lifecycle" not in container()


def test_the_probes_ask_the_admin_port() -> None:
    probes = {kind: container()[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        port = probe["port"]
        assert named_ports().get(port, port) == effective_config().admin[1]


def test_container_ports_match_the_image() -> None:
    exposed = {int(p) for i in read_dockerfile()[-1].all("EXPOSE") for p in i.args.split()}
    assert set(named_ports().values()) == exposed


def test_resources_are_requested() -> None:
    requests = container()["resources"]["requests"]
    assert {"cpu", "memory"} <= requests.keys()


def test_runs_as_the_image_user_on_a_read_only_root() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    user = read_dockerfile()[-1].all("USER")[-1].args.split(":")[0]
    assert pod["securityContext"].get("runAsUser", int(user)) == int(user)
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_services_select_the_pods_and_name_the_grpc_port() -> None:
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    services = [d for d in documents() if d["kind"] == "Service"]
    assert services
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert named_ports().get(target, target) == named_ports()["grpc"]
    # The admin port (pool, metrics) is not published through a Service.
    assert all(p["port"] == named_ports()["grpc"] for s in services for p in s["spec"]["ports"])


def test_the_disruption_budget_selects_the_pods() -> None:
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    budget = one("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
