"""A provider from a separate distribution is found and used like a built-in one.

``tests/plugin`` is a distribution of its own (``esprelay-example-provider``) that
registers the kind ``example`` under the ``esprelay.providers`` entry points. The test
run builds and installs it into a temporary directory (pip, no download), then runs a
real relay with that directory on its path and sends a message through it.
"""

from __future__ import annotations

import base64
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from esprelay.providers.registry import registered
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.relayproc import RelayProcess
from tests.securitykit import crlf

PLUGIN = Path(__file__).parent / "plugin"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("plugin")
    shutil.copytree(PLUGIN, work / "src")  # the build writes beside its sources
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(work / "site"), str(work / "src")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return work / "site"


def example_esp(request: Recorded) -> Reply:
    if request.headers.get("authorization") != "Bearer example-token":
        return Reply(401, {"error": "bad token"})
    return Reply(200, {"id": "ex-1"})


def test_a_third_party_provider_is_selected_by_name(
    plugin_path: Path, relay_factory: type[RelayProcess]
) -> None:
    with FakeESP(example_esp) as esp:
        relay = relay_factory(
            {
                "PYTHONPATH": str(plugin_path),
                "ESPRELAY_PROVIDER": "example",
                "ESPRELAY_EXAMPLE_URL": esp.url + "/send",
                "ESPRELAY_EXAMPLE_TOKEN": "example-token",
            }
        ).start()
        raw = crlf("From: a@example.com\nTo: b@example.org\nBcc: c@example.net\nSubject: s\n\nhi\n")
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.sendmail("a@example.com", ["b@example.org", "c@example.net"], raw)
        (request,) = esp.wait_for(1)
        relay.wait_for_log("delivered id=")
    body = request.json()
    assert request.path == "/send"
    assert body["from"] == "a@example.com" and body["to"] == ["b@example.org", "c@example.net"]
    assert base64.b64decode(body["raw"]) == raw.replace(b"Bcc: c@example.net\r\n", b"")
    assert "example(example)" in relay.log  # the listener's line names provider(kind)


def test_without_the_distribution_the_name_is_unknown(tmp_path: Path) -> None:
    env = {"ESPRELAY_PROVIDER": "example", "ESPRELAY_SPOOL_URL": f"sqlite:///{tmp_path}/s.db"}
    result = subprocess.run(
        [sys.executable, "-m", "esprelay", "serve"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**{k: v for k, v in __import__("os").environ.items()
                if not k.startswith("ESPRELAY_")}, **env},
    )  # fmt: skip
    assert result.returncode == 78  # EX_CONFIG
    line = result.stderr.strip().splitlines()[-1]
    assert "ESPRELAY_PROVIDER: 'example' is not a registered provider" in line
    assert ", ".join(registered()) in line  # every registered kind, in order
