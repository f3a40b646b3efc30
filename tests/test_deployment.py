"""Checks that the Dockerfile, docker-compose.yml and k8s/ manifests are valid and agree, and
that what they rely on works: the health check, the metrics address and secrets read from files."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import kubernetes_validate.utils as kubernetes_validate
import pytest
import yaml
from conftest import (
    DAY,
    START_TIMEOUT_S,
    T0,
    ServiceProcess,
    free_port,
    request,
    service_env,
    status_of,
    wait_for,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "k8s"
REPO_CONFIG = ROOT / "config.yaml"

NAMESPACE = "edgecom"
# The oldest Kubernetes the manifests promise to work on; the newest one that the
# installed kubernetes-validate ships schemas for is checked as well.
OLDEST_KUBERNETES = "1.30.0"
# Packages come from whatever index the build machine is configured for: the deployment
# files name none, neither by flag nor by environment variable.
INDEX_SETTINGS = ("--index-url", "--extra-index-url", "--find-links", "PIP_INDEX_URL", "UV_INDEX")
# Volume types the "restricted" Pod Security Standard admits.
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


# --------------------------------------------------------------------------- helpers


@dataclass
class _Stage:
    """One FROM stage of the Dockerfile: its name and (KEYWORD, arguments) pairs."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        """Returns the arguments of every instruction with this keyword, in order."""
        return [args for key, args in self.instructions if key == keyword]


def _dockerfile_stages() -> list[_Stage]:
    """Parses the Dockerfile into stages, joining continuation lines and dropping comments."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[_Stage] = []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            match = re.search(r"\s+AS\s+(\S+)$", rest, re.IGNORECASE)
            stages.append(_Stage(name=match.group(1) if match else "", base=rest.split()[0]))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def _stage(name: str) -> _Stage:
    stages = {stage.name: stage for stage in _dockerfile_stages()}
    assert name in stages, f"Dockerfile has no stage named {name!r}; stages: {sorted(stages)}"
    return stages[name]


def _exec_form(args: str) -> list[str]:
    """Returns the JSON array of an exec-form instruction, failing on the shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"not exec form (a JSON array): {args}")
    assert isinstance(value, list), f"not exec form (a JSON array): {args}"
    return value


def _healthcheck_command() -> list[str]:
    (healthcheck,) = _stage("runtime").values("HEALTHCHECK")
    _, _, command = healthcheck.partition(" CMD ")
    return _exec_form(command)


def _exposed_ports() -> set[int]:
    ports: set[int] = set()
    for args in _stage("runtime").values("EXPOSE"):
        ports.update(int(port.split("/")[0]) for port in args.split())
    return ports


def _k8s_files() -> list[Path]:
    return sorted(K8S_DIR.glob("*.yaml"))


def _k8s_documents() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in _k8s_files():
        documents.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return documents


def _k8s(kind: str, name: str) -> dict[str, Any]:
    for doc in _k8s_documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    pytest.fail(f"k8s/ defines no {kind} named {name!r}")


def _workloads() -> list[dict[str, Any]]:
    return [doc for doc in _k8s_documents() if doc["kind"] in ("Deployment", "StatefulSet")]


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    for container in workload["spec"]["template"]["spec"]["containers"]:
        if container["name"] == name:
            return container
    pytest.fail(f"{workload['kind']}/{workload['metadata']['name']} has no container {name!r}")


def _container_ports(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container.get("ports", [])}


def _configmap_config() -> dict[str, Any]:
    text = _k8s("ConfigMap", "edgecom-config")["data"]["config.yaml"]
    config = yaml.safe_load(text)
    assert isinstance(config, dict), "the ConfigMap's config.yaml is not a YAML mapping"
    return config


def _repo_config() -> dict[str, Any]:
    return yaml.safe_load(REPO_CONFIG.read_text())


def _duration_s(value: str | int | float) -> float:
    """Parses the service's duration syntax (300ms, 30s, 5m, 1h, 2d or bare seconds)."""
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?", value.strip())
    assert match, f"not a duration: {value!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2) or "s"]
    return float(match.group(1)) * scale


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _compose() -> dict[str, Any]:
    # safe_load resolves the file's anchors and <<: merge keys like Compose does.
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _interpolate(value: Any) -> str:
    """Resolves Compose's ${NAME:-default} syntax with defaults only, ignoring the shell."""
    text = str(value)
    text = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", text)
    text = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", "", text)
    return text.replace("$$", "$")


def _compose_environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: _interpolate(value) for key, value in environment.items()}


def _container_port(mapping: str) -> int:
    """Returns the container side of a short-syntax port mapping like 127.0.0.1:8080:80."""
    return int(str(mapping).rsplit(":", 1)[-1].split("/")[0])


def _host_port(mapping: str) -> int:
    return int(_interpolate(mapping).split(":")[-2])


def _command(value: str | list[str]) -> str:
    return value if isinstance(value, str) else " ".join(value)


def _tool(name: str) -> str | None:
    """Finds a console script of this venv first (hadolint, grpcurl), then on PATH."""
    candidate = Path(sys.prefix) / "bin" / name
    return str(candidate) if candidate.is_file() else shutil.which(name)


def _compose_cli() -> list[str] | None:
    """Returns the Compose v2 command available here, or None."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(command[0]):
            continue
        result = subprocess.run(
            [*command, "version", "--short"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0 and result.stdout.strip().lstrip("v").startswith("2"):
            return command
    return None


def _image_references() -> list[str]:
    images = [stage.base for stage in _dockerfile_stages()]
    images += [service["image"] for service in _compose()["services"].values()]
    for workload in _workloads():
        images += [c["image"] for c in workload["spec"]["template"]["spec"]["containers"]]
    arg_default = re.search(r"^ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert arg_default, "Dockerfile lost its ARG PYTHON_IMAGE default"
    return [arg_default.group(1) if image == "${PYTHON_IMAGE}" else image for image in images]


# --------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("path", _k8s_files(), ids=lambda path: path.name)
def test_manifest_validates_strictly(path: Path) -> None:
    versions = (OLDEST_KUBERNETES, kubernetes_validate.latest_version())
    for document in (doc for doc in yaml.safe_load_all(path.read_text()) if doc):
        for version in versions:
            # The library call, unlike the CLI, fails on kinds it has no schema for.
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(str(part) for part in error.path)
                pytest.fail(f"{path.name} {document['kind']} against {version}: {where}: {error}")
            except kubernetes_validate.SchemaNotFoundError as error:
                pytest.fail(f"{path.name}: {error.message}")


def test_manifests_apply_in_order_into_one_namespace() -> None:
    names = [path.name for path in _k8s_files()]
    assert names, "k8s/ holds no manifests"
    assert all(re.fullmatch(r"\d{2}-[a-z0-9-]+\.yaml", name) for name in names), names
    first = [doc for doc in yaml.safe_load_all((K8S_DIR / names[0]).read_text()) if doc]
    assert [(d["kind"], d["metadata"]["name"]) for d in first] == [("Namespace", NAMESPACE)]
    seen: set[tuple[str, str]] = set()
    for doc in _k8s_documents():
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{key} is defined twice"
        seen.add(key)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{key} lacks the namespace"


@pytest.mark.parametrize("kind,name", [("Deployment", "edgecom"), ("StatefulSet", "timescaledb")])
def test_pods_meet_the_restricted_pod_security_standard(kind: str, name: str) -> None:
    # 00-namespace.yaml enforces "restricted": a pod that misses one of these is rejected.
    pod = _k8s(kind, name)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert not context["capabilities"].get("add"), container["name"]
    for volume in pod.get("volumes", []):
        assert set(volume) - {"name"} <= RESTRICTED_VOLUME_TYPES, volume


def test_edgecom_pod_runs_the_image_as_built() -> None:
    deployment = _k8s("Deployment", "edgecom")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment, "edgecom")
    (user,) = _stage("runtime").values("USER")
    uid, _, gid = user.partition(":")
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert pod["securityContext"]["runAsGroup"] == int(gid)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a read-only pod still needs a writable /tmp"
    assert container["image"] == f"edgecom:{_project_version()}"
    assert container["image"] == _compose()["services"]["edgecom"]["image"]
    assert deployment["spec"]["replicas"] >= 2
    # The Service named "edgecom" would otherwise inject EDGECOM_SERVICE_HOST and
    # friends, which the service reads as EDGECOM_<SECTION>_<KEY> overrides.
    assert pod["enableServiceLinks"] is False


def test_ports_agree_across_config_dockerfile_compose_and_k8s() -> None:
    repo = _repo_config()
    expected = {"grpc": repo["server"]["port"], "metrics": repo["metrics"]["port"]}
    configmap = _configmap_config()
    assert configmap["server"]["port"] == expected["grpc"]
    assert configmap["metrics"]["port"] == expected["metrics"]
    assert _exposed_ports() == set(expected.values())
    for name in ("edgecom", "edgecom-demo"):
        mappings = _compose()["services"][name]["ports"]
        assert {_container_port(mapping) for mapping in mappings} == set(expected.values())
    container = _container(_k8s("Deployment", "edgecom"), "edgecom")
    assert _container_ports(container) == expected
    annotations = _k8s("Deployment", "edgecom")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(expected["metrics"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_probes_target_declared_ports() -> None:
    for workload in _workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            ports = _container_ports(container)
            for probe_name in PROBES:
                probe = container.get(probe_name)
                assert probe, f"{container['name']} has no {probe_name}"
                for handler in ("grpc", "httpGet", "tcpSocket"):
                    if handler in probe:
                        port = probe[handler]["port"]
                        assert port in ports or port in ports.values(), (
                            f"{container['name']} {probe_name} targets undeclared port {port}"
                        )
    # The kubelet's grpc probe speaks plaintext only: the pods run the image's health check,
    # which reads the same config as the service and speaks TLS when it is on.
    container = _container(_k8s("Deployment", "edgecom"), "edgecom")
    for probe_name in PROBES:
        assert set(container[probe_name]) & {"grpc", "httpGet", "tcpSocket"} == set()
        assert container[probe_name]["exec"]["command"] == _healthcheck_command(), probe_name
        assert container[probe_name]["timeoutSeconds"] >= 5, "Python needs about 1 s to start"


def test_termination_grace_covers_prestop_and_server_grace_period() -> None:
    pod = _k8s("Deployment", "edgecom")["spec"]["template"]["spec"]
    container = _container(_k8s("Deployment", "edgecom"), "edgecom")
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = _duration_s(_configmap_config()["server"]["grace_period"])
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + grace
    compose_grace = _duration_s(_compose()["services"]["edgecom"]["stop_grace_period"])
    assert compose_grace > grace


def test_services_select_pods_and_target_their_ports() -> None:
    for service in (doc for doc in _k8s_documents() if doc["kind"] == "Service"):
        selector = service["spec"]["selector"]
        pods = [
            workload
            for workload in _workloads()
            if selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, f"Service {service['metadata']['name']} selects {len(pods)} kinds"
        declared: dict[str, int] = {}
        for container in pods[0]["spec"]["template"]["spec"]["containers"]:
            declared |= _container_ports(container)
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in declared or target in declared.values(), (service, target)
    headless = _k8s("Service", "edgecom-headless")
    assert headless["spec"]["clusterIP"] == "None"
    for name in ("edgecom", "edgecom-headless"):
        ports = {port["name"]: port for port in _k8s("Service", name)["spec"]["ports"]}
        assert ports["grpc"]["appProtocol"] == "grpc"
    assert _k8s("StatefulSet", "timescaledb")["spec"]["serviceName"] == "timescaledb"


def test_disruption_budget_keeps_one_replica() -> None:
    budget = _k8s("PodDisruptionBudget", "edgecom")["spec"]
    deployment = _k8s("Deployment", "edgecom")["spec"]
    labels = deployment["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["minAvailable"] == 1 < deployment["replicas"]


def test_secret_and_configmap_references_resolve() -> None:
    for workload in _workloads():
        pod = workload["spec"]["template"]["spec"]
        for container in pod["containers"]:
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = _k8s("Secret", ref["name"])
                    keys = {*secret.get("stringData", {}), *secret.get("data", {})}
                    assert ref["key"] in keys, (variable["name"], ref)
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                _k8s("ConfigMap", volume["configMap"]["name"])
    container = _container(_k8s("Deployment", "edgecom"), "edgecom")
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["EDGECOM_DATABASE_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "edgecom-db"
    # EDGECOM_CONFIG, not --config: the health check the probes run must read the file too.
    assert "args" not in container
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert env["EDGECOM_CONFIG"]["value"] == f"{config_mount['mountPath']}/config.yaml"


def _readme_kubernetes_section() -> str:
    text = (ROOT / "docs" / "operations.md").read_text()
    start = text.index("### Kubernetes")
    return text[start : text.index("\n### ", start + 1)]


def _secret_keys(name: str) -> set[str]:
    """The keys of a Secret: shipped in k8s/, or made by a command of the README's steps."""
    for doc in _k8s_documents():
        if doc["kind"] == "Secret" and doc["metadata"]["name"] == name:
            return {*doc.get("stringData", {}), *doc.get("data", {})}
    # Not shipped, so that no placeholder token or key sits in git.
    command = re.search(
        rf"kubectl -n {NAMESPACE} create secret (generic|tls) {name}\b[^\n]*(\\\n[^\n]*)*",
        _readme_kubernetes_section(),
    )
    assert command, f"the README's Kubernetes steps do not create the Secret {name}"
    if command.group(1) == "tls":
        return {"tls.crt", "tls.key"}
    return set(re.findall(r"--from-file=([\w.-]+)=", command.group(0)))


def _secret_files(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Every file a Secret volume puts into the container: path -> (Secret name, key)."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    files: dict[str, tuple[str, str]] = {}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        name = secret["secretName"]
        assert mount.get("readOnly") is True, mount
        # Required: a missing Secret holds the pod back instead of starting it without.
        assert secret.get("optional") is not True, f"the Secret {name} must be required"
        keys = _secret_keys(name)
        items = secret.get("items") or [{"key": key, "path": key} for key in sorted(keys)]
        for item in items:
            assert item["key"] in keys, f"the Secret {name} has no key {item['key']!r}"
            files[f"{mount['mountPath']}/{item['path']}"] = (name, item["key"])
    return files


def test_token_and_tls_files_come_from_required_secrets() -> None:
    deployment = _k8s("Deployment", "edgecom")
    pod = deployment["spec"]["template"]["spec"]
    files = _secret_files(pod, _container(deployment, "edgecom"))
    config = _configmap_config()
    for key, path in (
        ("auth.tokens_file", config["auth"]["tokens_file"]),
        ("server.tls.cert_file", config["server"]["tls"]["cert_file"]),
        ("server.tls.key_file", config["server"]["tls"]["key_file"]),
    ):
        assert path in files, f"the ConfigMap's {key} ({path}) is no file of a mounted Secret"
    # The Secret files belong to the service's group, so they need not be world-readable.
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


def _policy_ports(rule: dict[str, Any]) -> set[tuple[int, str]]:
    return {(port["port"], port.get("protocol", "TCP")) for port in rule.get("ports", [])}


def _selects(selector: dict[str, Any], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return selector["matchLabels"].items() <= labels.items()


def test_network_policy_admits_grpc_and_metrics_and_reaches_database_dns_and_upstream() -> None:
    policy = _k8s("NetworkPolicy", "edgecom")["spec"]
    assert _selects(policy["podSelector"], _k8s("Deployment", "edgecom"))
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    config = _configmap_config()
    (ingress,) = policy["ingress"]
    expected = {(config["server"]["port"], "TCP"), (config["metrics"]["port"], "TCP")}
    assert _policy_ports(ingress) == expected
    database, dns, https = policy["egress"]
    (peer,) = database["to"]
    assert _selects(peer["podSelector"], _k8s("StatefulSet", "timescaledb"))
    assert _policy_ports(database) == {(config["database"]["port"], "TCP")}
    assert (
        database["to"][0]["podSelector"]["matchLabels"]
        == (_k8s("Service", config["database"]["host"])["spec"]["selector"])
    )
    ((namespace,),) = [peer["namespaceSelector"]["matchLabels"].items() for peer in dns["to"]]
    assert namespace == ("kubernetes.io/metadata.name", "kube-system")
    assert _policy_ports(dns) == {(53, "UDP"), (53, "TCP")}
    assert urlsplit(config["upstream"]["url"]).scheme == "https"
    assert _policy_ports(https) == {(443, "TCP")}
    blocks = {peer["ipBlock"]["cidr"]: set(peer["ipBlock"]["except"]) for peer in https["to"]}
    # Public addresses only: nothing inside the cluster, nor the cloud metadata endpoint.
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= blocks[
        "0.0.0.0/0"
    ]
    database_policy = _k8s("NetworkPolicy", "timescaledb")["spec"]
    assert _selects(database_policy["podSelector"], _k8s("StatefulSet", "timescaledb"))
    (from_edgecom,) = database_policy["ingress"]
    assert [peer["podSelector"] for peer in from_edgecom["from"]] == [policy["podSelector"]]
    assert _policy_ports(from_edgecom) == {(config["database"]["port"], "TCP")}


def test_metrics_listen_where_they_are_scraped() -> None:
    assert _repo_config()["metrics"]["host"] == "127.0.0.1", "a bare run keeps metrics local"
    assert _configmap_config()["metrics"]["host"] == "0.0.0.0", "Prometheus scrapes the pod IP"
    # A published port reaches the container's own address, not its loopback.
    for name in ("edgecom", "edgecom-demo"):
        assert _compose_environment(_compose()["services"][name])["EDGECOM_METRICS_HOST"] == (
            "0.0.0.0"
        )


def test_configmap_config_mirrors_the_repository_config() -> None:
    repo, configmap = _repo_config(), _configmap_config()
    stale = "k8s/10-configmap.yaml is out of step with config.yaml"
    assert configmap.keys() == repo.keys(), f"{stale}: sections differ"
    for section, values in repo.items():
        assert configmap[section].keys() == values.keys(), f"{stale}: keys of {section!r} differ"
    database = configmap["database"]
    assert database["url"] == ""
    assert database["host"] == _k8s("Service", "timescaledb")["metadata"]["name"]
    assert database["password"] == "", "the password belongs in the Secret"
    assert configmap["logging"]["format"] == "json"
    timescale = _container(_k8s("StatefulSet", "timescaledb"), "timescaledb")
    env = {variable["name"]: variable.get("value") for variable in timescale["env"]}
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == (database["user"], database["name"])


@pytest.fixture
def load_config(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """The service's own edgecom.load_config, or a skip when edgecom.py is not here yet."""
    if not (ROOT / "edgecom.py").is_file():
        pytest.skip("edgecom.py is not in this tree yet, so its load_config cannot be tried")
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("edgecom").load_config


def test_configmap_config_loads_with_the_service_loader(
    load_config: Callable[..., Any], tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(_k8s("ConfigMap", "edgecom-config")["data"]["config.yaml"])
    load_config(path, env={"EDGECOM_DATABASE_PASSWORD": "from-the-secret"})


def test_an_empty_metrics_host_is_refused(load_config: Callable[..., Any]) -> None:
    # An empty address would make the metrics listener take every interface.
    with pytest.raises(Exception, match=r"^metrics\.host: must not be empty"):
        load_config(REPO_CONFIG, env={"EDGECOM_METRICS_HOST": ""})


@pytest.mark.parametrize("service", ["edgecom", "edgecom-demo"])
def test_compose_environment_loads_with_the_service_loader(
    load_config: Callable[..., Any], service: str
) -> None:
    load_config(REPO_CONFIG, env=_compose_environment(_compose()["services"][service]))


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint not found: `uv sync` installs it with the dev group"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_runtime_stage_contract() -> None:
    stages = _dockerfile_stages()
    assert stages[-1].name == "runtime", "the runtime stage must be the default (last) target"
    runtime = stages[-1]
    assert re.fullmatch(r"\d+:\d+", runtime.values("USER")[-1]), "USER must be numeric"
    assert runtime.values("STOPSIGNAL") == ["SIGTERM"]
    entrypoint = _exec_form(runtime.values("ENTRYPOINT")[-1])
    assert entrypoint == ["python", "/app/edgecom.py"]
    assert "PYTHONDONTWRITEBYTECODE=1" in " ".join(runtime.values("ENV"))
    assert any("compileall" in run for run in runtime.values("RUN"))
    copied = " ".join(runtime.values("COPY"))
    for needed in ("*.py", "config.yaml", "proto/", "migrations/", "/app/.venv"):
        assert needed in copied, f"the runtime image does not copy {needed}"
    assert _healthcheck_command() == ["python", "/app/edgecom.py", "--health-check"]


def test_dockerfile_installs_dependency_groups_without_a_lock_file() -> None:
    build, test = _stage("build"), _stage("test")
    installs = " ".join(build.values("RUN"))
    assert re.search(r"pip install --no-cache-dir uv==\d+\.\d+\.\d+", installs)
    syncs = [run for run in build.values("RUN") + test.values("RUN") if "uv sync" in run]
    assert syncs, "no uv sync step"
    for sync in syncs:
        assert "--frozen" not in sync and "--locked" not in sync, sync
        assert "--no-default-groups" in sync, sync
        assert "embedded" not in sync, sync
    assert any("--group dev" in sync for sync in test.values("RUN"))
    assert "pyproject.toml .python-version" in build.values("COPY")[0]


def test_dockerignore_keeps_local_state_out_but_sources_in() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for excluded in (".git", ".venv", ".edgecom", "uv.lock", "**/__pycache__"):
        assert excluded in patterns, f".dockerignore does not exclude {excluded}"
    for needed in (
        "edgecom.py",
        "config.yaml",
        "pyproject.toml",
        ".python-version",
        "proto/edgecom.proto",
        "migrations/001_init.sql",
        "tests/test_deployment.py",
        "k8s/40-edgecom.yaml",
        "Dockerfile",
        "docker-compose.yml",
    ):
        hits = [p for p in patterns if fnmatch(needed, p) or needed.startswith(p.rstrip("/") + "/")]
        assert not hits, f".dockerignore drops {needed} via {hits}"


def _run_healthcheck(**env: str) -> subprocess.CompletedProcess[str]:
    """Runs the Dockerfile's HEALTHCHECK command here, with EDGECOM_* settings from env."""
    command = _healthcheck_command()
    assert command[:2] == ["python", "/app/edgecom.py"], command
    argv = [sys.executable, str(ROOT / "edgecom.py"), *command[2:]]
    return subprocess.run(
        argv, env=service_env(**env), capture_output=True, text=True, timeout=30, check=False
    )


def test_healthcheck_command_reports_grpc_health() -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert _run_healthcheck(EDGECOM_SERVER_PORT=str(port)).returncode == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        result = _run_healthcheck(EDGECOM_SERVER_PORT=str(port))
        assert (result.returncode, result.stderr) == (1, "edgecom: health check: NOT_SERVING\n")
    finally:
        server.stop(None)
    result = _run_healthcheck(EDGECOM_SERVER_PORT=str(free_port()))
    assert result.returncode == 1, "an unreachable server must count as unhealthy"
    assert "UNAVAILABLE" in result.stderr
    # Docker reserves exit code 2 of a health check; a bad configuration is unhealthy.
    result = _run_healthcheck(EDGECOM_SERVER_PORT="x")
    assert result.returncode == 1 and "EDGECOM_SERVER_PORT" in result.stderr, result.stderr


# --------------------------------------------------------------------------- Compose


def test_compose_dependencies_exist_and_wait_for_health() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert condition["condition"] == "service_healthy", (name, dependency)
            assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
            # A dependency must be active whenever its dependant is.
            assert set(services[dependency].get("profiles", [])) <= set(
                service.get("profiles", [])
            ), (name, dependency)
    for name in ("db", "db-demo"):
        assert "pg_isready" in _command(services[name]["healthcheck"]["test"])


def test_compose_edgecom_points_at_the_db_service() -> None:
    services = _compose()["services"]
    edgecom = services["edgecom"]
    env = _compose_environment(edgecom)
    db_env = _compose_environment(services["db"])
    assert env["EDGECOM_DATABASE_HOST"] == "db"
    assert env["EDGECOM_DATABASE_USER"] == db_env["POSTGRES_USER"]
    assert env["EDGECOM_DATABASE_PASSWORD"] == db_env["POSTGRES_PASSWORD"]
    assert env["EDGECOM_DATABASE_NAME"] == db_env["POSTGRES_DB"]
    assert env["EDGECOM_LOGGING_FORMAT"] == "json"
    assert edgecom["restart"] == "unless-stopped"
    assert edgecom["build"]["target"] == "runtime"
    assert edgecom["image"] == f"edgecom:{_project_version()}"
    assert edgecom["read_only"] is True
    demo = services["edgecom-demo"]
    assert demo["profiles"] == ["demo"] and "--demo" in demo["command"]
    assert _compose_environment(demo)["EDGECOM_DATABASE_HOST"] == "db-demo"
    host_ports = [_host_port(m) for s in ("edgecom", "edgecom-demo") for m in services[s]["ports"]]
    assert len(host_ports) == len(set(host_ports)), f"host ports clash: {host_ports}"


def test_compose_test_profile_runs_the_readme_test_command() -> None:
    tests = _compose()["services"]["tests"]
    assert tests["profiles"] == ["test"]
    assert "uv run pytest" in _command(tests["command"])
    assert tests["build"]["target"] in {stage.name for stage in _dockerfile_stages()}
    dsn = urlsplit(_compose_environment(tests)["EDGECOM_TEST_DSN"])
    assert dsn.scheme in ("postgresql", "postgres")
    assert (dsn.hostname, dsn.port) == ("db", 5432)


def test_database_image_is_a_pinned_timescaledb_everywhere() -> None:
    services = _compose()["services"]
    image = services["db"]["image"]
    assert re.fullmatch(r"timescale/timescaledb:2\.\d+\.\d+-pg\d+", image), image
    assert services["db-demo"]["image"] == image
    assert _container(_k8s("StatefulSet", "timescaledb"), "timescaledb")["image"] == image


def test_images_are_named_without_a_registry_host() -> None:
    for image in _image_references():
        first = image.split("/")[0]
        assert "/" not in image or not re.search(r"[.:]|^localhost$", first), image
    for path in (DOCKERFILE, COMPOSE_FILE):
        content = path.read_text()
        for setting in INDEX_SETTINGS:
            assert setting not in content, f"{path.name} names a package index ({setting})"


def test_compose_cli_accepts_the_file() -> None:
    compose = _compose_cli()
    if compose is None:
        pytest.skip("no Compose v2 CLI here (neither `docker compose` nor `docker-compose`)")
    profiles = ["--profile", "test", "--profile", "demo"]
    result = subprocess.run(
        [*compose, "--file", str(COMPOSE_FILE), *profiles, "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def docker_engine() -> Iterator[None]:
    """Skips unless a Docker engine answers; no test here ever starts one."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as error:
        pytest.skip(f"no reachable Docker engine: {error.__class__.__name__}")
    client.close()
    yield


@pytest.mark.slow
def test_compose_stack_answers_grpc(docker_engine: None) -> None:
    compose = _compose_cli()
    grpcurl = _tool("grpcurl")
    if compose is None or grpcurl is None:
        pytest.skip("needs a Compose v2 CLI and grpcurl next to the Docker engine")
    grpc_port, metrics_port = free_port(), free_port()
    env = {**os.environ, "HOST_GRPC_PORT": str(grpc_port), "HOST_METRICS_PORT": str(metrics_port)}
    project = f"edgecom-e2e-{uuid.uuid4().hex[:8]}"
    base = [*compose, "--file", str(COMPOSE_FILE), "--project-name", project]

    def run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )

    address = f"localhost:{grpc_port}"
    # --wait returns once db is healthy and edgecom's HEALTHCHECK reports SERVING.
    up_args = ["up", "--detach", "--build", "--wait", "--wait-timeout", "300", "db", "edgecom"]
    try:
        up = run([*base, *up_args], timeout=1800)
        if up.returncode != 0:
            logs = run([*base, "logs", "--no-color"], timeout=60).stdout
            pytest.fail(f"compose up failed:\n{up.stderr}\n{logs[-5000:]}")
        listing = run([grpcurl, "-plaintext", address, "list"], timeout=30)
        assert "edgecom.TimeSeriesService" in listing.stdout.split(), listing.stderr
        request = '{"service": "edgecom.TimeSeriesService"}'
        check_args = [grpcurl, "-plaintext", "-d", request, address, "grpc.health.v1.Health/Check"]
        check = run(check_args, timeout=30)
        assert '"SERVING"' in check.stdout, check.stdout + check.stderr
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
    finally:
        run([*base, "down", "--volumes", "--remove-orphans"], timeout=300)


# --------------------------------------------------------------------------- the service, deployed

# The name the README's Kubernetes steps put into the certificate: not 127.0.0.1 nor
# localhost, which the health check connects to.
SERVICE_DNS_NAME = "edgecom.edgecom.svc"


def _openssl(directory: Path, *args: str) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """self.crt/key: self-signed as in the README; mutual.crt/key: from ca.pem, server+client."""
    directory = tmp_path_factory.mktemp("tls")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    _openssl(
        directory, "req", "-x509", *key, "-keyout", "self.key", "-out", "self.crt",
        "-subj", "/CN=edgecom", "-addext", f"subjectAltName=DNS:{SERVICE_DNS_NAME}",
    )  # fmt: skip
    _openssl(
        directory, "req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem",
        "-subj", "/CN=edgecom test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    extensions = f"subjectAltName=DNS:{SERVICE_DNS_NAME}\nextendedKeyUsage=serverAuth,clientAuth\n"
    (directory / "mutual.ext").write_text(extensions)
    _openssl(
        directory, "req", "-new", *key[:5], "-keyout", "mutual.key", "-out", "mutual.csr",
        "-subj", "/CN=edgecom",
    )  # fmt: skip
    _openssl(
        directory, "x509", "-req", "-in", "mutual.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "mutual.ext", "-out", "mutual.crt",
    )  # fmt: skip
    return directory


def _tls_settings(certificates: Path, mode: str) -> dict[str, str]:
    if mode == "plaintext":
        return {}
    name = "self" if mode == "tls" else "mutual"
    env = {
        "EDGECOM_SERVER_TLS_CERT_FILE": str(certificates / f"{name}.crt"),
        "EDGECOM_SERVER_TLS_KEY_FILE": str(certificates / f"{name}.key"),
    }
    if mode == "mutual-tls":
        env["EDGECOM_SERVER_TLS_CLIENT_CA_FILE"] = str(certificates / "ca.pem")
    return env


@pytest.mark.parametrize("mode", ["plaintext", "tls", "mutual-tls"])
def test_healthcheck_asks_the_running_service_with_tls_off_and_on(
    start_service: Callable[..., ServiceProcess],
    certificates: Path,
    mode: str,
) -> None:
    port = str(free_port())
    settings = {**_tls_settings(certificates, mode), "EDGECOM_SERVER_PORT": port}
    service = start_service(**settings)

    def listening() -> bool:
        assert service.proc.poll() is None, service.log_text()
        return any(record["message"] == "serving" for record in service.records())

    assert wait_for(listening, timeout_s=START_TIMEOUT_S), service.log_text()
    # SERVING follows once the health watch has seen the database migrated.
    assert wait_for(lambda: _run_healthcheck(**settings).returncode == 0, timeout_s=30)
    # The other way of speaking fails: the check does use TLS when (and only when) it is on.
    other = "tls" if mode == "plaintext" else "plaintext"
    mismatched = _run_healthcheck(**_tls_settings(certificates, other), EDGECOM_SERVER_PORT=port)
    assert mismatched.returncode == 1, mismatched.stderr


def _other_local_address() -> str | None:
    """An IPv4 address of this machine besides loopback, or None when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            # Connecting a UDP socket sends nothing; it only picks the outgoing address.
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def _listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses that the kernel has a TCP socket listening on port at."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


def _reachable(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_metrics_listen_on_metrics_host_not_on_server_host(
    start_service: Callable[..., ServiceProcess],
) -> None:
    other = _other_local_address()
    # gRPC on every interface, as in a container; metrics.host left at its default.
    local_port, open_port = free_port(), free_port()
    local = start_service(
        "local", EDGECOM_SERVER_HOST="0.0.0.0", EDGECOM_METRICS_PORT=str(local_port)
    )
    scraped = start_service(
        "scraped", EDGECOM_METRICS_HOST="0.0.0.0", EDGECOM_METRICS_PORT=str(open_port)
    )
    for service in (local, scraped):
        service.wait_serving()
    assert _listening_addresses(local_port) == {"127.0.0.1"}
    assert _listening_addresses(open_port) == {"0.0.0.0"}
    assert _reachable("127.0.0.1", local_port)
    if other is not None:
        assert not _reachable(other, local_port), f"metrics answer on {other}"
        assert _reachable(other, open_port)


def test_tokens_file_adds_tokens_that_guard_the_api(
    start_service: Callable[..., ServiceProcess],
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotated monthly\n\n  from-file  \nsecond-from-file\n")
    service = start_service(EDGECOM_AUTH_TOKENS_FILE=str(tokens), EDGECOM_AUTH_TOKENS="from-env")
    service.wait_serving()
    stub = service.stub()
    query = request(T0, T0 + DAY)
    for token in ("from-file", "second-from-file", "from-env"):
        reply = stub.QueryTimeSeries(query, metadata=(("authorization", f"Bearer {token}"),))
        assert list(reply.data) == []
    for metadata in (None, (("authorization", "Bearer # rotated monthly"),)):
        code, _ = status_of(
            lambda metadata=metadata: stub.QueryTimeSeries(query, metadata=metadata)
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("content", [None, "", "# only a comment\n\n"])
def test_an_unreadable_or_empty_tokens_file_stops_start_up(
    tmp_path: Path, content: str | None, stopped_at_start_up: Callable[..., Any]
) -> None:
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    result = stopped_at_start_up(EDGECOM_AUTH_TOKENS_FILE=str(path))
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    if content is None:
        assert line == (
            f"edgecom: configuration error: auth.tokens_file: cannot read {path}: "
            "No such file or directory"
        )
    else:
        assert line.startswith(f"edgecom: configuration error: auth.tokens_file: {path} holds no")
