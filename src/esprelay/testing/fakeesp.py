"""A real HTTP server on loopback that plays an ESP's API, for tests of providers.

It records every request (method, path, query, headers, body) and answers with
whatever ``respond(request)`` returns, or the next scripted response.  ESP-specific
checks (auth header, required fields) live in each provider's test module, as
``respond`` functions that validate like the real API and answer as it does.
:class:`MailjetAPI` (below) is such a responder for Mailjet's Send API v3.1, kept here
so that any test can play Mailjet, partial results included.
:class:`SparkPostAPI` plays SparkPost's transmissions API with ``email_rfc822`` content,
its template engine on headers and its partial results included.
"""

from __future__ import annotations

import base64
import binascii
import email.header
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        if isinstance(self.body, dict | list):
            headers.setdefault("Content-Type", "application/json")
            return json.dumps(self.body).encode(), headers
        if isinstance(self.body, str):
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
            return self.body.encode(), headers
        return self.body, headers


Responder = Callable[[Recorded], Reply]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up early (a timeout test) is not an error here


class FakeESP:
    """``with FakeESP(respond) as esp: ... esp.url ... esp.requests``"""

    def __init__(self, respond: Responder | None = None) -> None:
        self.respond = respond or (lambda request: Reply(200, {}))
        self.script: list[Reply] = []
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def then(self, *replies: Reply) -> FakeESP:
        """Answer the next requests with these replies, in order, before ``respond``."""
        with self._lock:
            self.script.extend(replies)
        return self

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Recorded]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.02)
        raise AssertionError(f"{len(self.requests)} of {count} requests after {timeout}s")

    def __enter__(self) -> FakeESP:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _reply_for(self, request: Recorded) -> Reply:
        with self._lock:
            self.requests.append(request)
            scripted = self.script.pop(0) if self.script else None
        return scripted if scripted is not None else self.respond(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                request = Recorded(
                    method=self.command,
                    path=parts.path,
                    query=parse_qs(parts.query),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                reply = fake._reply_for(request)
                if reply.delay:
                    time.sleep(reply.delay)
                payload, headers = reply.encoded()
                self.send_response(reply.status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        return Handler


# --- Mailjet Send API v3.1 ---------------------------------------------------------------
#
# Written from Mailjet's documentation of the Send API v3.1 (message properties, the
# error table, sandbox mode, the order of results), independently of the adapter: its
# own list of forbidden headers, its own limits.  ``refuse(address)`` makes every
# message with that recipient fail with the given error while the others are sent, as
# Mailjet processes each message of a request separately.

#: Message properties of the Send API v3.1 (mailjet/api-documentation, _send-api.md).
MAILJET_PROPERTIES = frozenset(
    {
        "From",
        "Sender",
        "To",
        "Cc",
        "Bcc",
        "ReplyTo",
        "Subject",
        "TextPart",
        "HTMLPart",
        "TemplateID",
        "TemplateLanguage",
        "TemplateErrorReporting",
        "TemplateErrorDeliver",
        "Attachments",
        "InlinedAttachments",
        "Priority",
        "CustomCampaign",
        "DeduplicateCampaign",
        "TrackOpens",
        "TrackClicks",
        "CustomID",
        "EventPayload",
        "MonitoringCategory",
        "URLTags",
        "Headers",
        "Variables",
    }
)
#: "List of forbidden headers" of the Send API guide (send-0011).
MAILJET_FORBIDDEN = frozenset(
    h.lower()
    for h in [
        "From",
        "Sender",
        "Subject",
        "To",
        "Cc",
        "Bcc",
        "Return-Path",
        "Delivered-To",
        "DKIM-Signature",
        "DomainKey-Status",
        "Received-SPF",
        "Authentication-Results",
        "Received",
        "X-Mailjet-Prio",
        "X-Mailjet-Debug",
        "User-Agent",
        "X-Mailer",
        "X-MJ-CustomID",
        "X-MJ-EventPayload",
        "X-MJ-Vars",
        "X-MJ-TemplateErrorDeliver",
        "X-MJ-TemplateErrorReporting",
        "X-MJ-TemplateLanguage",
        "X-Mailjet-TrackOpen",
        "X-Mailjet-TrackClick",
        "X-MJ-TemplateID",
        "X-MJ-WorkflowID",
        "X-Feedback-Id",
        "X-Mailjet-Segmentation",
        "List-Id",
        "X-MJ-MID",
        "X-MJ-ErrorMessage",
        "Date",
        "X-CSA-Complaints",
        "Message-Id",
        "X-Mailjet-Campaign",
        "X-MJ-StatisticsContactsListID",
    ]
)
MailjetError = tuple[int, str, str]  # (StatusCode, ErrorCode, ErrorMessage)


class MailjetAPI:
    """A responder for :class:`FakeESP` that validates like Mailjet's ``POST /v3.1/send``
    (and answers ``GET /v3/REST/apikey``, the doctor's credential check)."""

    def __init__(
        self,
        api_key: str,
        secret_key: str,
        *,
        refuse: Callable[[str], MailjetError | None] | None = None,
    ) -> None:
        self.auth = "Basic " + base64.b64encode(f"{api_key}:{secret_key}".encode()).decode()
        self.refuse = refuse or (lambda address: None)
        self._next_id = 70_650_219_165_027_410
        self._lock = threading.Lock()

    def __call__(self, request: Recorded) -> Reply:
        if request.headers.get("authorization") != self.auth:
            return Reply(401, _mj_global(401, "mj-0015", "API key authentication failure"))
        if request.method == "GET" and request.path == "/v3/REST/apikey":
            return Reply(200, {"Count": 1, "Data": [{"IsActive": True}], "Total": 1})
        if request.method != "POST" or request.path != "/v3.1/send":
            return Reply(404, _mj_global(404, "mj-0000", "Not Found"))
        try:
            payload = request.json()
        except ValueError:
            return Reply(400, _mj_global(400, "mj-0002", "Malformed JSON"))
        if not isinstance(payload, dict) or set(payload) - {"Messages", "Globals", "SandboxMode"}:
            return Reply(400, _mj_global(400, "mj-0003", "Unknown or missing root property"))
        messages = payload.get("Messages")
        if not isinstance(messages, list) or not messages:
            return Reply(400, _mj_global(400, "mj-0007", "Messages cannot be empty"))
        if len(messages) > 50:
            return Reply(400, _mj_global(400, "mj-0008", "Messages has over 50 elements"))
        shared = payload.get("Globals", {})
        sandbox = payload.get("SandboxMode") is True
        results = [self._message({**shared, **m}, sandbox) for m in messages]
        failed = any(r["Status"] == "error" for r in results)
        return Reply(400 if failed else 200, {"Messages": results})

    def _message(self, message: dict[str, Any], sandbox: bool) -> dict[str, Any]:
        errors = mailjet_errors(message)
        if not errors:
            for box in message["To"] + message.get("Cc", []) + message.get("Bcc", []):
                refused = self.refuse(box["Email"])
                if refused is not None:
                    errors = [(*refused, "To")]
                    break
        if errors:
            return {
                "Status": "error",
                "Errors": [
                    {
                        "ErrorIdentifier": f"{abs(hash((code, text))):x}",
                        "ErrorCode": code,
                        "StatusCode": status,
                        "ErrorMessage": text,
                        "ErrorRelatedTo": [related],
                    }
                    for status, code, text, related in errors
                ],
            }
        result: dict[str, Any] = {"Status": "success", "CustomID": message.get("CustomID", "")}
        for kind in ("To", "Cc", "Bcc"):
            result[kind] = [self._sent(box["Email"], sandbox) for box in message.get(kind, [])]
        return result

    def _sent(self, address: str, sandbox: bool) -> dict[str, Any]:
        if sandbox:  # "omitting only the MessageID and MessageUUID"
            return {"Email": address, "MessageUUID": "", "MessageID": 0, "MessageHref": ""}
        with self._lock:
            self._next_id += 1
            number = self._next_id
        return {
            "Email": address,
            "MessageUUID": f"{number:032x}",
            "MessageID": number,
            "MessageHref": f"https://api.mailjet.com/v3/REST/message/{number}",
        }


def _mj_global(status: int, code: str, message: str) -> dict[str, Any]:
    return {
        "ErrorIdentifier": f"{abs(hash(code)):x}",
        "ErrorCode": code,
        "ErrorMessage": message,
        "StatusCode": status,
    }


def _mj_people(value: Any, kind: str, errors: list[tuple[int, str, str, str]]) -> list[str]:
    if not isinstance(value, list):
        errors.append((400, "mj-0004", "Type mismatch. Expected type array of emails.", kind))
        return []
    out = []
    for item in value:
        if not isinstance(item, dict) or set(item) - {"Email", "Name"}:
            errors.append((400, "mj-0004", "Expected {Email, Name}", kind))
        elif not isinstance(item.get("Email"), str) or "@" not in item["Email"]:
            errors.append((400, "mj-0013", f'"{item.get("Email")}" is an invalid email', kind))
        elif item.get("Name") == "":
            errors.append((400, "mj-0012", "Name cannot be empty", kind))
        else:
            out.append(item["Email"].lower())
    return out


def mailjet_errors(message: Any) -> list[tuple[int, str, str, str]]:
    """What Mailjet's Send API v3.1 refuses in one message (after Globals are merged):
    ``(StatusCode, ErrorCode, ErrorMessage, ErrorRelatedTo)`` each.

    Two checks are stricter than Mailjet documents, so that a test fails where the
    adapter would rely on undocumented leniency: an unknown property, and a header name
    or value that is not ASCII (esprelay sends 7-bit header values, RFC 2047)."""
    errors: list[tuple[int, str, str, str]] = []
    if not isinstance(message, dict):
        return [(400, "mj-0004", "A message is an object", "Messages")]
    for name in set(message) - MAILJET_PROPERTIES:
        errors.append((400, "mj-0003", f"Unknown property {name}", name))
    sender = message.get("From")
    if not isinstance(sender, dict) or "@" not in str(sender.get("Email", "")):
        errors.append((400, "mj-0003", "The From is mandatory but missing", "From"))
    if "Sender" in message:
        errors.append((403, "send-0006", "The API key may not use a Sender", "SenderID"))
    if not message.get("To"):
        errors.append((400, "mj-0003", "The To is mandatory but missing from the input", "To"))
    people = [
        p for kind in ("To", "Cc", "Bcc") for p in _mj_people(message.get(kind, []), kind, errors)
    ]
    if len(set(people)) > 50:
        errors.append((400, "send-0015", "Too many recipients", "To, Cc, Bcc"))
    subject = message.get("Subject")
    if subject is not None and (not isinstance(subject, str) or len(subject) > 255):
        errors.append((400, "mj-0006", "Subject is over 255 characters", "Subject"))
    parts = [message.get(p) for p in ("TextPart", "HTMLPart")]
    if not any(isinstance(p, str) and p for p in parts):
        errors.append(
            (400, "send-0003", 'At least "HTMLPart", "TextPart" or "TemplateID" must be provided.',
             "TextPart")
        )  # fmt: skip
    total = 0
    for kind in ("Attachments", "InlinedAttachments"):
        items = message.get(kind, [])
        if not isinstance(items, list):
            errors.append((400, "mj-0004", "Expected an array", kind))
            continue
        allowed = {"ContentType", "Filename", "Base64Content"} | (
            {"ContentID"} if kind == "InlinedAttachments" else set()
        )
        for item in items:
            if not isinstance(item, dict) or set(item) - allowed:
                errors.append((400, "mj-0004", "Unexpected attachment property", kind))
                continue
            for key in ("ContentType", "Filename", "Base64Content"):
                if not isinstance(item.get(key), str) or not item[key]:
                    errors.append((400, "mj-0012", f"{key} cannot be empty", f"{kind}.{key}"))
            try:
                total += len(base64.b64decode(str(item.get("Base64Content", "")), validate=True))
            except (binascii.Error, ValueError):
                errors.append((400, "mj-0004", "Base64Content is not base64", kind))
    if total > 15 * 1000 * 1000:
        errors.append((400, "mj-0011", "Attachments are over 15 MB", "Attachments"))
    headers = message.get("Headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        errors.append((400, "mj-0004", "Headers map names to strings", "Headers"))
    else:
        for name in headers:
            if name.lower() in MAILJET_FORBIDDEN:
                errors.append(
                    (400, "send-0011", f"The {name} header cannot be set", f'Headers["{name}"]')
                )
            elif not name.isascii() or not headers[name].isascii():
                errors.append((400, "mj-0004", "Header lines are ASCII", f'Headers["{name}"]'))
    reply_to = message.get("ReplyTo")
    if reply_to is not None and (
        not isinstance(reply_to, dict) or "@" not in str(reply_to.get("Email"))
    ):
        errors.append((400, "mj-0013", "ReplyTo needs an Email", "ReplyTo"))
    for key in ("CustomID", "EventPayload", "CustomCampaign", "MonitoringCategory"):
        if key in message and (not isinstance(message[key], str) or not message[key]):
            errors.append((400, "mj-0012", f"{key} must be a non-empty string", key))
    if message.get("DeduplicateCampaign") is True and "CustomCampaign" not in message:
        errors.append(
            (400, "send-0012", "DeduplicateCampaign needs a CustomCampaign", "CustomCampaign")
        )
    for key in ("TrackOpens", "TrackClicks"):
        if key in message and (
            message[key] not in ("account_default", "disabled", "enabled")
            or not message.get("HTMLPart")
        ):
            errors.append((400, "mj-0005", f"{key} is not an allowed value here", key))
    if "Priority" in message and (
        not isinstance(message["Priority"], int) or isinstance(message["Priority"], bool)
    ):
        errors.append((400, "mj-0004", "Priority is an integer", "Priority"))
    return errors


# --- SparkPost transmissions API (email_rfc822) --------------------------------------------
#
# Written from SparkPost's API Blueprint (developers.sparkpost.com: transmissions.apib,
# index.apib's error table, recipient-lists.apib's address object, template-language.apib),
# independently of the adapter.  Recipients in ``refuse`` are refused at injection the
# way SparkPost refuses a malformed address: counted in ``total_rejected_recipients``,
# described in ``rcpt_to_errors`` without the address (``name_refused=True`` names it).

_SP_EXPRESSION = re.compile(r"\{\{\{?\s*([A-Za-z_][A-Za-z0-9_]*)?[^{}]*?\s*\}?\}\}")
_SP_ADDRESS = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_SP_FROM = re.compile(rb"(?im)^from:.*?([^\s<@\"]+@([^\s>\"]+))")


def sparkpost_error(
    status: int, code: str, message: str, description: str = "", **headers: str
) -> Reply:
    """An answer in SparkPost's error form, ``{"errors": [{message, code, description}]}``."""
    item = {"message": message, "code": code}
    if description:
        item["description"] = description
    return Reply(status, {"errors": [item]}, dict(headers))


def sparkpost_substitute(text: str, data: dict[str, Any]) -> str:
    """SparkPost's expressions as far as a relay's messages meet them: ``{{ name }}`` and
    ``{{{ name }}}`` become the variable's value; an unknown variable or anything else
    (a statement, a macro) the empty string ("An empty string is substituted for
    variables that do not exist or have a value of null")."""

    def value(match: re.Match[str]) -> str:
        name = match[1]
        found = data.get(name) if name else None
        return "" if found is None else str(found)

    return _SP_EXPRESSION.sub(value, text)


def sparkpost_render_headers(raw: bytes, data: dict[str, Any]) -> bytes:
    """What the template engine makes of a message's top-level header fields, which it
    reads even with substitutions off: encoded words decoded to look for expressions; a
    field with one written back, RFC 2047 base64 when it is no longer ASCII ("Encoding
    Rules")."""
    head, separator, body = raw.partition(b"\r\n\r\n")
    out = []
    for item in re.split(rb"\r\n(?![ \t])", head):
        name, _, value = item.partition(b":")
        text = value.decode("utf-8", "surrogateescape")
        if "=?" in text:
            decoded = str(email.header.make_header(email.header.decode_header(text)))
            if "{{" in decoded:
                new = sparkpost_substitute(decoded, data).strip()
                if not new.isascii():
                    new = email.header.Header(new, "utf-8").encode()
                out.append(name + b": " + new.encode("ascii"))
                continue
        rendered = sparkpost_substitute(text, data)
        out.append(name + b":" + rendered.encode("utf-8", "surrogateescape"))
    return b"\r\n".join(out) + separator + body


def sparkpost_problems(payload: Any) -> list[str]:
    """What the transmissions API documents as required or forbidden for rfc822 content."""
    if not isinstance(payload, dict):
        return ["request body must be an object"]
    problems = []
    recipients = payload.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        problems.append("recipients must be a non-empty array")
    else:
        for item in recipients:
            address = item.get("address") if isinstance(item, dict) else None
            if not isinstance(address, dict) or not isinstance(address.get("email"), str):
                problems.append("address.email is required for each recipient")
            elif set(address) - {"email", "name", "header_to"}:
                problems.append("unknown address field")
    content = payload.get("content")
    if not isinstance(content, dict) or not isinstance(content.get("email_rfc822"), str):
        problems.append("content.email_rfc822 is required")
    else:
        if set(content) != {"email_rfc822"}:
            problems.append("email_rfc822 cannot be combined with other content fields")
        text = content["email_rfc822"]
        if text.endswith("\r\n.\r\n"):
            problems.append("email_rfc822 must not end in the SMTP terminator")
        if "\r\n\r\n" not in text:
            problems.append("email_rfc822 has no header section")
    options = payload.get("options", {})
    if not isinstance(options, dict) or not all(
        isinstance(v, str) if k == "ip_pool" else isinstance(v, bool) for k, v in options.items()
    ):
        problems.append("options must be booleans (ip_pool a string)")
    for key in ("metadata", "substitution_data"):
        if key in payload and not isinstance(payload[key], dict):
            problems.append(f"{key} must be an object")
    if len(json.dumps(payload.get("metadata", {}))) > 10_000:
        problems.append("metadata too large (10KB)")
    campaign = payload.get("campaign_id")
    if campaign is not None and (not isinstance(campaign, str) or len(campaign.encode()) > 64):
        problems.append("campaign_id is a string of at most 64 bytes")
    return problems


class SparkPostAPI:
    """A responder for :class:`FakeESP` that validates like SparkPost's
    ``POST /api/v1/transmissions`` with ``email_rfc822`` content (and answers
    ``GET /api/v1/account``, the doctor's credential check).  ``delivered`` holds
    (envelope recipient, message as SparkPost would send it) pairs."""

    def __init__(
        self,
        api_key: str,
        *,
        verified: frozenset[str] | set[str] = frozenset({"example.com"}),
        refuse: frozenset[str] | set[str] = frozenset(),
        name_refused: bool = False,
    ) -> None:
        self.api_key = api_key
        #: The account's verified sending domains; a From elsewhere is ``400 7001``.
        self.verified = {d.lower() for d in verified}
        self.refuse = set(refuse)
        self.name_refused = name_refused
        self.sandbox_sent = 0
        self.delivered: list[tuple[str, bytes]] = []
        self.bodies: list[dict[str, Any]] = []
        self._ids = itertools.count(11668787484950529)
        self._lock = threading.Lock()

    def __call__(self, request: Recorded) -> Reply:
        path = request.path.rstrip("/")
        if path not in ("/api/v1/transmissions", "/api/v1/account"):
            return sparkpost_error(404, "1101", "invalid URI")
        if request.headers.get("authorization") != self.api_key:
            return sparkpost_error(401, "1100", "Unauthorized.")
        if path == "/api/v1/account":
            if request.method != "GET":
                return sparkpost_error(405, "1102", "invalid HTTP method")
            return Reply(200, {"results": {"customer_id": 1, "status": "active"}})
        if request.method != "POST":
            return sparkpost_error(405, "1102", "invalid HTTP method")
        if not request.headers.get("content-type", "").startswith("application/json"):
            return sparkpost_error(415, "1300", "invalid data format/type")
        try:
            payload = request.json()
        except ValueError:
            return sparkpost_error(400, "1300", "invalid data format/type", "invalid JSON")
        with self._lock:
            if isinstance(payload, dict):
                self.bodies.append(payload)
            return self._transmit(payload)

    def _transmit(self, payload: Any) -> Reply:
        problems = sparkpost_problems(payload)
        if problems:
            return sparkpost_error(422, "1300", "invalid data format/type", "; ".join(problems))
        raw = str(payload["content"]["email_rfc822"]).encode("utf-8")
        sender = _SP_FROM.search(raw.split(b"\r\n\r\n", 1)[0])
        if sender is None:
            return sparkpost_error(422, "1300", "invalid data format/type", "Unable to parse MIME")
        options = payload.get("options", {})
        if options.get("sandbox"):
            if self.sandbox_sent >= 5:
                return sparkpost_error(420, "2103", "Exceed Sending Limit (sandbox)")
            self.sandbox_sent += 1
        elif sender[2].decode("utf-8", "replace").lower() not in self.verified:
            return sparkpost_error(
                400, "7001", "Invalid domain", "Unconfigured or unverified sending domain."
            )
        data = payload.get("substitution_data", {})
        rendered = sparkpost_render_headers(raw, data)
        if options.get("perform_substitutions", True) is not False:
            head, separator, body = rendered.partition(b"\r\n\r\n")
            text = sparkpost_substitute(body.decode("utf-8", "surrogateescape"), data)
            rendered = head + separator + text.encode("utf-8", "surrogateescape")
        accepted: list[str] = []
        errors: list[dict[str, str]] = []
        for recipient in payload["recipients"]:
            address = recipient["address"]["email"]
            if address in self.refuse or not _SP_ADDRESS.fullmatch(address):
                where = f" ({address})" if self.name_refused else ""
                errors.append(
                    {
                        "message": "invalid data format/type",
                        "description": f"Invalid recipient address.email{where}",
                        "code": "1300",
                    }
                )
            else:
                accepted.append(address)
        if not accepted:
            return sparkpost_error(400, "5002", "At least one valid recipient is required")
        self.delivered += [(address, rendered) for address in accepted]
        results: dict[str, Any] = {
            "total_rejected_recipients": len(errors),
            "total_accepted_recipients": len(accepted),
            "id": str(next(self._ids)),
        }
        answer: dict[str, Any] = {"results": results}
        if errors:
            results["rcpt_to_errors"] = errors
            answer["errors"] = [
                {"message": "transmission created, but with validation errors", "code": "2000"}
            ]
        return Reply(200, answer)
