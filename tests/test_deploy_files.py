"""The Compose file and the Kubernetes manifest against esprelay's own settings.

What each publishes must be what esprelay listens on with the settings it gives it (read
by ``esprelay.config``, as ``serve`` reads them); who may send must be AUTH users, the
pod or host itself, or an explicitly named address range, never everyone; and each must
give a stop at least as long as the drain can take. The manifest is validated against
the Kubernetes JSON schemas (the ``kubernetes-validate`` package ships them, so this runs
offline)."""

from __future__ import annotations

import copy
import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from esprelay.config import Settings, load_settings
from esprelay.smtp.policy import parse_networks
from tests.test_ops_deploy import compose, dockerfile

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "contrib" / "k8s" / "esprelay.yaml"
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
# The oldest Kubernetes release still common in production, and the newest schema shipped.
K8S_VERSIONS = ("1.28", kubernetes_validate.utils.latest_version())

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def drain_bound(settings: Settings) -> float:
    """The longest a graceful stop can take (esprelay.app.Relay.shutdown): sessions under
    way get ESPRELAY_SHUTDOWN_GRACE, deliveries in flight get it again, failure notices
    under way once more; closing the listener (2 s), the ops server (2 s) and a
    PostgreSQL pool (5 s) add at most 10 s. (With PostgreSQL unreachable, handing the
    leases back can wait for its timeouts; a SIGKILL then loses nothing either: the
    leases expire.)"""
    return 3 * settings.shutdown_grace + 10


def image_env() -> dict[str, str]:
    """The ENV the Dockerfile sets (KEY=value pairs)."""
    env: dict[str, str] = {}
    for instruction, args in dockerfile():
        if instruction == "ENV":
            for pair in args.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return {k: v for k, v in env.items() if k.startswith("ESPRELAY_")}


def settings_from(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """esprelay's settings for exactly this environment (no .env, nothing inherited)."""
    for key in list(os.environ):
        if key.startswith("ESPRELAY_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings(env_file=None)


def listening_ports(settings: Settings) -> set[int]:
    """The TCP ports ``esprelay serve`` opens with these settings (esprelay.listeners,
    esprelay.ops): SMTP, SMTPS only with a certificate, and the ops HTTP port."""
    ports = {settings.smtp_port, settings.http_port}
    if settings.smtps_port is not None and settings.tls_cert_file is not None:
        ports.add(settings.smtps_port)
    return ports


def interpolate(value: Any) -> str:
    """Compose's ${VAR:-default} with nothing set: the default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


def seconds(duration: str) -> float:
    """A Compose duration (75s, 1m30s)."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def within(network: Network, ranges: list[Network]) -> bool:
    return any(
        network.version == r.version and network.subnet_of(r)  # type: ignore[arg-type]
        for r in ranges
    )


def assert_not_open(trusted: tuple[Network, ...]) -> None:
    for network in trusted:
        assert network.prefixlen > 0, f"{network} trusts everyone"


# --- Compose ---------------------------------------------------------------------------


def compose_relay() -> dict[str, Any]:
    relay = compose()["services"]["esprelay"]
    assert isinstance(relay, dict)
    return relay


def compose_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    env = {**image_env(), **{k: interpolate(v) for k, v in compose_relay()["environment"].items()}}
    return settings_from(env, monkeypatch)


def published(relay: dict[str, Any]) -> Iterator[tuple[str, int, int]]:
    """(host address, host port, container port) of each short-syntax mapping."""
    for mapping in relay["ports"]:
        host_ip, host_port, container_port = str(mapping).split(":")
        yield host_ip, int(host_port), int(container_port.split("/")[0])


def test_compose_publishes_the_ports_esprelay_listens_on(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = compose_settings(monkeypatch)
    relay = compose_relay()
    assert {port for _, _, port in published(relay)} == listening_ports(settings)
    # On the host's loopback: nothing reaches the bridge from other hosts by default.
    assert {host_ip for host_ip, _, _ in published(relay)} == {"127.0.0.1"}
    # The image announces the same ports, for its own defaults.
    exposed = {int(p) for i, a in dockerfile() if i == "EXPOSE" for p in a.split()}
    assert exposed == listening_ports(settings_from(image_env(), monkeypatch))


def test_compose_trusts_exactly_its_named_container_range(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = compose_settings(monkeypatch)
    trusted = parse_networks(settings.trusted_networks)
    assert_not_open(trusted)
    relay_networks = compose_relay()["networks"]
    assert relay_networks == ["esprelay"]
    [ipam] = compose()["networks"]["esprelay"]["ipam"]["config"]
    subnet = ipaddress.ip_network(ipam["subnet"])
    containers = ipaddress.ip_network(ipam["ip_range"])
    gateway = ipaddress.ip_address(ipam["gateway"])
    assert containers.subnet_of(subnet)  # type: ignore[arg-type]
    # Trusted: loopback and the containers' range, which leaves out the gateway that
    # published ports arrive through (so publishing the port wider opens no relay).
    assert containers in trusted
    for network in trusted:
        assert within(network, [*LOOPBACK, containers]), network
        assert gateway not in network
    # AUTH without TLS: the network's own subnet only.
    plaintext = parse_networks(settings.plaintext_auth_networks)
    assert plaintext and all(within(n, [subnet]) for n in plaintext)


def test_compose_takes_credentials_from_the_env_file() -> None:
    relay = compose_relay()
    assert relay["env_file"] == ".env"
    environment = relay["environment"]
    # The secrets stay in .env: the Compose file names none of them.
    assert not {"ESPRELAY_AUTH_PASSWORD", "ESPRELAY_ADMIN_TOKEN"} & set(environment)
    env_example = (ROOT / ".env.example").read_text()
    assert "ESPRELAY_AUTH_USER=" in env_example and "ESPRELAY_AUTH_PASSWORD=" in env_example


def test_compose_stop_grace_covers_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = compose_settings(monkeypatch)
    relay = compose_relay()
    assert relay["stop_signal"] == "SIGTERM"
    assert seconds(relay["stop_grace_period"]) >= drain_bound(settings)


def test_compose_binds_no_privileged_port_and_needs_no_sysctl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert min(listening_ports(compose_settings(monkeypatch))) >= 1024
    assert "sysctls" not in compose_relay()


# --- Kubernetes ------------------------------------------------------------------------


def manifest() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def resource(kind: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    [found] = [doc for doc in (docs or manifest()) if doc["kind"] == kind]
    return found


def schema_errors(doc: dict[str, Any]) -> list[str]:
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            errors.append(f"{doc['kind']} (Kubernetes {version}) {where}: {exc.message}")
    return errors


def test_manifest_is_valid_per_the_kubernetes_schema() -> None:
    docs = manifest()
    assert {doc["kind"] for doc in docs} == {
        "Secret",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }
    # An unknown kind or apiVersion raises SchemaNotFoundError: that fails the test too.
    assert [error for doc in docs for error in schema_errors(doc)] == []


def _pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec = resource("Deployment", docs)["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: _pod(d).update(terminationGracePeriod=75), id="unknown-field"),
        pytest.param(
            lambda d: _pod(d)["containers"][0]["ports"][0].update(containerPort="smtp"),
            id="wrong-type",
        ),
        pytest.param(
            lambda d: _pod(d)["securityContext"].update(seccompProfile={"localhost": "x"}),
            id="missing-required",
        ),
    ],
)
def test_schema_validation_catches_mistakes(mutate: Any) -> None:
    docs = copy.deepcopy(manifest())
    mutate(docs)
    assert schema_errors(resource("Deployment", docs))


def k8s_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The container's settings: the image's ENV, then the ConfigMap and the Secret."""
    env = {**image_env(), **resource("ConfigMap")["data"], **resource("Secret")["stringData"]}
    return settings_from({k: str(v) for k, v in env.items()}, monkeypatch)


def test_manifest_runs_what_listens_and_probes_the_right_endpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = k8s_settings(monkeypatch)
    pod = _pod(manifest())
    [container] = pod["containers"]
    assert {p["configMapRef"]["name"] for p in container["envFrom"] if "configMapRef" in p} == {
        resource("ConfigMap")["metadata"]["name"]
    }
    assert {p["secretRef"]["name"] for p in container["envFrom"] if "secretRef" in p} == {
        resource("Secret")["metadata"]["name"]
    }
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports.values()) == listening_ports(settings)
    assert ports["smtp"] == settings.smtp_port
    assert ports["ops"] == settings.http_port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    service = resource("Service")["spec"]
    assert [p["targetPort"] for p in service["ports"]] == ["smtp"]


def test_manifest_security(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = k8s_settings(monkeypatch)
    pod = _pod(manifest())
    [container] = pod["containers"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = re.search(r"useradd .*--uid (\d+)", " ".join(a for _, a in dockerfile()))
    assert uid is not None and pod["securityContext"]["runAsUser"] == int(uid.group(1))
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # The read-only root leaves the spool directory and /tmp writable.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/var/lib/esprelay", "/tmp"} <= mounts
    # Who may send: the pod itself without AUTH, everyone else with the Secret's login.
    trusted = parse_networks(settings.trusted_networks)
    assert_not_open(trusted)
    assert all(within(n, LOOPBACK) for n in trusted)
    assert settings.auth_user and settings.auth_password is not None
    assert {"ESPRELAY_AUTH_USER", "ESPRELAY_AUTH_PASSWORD"} <= set(resource("Secret")["stringData"])
    assert not {"ESPRELAY_AUTH_PASSWORD", "ESPRELAY_POSTMARK_SERVER_TOKEN"} & set(
        resource("ConfigMap")["data"]
    )
    assert_not_open(parse_networks(settings.plaintext_auth_networks))


def test_manifest_termination_grace_covers_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = k8s_settings(monkeypatch)
    pod = _pod(manifest())
    assert pod["terminationGracePeriodSeconds"] >= drain_bound(settings)
