"""The operations HTTP endpoint: health, readiness, metrics and the queue admin API.

A deliberately small HTTP/1.1 server on ``asyncio.start_server`` (no web framework:
the routes are few and fixed, and a dependency the size of aiohttp would buy nothing
here).  One request per connection (``Connection: close``), request line and headers
capped at 16 KiB, bodies refused (no route takes one), a read timeout on every
connection.  It listens on loopback by default.

Routes::

    GET    /healthz                     200 "ok" while the process runs
    GET    /readyz                      200 or 503, with the result of every check (JSON)
    GET    /metrics                     Prometheus text format
    GET    /api/messages?state=&limit=  list (admin)
    GET    /api/messages/{id}?body=1    one message, its attempts; the body on request
    POST   /api/messages/{id}/retry     make it due now
    DELETE /api/messages/{id}           delete it
    GET    /queue?state=                read-only HTML page (admin)

Admin routes exist only when ``ESPRELAY_ADMIN_TOKEN`` is set and there is a spool (not in
passthrough mode; 404 otherwise) and need
``Authorization: Bearer <token>`` (401 otherwise).  The HTML page also accepts the
token once as ``/queue?token=...``: it answers with a redirect that drops the token
from the address and sets it as an ``HttpOnly``, ``SameSite=Strict`` cookie, which
then works for the page only (GET, read-only), never for the JSON API, so a cookie
can never be used to retry or delete anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from esprelay.errors import SpoolError
from esprelay.metrics import CONTENT_TYPE, RelayMetrics
from esprelay.models import MessageState, SpooledMessage
from esprelay.queueview import detail, summary, table_time
from esprelay.spool.base import Spool

log = logging.getLogger("esprelay.http")

MAX_HEAD = 16 * 1024
READ_TIMEOUT = 10.0
LIST_LIMIT_MAX = 1000
COOKIE = "esprelay_admin"

#: A readiness check returns None when fine, else a short reason.
ReadinessCheck = Callable[[], Awaitable[str | None]]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(data, indent=1).encode() + b"\n", "application/json")

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode())


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class OpsServer:
    """The HTTP side of one relay.  ``admin_token`` may change (SIGHUP)."""

    def __init__(
        self,
        *,
        spool: Spool | None,
        metrics: RelayMetrics,
        admin_token: str | None,
        readiness: list[tuple[str, ReadinessCheck]],
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.spool = spool
        self.metrics = metrics
        self.admin_token = admin_token
        self.readiness = readiness
        self.on_retry = on_retry
        self.server: asyncio.Server | None = None
        self.port: int | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(
            self._serve, host=host, port=port, limit=MAX_HEAD, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self._connections):
                task.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), timeout=2)

    # region HTTP/1.1, the small part we need

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            try:
                request = await asyncio.wait_for(_read_request(reader), READ_TIMEOUT)
            except HttpError as exc:
                response = Response.text(f"{exc}\n", exc.status)
                method = "?"
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            else:
                method = request.method
                response = await self._dispatch(request)
            writer.write(_encode(response, head_only=method == "HEAD"))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)

    async def _dispatch(self, request: Request) -> Response:
        try:
            response = await self._route(request)
        except HttpError as exc:
            response = Response.json({"error": str(exc)}, exc.status)
            response.headers.update(exc.headers)
        except SpoolError as exc:
            log.error("http %s %s: spool error: %s", request.method, request.path, exc)
            response = Response.json({"error": "spool unavailable"}, 503)
        except Exception:
            log.exception("http %s %s failed", request.method, request.path)
            response = Response.json({"error": "internal error"}, 500)
        # Never log the query string: it may carry the admin token.
        log.debug("http %s %s -> %d", request.method, request.path, response.status)
        return response

    # endregion

    async def _route(self, request: Request) -> Response:
        method, path = request.method, request.path
        if method == "HEAD":
            method = "GET"
        if path == "/healthz":
            _allow(method, "GET")
            return Response.text("ok\n")
        if path == "/readyz":
            _allow(method, "GET")
            return await self._readyz()
        if path == "/metrics":
            _allow(method, "GET")
            await self.refresh_spool_metrics()
            return Response(200, self.metrics.exposition(), CONTENT_TYPE)
        if path == "/queue" or path == "/api/messages" or path.startswith("/api/messages/"):
            if self.admin_token is None or self.spool is None:
                raise HttpError(404, "not found")
            if path == "/queue":
                _allow(method, "GET")
                return await self._queue_page(request)
            self._require_bearer(request)
            return await self._api(method, path, request)
        raise HttpError(404, "not found")

    async def refresh_spool_metrics(self) -> None:
        if self.spool is None:
            return
        try:
            stats = await self.spool.stats()
        except SpoolError as exc:
            log.warning("metrics: cannot read spool statistics: %s", exc)
            self.metrics.spool_scrape_errors.inc()
        else:
            self.metrics.observe_spool(stats)

    async def _readyz(self) -> Response:
        results: dict[str, str] = {}
        ready = True
        for name, check in self.readiness:
            try:
                problem = await check()
            except Exception as exc:  # noqa: BLE001 - a failing check means "not ready"
                problem = f"check failed: {type(exc).__name__}: {exc}"
            results[name] = "ok" if problem is None else problem
            ready = ready and problem is None
        return Response.json({"ready": ready, "checks": results}, 200 if ready else 503)

    # region admin

    def _token_matches(self, candidate: str | None) -> bool:
        token = self.admin_token
        if token is None or not candidate:
            return False
        return hmac.compare_digest(candidate.encode(), token.encode())

    def _bearer(self, request: Request) -> str | None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None

    def _require_bearer(self, request: Request) -> None:
        if not self._token_matches(self._bearer(request)):
            raise HttpError(
                401, "a valid admin bearer token is required", {"WWW-Authenticate": "Bearer"}
            )

    async def _api(self, method: str, path: str, request: Request) -> Response:
        assert self.spool is not None
        parts = [unquote(p) for p in path.split("/")[3:]]  # after "", "api", "messages"
        if not parts:
            _allow(method, "GET")
            state = _state_arg(request.arg("state"))
            limit = _limit_arg(request.arg("limit"))
            messages = await self.spool.list(state=state, limit=limit)
            return Response.json({"messages": [summary(m) for m in messages]})
        message_id = parts[0]
        if len(parts) == 1:
            if method == "GET":
                with_body = request.arg("body") in ("1", "true", "yes")
                message = await self.spool.get(message_id, with_body=with_body)
                if message is None:
                    raise HttpError(404, f"no message {message_id}")
                return Response.json(detail(message, with_body=with_body))
            _allow(method, "GET", "DELETE")
            if not await self.spool.delete(message_id):
                raise HttpError(404, f"no message {message_id}")
            log.info("admin api: deleted id=%s", message_id, extra={"message_id": message_id})
            return Response.json({"id": message_id, "deleted": True})
        if len(parts) == 2 and parts[1] == "retry":
            _allow(method, "POST")
            if not await self.spool.retry_now(message_id):
                raise HttpError(404, f"no queued or failed message {message_id}")
            log.info("admin api: retry now id=%s", message_id, extra={"message_id": message_id})
            if self.on_retry is not None:
                self.on_retry()
            return Response.json({"id": message_id, "due": True})
        raise HttpError(404, "not found")

    async def _queue_page(self, request: Request) -> Response:
        assert self.spool is not None
        token = request.arg("token")
        if token is not None:
            if not self._token_matches(token):
                raise HttpError(401, "wrong token")
            state = request.arg("state")
            location = "/queue" + (f"?state={quote(state)}" if state else "")
            return Response(
                303,
                b"",
                headers={
                    "Location": location,
                    "Set-Cookie": f"{COOKIE}={quote(token, safe='')}; Path=/queue;"
                    " HttpOnly; SameSite=Strict",
                    "Cache-Control": "no-store",
                },
            )
        cookie = unquote(_cookies(request.headers.get("cookie", "")).get(COOKIE, ""))
        if not (self._token_matches(self._bearer(request)) or self._token_matches(cookie)):
            raise HttpError(
                401,
                "a valid admin token is required (bearer header, or open /queue?token=...)",
                {"WWW-Authenticate": "Bearer"},
            )
        state = _state_arg(request.arg("state"))
        messages = await self.spool.list(state=state, limit=_limit_arg(request.arg("limit")))
        stats = await self.spool.stats()
        counts = {s.value: stats.counts.get(s, 0) for s in MessageState}
        page = render_queue_page(messages, counts, state)
        return Response(
            200,
            page.encode(),
            "text/html; charset=utf-8",
            {
                "Cache-Control": "no-store",
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
                "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer",
            },
        )

    # endregion


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise HttpError(405, "method not allowed", {"Allow": ", ".join(allowed)})


def _state_arg(value: str | None) -> MessageState | None:
    if not value:
        return None
    try:
        return MessageState(value)
    except ValueError:
        choices = ", ".join(s.value for s in MessageState)
        raise HttpError(400, f"state must be one of {choices}") from None


def _limit_arg(value: str | None) -> int:
    if value is None:
        return 100
    if not value.isdigit() or not 1 <= int(value) <= LIST_LIMIT_MAX:
        raise HttpError(400, f"limit must be a number from 1 to {LIST_LIMIT_MAX}")
    return int(value)


def _cookies(header: str) -> dict[str, str]:
    jar: dict[str, str] = {}
    for part in header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq:
            jar[name] = value
    return jar


async def _read_request(reader: asyncio.StreamReader) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(431, "request head too large") from None
    if len(head) > MAX_HEAD:
        raise HttpError(431, "request head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "bad request line")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise HttpError(400, "bad header line")
        headers[name.lower()] = value.strip()
    if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
        raise HttpError(413, "request bodies are not accepted")
    url = urlsplit(target)
    if not url.path.startswith("/"):
        raise HttpError(400, "bad request target")
    return Request(method.upper(), url.path, parse_qs(url.query), headers)


def _encode(response: Response, *, head_only: bool = False) -> bytes:
    reason = HTTPStatus(response.status).phrase
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        "X-Content-Type-Options: nosniff",
        *(f"{name}: {value}" for name, value in response.headers.items()),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


# region views shared by the JSON API and the page


_PAGE_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}
td.err{color:#a00;max-width:40em;overflow-wrap:anywhere}
.state-failed{color:#a00;font-weight:bold}.state-queued{color:#a60}.state-delivered{color:#070}
nav a{margin-right:1em}td.t{white-space:nowrap}
"""


def render_queue_page(
    messages: list[SpooledMessage], counts: dict[str, int], state: MessageState | None
) -> str:
    """The read-only queue page.  Every value is escaped; no script at all."""
    e = html.escape
    nav = " ".join(
        f'<a href="/queue?state={e(name)}">{e(name)} ({count})</a>'
        for name, count in counts.items()
    )
    rows = []
    for m in messages:
        due = table_time(m.next_attempt_at) if m.state is MessageState.QUEUED else ""
        rows.append(
            "<tr>"
            f'<td class="id"><code>{e(m.id)}</code></td>'
            f'<td class="state-{e(m.state.value)}">{e(m.state.value)}</td>'
            f'<td class="t">{e(table_time(m.created_at))}</td>'
            f"<td>{e('<' + m.envelope.mail_from + '>')}</td>"
            f"<td>{'<br>'.join(e(r) for r in m.envelope.rcpt_tos)}</td>"
            f"<td>{m.size}</td><td>{m.attempts}</td>"
            f'<td class="t">{e(due)}</td>'
            f"<td>{e(m.provider)}</td><td>{e(m.provider_message_id or '')}</td>"
            f'<td class="err">{e(m.last_error or "")}</td>'
            "</tr>"
        )
    shown = f"state {state.value}" if state else "all states"
    body = "\n".join(rows) or '<tr><td colspan="11">no messages</td></tr>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>esprelay queue</title><style>{_PAGE_STYLE}</style></head>
<body><h1>esprelay queue</h1>
<nav><a href="/queue">all</a> {nav}</nav>
<p id="summary">{len(messages)} message(s) shown, {e(shown)}. Read-only: act with
<code>esprelay queue</code> or the admin API.</p>
<table id="messages"><thead><tr><th>id</th><th>state</th><th>created (UTC)</th><th>from</th>
<th>recipients</th><th>size</th><th>attempts</th><th>next attempt</th><th>provider</th>
<th>provider id</th><th>last error</th></tr></thead>
<tbody>
{body}
</tbody></table></body></html>
"""


# endregion
