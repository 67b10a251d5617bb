"""The deployment files (deploy/, compose/fleet-trial.*): the Kubernetes manifest validates
offline against the Kubernetes schema (kubernetes-validate, strict: no unknown field), the
Swarm stack file says what the README says it does, and every knockgate configuration they
ship parses with knockgate's own loader (its ``password_file`` pointed at a real file: the
loader checks that it is readable, and /run/secrets exists only in the container)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.config import load_config
from appliance.config.initial import initial_config
from tests.integration.conftest import require

REPO = Path(__file__).resolve().parents[2]
DAEMONSET = REPO / "deploy" / "kubernetes" / "knockgate-daemonset.yaml"
STACK = REPO / "deploy" / "swarm" / "knockgate-stack.yml"
STACK_CONFIG = REPO / "deploy" / "swarm" / "knockgate.example.yaml"
TRIAL = REPO / "compose" / "fleet-trial.yml"
TRIAL_FLEET = REPO / "compose" / "fleet-trial.yaml"
SECRET_PATH = "/run/secrets/knockgate-redis-password"
PLACEHOLDER = "REPLACE-with-a-random-knock"
# The README's example sequences: a shipped deployment must never open with them.
README_KNOCKS = ("7113, 2231/udp, 9157", "9157, 2231/udp, 7113")
# The DaemonSet's capabilities (all others dropped): what the entrypoint and appliance use.
POD_CAPABILITIES = (
    "NET_ADMIN", "NET_RAW", "SETUID", "SETGID", "SETPCAP", "CHOWN", "FOWNER", "DAC_OVERRIDE",
    "KILL",
)  # fmt: skip
# The oldest Kubernetes the manifest is meant for, and the newest the validator knows.
OLDEST_KUBERNETES = "1.29.0"


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as module
    except ImportError:
        require(False, "kubernetes-validate is not installed (pip install -e '.[test]')")
    return module


def manifests() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(DAEMONSET.read_text()) if doc is not None]


def kind(name: str) -> dict[str, Any]:
    found = [doc for doc in manifests() if doc["kind"] == name]
    assert len(found) == 1, f"{name}: {len(found)} in {DAEMONSET}"
    return found[0]


def loads_as_knockgate(text: str, tmp_path: Path, name: str = "knockgate.yaml") -> Any:
    """``text`` parsed by knockgate's loader, the secret's path replaced by a real file and
    each knock placeholder by a sequence (as the user does before deploying)."""
    password = tmp_path / "redis-password"
    password.write_text("kg-" + "0" * 32 + "\n")
    assert SECRET_PATH in text
    path = tmp_path / name
    text = text.replace(SECRET_PATH, str(password))
    for n in range(text.count(PLACEHOLDER)):
        text = text.replace(PLACEHOLDER, f"{41001 + n}, {42001 + n}/udp, {43001 + n}", 1)
    path.write_text(text)
    return load_config(str(path)).config


def check_refuses(text: str, tmp_path: Path) -> str:
    """``knockgate check`` on ``text`` as shipped (only the secret's path made real): it must
    refuse, and says why."""
    password = tmp_path / "redis-password"
    password.write_text("kg-" + "0" * 32 + "\n")
    path = tmp_path / "shipped.yaml"
    path.write_text(text.replace(SECRET_PATH, str(password)))
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "check", str(path)],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


# ---------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_the_kubernetes_manifest_validates_strictly_against_the_schema(version: str) -> None:
    validator = kubernetes_validate()
    wanted = validator.latest_version() if version == "latest" else version
    kinds = []
    for doc in manifests():
        validator.validate(doc, wanted, strict=True)  # raises ValidationError
        kinds.append(doc["kind"])
    # No Secret: `kubectl apply` of this file again must never reset the Redis password.
    assert kinds == ["Namespace", "ConfigMap", "DaemonSet"]


def test_strict_validation_rejects_a_misspelled_field() -> None:
    """The validator is really strict: a typo in the pod spec does not pass silently."""
    validator = kubernetes_validate()
    daemonset = copy.deepcopy(kind("DaemonSet"))
    pod = daemonset["spec"]["template"]["spec"]
    pod["hostNetwrok"] = pod.pop("hostNetwork")
    with pytest.raises(validator.ValidationError):
        validator.validate(daemonset, validator.latest_version(), strict=True)


def test_the_daemonset_runs_on_the_host_network_with_every_capability_dropped_but_its_list() -> (
    None
):
    """The list is the one the pod-like ``docker run`` in tests/testbed/test_swarm_stack.py
    starts the appliance with (and without any one of them it does not come up)."""
    daemonset = kind("DaemonSet")
    assert daemonset["metadata"]["namespace"] == "knockgate"
    assert daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["securityContext"] == {
        "fsGroup": 64110,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["capabilities"]["drop"] == ["ALL"]
    assert sorted(context["capabilities"]["add"]) == sorted(POD_CAPABILITIES)
    assert context["runAsUser"] == 0
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert "privileged" not in context
    # No Docker socket by default (services are off on Kubernetes), state in a hostPath.
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"state": "/var/lib/knockgate"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/var/lib/knockgate"] == "state"
    assert not any("docker" in path for path in mounts)
    # Not measured: no limit the appliance could be OOM-killed at under a flood.
    assert "limits" not in container["resources"]


def test_the_namespace_admits_the_pods_under_pod_security_enforcement() -> None:
    labels = kind("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


def test_the_liveness_probe_asks_the_daemon_without_reading_the_config() -> None:
    (container,) = kind("DaemonSet")["spec"]["template"]["spec"]["containers"]
    command = container["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["sh", "-c"]
    assert command[2].startswith("knockgate status >/dev/null || ")  # no --config
    assert "--config" not in command[2]


def test_the_redis_password_and_ca_come_from_a_secret_the_user_creates() -> None:
    """Every key of the Secret is a file in /run/secrets (no ``items:`` that would leave the
    CA out): the key names are the files the config names."""
    pod = kind("DaemonSet")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "secret" in v)
    assert volume["secret"] == {"secretName": "knockgate-redis", "defaultMode": 0o440}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    assert mount["mountPath"] == "/run/secrets"
    text = kind("ConfigMap")["data"]["knockgate.yaml"]
    config = yaml.safe_load(text)
    assert config["fleet"]["password_file"] == SECRET_PATH
    assert "tls: {ca: /run/secrets/knockgate-redis-ca.pem}" in text
    header = DAEMONSET.read_text()
    assert "--from-file=knockgate-redis-password=" in header
    assert "--from-file=knockgate-redis-ca.pem=" in header
    assert "rollout restart ds/knockgate" in header


def test_the_configmaps_knockgate_config_parses_with_knockgates_loader(tmp_path: Path) -> None:
    config = loads_as_knockgate(kind("ConfigMap")["data"]["knockgate.yaml"], tmp_path)
    fleet = config.settings.fleet
    assert fleet is not None and fleet.name == "k8s" and fleet.redis.startswith("rediss://")
    assert not any(door.service for door in config.doors)  # no Docker socket on Kubernetes


# ---------------------------------------------------------------------------- Swarm


def test_the_swarm_stack_is_global_on_the_host_network_with_capabilities() -> None:
    stack = yaml.safe_load(STACK.read_text())
    assert stack["networks"]["hostnet"] == {"external": True, "name": "host"}
    knockgate = stack["services"]["knockgate"]
    assert knockgate["networks"] == ["hostnet"]
    assert knockgate["cap_add"] == ["NET_ADMIN", "NET_RAW"]
    assert knockgate["deploy"]["mode"] == "global"
    assert knockgate["deploy"]["update_config"]["order"] == "stop-first"
    assert knockgate["read_only"] is True
    targets = {s["target"] for s in knockgate["secrets"]}
    assert {f"/run/secrets/{t}" for t in targets} == {SECRET_PATH}
    assert {c["target"] for c in knockgate["configs"]} == {"/etc/knockgate/knockgate.yaml"}
    redis = stack["services"]["redis"]
    assert redis["networks"] == ["hostnet"]
    # Plain TCP: loopback only, not a variable (the image refuses anything else too).
    assert redis["environment"]["KNOCKGATE_REDIS_BIND"] == "127.0.0.1"
    # Its data stays on one labelled node, not on whichever manager the task lands on.
    assert redis["deploy"]["placement"]["constraints"] == ["node.labels.knockgate-redis == true"]


def test_the_swarm_config_parses_with_knockgates_loader(tmp_path: Path) -> None:
    config = loads_as_knockgate(STACK_CONFIG.read_text(), tmp_path)
    fleet = config.settings.fleet
    assert fleet is not None
    stack = yaml.safe_load(STACK.read_text())
    # The stack's Redis ACL covers the config's fleet (kg:{NAME}:*) by default.
    assert stack["services"]["redis"]["environment"]["KNOCKGATE_FLEET"] == (
        f"${{KNOCKGATE_FLEET:-{fleet.name}}}"
    )
    assert fleet.redis == "redis://knockgate@127.0.0.1:6379/0"


# ---------------------------------------------------------------------------- shipped knocks


@pytest.mark.parametrize("where", ["swarm", "kubernetes"])
def test_a_shipped_config_has_no_knock_and_knockgate_check_says_so(
    where: str, tmp_path: Path
) -> None:
    """Deployed unedited, the README's example knock would open every node to whoever read
    the README: the shipped configs hold a placeholder that ``knockgate check`` refuses (the
    appliance then waits for a valid config and opens nothing)."""
    if where == "swarm":
        text = STACK_CONFIG.read_text()
    else:
        text = kind("ConfigMap")["data"]["knockgate.yaml"]
    for knock in README_KNOCKS:
        assert knock not in text
    doors = yaml.safe_load(text)["doors"]
    assert all(door["knock"]["sequence"] == [PLACEHOLDER] for door in doors.values())
    said = check_refuses(text, tmp_path)
    assert f"doors.ssh.knock.sequence: '{PLACEHOLDER}' is not a port" in said, said


def test_no_deployment_file_ships_the_readmes_example_knock() -> None:
    shipped = [*(REPO / "deploy").rglob("*.y*ml"), *(REPO / "compose").rglob("*.y*ml")]
    assert STACK_CONFIG in shipped and DAEMONSET in shipped
    for path in shipped:
        text = path.read_text()
        for knock in README_KNOCKS:
            assert knock not in text, path


def test_the_swarm_config_users_fill_in_is_ignored_by_git() -> None:
    """The stack reads ./knockgate.yaml (the user's copy, with the knock): never tracked."""
    stack = yaml.safe_load(STACK.read_text())
    assert (
        stack["configs"]["knockgate-config"]["file"] == "${KNOCKGATE_CONFIG_FILE:-./knockgate.yaml}"
    )
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "deploy/swarm/knockgate.yaml"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0


def test_the_readmes_fleet_recipes_leave_no_knock_or_password_in_the_working_directory() -> None:
    """The live config (the knock) goes through a mktemp file removed at once, never a
    world-readable ./knockgate.yaml; password files are made by you only (umask, install)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running a fleet") : readme.index("## Coming from knockd")]
    assert "> knockgate.yaml" not in section
    assert "config=$(mktemp)" in section and 'rm -f "$config"' in section
    for line in section.splitlines():
        if "openssl rand" in line and ">" in line:
            assert "umask 077" in line or "install -m 0640" in section, line


# ---------------------------------------------------------------------------- Compose trial


def test_the_trials_fleet_block_added_to_a_first_config_parses(tmp_path: Path) -> None:
    """What the README has a trial user do: the appliance's first config plus the block."""
    text = initial_config(str(tmp_path / "ssh-keys")) + "\n" + TRIAL_FLEET.read_text()
    config = loads_as_knockgate(text, tmp_path)
    fleet = config.settings.fleet
    assert fleet is not None and fleet.name == "trial"
    trial = yaml.safe_load(TRIAL.read_text())
    redis = trial["services"]["redis"]
    assert redis["environment"]["KNOCKGATE_FLEET"] == fleet.name
    assert redis["environment"]["KNOCKGATE_REDIS_BIND"] == "127.0.0.1"
    assert (
        fleet.redis
        == f"redis://knockgate@127.0.0.1:{redis['environment']['KNOCKGATE_REDIS_PORT']}/0"
    )
    assert trial["services"]["knockgate"]["secrets"] == ["knockgate-redis-password"]
