"""Deployment files: Compose (validated against the Compose specification), the
Dockerfile (same install steps as the Makefile, a healthcheck that works), the systemd
unit and the sendmail wrapper.  No Docker engine is available here, so what can be run
for real (the healthcheck command, the wrapper, systemd-analyze) is run for real."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import require_tool
from tests.relayproc import RelayProcess

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    steps = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            steps.append((instruction.upper(), " ".join(args.split())))
    return steps


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def compose_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    # The schema declares draft 2019-09 (with a non-canonical URI); say so explicitly.
    validator = jsonschema.Draft201909Validator(schema)
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_is_valid_per_the_compose_specification() -> None:
    jsonschema.Draft201909Validator.check_schema(json.loads(SCHEMA.read_text()))
    assert compose_errors(compose()) == []


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d["services"]["esprelay"].update(ports={"smtp": 2525}), id="ports"),
        pytest.param(lambda d: d["services"]["esprelay"].update(restart_policy="x"), id="unknown"),
        pytest.param(lambda d: d["services"]["postgres"].update(profiles="postgres"), id="profile"),
    ],
)
def test_schema_catches_mistakes(mutate: Any) -> None:
    broken = copy.deepcopy(compose())
    mutate(broken)
    assert compose_errors(broken)


def test_compose_services() -> None:
    services = compose()["services"]
    relay = services["esprelay"]
    assert relay["env_file"] == ".env"
    # What is published and where: tests/test_deploy_files.py.
    assert "127.0.0.1:8025:8025" in relay["ports"]  # admin/metrics only on the host's loopback
    assert relay["environment"]["ESPRELAY_SMTP_HOST"] == "0.0.0.0"
    volume = dict(step for step in dockerfile() if step[0] == "VOLUME")["VOLUME"]
    assert f"esprelay-data:{json.loads(volume)[0]}" in relay["volumes"]
    assert relay["stop_signal"] == "SIGTERM"
    assert services["postgres"]["profiles"] == ["postgres"]
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert set(compose()["volumes"]) == {"esprelay-data", "postgres-data"}


def test_dockerfile_shape() -> None:
    steps = dockerfile()
    # The base image is a build argument (tests/test_container.py builds on a Debian one).
    assert steps[:2] == [("ARG", "BASE_IMAGE=python:3.11-slim"), ("FROM", "${BASE_IMAGE}")]
    users = [args for instruction, args in steps if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    instructions = dict(steps)
    assert json.loads(instructions["VOLUME"]) == ["/var/lib/esprelay"]
    entrypoint = json.loads(instructions["ENTRYPOINT"])  # exec form: a JSON array
    assert entrypoint == ["/opt/esprelay/bin/esprelay"]
    assert json.loads(instructions["CMD"]) == ["serve"]
    env = " ".join(args for instruction, args in steps if instruction == "ENV")
    assert "ESPRELAY_SMTP_HOST=0.0.0.0" in env
    assert "ESPRELAY_SPOOL_URL=sqlite:////var/lib/esprelay/spool.db" in env
    assert instructions["HEALTHCHECK"].split(" CMD ")[1].startswith('["python", "-c"')
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv/" in ignored and ".env" in ignored  # no secrets, no host venv in the image


def _pip_steps(commands: list[str], python: str, target: str) -> list[str]:
    steps = []
    for command in commands:
        words = shlex.split(command)
        if "pip" in words and "install" in words:
            words = ["{python}" if w == python else w for w in words]
            words = ["{target}" if w == target else w for w in words]
            steps.append(" ".join(words))
    return steps


def test_dockerfile_installs_like_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^\$\(VENV\)/\.installed:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe is not None
    make_steps = _pip_steps(recipe.group(1).splitlines(), "$(BIN)/python", ".[dev]")
    run = " && ".join(args for instruction, args in dockerfile() if instruction == "RUN")
    docker_steps = _pip_steps(run.split("&&"), "/opt/esprelay/bin/python", ".")
    # Editable and dev extras differ on purpose (an image wants neither); nothing else may.
    make_steps = [s.replace("-e {target}", "{target}") for s in make_steps]
    assert make_steps == docker_steps
    assert len(make_steps) == 2


def _healthcheck_code(command: list[str]) -> str:
    assert command[:2] == ["python", "-c"] or command[1:3] == ["python", "-c"]
    return command[-1]


def test_healthcheck_commands_probe_healthz(relay: RelayProcess) -> None:
    docker_cmd = json.loads(dict(dockerfile())["HEALTHCHECK"].split(" CMD ", 1)[1])
    compose_cmd = compose()["services"]["esprelay"]["healthcheck"]["test"]
    env = {**os.environ, "ESPRELAY_HTTP_PORT": str(relay.http_port)}
    for code in (
        _healthcheck_code(docker_cmd),
        _healthcheck_code(compose_cmd).replace(":8025/", f":{relay.http_port}/"),
    ):
        ok = subprocess.run([sys.executable, "-c", code], env=env, timeout=30, check=False)
        assert ok.returncode == 0
    relay.stop()
    down = subprocess.run(
        [sys.executable, "-c", _healthcheck_code(docker_cmd)],
        env=env,
        timeout=30,
        check=False,
        capture_output=True,
    )
    assert down.returncode != 0


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = (ROOT / "contrib" / "systemd" / "esprelay.service").read_text()
    assert "ExecStart=/opt/esprelay/bin/esprelay serve" in unit  # the Dockerfile's venv path
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    # systemd-analyze wants the binary to exist: point it at this checkout's.
    script = Path(sys.executable).parent / "esprelay"
    local = tmp_path / "esprelay.service"
    local.write_text(unit.replace("/opt/esprelay/bin/esprelay", str(script)))
    result = subprocess.run(
        [analyze, "verify", str(local)], capture_output=True, text=True, timeout=60, check=False
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "esprelay.service" in line
    ]
    assert result.returncode == 0 or not problems, result.stdout + result.stderr
    assert not problems, problems


def test_sendmail_wrapper_submits_to_the_bridge(relay: RelayProcess, tmp_path: Path) -> None:
    wrapper = ROOT / "contrib" / "sendmail" / "esprelay-sendmail"
    assert os.access(wrapper, os.X_OK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
    env.update(
        ESPRELAY_SMTP_PORT=str(relay.port),
        ESPRELAY_BIN=str(Path(sys.executable).parent / "esprelay"),
    )
    result = subprocess.run(
        [str(wrapper), "-t", "-i"],
        input=b"To: ops@example.org\nSubject: from the wrapper\n\nhello\n",
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [message_id] = relay.wait_delivered(1)
    assert b"from the wrapper" in (relay.outbox / f"{message_id}.eml").read_bytes()
