"""The operations HTTP endpoint: health, readiness, metrics and the queue admin API.

Served by ``aiohttp.web`` (the stack the ESP webhook receivers will share): keep-alive
connections closed after ``IDLE_TIMEOUT`` seconds without a complete request, request
lines and header fields capped by aiohttp's parser (``MAX_LINE``, ``MAX_FIELD``,
``MAX_HEADERS``), request bodies refused (no route takes one), no access log (a query
string may carry the admin token), and a request aiohttp cannot parse logged at DEBUG
without its text.  It listens on loopback by default.

Routes::

    GET    /healthz                     200 "ok" while the process runs; ?detail=1: JSON
                                        with each provider's circuit breaker
    GET    /readyz                      200 or 503, with the result of every check (JSON)
    GET    /metrics                     Prometheus text format
    GET    /api/messages?state=&limit=  list (admin)
    GET    /api/messages?message_id=&rcpt=&since=&until=
                                        search by Message-ID header, recipient, time
    GET    /api/messages/{id}?body=1    one message, its attempts, per-recipient status
                                        and timeline (ESP events); the body on request
    POST   /api/messages/{id}/retry     make it due now
    DELETE /api/messages/{id}           delete it
    GET    /queue?state=                read-only HTML page (admin)
    GET    /queue/{id}                  one message's page, with its timeline (admin)

Admin routes exist only when ``ESPRELAY_ADMIN_TOKEN`` is set and there is a spool (not in
passthrough mode; 404 otherwise) and need ``Authorization: Bearer <token>`` (401
otherwise).  The HTML page also accepts the token once as ``/queue?token=...``: it
answers with a redirect that drops the token from the address and sets an ``HttpOnly``,
``SameSite=Strict`` cookie for ``/queue``.  The cookie is not the token but an HMAC of
a fixed label keyed with it: it opens the page only (GET, read-only), a stolen cookie
is no bearer token for the JSON API, and a new token voids every cookie.

When every listening address is loopback, a request must name a loopback host
(``localhost``, ``127.x.y.z``, ``[::1]``, with or without a port) in its ``Host``
header, else it is answered ``421 Misdirected Request``: a page whose domain was
re-pointed at 127.0.0.1 (DNS rebinding) cannot read /readyz or /metrics.  With the
admin API on and an address beyond loopback, start-up logs a warning: plain HTTP
carries the token in clear, put TLS (a reverse proxy) in front.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import json
import logging
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from esprelay.errors import SpoolError
from esprelay.events.status import MessageStatusStore
from esprelay.metrics import CONTENT_TYPE, RelayMetrics
from esprelay.models import MessageState, SpooledMessage
from esprelay.queueview import detail, summary, table_time
from esprelay.queueview import load as load_message
from esprelay.spool.base import Spool

log = logging.getLogger("esprelay.http")

MAX_LINE = 8190  # request line, query string included
MAX_FIELD = 8190  # one header field
MAX_HEADERS = 64
IDLE_TIMEOUT = 10.0  # seconds a connection may go without sending a complete request
SHUTDOWN_TIMEOUT = 2.0
LIST_LIMIT_MAX = 1000
COOKIE = "esprelay_admin"
_COOKIE_LABEL = b"esprelay queue page cookie v1"

#: A readiness check returns None when fine, else a short reason.
ReadinessCheck = Callable[[], Awaitable[str | None]]
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _BadRequests(logging.Filter):
    """aiohttp logs a request it cannot parse at ERROR with a traceback that quotes the
    request, a query string's admin token included.  A client's malformed request is no
    error of ours: one DEBUG line with the status and the kind of fault instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log.debug("http bad request: %d %s", exc.code, type(exc).__name__)
            return False
        return True


_server_log = logging.getLogger("esprelay.http.server")
_server_log.addFilter(_BadRequests())


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
        health: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.spool = spool
        #: What ``/healthz?detail=1`` adds to "ok": provider health (never readiness).
        self.health = health
        self.metrics = metrics
        self.readiness = readiness
        self.on_retry = on_retry
        self.port: int | None = None
        self.loopback_only = True  # every listening address is loopback (known after start)
        self._runner: web.AppRunner | None = None
        self._admin_token: str | None = None
        self._cookie: str | None = None
        self.admin_token = admin_token

    @property
    def admin_token(self) -> str | None:
        return self._admin_token

    @admin_token.setter
    def admin_token(self, token: str | None) -> None:
        enabled = token is not None and self._admin_token is None
        self._admin_token = token
        self._cookie = None if token is None else page_cookie(token)
        if enabled and self._runner is not None:
            self._warn_if_exposed()

    async def start(self, host: str, port: int) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=1024)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/messages", self._list)
        app.router.add_get("/api/messages/{id}", self._show)
        app.router.add_delete("/api/messages/{id}", self._delete)
        app.router.add_post("/api/messages/{id}/retry", self._retry)
        app.router.add_get("/queue", self._queue_page)
        app.router.add_get("/queue/{id}", self._message_page)
        runner = web.AppRunner(
            app,
            access_log=None,  # a query string may carry the admin token
            logger=_server_log,
            keepalive_timeout=IDLE_TIMEOUT,
            max_line_size=MAX_LINE,
            max_field_size=MAX_FIELD,
            max_headers=MAX_HEADERS,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = [address[0] for address in runner.addresses]
        self.port = runner.addresses[0][1]
        self.loopback_only = all(_is_loopback(address) for address in addresses)
        self._warn_if_exposed()

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _warn_if_exposed(self) -> None:
        if self._admin_token is None or self.loopback_only or self._runner is None:
            return
        log.warning(
            "admin api listening beyond loopback (%s) over plain HTTP: the bearer token and"
            " the queue cross the network in clear; put TLS in front (a reverse proxy)"
            " or listen on 127.0.0.1",
            ", ".join(f"{a[0]}:{a[1]}" for a in self._runner.addresses),
        )

    # region request handling shared by every route

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            response = await self._guarded(request, handler)
        except HttpError as exc:
            response = _json({"error": str(exc)}, exc.status)
            response.headers.update(exc.headers)
            if exc.status == 413:
                response.force_close()  # rather than read the body to reuse the connection
        except SpoolError as exc:
            log.error("http %s %s: spool error: %s", request.method, request.path, exc)
            response = _json({"error": "spool unavailable"}, 503)
        except Exception:
            log.exception("http %s %s failed", request.method, request.path)
            response = _json({"error": "internal error"}, 500)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers[hdrs.SERVER] = "esprelay"
        # Never log the query string: it may carry the admin token.
        log.debug("http %s %s -> %d", request.method, request.path, response.status)
        return response

    async def _guarded(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if self.loopback_only and not loopback_host(request.headers.get(hdrs.HOST)):
            raise HttpError(421, "this endpoint answers to loopback host names only")
        if request.body_exists:
            raise HttpError(413, "request bodies are not accepted")
        path = request.path
        if path in ("/queue", "/api/messages") or path.startswith("/api/messages/"):
            if self._admin_token is None or self.spool is None:
                raise HttpError(404, "not found")
            if path != "/queue":
                self._require_bearer(request)
        try:
            return await handler(request)
        except web.HTTPException as exc:  # no route, or not this method
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
            raise HttpError(exc.status, exc.reason.lower(), headers) from None

    # endregion

    async def _healthz(self, request: web.Request) -> web.Response:
        if "detail" not in request.query:
            return web.Response(text="ok\n")
        detail: dict[str, Any] = {"status": "ok"}
        if self.health is not None:
            detail.update(self.health())
        return web.json_response(detail)

    async def _readyz(self, request: web.Request) -> web.Response:
        results: dict[str, str] = {}
        ready = True
        for name, check in self.readiness:
            try:
                problem = await check()
            except Exception as exc:  # noqa: BLE001 - a failing check means "not ready"
                problem = f"check failed: {type(exc).__name__}: {exc}"
            results[name] = "ok" if problem is None else problem
            ready = ready and problem is None
        return _json({"ready": ready, "checks": results}, 200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        await self.refresh_spool_metrics()
        return web.Response(
            body=self.metrics.exposition(), headers={hdrs.CONTENT_TYPE: CONTENT_TYPE}
        )

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
        round_trips = getattr(self.spool, "round_trips", None)  # a PostgreSQL spool's count
        if isinstance(round_trips, int):
            self.metrics.observe_round_trips(round_trips)

    # region admin

    def _token_matches(self, candidate: str | None) -> bool:
        token = self._admin_token
        if token is None or not candidate:
            return False
        return hmac.compare_digest(candidate.encode(), token.encode())

    def _cookie_matches(self, candidate: str | None) -> bool:
        cookie = self._cookie
        if cookie is None or not candidate:
            return False
        return hmac.compare_digest(candidate.encode(), cookie.encode())

    def _bearer(self, request: web.Request) -> str | None:
        scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None

    def _require_bearer(self, request: web.Request) -> None:
        if not self._token_matches(self._bearer(request)):
            raise HttpError(
                401, "a valid admin bearer token is required", {"WWW-Authenticate": "Bearer"}
            )

    @property
    def _spool(self) -> Spool:
        assert self.spool is not None  # admin routes are off without a spool
        return self.spool

    async def _list(self, request: web.Request) -> web.Response:
        if any(_arg(request, name) for name in SEARCH_ARGS):
            return _json({"messages": [summary(m) for m in await self._search(request)]})
        state = _state_arg(_arg(request, "state"))
        messages = await self._spool.list(state=state, limit=_limit_arg(_arg(request, "limit")))
        return _json({"messages": [summary(m) for m in messages]})

    async def _show(self, request: web.Request) -> web.Response:
        message_id = request.match_info["id"]
        with_body = _arg(request, "body") in ("1", "true", "yes")
        loaded = await load_message(self._spool, message_id, with_body=with_body)
        if loaded is None:
            raise HttpError(404, f"no message {message_id}")
        message, status = loaded
        return _json(detail(message, with_body=with_body, status=status))

    async def _delete(self, request: web.Request) -> web.Response:
        message_id = request.match_info["id"]
        if not await self._spool.delete(message_id):
            raise HttpError(404, f"no message {message_id}")
        log.info("admin api: deleted id=%s", message_id, extra={"message_id": message_id})
        return _json({"id": message_id, "deleted": True})

    async def _retry(self, request: web.Request) -> web.Response:
        message_id = request.match_info["id"]
        if not await self._spool.retry_now(message_id):
            raise HttpError(404, f"no queued or failed message {message_id}")
        log.info("admin api: retry now id=%s", message_id, extra={"message_id": message_id})
        if self.on_retry is not None:
            self.on_retry()
        return _json({"id": message_id, "due": True})

    async def _search(self, request: web.Request) -> list[SpooledMessage]:
        """``GET /api/messages?message_id=&rcpt=&since=&until=&limit=``: the messages
        with that Message-ID header (angle brackets optional), that recipient, created
        in that window (ISO 8601 or seconds since the epoch; ``until`` excluded)."""
        store: object = self._spool
        if not isinstance(store, MessageStatusStore):
            raise HttpError(400, "this spool cannot search messages")
        message_id = _arg(request, "message_id")
        found: list[SpooledMessage] = list(
            await store.search_messages(
                header_message_id=None if message_id is None else message_id.strip().strip("<>"),
                recipient=_arg(request, "rcpt"),
                since=_time_arg(_arg(request, "since"), "since"),
                until=_time_arg(_arg(request, "until"), "until"),
                limit=_limit_arg(_arg(request, "limit")),
            )
        )
        return found

    async def _message_page(self, request: web.Request) -> web.Response:
        self._require_page_access(request)
        message_id = request.match_info["id"]
        loaded = await load_message(self._spool, message_id, with_body=False)
        if loaded is None:
            raise HttpError(404, f"no message {message_id}")
        message, status = loaded
        return web.Response(
            text=render_message_page(detail(message, with_body=False, status=status)),
            content_type="text/html",
            headers=_PAGE_HEADERS,
        )

    def _require_page_access(self, request: web.Request) -> None:
        if not (
            self._token_matches(self._bearer(request))
            or self._cookie_matches(request.cookies.get(COOKIE))
        ):
            raise HttpError(
                401,
                "a valid admin token is required (bearer header, or open /queue?token=...)",
                {"WWW-Authenticate": "Bearer"},
            )

    async def _queue_page(self, request: web.Request) -> web.Response:
        token = _arg(request, "token")
        if token is not None:
            if not self._token_matches(token):
                raise HttpError(401, "wrong token")
            assert self._cookie is not None
            state = _arg(request, "state")
            location = "/queue" + (f"?state={quote(state)}" if state else "")
            return web.Response(
                status=303,
                headers={
                    hdrs.LOCATION: location,
                    hdrs.SET_COOKIE: f"{COOKIE}={self._cookie}; Path=/queue;"
                    " HttpOnly; SameSite=Strict",
                    hdrs.CACHE_CONTROL: "no-store",
                },
            )
        self._require_page_access(request)
        state = _state_arg(_arg(request, "state"))
        messages = await self._spool.list(state=state, limit=_limit_arg(_arg(request, "limit")))
        stats = await self._spool.stats()
        counts = {s.value: stats.counts.get(s, 0) for s in MessageState}
        return web.Response(
            text=render_queue_page(messages, counts, state),
            content_type="text/html",
            headers=_PAGE_HEADERS,
        )

    # endregion


def page_cookie(token: str) -> str:
    """The /queue page's cookie for ``token``: an HMAC, so the cookie is no bearer token."""
    return hmac.new(token.encode(), _COOKIE_LABEL, hashlib.sha256).hexdigest()


def loopback_host(value: str | None) -> bool:
    """Whether a ``Host`` header names loopback: ``localhost``, ``127.x.y.z`` or ``[::1]``,
    with or without a port.  No header at all passes: every browser sends one."""
    if value is None:
        return True
    name, port = value.strip(), ""
    if name.startswith("["):
        name, bracket, port = name[1:].partition("]")
        if not bracket:
            return False
    elif name.count(":") == 1:
        name, _, digits = name.partition(":")
        port = ":" + digits
    if port and not (port[:1] == ":" and port[1:].isascii() and port[1:].isdigit()):
        return False
    return name.lower().removesuffix(".") == "localhost" or _is_loopback(name)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _json(data: Any, status: int = 200) -> web.Response:
    body = json.dumps(data, indent=1).encode() + b"\n"
    return web.Response(status=status, body=body, content_type="application/json")


def _arg(request: web.Request, name: str) -> str | None:
    """A query argument; an empty one counts as absent."""
    return request.query.get(name) or None


def _state_arg(value: str | None) -> MessageState | None:
    if not value:
        return None
    try:
        return MessageState(value)
    except ValueError:
        choices = ", ".join(s.value for s in MessageState)
        raise HttpError(400, f"state must be one of {choices}") from None


#: The query arguments of ``GET /api/messages`` that make it a search.
SEARCH_ARGS = ("message_id", "rcpt", "since", "until")
_PAGE_HEADERS = {
    hdrs.CACHE_CONTROL: "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def _time_arg(value: str | None, name: str) -> float | None:
    """A time: seconds since the epoch, or ISO 8601 (UTC unless it says otherwise)."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(number):
            raise HttpError(400, f"{name} must be ISO 8601 or seconds since the epoch")
        return number
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise HttpError(400, f"{name} must be ISO 8601 or seconds since the epoch") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _limit_arg(value: str | None) -> int:
    if value is None:
        return 100
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= LIST_LIMIT_MAX:
        raise HttpError(400, f"limit must be a number from 1 to {LIST_LIMIT_MAX}")
    return int(value)


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
            f'<td class="id"><a href="/queue/{quote(m.id)}"><code>{e(m.id)}</code></a></td>'
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


# region the message page (status from ESP events)


def render_message_page(data: dict[str, Any]) -> str:
    """One message's read-only page: its facts, each recipient's status, the timeline
    of its ESP events and its attempts.  Every value is escaped; no script at all."""
    e = html.escape

    def cell(value: Any) -> str:
        if isinstance(value, list):
            value = ", ".join(str(item) for item in value)
        return f"<td>{e('' if value is None else str(value))}</td>"

    def table(rows: list[dict[str, Any]], columns: tuple[str, ...], empty: str) -> str:
        head = "".join(f"<th>{e(c)}</th>" for c in columns)
        body = "\n".join(
            "<tr>" + "".join(cell(row.get(c)) for c in columns) + "</tr>" for row in rows
        )
        body = body or f'<tr><td colspan="{len(columns)}">{e(empty)}</td></tr>'
        return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"

    facts = "".join(
        f"<tr><th>{e(name)}</th>{cell(data.get(name))}</tr>"
        for name in (
            "id",
            "state",
            "mail_from",
            "size",
            "attempts",
            "created_at",
            "provider",
            "provider_message_id",
            "last_error",
        )
    )
    header_id = (data.get("meta") or {}).get("message_id_header")
    facts += f"<tr><th>Message-ID</th>{cell(header_id)}</tr>"
    status_columns = ("recipient", "status", "at", "smtp_status", "diagnostic", "remote_mta")
    recipients = table(data.get("recipients", []), (*status_columns, "dsn_sent"), "no status kept")
    timeline = table(data.get("timeline", []), (*status_columns, "provider"), "no ESP events")
    attempts = table(
        data.get("attempt_history", []),
        ("number", "at", "provider", "outcome", "error"),
        "no attempts recorded",
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>esprelay message {e(str(data.get("id")))}</title><style>{_PAGE_STYLE}</style></head>
<body><h1>message <code>{e(str(data.get("id")))}</code></h1>
<nav><a href="/queue">back to the queue</a></nav>
<table id="facts">{facts}</table>
<h2>recipients</h2><div id="recipients">{recipients}</div>
<h2>timeline (ESP events, UTC)</h2><div id="timeline">{timeline}</div>
<h2>attempts</h2><div id="attempts">{attempts}</div>
</body></html>
"""


# endregion
