"""The settings that point each HTTP provider kind at the loopback ESP emulator.

One table serves the end-to-end benchmark (as ``ESPRELAY_<KIND>_<FIELD>`` variables for
``esprelay serve``) and the ``build_request`` micro benchmark (as a settings mapping).
Credentials are dummies: the emulator checks none.  Client-side pacing that stands for
an ESP's account limit is lifted where a setting allows it (Resend's 2 requests/s,
Graph's 16 requests/s per mailbox) so the figures are esprelay's CPU, not a quota;
limits that are fixed in an adapter stay (Brevo's and Mailjet's 1000 requests/s,
SparkPost's own; Graph's 4 requests in flight per mailbox).

This module does not import esprelay: a kind that is not installed (SparkPost before
its adapter is merged) is only a name here.
"""

from __future__ import annotations

import base64
from pathlib import Path

from bench.emulator import HTTP_PATH

#: Every HTTP kind the emulator answers like, in the order the benchmark runs them;
#: sendgrid first, the reference of the per-provider ratios.
KINDS = (
    "sendgrid",
    "postmark",
    "mailgun",
    "ses",
    "resend",
    "brevo",
    "mailjet",
    "http",
    "graph",
    "sparkpost",
)
REFERENCE = "sendgrid"
SES_REGION = "us-east-1"
GRAPH_TENANT = "00000000-0000-4000-8000-00000000beef"


def settings(kind: str, url: str) -> dict[str, str]:
    """``kind``'s settings (field -> value) with the ESP at ``url`` (no trailing /)."""
    table: dict[str, dict[str, str]] = {
        "sendgrid": {"api_key": "SG.bench-key", "api_url": url},
        "postmark": {"server_token": "bench-token", "api_url": url},
        "mailgun": {"api_key": "bench-key", "domain": "mg.esprelay.invalid", "api_url": url},
        "ses": {"region": SES_REGION, "endpoint_url": url},
        "resend": {"api_key": "re_bench", "api_url": url, "rate": "1000000"},
        "brevo": {"api_key": "xkeysib-bench", "api_url": url},
        "mailjet": {"api_key": "bench-key", "secret_key": "bench-secret", "api_url": url},
        "http": {
            "api_url": url + HTTP_PATH,
            "api_secret": "whsec_" + base64.b64encode(bytes(range(32))).decode(),
        },
        "graph": {
            "tenant_id": GRAPH_TENANT,
            "client_id": "00000000-0000-4000-8000-0000000c11e7",
            "client_secret": "bench-secret",
            "api_url": url,
            "authority_url": url,
            "mailbox_rate": "1000000",
        },
        "sparkpost": {"api_key": "bench-key", "api_url": url},
    }
    return dict(table[kind])


def environment(kind: str, url: str, workdir: Path) -> dict[str, str]:
    """The variables that make ``esprelay serve`` deliver through ``kind`` to ``url``."""
    values = settings(kind, url)
    env = {f"ESPRELAY_{kind.upper()}_{field.upper()}": value for field, value in values.items()}
    if kind == "ses":
        # SigV4 needs credentials; none of this machine's AWS setup may be read.
        env.update(
            {
                "AWS_ACCESS_KEY_ID": "AKIDBENCHEXAMPLE",
                "AWS_SECRET_ACCESS_KEY": "bench-secret-access-key",
                "AWS_CONFIG_FILE": str(workdir / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "no-aws-credentials"),
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        )
    return env


def installed() -> list[str]:
    """The kinds of :data:`KINDS` this installation has an adapter for."""
    try:
        from esprelay.providers import registered
    except ImportError:
        return []
    names = set(registered())
    return [kind for kind in KINDS if kind in names]
