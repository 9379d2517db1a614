"""A fast loopback ESP emulator: answers POSTs like an ESP, after a configurable latency.

It counts every send request it answers, so the benchmark can say "delivered" only once
the emulator has seen each message.  ``GET /__stats`` returns the counters as JSON:
``requests`` (every send, all ESPs together), ``by_kind`` (sends per ESP), ``tokens``
(OAuth token requests, not sends), ``unknown`` (requests it answered 404), ``bytes``
and ``connections``.  The HTTP/1.1 parsing is deliberately minimal (Content-Length
bodies, keep-alive): it is a load sink for our own client, not a general server, and it
must cost little CPU because it shares the machine with what it measures.

The answer is chosen by the request's path, so one emulator plays every ESP at once.
Each answer is precomputed; only a fixed-width counter is spliced into it, so every
message gets its own id for the cost of formatting one ``bytes``:

- ``sendgrid``: ``POST /v3/mail/send``, ``202``, no body, ``X-Message-Id``;
- ``postmark``: ``POST /email``, ``200 {"ErrorCode":0,"Message":"OK","MessageID":..}``;
- ``mailgun``: ``POST /v3/{domain}/messages.mime``, ``200 {"id":"<..>","message":..}``;
- ``ses``: ``POST /v2/email/outbound-emails``, ``200 {"MessageId":..}``;
- ``resend``: ``POST /emails``, ``200 {"id":..}`` (``/emails/batch``: ``{"data":[..]}``);
- ``brevo``: ``POST /v3/smtp/email``, ``201 {"messageId":"<..>"}``;
- ``mailjet``: ``POST /v3.1/send``, ``200 {"Messages":[{"Status":"success",..}]}``;
- ``http``: ``POST /esprelay/messages`` (:data:`HTTP_PATH`), ``200 {"id":..}``;
- ``graph``: ``POST /v1.0/users/{mailbox}/sendMail``, ``202``, no body; and its token
  endpoint ``POST /{tenant}/oauth2/v2.0/token``, ``200 {"token_type":"Bearer",..}``
  (counted apart, under ``tokens``);
- ``sparkpost``: ``POST /api/v1/transmissions``,
  ``200 {"results":{"total_rejected_recipients":0,"total_accepted_recipients":1,"id":..}}``.

Mailjet's answer holds one result, as for a message with a To recipient (Mailjet's
answer has one result per message of the request).  Any other POST gets the answer of
``--flavour`` (``sendgrid``, ``postmark`` or ``generic``, ``200 {"id":..}``) and counts
under that name; any other method is answered ``404``.

Run: ``python -m bench.emulator --port 0 --latency-ms 100``; it prints
``emulator listening on 127.0.0.1:PORT`` once ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
from typing import cast

#: Where the generic ``http`` provider POSTs (ESPRELAY_HTTP_API_URL's path).
HTTP_PATH = "/esprelay/messages"
#: Fixed width of the counter in every answer, so Content-Length is precomputed too.
ID_WIDTH = 12
_MARK = b"\x00ID\x00"
_counter = itertools.count(1)


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.connections = 0
        self.by_kind: dict[str, int] = {}
        self.tokens = 0
        self.unknown = 0

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "requests": self.requests,
                "by_kind": self.by_kind,
                "tokens": self.tokens,
                "unknown": self.unknown,
                "bytes": self.bytes,
                "connections": self.connections,
            }
        ).encode()


class Answer:
    """A precomputed HTTP response with a counter spliced in at ``_MARK``."""

    __slots__ = ("after", "before", "kind")

    def __init__(self, kind: str, status: str, body: bytes = b"", *, header: str = "") -> None:
        self.kind = kind
        head = f"HTTP/1.1 {status}\r\n"
        if body:
            length = len(body) + (ID_WIDTH - len(_MARK)) * body.count(_MARK)
            head += f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
        else:
            head += "Content-Length: 0\r\n"
        if header:
            head += f"{header}: {_MARK.decode()}\r\n"
        whole = head.encode() + b"\r\n" + body
        assert whole.count(_MARK) == 1, kind
        self.before, _, self.after = whole.partition(_MARK)

    def render(self) -> bytes:
        return b"%s%0*d%s" % (self.before, ID_WIDTH, next(_counter), self.after)


def _json(value: object) -> bytes:
    """Compact JSON; the counter goes where a string holds ``@ID@`` (in the string) or
    where a string is ``@NUM@`` (as a number, without leading zeros)."""
    text = json.dumps(value, separators=(",", ":")).encode()
    return text.replace(b"@ID@", _MARK).replace(b'"@NUM@"', b"1" + _MARK)


#: The success answer of each kind (mirrors each adapter's parse_response).
ANSWERS: dict[str, Answer] = {
    "sendgrid": Answer("sendgrid", "202 Accepted", header="X-Message-Id"),
    "postmark": Answer(
        "postmark",
        "200 OK",
        _json(
            {
                "To": "x",
                "SubmittedAt": "2026-01-01T00:00:00Z",
                "MessageID": "00000000-0000-0000-0000-@ID@",
                "ErrorCode": 0,
                "Message": "OK",
            }
        ),
    ),
    "mailgun": Answer(
        "mailgun",
        "200 OK",
        _json({"id": "<@ID@.emu@mg.esprelay.invalid>", "message": "Queued. Thank you."}),
    ),
    "ses": Answer("ses", "200 OK", _json({"MessageId": "0100018c-emu-@ID@-000000"})),
    "resend": Answer("resend", "200 OK", _json({"id": "emu-@ID@"})),
    "resend-batch": Answer("resend", "200 OK", _json({"data": [{"id": "emu-@ID@"}]})),
    "brevo": Answer("brevo", "201 Created", _json({"messageId": "<@ID@.emu@smtp-relay.invalid>"})),
    "mailjet": Answer(
        "mailjet",
        "200 OK",
        _json(
            {
                "Messages": [
                    {
                        "Status": "success",
                        "CustomID": "",
                        "To": [
                            {
                                "Email": "rcpt@esprelay.invalid",
                                "MessageUUID": "00000000-0000-0000-0000-000000000000",
                                "MessageID": "@NUM@",
                                "MessageHref": "https://api.mailjet.invalid/v3/REST/message",
                            }
                        ],
                        "Cc": [],
                        "Bcc": [],
                    }
                ]
            }
        ),
    ),
    "http": Answer("http", "200 OK", _json({"id": "emu-@ID@"})),
    "graph": Answer("graph", "202 Accepted", header="request-id"),
    "sparkpost": Answer(
        "sparkpost",
        "200 OK",
        _json(
            {
                "results": {
                    "total_rejected_recipients": 0,
                    "total_accepted_recipients": 1,
                    "id": "@ID@",
                }
            }
        ),
    ),
    "generic": Answer("generic", "200 OK", _json({"id": "emu@ID@"})),
    "token": Answer(
        "token",
        "200 OK",
        _json(
            {
                "token_type": "Bearer",
                "expires_in": 3599,
                "ext_expires_in": 3599,
                "access_token": "emu-token-@ID@",
            }
        ),
    ),
}
#: Exact paths; Mailgun's and Graph's carry a name and are matched by their ends.
ROUTES: dict[bytes, Answer] = {
    b"/v3/mail/send": ANSWERS["sendgrid"],
    b"/email": ANSWERS["postmark"],
    b"/v2/email/outbound-emails": ANSWERS["ses"],
    b"/emails": ANSWERS["resend"],
    b"/emails/batch": ANSWERS["resend-batch"],
    b"/v3/smtp/email": ANSWERS["brevo"],
    b"/v3.1/send": ANSWERS["mailjet"],
    HTTP_PATH.encode(): ANSWERS["http"],
    b"/api/v1/transmissions": ANSWERS["sparkpost"],
}
FLAVOURS = ("sendgrid", "postmark", "generic")
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def route(method: bytes, path: bytes, fallback: Answer) -> Answer | None:
    """The answer to ``method path``; None for 404."""
    if method != b"POST":
        return None
    answer = ROUTES.get(path)
    if answer is not None:
        return answer
    if path.startswith(b"/v3/") and path.endswith(b"/messages.mime"):
        return ANSWERS["mailgun"]
    if path.startswith(b"/v1.0/users/") and path.endswith(b"/sendMail"):
        return ANSWERS["graph"]
    if path.endswith(b"/oauth2/v2.0/token"):
        return ANSWERS["token"]
    return fallback


class EmulatorProtocol(asyncio.Protocol):
    def __init__(self, stats: Stats, flavour: str, latency: float) -> None:
        self.stats = stats
        self.fallback = ANSWERS[flavour]
        self.latency = latency
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.need: int | None = None  # body bytes still expected
        self.head: bytes = b""
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.stats.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.need is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                self.head = bytes(self.buffer[:end])
                del self.buffer[: end + 4]
                length = 0
                for line in self.head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                self.need = length
            if len(self.buffer) < self.need:
                return
            body_len = self.need
            del self.buffer[: self.need]
            self.need = None
            self._respond(self.head, body_len)

    def _respond(self, head: bytes, body_len: int) -> None:
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method == b"GET" and path == b"/__stats":
            body = self.stats.as_json()
            reply = (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            self._send(reply, None)
            return
        answer = route(method, path, self.fallback)
        if answer is None:
            self.stats.unknown += 1
            self._send(_NOT_FOUND, None)
            return
        if answer.kind == "token":
            self.stats.tokens += 1
            self._send(answer.render(), None)
            return
        self.stats.bytes += body_len
        reply = answer.render()
        if self.latency > 0:
            self.loop.call_later(self.latency, self._send, reply, answer.kind)
        else:
            self._send(reply, answer.kind)

    def _send(self, reply: bytes, kind: str | None) -> None:
        if kind is not None:
            self.stats.requests += 1
            self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply)


async def start(
    port: int, flavour: str = "generic", latency: float = 0.0
) -> tuple[asyncio.Server, Stats]:
    """Listen on 127.0.0.1:``port`` in the running loop; the server and its counters."""
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: EmulatorProtocol(stats, flavour, latency), "127.0.0.1", port, backlog=4096
    )
    return server, stats


async def serve(port: int, flavour: str, latency: float) -> None:
    server, _ = await start(port, flavour, latency)
    bound = server.sockets[0].getsockname()[1]
    print(f"emulator listening on 127.0.0.1:{bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument(
        "--flavour",
        choices=FLAVOURS,
        default="generic",
        help="the answer to a POST on a path no ESP uses",
    )
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(serve(args.port, args.flavour, args.latency_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
