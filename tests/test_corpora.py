"""Public MIME corpora (real-world and malformed messages) through mime.py and both JSON
builders: no exception, a payload each fake ESP accepts, and the recipient-union rule.

The corpora live outside the project (``../shared/corpora``); without them this skips.
"""

from __future__ import annotations

import email.policy
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from pathlib import Path

import pytest

from esprelay.errors import MessageRejected
from esprelay.message.mime import address_key, parse
from esprelay.models import Envelope
from esprelay.providers import postmark, sendgrid
from tests.providers import test_postmark, test_sendgrid

CORPORA = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"
FILES = sorted(CORPORA.rglob("*.eml")) if CORPORA.is_dir() else []


def envelope_for(raw: bytes) -> Envelope:
    """Header recipients (the first few) plus one envelope-only recipient."""
    headers = BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
    values = [str(v) for name in ("to", "cc") for v in headers.get_all(name) or []]
    rcpts = [addr for _, addr in getaddresses(values) if "@" in addr][:10]
    return Envelope("sender@example.com", (*rcpts, "envelope-only@example.org"))


@pytest.mark.slow
@pytest.mark.skipif(not FILES, reason=f"no MIME corpora at {CORPORA} (optional test data)")
def test_every_corpus_message_maps_to_both_providers() -> None:
    problems: list[str] = []
    for path in FILES:
        name = str(path.relative_to(CORPORA))
        raw = path.read_bytes()
        if b"\r\n" not in raw:
            raw = raw.replace(b"\n", b"\r\n")  # as an SMTP client would send it
        envelope = envelope_for(raw)
        parsed = parse(raw, envelope)
        sent = {address_key(m.addr) for m in parsed.recipients.all()}
        if sent != {address_key(a) for a in envelope.rcpt_tos}:
            problems.append(f"{name}: recipients {sorted(sent)} != envelope")
        try:
            payload, _ = sendgrid.build_payload(parsed)
        except MessageRejected as exc:
            problems.append(f"{name}: sendgrid rejected: {exc}")
        else:
            errors = test_sendgrid.validate(payload)
            if errors:
                problems.append(f"{name}: sendgrid fake refuses: {errors}")
        try:
            pm_payload, _ = postmark.build_payload(parsed)
        except MessageRejected as exc:
            problems.append(f"{name}: postmark rejected: {exc}")
        else:
            pm_errors = test_postmark.validate(pm_payload, stream=None)
            if pm_errors:
                problems.append(f"{name}: postmark fake refuses: {pm_errors}")
    assert not problems, "\n".join(problems)
