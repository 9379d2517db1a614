"""Delivery status notifications (RFC 3464) for mail that failed after its 250.

A DSN is a ``multipart/report; report-type=delivery-status`` with three parts: a
human-readable explanation, the ``message/delivery-status`` fields (one block for the
message, one per failed recipient), and the original message's headers
(``text/rfc822-headers``, RFC 6522) or, if the sender asked with ``RET=FULL`` and the
message is at most :data:`RETURN_FULL_LIMIT` bytes, the whole message
(``message/rfc822``).  It is sent with the null sender (``<>``), so it can never
cause another bounce.

The DSN parameters the client gave (RFC 3461, read by :mod:`esprelay.smtp.dsnparams`)
are kept in the message's metadata (:class:`EnvelopeDSN`): ``ENVID`` comes back as
``Original-Envelope-Id``, each ``ORCPT`` as its recipient's ``Original-Recipient``, and
a recipient whose ``NOTIFY`` lacks ``FAILURE`` (``NEVER`` included) is left out of the
report (:func:`wants_failure_report`).  ``NOTIFY=SUCCESS`` and ``DELAY`` are only stored.
"""

from __future__ import annotations

import email.policy
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.utils import format_datetime, formatdate, make_msgid
from typing import Any

from esprelay.errors import DeliveryError, PermanentDeliveryError
from esprelay.message.header import read_header

_HEADER_PARSER = BytesHeaderParser(policy=email.policy.compat32)
#: The largest message returned whole for ``RET=FULL`` (bytes); a larger one is returned
#: as its headers only, and the report says so.
RETURN_FULL_LIMIT = 1024 * 1024


@dataclass(frozen=True, slots=True)
class RecipientDSN:
    """NOTIFY and ORCPT of one recipient (None: not given)."""

    notify: tuple[str, ...] | None = None
    #: ``addr-type;address``, the address decoded from xtext.
    orcpt: str | None = None


@dataclass(slots=True)
class EnvelopeDSN:
    """The DSN parameters of one transaction (RET, ENVID and per recipient)."""

    ret: str | None = None
    #: Decoded from xtext.
    envid: str | None = None
    recipients: dict[str, RecipientDSN] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """The message metadata these parameters make (empty if none was given)."""
        meta: dict[str, Any] = {}
        if self.ret is not None:
            meta["dsn_ret"] = self.ret
        if self.envid is not None:
            meta["dsn_envid"] = self.envid
        recipients = {
            address: {
                key: value
                for key, value in (
                    ("notify", list(r.notify) if r.notify is not None else None),
                    ("orcpt", r.orcpt),
                )
                if value is not None
            }
            for address, r in self.recipients.items()
        }
        if recipients:
            meta["dsn_rcpts"] = recipients
        return meta


def from_meta(meta: Mapping[str, Any]) -> EnvelopeDSN:
    """The parameters a message's metadata holds (the inverse of :meth:`EnvelopeDSN.meta`)."""
    recipients: dict[str, RecipientDSN] = {}
    stored = meta.get("dsn_rcpts")
    if isinstance(stored, Mapping):
        for address, values in stored.items():
            if not isinstance(values, Mapping):
                continue
            notify = values.get("notify")
            orcpt = values.get("orcpt")
            recipients[str(address)] = RecipientDSN(
                notify=tuple(str(n) for n in notify) if isinstance(notify, list) else None,
                orcpt=orcpt if isinstance(orcpt, str) else None,
            )
    ret = meta.get("dsn_ret")
    envid = meta.get("dsn_envid")
    return EnvelopeDSN(
        ret=ret if isinstance(ret, str) else None,
        envid=envid if isinstance(envid, str) else None,
        recipients=recipients,
    )


def wants_failure_report(parameters: RecipientDSN | None) -> bool:
    """Does this recipient's NOTIFY ask for a report of its failure?  (No NOTIFY: yes,
    RFC 3461 4.1's default; ``NEVER`` or a list without ``FAILURE``: no.)"""
    return parameters is None or parameters.notify is None or "FAILURE" in parameters.notify


def is_dsn(raw: bytes) -> bool:
    """Is this message itself a delivery status notification?"""
    headers = _HEADER_PARSER.parsebytes(_header_block(raw))
    content_type = (headers.get_content_type() or "").lower()
    report_type = str(headers.get_param("report-type", "") or "").lower()
    return content_type == "multipart/report" and report_type == "delivery-status"


def status_for(error: DeliveryError | None, *, expired: bool) -> str:
    """An RFC 3463 status code for the failure."""
    if expired or not isinstance(error, PermanentDeliveryError):
        return "5.4.7"  # delivery time expired
    if error.status_code == 413:
        return "5.3.4"  # message too big for system
    return "5.0.0"


def build_dsn(
    *,
    raw: bytes,
    failed_recipients: Sequence[str],
    original_sender: str,
    reason: str,
    status: str,
    reporting_mta: str,
    from_address: str,
    to_address: str,
    arrival_date: float,
    message_id: str,
    parameters: EnvelopeDSN | None = None,
    recipient_status: Mapping[str, tuple[str, str]] | None = None,
    action: str = "failed",
    remote_mta: str | None = None,
    diagnostic_code: str | None = None,
    last_attempt: float | None = None,
) -> bytes:
    """The bytes of a DSN reporting that ``failed_recipients`` did not get ``raw``;
    ``parameters``: the DSN parameters of the original transaction, if any;
    ``recipient_status``: a recipient's own (status, reason), where it differs from
    the message's (a provider that refused some recipients only).

    ``action`` (RFC 3464 2.3.3) is ``failed`` by default; a report made from an ESP's
    event may say ``delivered`` or ``delayed`` instead, name the ``remote_mta`` and
    give the remote server's ``diagnostic_code`` (``smtp; 550 5.1.1 ...``) and the
    time of the event (``last_attempt``)."""
    parameters = parameters if parameters is not None else EnvelopeDSN()
    full = parameters.ret == "FULL" and len(raw) <= RETURN_FULL_LIMIT
    if full:
        returned = "The message is attached."
    elif parameters.ret == "FULL":
        returned = (
            f"Its headers are attached (the message, {len(raw)} bytes, is larger than"
            f" the {RETURN_FULL_LIMIT} bytes returned whole)."
        )
    else:
        returned = "Its headers are attached."
    report = EmailMessage(policy=email.policy.SMTP)
    report["From"] = f"Mail Delivery System <{from_address}>"
    report["To"] = to_address
    report["Subject"] = _SUBJECTS.get(action, _SUBJECTS["failed"])
    report["Date"] = formatdate(localtime=False)
    report["Message-ID"] = make_msgid(domain=from_address.rpartition("@")[2] or None)
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report.set_type("multipart/report")
    report.set_param("report-type", "delivery-status")

    recipients = "\n".join(f"  <{r}>" for r in failed_recipients)
    text = EmailMessage(policy=email.policy.SMTP)
    text.set_content(
        f"This is the mail system at {reporting_mta}.\n\n"
        f"{_EXPLANATIONS.get(action, _EXPLANATIONS['failed'])}\n\n"
        f"{recipients}\n\n"
        f"Reason: {reason}\n\n"
        f"The message was accepted as {message_id}. {returned}\n"
    )

    status_part = EmailMessage(policy=email.policy.SMTP)
    status_part["Content-Type"] = "message/delivery-status"
    per_message = Message(policy=email.policy.SMTP)
    if parameters.envid is not None:
        per_message["Original-Envelope-Id"] = parameters.envid
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["X-Esprelay-Queue-ID"] = message_id
    if original_sender:
        per_message["X-Original-Envelope-From"] = address_field(original_sender)
    per_message["Arrival-Date"] = format_datetime(datetime.fromtimestamp(arrival_date, UTC))
    blocks: list[Message | str] = [per_message]
    diagnostic = " ".join(reason.split())
    for recipient in failed_recipients:
        block = Message(policy=email.policy.SMTP)
        orcpt = parameters.recipients.get(recipient, RecipientDSN()).orcpt
        if orcpt is not None:
            block["Original-Recipient"] = orcpt
        block["Final-Recipient"] = address_field(recipient)
        block["Action"] = action
        own = recipient_status.get(recipient) if recipient_status else None
        block["Status"] = own[0] if own else status
        if remote_mta is not None:
            block["Remote-MTA"] = f"dns; {remote_mta}"
        block["Diagnostic-Code"] = diagnostic_code or (
            f"X-ESP-API; {' '.join(own[1].split()) if own else diagnostic}"
        )
        block["Last-Attempt-Date"] = formatdate(
            time.time() if last_attempt is None else last_attempt, localtime=False
        )
        blocks.append(block)
    status_part.set_payload(blocks)

    report.attach(text)
    report.attach(status_part)
    # A UTF-8 sender (RFC 6531, only accepted where every provider carries it) is written
    # as UTF-8 (RFC 6532), not as an RFC 2047 word, which is no address at all.
    policy = email.policy.SMTP if to_address.isascii() else email.policy.SMTPUTF8
    if full:
        return _with_message(report, raw, policy)
    headers_part = EmailMessage(policy=email.policy.SMTP)
    original_headers = _header_block(raw)
    try:
        headers_part.set_content(
            original_headers.decode("ascii"), subtype="rfc822-headers", cte="7bit"
        )
    except (UnicodeDecodeError, ValueError):
        headers_part.set_content(
            original_headers, maintype="text", subtype="rfc822-headers", cte="base64"
        )

    report.attach(headers_part)
    return report.as_bytes(policy=policy)


_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
}
_EXPLANATIONS = {
    "failed": "Your message could not be delivered to the following recipient(s):",
    "delayed": "Your message has not been delivered yet to the following recipient(s);"
    " delivery is still being tried:",
    "delivered": "Your message was delivered to the following recipient(s):",
}


def address_field(address: str) -> str:
    """``address-type; address`` for a report: ``rfc822`` for an ASCII address, else
    RFC 6533's ``utf-8`` type with ``\\x{HEX}`` for every character that is not a
    QCHAR (a report in ``message/delivery-status`` stays ASCII: the address is kept
    whole instead of becoming an RFC 2047 encoded word)."""
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(
        c if "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):02X}}}" for c in address
    )


def _with_message(
    report: EmailMessage, raw: bytes, policy: email.policy.EmailPolicy[EmailMessage]
) -> bytes:
    """``report`` with ``raw`` attached as it is (``message/rfc822``, RFC 3462).

    The email package would re-serialise the message (refold, re-encode); its bytes
    are put in place of a token instead, under a boundary nobody can guess, so nothing
    in the message can end the part early.
    """
    token = f"esprelay-returned-message-{secrets.token_hex(16)}"
    report.set_boundary(f"=_report_{secrets.token_hex(16)}")
    returned = EmailMessage(policy=email.policy.SMTP)
    returned["Content-Type"] = "message/rfc822"
    # RFC 2046 5.2.1: 7bit, 8bit or binary only.
    returned["Content-Transfer-Encoding"] = "7bit" if raw.isascii() else "8bit"
    returned.set_payload(token)
    report.attach(returned)
    # (The CRLF the generator writes before the boundary belongs to the boundary.)
    before, found, after = report.as_bytes(policy=policy).partition(token.encode())
    assert found
    return before + raw + after


def _header_block(raw: bytes) -> bytes:
    """The header section of a raw message (without the blank line)."""
    return raw[: read_header(raw).end]
