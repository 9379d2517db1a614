"""The image, built and run for real.

No image registry is reachable here, Debian's packages are: a Debian bookworm base with
Python is made with debootstrap and imported into podman (once: it is kept in podman's
image store under a tag naming a hash of what it holds), the repository's Dockerfile is
built on it (``BASE_IMAGE``), and the container is run as Compose runs it: SMTP AUTH
with the credentials of an env file, a read-only root, no capabilities. A message sent
through it with smtplib must reach a fake ESP on loopback; ``podman stop`` must end it
gracefully within the Compose stop grace.

podman runs with runc (crun fails on this kernel's hybrid cgroups and on raising
rlimits) and host networking (nothing here sets up container networks). Skipped only
where the kernel refuses containers, or without root to run debootstrap; under CI=true
it fails instead.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from esprelay.testing.fakeesp import FakeESP
from tests.conftest import IN_CI, require_tool
from tests.providers.test_postmark import TOKEN, PostmarkAPI, relay_env
from tests.test_deploy_files import interpolate, seconds
from tests.test_ops_deploy import compose

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
# What the Dockerfile needs of a base: Python 3.11 with its venv module (pip comes from
# ensurepip), groupadd/useradd (in minbase), and CA certificates for the ESPs' APIs.
PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Bump when the way the base is made changes: a new tag, so a new base.
RECIPE = 1
MIRROR = os.environ.get("ESPRELAY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Each step is bounded: a wedged download or build fails the test, never hangs CI.
DEBOOTSTRAP_TIMEOUT = 1200
BUILD_TIMEOUT = 1200
START_TIMEOUT = 120
STEP_TIMEOUT = 120
# The same rlimits for every run: podman's defaults ask for more than this kernel grants.
RUN_LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000")
#: On the host's network, as the Kubernetes manifest runs it: read-only root, no
#: capabilities, no new privileges.
HARDENED = (
    "--network",
    "host",
    "--read-only",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
)


def cannot(reason: str) -> None:
    """Skip for ``reason``; under CI=true fail: there the container must be built."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def base_tag() -> str:
    recipe = json.dumps(
        {"suite": SUITE, "variant": "minbase", "packages": PACKAGES, "recipe": RECIPE},
        sort_keys=True,
    )
    return f"localhost/esprelay-base:{SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def run(
    command: list[str], *, timeout: float, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` to its end, at most ``timeout`` seconds; fail the test if it
    fails (unless ``check`` is false) or takes longer."""
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(command)} did not finish within {timeout:.0f} s")
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


@pytest.fixture(scope="module")
def podman() -> list[str]:
    """The podman command line to use, after checking that containers can run here."""
    for tool in ("podman", "debootstrap", "runc", "unshare", "tar"):
        require_tool(tool)
    if os.geteuid() != 0:
        cannot("building the Debian base with debootstrap needs root")
    # What a container needs of the kernel: its own mount, UTS, IPC, network and PID
    # namespaces. A kernel or sandbox that refuses them refuses every container.
    probe = run(
        ["unshare", "--mount", "--uts", "--ipc", "--net", "--pid", "--fork", "true"],
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        cannot(f"the kernel refuses container namespaces: {probe.stderr.strip()}")
    return [require_tool("podman"), "--runtime", require_tool("runc")]


def ensure_base(podman: list[str]) -> str:
    """The Debian base image: from podman's store, or made now with debootstrap."""
    tag = base_tag()
    if run([*podman, "image", "exists", tag], timeout=STEP_TIMEOUT, check=False).returncode == 0:
        return tag
    # One maker at a time on this machine; whoever waited finds it made.
    with open(os.path.join(tempfile.gettempdir(), "esprelay-base.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        exists = run([*podman, "image", "exists", tag], timeout=STEP_TIMEOUT, check=False)
        if exists.returncode == 0:
            return tag
        with tempfile.TemporaryDirectory(
            dir="/var/tmp", prefix="esprelay-base-", ignore_cleanup_errors=True
        ) as scratch:
            root = Path(scratch) / "root"
            run(
                [
                    require_tool("debootstrap"),
                    "--variant=minbase",
                    f"--include={','.join(PACKAGES)}",
                    SUITE,
                    str(root),
                    MIRROR,
                ],
                timeout=DEBOOTSTRAP_TIMEOUT,
            )
            # Downloaded packages and package lists: 100 MB the image does not need.
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for item in (root / cache).glob("*"):
                    if item.is_file():
                        item.unlink()
            with subprocess.Popen(
                ["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE
            ) as tar:
                run(
                    [*podman, "import", "--change", 'CMD ["/bin/bash"]', "-", tag],
                    stdin=tar.stdout,
                    timeout=BUILD_TIMEOUT,
                )
            assert tar.returncode == 0
    return tag


def pip_settings() -> dict[str, str]:
    """This machine's pip configuration (``pip config list``): files, then PIP_* variables."""
    listed = run([sys.executable, "-m", "pip", "config", "list"], timeout=STEP_TIMEOUT).stdout
    from_files: dict[str, str] = {}
    from_env: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        target = from_env if section == ":env:" else from_files
        target[name] = value.strip().strip("'\"")
    return {**from_files, **from_env}


def pip_build_config(directory: Path) -> Path:
    """A pip configuration for the build's ``RUN pip install``, mounted at /etc/xdg/pip
    (pip's site-wide configuration directory) for the build only, never in the image.

    It carries what the build needs of this machine's: its CA bundle (which trusts any
    TLS-inspecting proxy on the way to the index), the indexes reachable over the network
    and the timeouts. Local paths (find-links, file:// indexes, constraints) are left
    out: the build cannot see them."""
    directory.mkdir()
    settings = pip_settings()
    lines = ["[global]"]
    cert = settings.get("cert") or os.environ.get("SSL_CERT_FILE")
    if cert and Path(cert).is_file():
        shutil.copyfile(cert, directory / "ca.crt")
        lines.append("cert = /etc/xdg/pip/ca.crt")
    for name in ("index-url", "extra-index-url"):
        urls = [u for u in settings.get(name, "").split() if u.startswith(("http:", "https:"))]
        if urls:
            lines.append(f"{name} = {' '.join(urls)}")
    for name in ("trusted-host", "default-timeout", "timeout", "retries", "proxy"):
        if settings.get(name):
            lines.append(f"{name} = {settings[name]}")
    (directory / "pip.conf").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture(scope="module")
def image(podman: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The repository's Dockerfile built on the Debian base: its image ID."""
    base = ensure_base(podman)
    work = tmp_path_factory.mktemp("build")
    pip_dir = pip_build_config(work / "pip")
    iidfile = work / "iid"
    run(
        [
            *podman,
            "build",
            "--pull=never",
            "--format",
            "docker",  # keeps the HEALTHCHECK
            "--network",
            "host",  # pip needs the index
            "--build-arg",
            f"BASE_IMAGE={base}",
            "--volume",
            f"{pip_dir}:/etc/xdg/pip:ro",
            "--iidfile",
            str(iidfile),
            "--tag",
            "localhost/esprelay:test",
            str(ROOT),
        ],
        timeout=BUILD_TIMEOUT,
    )
    return iidfile.read_text().strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def container(podman: list[str], image: str, args: list[str]) -> Iterator[str]:
    name = f"esprelay-test-{uuid.uuid4().hex[:12]}"
    run([*podman, "run", "--detach", "--name", name, *RUN_LIMITS, *args, image], timeout=60)
    try:
        yield name
    finally:
        run([*podman, "rm", "--force", "--volumes", name], timeout=STEP_TIMEOUT, check=False)


def wait_ready(podman: list[str], name: str, http_port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        state = run([*podman, "inspect", "--format", "{{.State.Running}}", name], timeout=60)
        if state.stdout.strip() != "true":
            break
        time.sleep(0.5)
    logs = run([*podman, "logs", name], timeout=60, check=False)
    pytest.fail(f"the container did not become ready:\n{logs.stdout}\n{logs.stderr}")


def compose_environment() -> dict[str, str]:
    environment = compose()["services"]["esprelay"]["environment"]
    return {key: interpolate(value) for key, value in environment.items()}


def test_image_built_on_debian_relays_a_message_with_auth(
    podman: list[str], image: str, tmp_path: Path
) -> None:
    smtp_port, http_port = free_port(), free_port()
    user, password = "app", secrets.token_urlsafe(18)
    with FakeESP(PostmarkAPI()) as esp:
        # The env file Compose reads (.env): the provider, its key, the AUTH login.
        env_file = tmp_path / "esprelay.env"
        settings = {
            **relay_env(esp),
            "ESPRELAY_AUTH_USER": user,
            "ESPRELAY_AUTH_PASSWORD": password,
        }
        env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        # Compose's own settings, with what differs under host networking: the bridge
        # listens on loopback only, on free ports, and the client arrives from loopback
        # rather than through the network's gateway, so loopback stands in for the
        # network in ESPRELAY_PLAINTEXT_AUTH_NETWORKS and is not trusted: AUTH is needed.
        composed = compose_environment()
        trusted = composed["ESPRELAY_TRUSTED_NETWORKS"].split(",")
        environment = {
            **composed,
            "ESPRELAY_SMTP_HOST": "127.0.0.1",
            "ESPRELAY_SMTP_PORT": str(smtp_port),
            "ESPRELAY_HTTP_HOST": "127.0.0.1",
            "ESPRELAY_HTTP_PORT": str(http_port),
            "ESPRELAY_TRUSTED_NETWORKS": ",".join(
                n for n in trusted if not n.startswith(("127.", "::1"))
            ),
            "ESPRELAY_PLAINTEXT_AUTH_NETWORKS": "127.0.0.0/8",
        }
        args = [
            *HARDENED,
            "--env-file",
            str(env_file),
        ]
        for key, value in environment.items():
            args += ["--env", f"{key}={value}"]
        with container(podman, image, args) as name:
            wait_ready(podman, name, http_port)
            uid = run([*podman, "exec", name, "id", "-u"], timeout=STEP_TIMEOUT)
            assert uid.stdout.strip() == "10001"
            assert run([*podman, "healthcheck", "run", name], timeout=STEP_TIMEOUT).returncode == 0
            # The README's first check, in the running container (SMTP egress probed on
            # loopback here: tests reach no other host).
            probe = ["--smtp-probe-host", "127.0.0.1", "--timeout", "5"]
            doctor = run(
                [*podman, "exec", name, "esprelay", "doctor", "--json", *probe],
                timeout=STEP_TIMEOUT,
                check=False,
            )
            assert doctor.stdout.startswith("{"), doctor.stderr[-3000:]
            checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
            assert checks["configuration"]["status"] == "pass", checks
            assert checks["spool"]["status"] == "pass", checks
            probes = len(esp.requests)  # doctor's credential check (GET /server)

            message = EmailMessage()
            message["From"] = "app@example.com"
            message["To"] = "customer@example.org"
            message["Subject"] = "through the container"
            message.set_content("hello from a container\n")
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
                smtp.ehlo("client.test")
                assert smtp.mail("app@example.com")[0] == 530  # no AUTH, not trusted
                smtp.rset()
                smtp.login(user, password)
                smtp.send_message(message)
            esp.wait_for(probes + 1, timeout=60)
            [request] = [r for r in esp.requests if (r.method, r.path) == ("POST", "/email")]

            grace = seconds(compose()["services"]["esprelay"]["stop_grace_period"])
            run([*podman, "stop", "--time", str(int(grace)), name], timeout=grace + 60)
            state = run([*podman, "inspect", "--format", "{{.State.ExitCode}}", name], timeout=60)
            logs = run([*podman, "logs", name], timeout=60)
    payload = request.json()
    assert request.headers["x-postmark-server-token"] == TOKEN
    assert payload["Subject"] == "through the container"
    assert payload["To"] == "customer@example.org"
    assert "hello from a container" in payload["TextBody"]
    output = logs.stdout + logs.stderr
    # SIGTERM reached esprelay as PID 1 and it drained: exit 0, not 137 (SIGKILL).
    assert state.stdout.strip() == "0", output
    assert "stopped" in output
    assert password not in output


# A 25 MB attachment is ~34 MB of message once base64-encoded: within this limit.
LARGE_LIMIT = "40M"
MEMORY_LIMIT = 256 * 1024 * 1024


def test_a_container_limited_to_256_mb_takes_a_25_mb_attachment(
    podman: list[str], image: str, tmp_path: Path
) -> None:
    """The message arrives into a file (esprelay.spill), not into memory: the container,
    limited to 256 MB with no swap, accepts it and delivers it byte for byte (the outbox
    provider, on a volume), and is not killed for memory."""
    smtp_port, http_port = free_port(), free_port()
    volume = tmp_path / "esprelay"
    volume.mkdir()
    os.chown(volume, 10001, 10001)
    args = [
        *HARDENED,
        "--memory",
        str(MEMORY_LIMIT),
        "--memory-swap",
        str(MEMORY_LIMIT),
        "--volume",
        f"{volume}:/var/lib/esprelay",
        "--env",
        "ESPRELAY_PROVIDER=outbox",
        "--env",
        f"ESPRELAY_MAX_MESSAGE_SIZE={LARGE_LIMIT}",
        "--env",
        "ESPRELAY_SMTP_HOST=127.0.0.1",
        "--env",
        f"ESPRELAY_SMTP_PORT={smtp_port}",
        "--env",
        "ESPRELAY_HTTP_HOST=127.0.0.1",
        "--env",
        f"ESPRELAY_HTTP_PORT={http_port}",
        "--env",
        "ESPRELAY_TRUSTED_NETWORKS=127.0.0.0/8",
    ]
    attachment = os.urandom(25 * 1024 * 1024)
    # (Built by hand: the email package takes minutes to write 34 MB of base64.)
    raw = (
        b"From: app@example.com\r\nTo: customer@example.org\r\n"
        b"Subject: a 25 MB attachment\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="part"\r\n\r\n'
        b"--part\r\nContent-Type: text/plain\r\n\r\nsee the attachment\r\n"
        b"--part\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="big.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(attachment).replace(b"\n", b"\r\n")
        + b"--part--\r\n"
    )
    with container(podman, image, args) as name:
        wait_ready(podman, name, http_port)
        limit = run(
            [*podman, "exec", name, "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"],
            timeout=STEP_TIMEOUT,
            check=False,
        )
        if limit.returncode != 0:  # cgroup v2
            limit = run(
                [*podman, "exec", name, "cat", "/sys/fs/cgroup/memory.max"], timeout=STEP_TIMEOUT
            )
        assert int(limit.stdout) == MEMORY_LIMIT
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=120) as smtp:
            smtp.ehlo("client.test")
            assert smtp.mail("app@example.com")[0] == 250
            assert smtp.rcpt("customer@example.org")[0] == 250
            code, reply = smtp.data(raw)
        assert code == 250, reply
        message_id = reply.decode().rsplit(" ", 1)[1]
        delivered = volume / "outbox" / f"{message_id}.json"
        deadline = time.monotonic() + 120
        while not delivered.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        state = run(
            [*podman, "inspect", "--format", "{{.State.Running}} {{.State.OOMKilled}}", name],
            timeout=60,
        )
        logs = run([*podman, "logs", name], timeout=60, check=False)
    output = logs.stdout + logs.stderr
    assert state.stdout.split() == ["true", "false"], output
    assert delivered.exists(), output
    got = (volume / "outbox" / f"{message_id}.eml").read_bytes()
    # Byte for byte, after the Date and Message-ID the image's header repair adds (the
    # rewritten head, then the rest of the file as received).  Compared without a diff
    # of 34 MB on failure.
    assert got.startswith(b"Date: "), got[:300]
    assert got.endswith(raw) and len(got) - len(raw) < 200, (len(got), len(raw))
