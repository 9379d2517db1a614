"""CPU cost of ``esprelay.message.mime.parse`` and of every HTTP adapter's ``build_request``.

``python -m bench.mime_cpu [--loops 2000]`` parses a few representative messages in a
loop and prints the CPU time (``time.process_time``) per call, for the default path
and the exact reference path (``exact=True``), so both are measured in the same go.
Then ``build_request`` of every HTTP provider kind installed (``--providers``), each
configured as the end-to-end benchmark configures it (``bench.providers``), on the same
messages: the pure part of a delivery (parsing, payload, encoding; no signing, no I/O),
with the ratio to SendGrid's on the 2 KB message.

``python -m bench.mime_cpu --large 5M`` measures instead each per-byte step one large
message takes in the server, alone: reading its DATA (64 KiB reads), the intake's
``prepare``, ``mime.parse``, the SendGrid payload and its JSON, the whole
``build_request``; with glibc's allocation settings of ``esprelay serve``
(``esprelay.gctune``), so that a step pays the page faults it would pay there.  With
``--attachment`` the message is a line of text and a base64 attachment.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import httpx
from pydantic import SecretStr

from bench.loadgen import make_message
from bench.providers import KINDS, REFERENCE, installed, settings
from esprelay.errors import DeliveryError
from esprelay.message import mime
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers import get_kind, postmark, sendgrid
from esprelay.providers.base import HttpProvider
from esprelay.providers.postmark import PostmarkProvider
from esprelay.providers.registry import configure
from esprelay.providers.sendgrid import SendGridProvider

SENDER = "bench-sender@esprelay.invalid"
RCPT = "bench-rcpt@esprelay.invalid"
ENVELOPE = Envelope(SENDER, (RCPT,))


def _crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def bench_message() -> bytes:
    return make_message(2048, sender=SENDER, recipient=RCPT)


def alternative_with_attachment() -> bytes:
    pdf = base64.encodebytes(bytes(range(256)) * 40).decode()  # ~10 KB
    return _crlf(
        """From: "Billing Team" <billing@example.com>
To: Jane Doe <bench-rcpt@esprelay.invalid>
Subject: Your invoice 2024-0042
Date: Tue, 01 Oct 2024 10:00:00 +0000
Message-ID: <invoice-2024-0042@example.com>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="=_mixed_1"

--=_mixed_1
Content-Type: multipart/alternative; boundary="=_alt_1"

--=_alt_1
Content-Type: text/plain; charset="utf-8"
Content-Transfer-Encoding: quoted-printable

Hello Jane,

your invoice is attached. Total: 42.00 EUR.
--=_alt_1
Content-Type: text/html; charset="utf-8"
Content-Transfer-Encoding: quoted-printable

<html><body><p>Hello Jane,</p><p>your invoice is attached. Total: <b>42.00 EUR</b>.</p>=
</body></html>
--=_alt_1--
--=_mixed_1
Content-Type: application/pdf; name="invoice-2024-0042.pdf"
Content-Disposition: attachment; filename="invoice-2024-0042.pdf"
Content-Transfer-Encoding: base64

"""
        + pdf
        + "--=_mixed_1--\n"
    )


def many_headers() -> bytes:
    received = "".join(
        f"Received: from host{i}.example.net (host{i}.example.net [192.0.2.{i}])\n"
        f"\tby mx{i}.example.com (Postfix) with ESMTPS id 4XyZ{i}abc\n"
        f"\tfor <bench-rcpt@esprelay.invalid>; Tue, 01 Oct 2024 10:00:0{i % 10} +0000\n"
        for i in range(6)
    )
    xheaders = "".join(f"X-App-Header-{i}: value number {i} for tracing\n" for i in range(6))
    head = (
        received
        + "From: App <app@example.com>\nTo: bench-rcpt@esprelay.invalid\n"
        + "Subject: plenty of headers\nDate: Tue, 01 Oct 2024 10:00:00 +0000\n"
        + "Message-ID: <many@example.com>\n"
        + xheaders
        + "List-Unsubscribe: <mailto:unsub@example.com>\nMIME-Version: 1.0\n"
        + "Content-Type: text/plain; charset=us-ascii\n\n"
    )
    return _crlf(head + "A short body.\n" * 20)


SAMPLES: dict[str, Callable[[], bytes]] = {
    "bench 2K plain": bench_message,
    "alternative+pdf": alternative_with_attachment,
    "12 Received/X-": many_headers,
}


def cpu_per_call(fn: Callable[[], object], loops: int) -> float:
    """Milliseconds of CPU per call (best of three rounds)."""
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(loops):
            fn()
        best = min(best, time.process_time() - start)
    return best / loops * 1000


def http_provider(
    kind: str, client: httpx.AsyncClient, url: str = "http://127.0.0.1:9"
) -> HttpProvider:
    """``kind`` configured as the end-to-end benchmark configures it, its ESP at ``url``."""
    provider = configure(get_kind(kind), settings(kind, url)).build(client)
    assert isinstance(provider, HttpProvider), kind
    return provider


def build_request_table(kinds: list[str], loops: int, client: httpx.AsyncClient) -> str:
    """CPU ms per ``build_request`` of each kind on each sample, and the ratio to the
    reference kind on the first sample."""
    messages = {name: OutboundMessage("m1", ENVELOPE, make()) for name, make in SAMPLES.items()}
    first = next(iter(SAMPLES))
    figures: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        provider = http_provider(kind, client)
        row: dict[str, Any] = {}
        for name, message in messages.items():
            build = functools.partial(provider.build_request, message)
            try:
                row[name] = cpu_per_call(build, loops)
            except DeliveryError as exc:  # the adapter refuses this sample
                row[name] = f"refused: {type(exc).__name__}"
        figures[kind] = row
    reference = figures.get(REFERENCE, {}).get(first)
    lines = [
        "| provider | " + " | ".join(f"{name} ms" for name in SAMPLES) + f" | {first} vs"
        f" {REFERENCE} |",
        "|" + "---|" * (len(SAMPLES) + 2),
    ]
    for kind, row in figures.items():
        cells = [f"{v:.4f}" if isinstance(v, float) else v for v in row.values()]
        mine = row[first]
        ratio = (
            f"{mine / reference:.2f}"
            if isinstance(mine, float) and isinstance(reference, float)
            else "-"
        )
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def attachment_message(size: int) -> bytes:
    """A message of about ``size`` bytes: a line of text and an attachment in base64
    lines of 76 characters, as mailers write them."""
    data = bytes(range(256)) * (size * 57 // 78 // 256 + 1)
    lines = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (
        (
            f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: invoice\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
            "Content-Type: text/plain\r\n\r\nsee the attachment\r\n--b1\r\n"
            'Content-Type: application/pdf; name="scan.pdf"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n"
        ).encode()
        + lines
        + b"--b1--\r\n"
    )


def large_steps(size: int, loops: int, *, attachment: bool = False) -> None:
    """Milliseconds of CPU per step for one ``size``-byte message (bench/README.md):
    a text message, or with ``attachment`` one that is mostly a base64 attachment."""
    from esprelay.gctune import return_large_blocks_to_the_system
    from esprelay.message.repair import prepare
    from esprelay.providers.base import LONG_STRING, json_body
    from esprelay.smtp.dataread import MessageReader

    return_large_blocks_to_the_system()
    raw = (
        attachment_message(size)
        if attachment
        else make_message(size, sender=SENDER, recipient=RCPT)
    )
    wire = raw + b".\r\n"
    pieces = [wire[i : i + 65536] for i in range(0, len(wire), 65536)]

    def read() -> bytes:
        reader = MessageReader(size_limit=None, line_limit=1000)
        for piece in pieces:
            reader.feed(piece)
        return reader.take()

    provider = SendGridProvider(httpx.AsyncClient(), SecretStr("SG.x"), "https://api.sendgrid.com")
    message = OutboundMessage("m1", ENVELOPE, raw)
    parsed = mime.parse(raw, ENVELOPE)
    payload, _ = sendgrid.build_payload(parsed)
    steps: dict[str, Callable[[], object]] = {
        "read DATA (MessageReader)": read,
        "prepare (line endings, header)": functools.partial(
            prepare, raw, mail_from=SENDER, hostname="bench.invalid"
        ),
        "mime.parse": functools.partial(mime.parse, raw, ENVELOPE),
        "SendGrid payload": functools.partial(sendgrid.build_payload, parsed),
        "JSON body": functools.partial(json_body, payload, large=size >= LONG_STRING),
        "SendGrid build_request": functools.partial(provider.build_request, message),
    }
    kind = "message with a base64 attachment" if attachment else "text message"
    print(f"one {len(raw)} byte {kind}, ms of CPU per step:")
    for name, step in steps.items():
        print(f"  {name:32} {cpu_per_call(step, loops):8.3f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--loops", type=int, default=2000)
    ap.add_argument(
        "--providers",
        default="all",
        help=f"build_request of these kinds ('all': every one installed of {', '.join(KINDS)};"
        " '' for none)",
    )
    ap.add_argument("--large", metavar="SIZE", help="per-step CPU of one SIZE message (5M)")
    ap.add_argument(
        "--attachment", action="store_true", help="with --large: a message with an attachment"
    )
    args = ap.parse_args(argv)
    if args.large:
        from bench.__main__ import parse_size

        large_steps(parse_size(args.large), max(1, min(args.loops, 20)), attachment=args.attachment)
        return
    print(f"{'sample':18} {'reference ms':>13} {'parse ms':>9} {'ratio':>6}")
    for name, make in SAMPLES.items():
        raw = make()
        fast = cpu_per_call(functools.partial(mime.parse, raw, ENVELOPE), args.loops)
        ref = cpu_per_call(functools.partial(mime.parse, raw, ENVELOPE, exact=True), args.loops)
        print(f"{name:18} {ref:13.4f} {fast:9.4f} {ref / fast:6.2f}")
    message = OutboundMessage("m1", ENVELOPE, bench_message())
    client = httpx.AsyncClient()
    providers: list[tuple[str, ModuleType, HttpProvider]] = [
        (
            "sendgrid",
            sendgrid,
            SendGridProvider(client, SecretStr("SG.x"), "https://api.sendgrid.com"),
        ),
        (
            "postmark",
            postmark,
            PostmarkProvider(client, SecretStr("token"), "https://api.postmarkapp.com", None),
        ),
    ]
    for kind, module, provider in providers:
        build = functools.partial(provider.build_request, message)
        ms = cpu_per_call(build, args.loops)
        with _exact_parse(module):
            ref = cpu_per_call(build, args.loops)
        print(
            f"{kind} build_request (bench 2K): {ref:.4f} ms CPU with exact=True,"
            f" {ms:.4f} ms by default ({ref / ms:.2f}x)"
        )
    available = installed()
    if args.providers.strip() == "all":
        kinds = available
    else:
        kinds = [k.strip() for k in args.providers.split(",") if k.strip()]
        missing = [k for k in kinds if k not in available]
        if missing:
            ap.error(f"--providers: not installed here: {', '.join(missing)}")
    if kinds:
        print(f"\nCPU per build_request (best of 3 x {args.loops} calls):")
        print(build_request_table(kinds, args.loops, client))


@contextlib.contextmanager
def _exact_parse(module: ModuleType) -> Iterator[None]:
    """The adapter ``module`` parses with ``exact=True`` (the reference path) meanwhile."""
    saved = getattr(module, "parse")  # noqa: B009 - a module's attribute, swapped
    setattr(module, "parse", functools.partial(mime.parse, exact=True))  # noqa: B010
    try:
        yield
    finally:
        setattr(module, "parse", saved)  # noqa: B010


if __name__ == "__main__":
    main()
