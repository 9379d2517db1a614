"""Delivery status notifications (RFC 3464) for mail that failed after its 250.

A DSN is a ``multipart/report; report-type=delivery-status`` with three parts: a
human-readable explanation, the ``message/delivery-status`` fields (one block for the
message, one per failed recipient), and the original message's headers
(``text/rfc822-headers``, RFC 6522).  It is sent with the null sender (``<>``), so
it can never cause another bounce.
"""

from __future__ import annotations

import email.policy
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.utils import format_datetime, formatdate, make_msgid

from esprelay.errors import DeliveryError, PermanentDeliveryError
from esprelay.message.header import read_header

_HEADER_PARSER = BytesHeaderParser(policy=email.policy.compat32)


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
) -> bytes:
    """The bytes of a DSN reporting that ``failed_recipients`` did not get ``raw``."""
    report = EmailMessage(policy=email.policy.SMTP)
    report["From"] = f"Mail Delivery System <{from_address}>"
    report["To"] = to_address
    report["Subject"] = "Undelivered Mail Returned to Sender"
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
        "Your message could not be delivered to the following recipient(s):\n\n"
        f"{recipients}\n\n"
        f"Reason: {reason}\n\n"
        f"The message was accepted as {message_id}. Its headers are attached.\n"
    )

    status_part = EmailMessage(policy=email.policy.SMTP)
    status_part["Content-Type"] = "message/delivery-status"
    per_message = Message(policy=email.policy.SMTP)
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["X-Esprelay-Queue-ID"] = message_id
    if original_sender:
        per_message["X-Original-Envelope-From"] = f"rfc822; {original_sender}"
    per_message["Arrival-Date"] = format_datetime(datetime.fromtimestamp(arrival_date, UTC))
    blocks: list[Message | str] = [per_message]
    diagnostic = " ".join(reason.split())
    for recipient in failed_recipients:
        block = Message(policy=email.policy.SMTP)
        block["Final-Recipient"] = f"rfc822; {recipient}"
        block["Action"] = "failed"
        block["Status"] = status
        block["Diagnostic-Code"] = f"X-ESP-API; {diagnostic}"
        block["Last-Attempt-Date"] = formatdate(time.time(), localtime=False)
        blocks.append(block)
    status_part.set_payload(blocks)

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

    report.attach(text)
    report.attach(status_part)
    report.attach(headers_part)
    return report.as_bytes(policy=email.policy.SMTP)


def _header_block(raw: bytes) -> bytes:
    """The header section of a raw message (without the blank line)."""
    return raw[: read_header(raw).end]
