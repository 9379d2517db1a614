"""Helpers shared by the provider end-to-end tests."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
from typing import Any

from tests.messages import Case
from tests.relayproc import RelayProcess


def send_case(relay: RelayProcess, case: Case) -> str:
    """Send ``case`` over SMTP exactly as built; return the spool id."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        code, _ = smtp.mail(case.mail_from)
        assert code == 250
        for rcpt in case.rcpts:
            code, reply = smtp.rcpt(rcpt)
            assert code == 250, reply
        code, reply = smtp.data(case.raw)
        assert code == 250, reply
    return reply.decode().rsplit("queued as ", 1)[1].strip()


def queue(relay: RelayProcess, state: str) -> list[dict[str, Any]]:
    """``esprelay queue list --state STATE --json`` against the running relay's spool."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "esprelay", "queue", "list", "--state", state, "--json"],
        cwd=relay.workdir,
        env={**environ, **relay.env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
