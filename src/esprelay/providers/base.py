"""The provider interface, and the shared HTTP flow for ESP adapters.

A provider turns one :class:`~esprelay.models.OutboundMessage` into a delivery and
says how it went: a :class:`~esprelay.models.SendResult`, or a
:class:`~esprelay.errors.DeliveryError` (transient or permanent).  Providers never
retry: the spool owns the one retry mechanism.

A kind of provider is a :class:`ProviderKind`: its name, its settings (a
:class:`ProviderSettings` model, field ``x`` being ``ESPRELAY_<KIND>_X``) and a
function that builds the provider from them.  Kinds are registered under the
``esprelay.providers`` entry-point group (:mod:`esprelay.providers.registry`).

HTTP adapters subclass :class:`HttpProvider` and fill in these hooks::

    build_request(message) -> Built               pure: no I/O, testable offline;
                                                  the request and its warnings
    parse_response(response, message) -> SendResult
    classify_error(response) -> DeliveryError     overridable per ESP quirk
    answered(response) -> bool                    optional: an error status that still
                                                  carries per-message results (Mailjet)
    authorize(request)                            optional: sign the request (SES)
    refusal(message) -> str | None                optional: refuse at end of DATA

:meth:`HttpProvider.send` is the fixed template that runs them; no adapter overrides it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import email.utils
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field

from esprelay.budget import LARGE_MESSAGE_BUDGET, ByteBudget
from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    PermanentDeliveryError,
    ProviderConfigError,
    ProviderConnectionError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.models import OutboundMessage, SendResult
from esprelay.ratelimit import ConcurrencyLimit, Rate, RateLimit, spend_prepaid

EXCERPT_LIMIT = 300
#: Messages up to this size (raw bytes) are turned into requests on the event loop.
INLINE_BUILD_LIMIT = 64 * 1024


class ProviderSettings(BaseModel):
    """A kind's own settings; field ``x`` is ``ESPRELAY_<KIND>_X`` (or ``x`` in a
    ``[providers.NAME]`` table of the routes file)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    #: Every kind's proactive limits (esprelay.ratelimit): messages a second (or
    #: ``N/min``), and messages in the provider's hands at once; None: no limit.
    rate: Rate | None = None
    concurrency: int | None = Field(default=None, ge=1)

    def api_urls(self) -> tuple[str, ...]:
        """The URLs of the ESP's API this provider talks to (for metrics and checks)."""
        return ()


SettingsT = TypeVar("SettingsT", bound=ProviderSettings)


@dataclass(frozen=True, slots=True)
class ProviderKind(Generic[SettingsT]):
    """A kind of provider, as registered under the ``esprelay.providers`` entry points."""

    name: str
    settings: type[SettingsT]
    build: Callable[[SettingsT, httpx.AsyncClient], Provider]
    #: One line for ``--help`` and error messages.
    summary: str = ""


@dataclass(frozen=True, slots=True)
class Built:
    """What :meth:`HttpProvider.build_request` makes of a message."""

    request: httpx.Request
    #: What the request could not carry of the message (fidelity losses), for the result.
    warnings: tuple[str, ...] = ()


class Provider(abc.ABC):
    """One configured way of delivering mail."""

    #: The kind of provider ("outbox", "sendgrid", ...); fixed per class.
    kind: ClassVar[str]
    #: Largest raw message (bytes, as received over SMTP) the provider can carry, or None.
    max_message_size: int | None = None
    #: Most envelope recipients per message, or None.
    max_recipients: int | None = None
    #: The provider rebuilds the message from its parsed parts (a JSON API), so a
    #: signature cannot survive it (ESPRELAY_SIGNED_MESSAGES).
    rebuilds_message: ClassVar[bool] = False
    #: Does the ESP take UTF-8 envelope addresses (RFC 6531) as they are?  If not, domains
    #: are sent as Punycode and a UTF-8 local part is refused (esprelay.message.idn).
    smtputf8: bool = False

    def __init__(self, name: str | None = None) -> None:
        #: The name used in logs, the spool and (later) routes.
        self.name = name or self.kind
        #: The ESP's message rate and concurrency, kept proactively around each send
        #: (esprelay.ratelimit, esprelay.dispatch); None: no limit.
        self.rate_limit: RateLimit | None = None
        self.concurrency: ConcurrencyLimit | None = None

    @abc.abstractmethod
    async def send(self, message: OutboundMessage) -> SendResult:
        """Deliver ``message`` or raise a DeliveryError."""

    #: :meth:`refusal` reads the message's body, not only its header (a large message
    #: is then read back whole at the end of DATA: esprelay.spill).
    refusal_reads_body: ClassVar[bool] = False

    def refusal(self, message: OutboundMessage) -> str | None:
        """Why this provider could never send ``message`` as it is (a malformed control
        header, a part it cannot carry...), or None.  Asked at the end of DATA, where a
        reason becomes ``550 5.6.0``; pure and cheap for the common message."""
        return None

    async def aclose(self) -> None:
        """Release what the provider holds (connections, files)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class HttpProvider(Provider):
    """A provider that makes one HTTP request per message."""

    def __init__(self, client: httpx.AsyncClient, name: str | None = None) -> None:
        super().__init__(name)
        self._client = client
        #: Large messages are built and sent a few at a time (esprelay.budget).
        self.large_messages = ByteBudget(LARGE_MESSAGE_BUDGET)

    @abc.abstractmethod
    def build_request(self, message: OutboundMessage) -> Built:
        """The exact request to send for ``message`` and its warnings; pure."""

    async def authorize(self, request: httpx.Request) -> None:
        """Sign ``request`` just before it is sent (credentials that expire); no-op."""
        return None

    @abc.abstractmethod
    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        """Read a successful answer; raise DeliveryError if it is not a real success."""

    def classify_error(self, response: httpx.Response) -> DeliveryError:
        """Map an unsuccessful answer to the error tree; adapters override for quirks."""
        return classify_status(response, provider=self.name)

    def answered(self, response: httpx.Response) -> bool:
        """Does ``response`` go to :meth:`parse_response` (else :meth:`classify_error`)?
        A success does; an adapter whose ESP answers a partly accepted request with an
        error status and one result per message (Mailjet's 4xx) says so here."""
        return response.is_success

    async def send(self, message: OutboundMessage) -> SendResult:
        # Building may parse the MIME (JSON providers): seconds of CPU for a huge or
        # deeply nested message, so it runs off the event loop that serves SMTP. A small
        # message parses in well under a millisecond, less than the hop to a thread
        # costs (bench/README.md), so it is built in place.
        if len(message.raw) <= INLINE_BUILD_LIMIT:
            built = self.build_request(message)
            await self.authorize(built.request)
            response = await self._exchange(built.request)
        else:
            async with self.large_messages.hold(len(message.raw)):
                built = await asyncio.to_thread(self.build_request, message)
                await self.authorize(built.request)
                response = await self._exchange(built.request)
        warnings = built.warnings
        del built
        if not self.answered(response):
            raise self.classify_error(response)
        result = self.parse_response(response, message)
        if not warnings:
            return result
        return SendResult(
            result.provider_message_id,
            warnings=warnings + result.warnings,
            rejected=result.rejected,
        )

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        limit = self.rate_limit
        if limit is not None and not spend_prepaid(limit):
            await limit.acquire()
        with map_transport_errors(self.name):
            response = await self._client.send(request)
            await response.aread()
        return response


def json_object(response: httpx.Response) -> dict[str, Any] | None:
    """An ESP's answer as a JSON object, or None when it is not one (HTML, text, a
    list, undecodable bytes): the one reading of answer bodies for every adapter."""
    try:
        answer = response.json()
    except (ValueError, UnicodeDecodeError):
        return None
    return answer if isinstance(answer, dict) else None


def no_json_constant(name: str) -> Any:
    """``json.loads(..., parse_constant=no_json_constant)``: NaN and Infinity are not
    JSON, and a control header that holds them is refused like any other bad JSON."""
    raise ValueError(f"{name} is not JSON")


def json_body(payload: Any, *, large: bool = False) -> bytes:
    """``payload`` (a tree of dicts, lists, strings, numbers) as compact UTF-8 JSON.

    ``orjson`` rather than the json module: the same JSON text without the optional
    spaces, non-ASCII characters as UTF-8 (``ensure_ascii=False``), in a fifth of the
    time on a message's long strings (``python -m bench.mime_cpu``).

    ``large`` (a payload that may hold strings of ``LONG_STRING`` characters or more: a
    large message's text or attachments): the same bytes, with each such string encoded
    a piece at a time.  orjson reserves its output for the worst case, about 12 bytes
    per character, so a 5 MB string took a fresh 64 MB mapping and a page fault for each of
    the ~1300 pages it wrote (~1 ms of a 5 MB message's 3 on a VM); pieces of
    ``LONG_STRING`` characters reserve less than glibc's mapping threshold and reuse
    the heap.
    """
    if not large:
        return orjson.dumps(payload)
    strings: list[str] = []
    marked = _mark_long_strings(payload, strings)
    if not strings:
        return orjson.dumps(payload)
    # A raw NUL is never in orjson's output (it escapes every control character), so
    # each fragment holding one marks where a long string goes.
    around = orjson.dumps(marked).split(b"\x00")
    out = [around[0]]
    for text, after in zip(strings, around[1:], strict=True):
        out.append(b'"')
        for start in range(0, len(text), LONG_STRING):
            out.append(orjson.dumps(text[start : start + LONG_STRING])[1:-1])
        out.append(b'"')
        out.append(after)
    return b"".join(out)


#: See :func:`json_body`: below 8 MiB (glibc's mapping threshold, esprelay.gctune) / 12.
LONG_STRING = 1 << 18
_MARK = orjson.Fragment(b"\x00")


def _mark_long_strings(value: Any, strings: list[str]) -> Any:
    """``value`` with every string of ``LONG_STRING`` characters or more replaced by
    ``_MARK`` (in order, into ``strings``); containers copied only where one was."""
    kind = type(value)
    if kind is str:
        if len(value) < LONG_STRING:
            return value
        strings.append(value)
        return _MARK
    if kind is dict:
        count = len(strings)
        items = {key: _mark_long_strings(item, strings) for key, item in value.items()}
        return items if len(strings) > count else value
    if kind is list:
        count = len(strings)
        marked = [_mark_long_strings(item, strings) for item in value]
        return marked if len(strings) > count else value
    return value


class PostTarget:
    """POSTs to one URL with fixed headers, built without per-request parsing.

    ``target.request(body)`` is the request ``httpx.Request("POST", url, content=body,
    headers=headers)`` makes (the same URL, the same headers in the same order, Host
    first and Content-Length last, the same body already read), with the URL parsed and
    the headers normalised once instead of for every message.
    """

    def __init__(self, url: str, headers: Mapping[str, str]) -> None:
        self.url = httpx.URL(url)
        fixed = httpx.Headers(headers)
        if "Content-Length" in fixed or "Transfer-Encoding" in fixed:
            raise ValueError("PostTarget sets Content-Length itself")
        self._headers = fixed.raw
        self._host = [] if "Host" in fixed or not self.url.host else [(b"Host", self.url.netloc)]

    def request(self, body: bytes, extensions: dict[str, Any] | None = None) -> httpx.Request:
        # httpx adds Content-Length after the given headers for a body, and before them
        # (next to Host) for an empty one.
        if body:
            headers = [*self._host, *self._headers, (b"Content-Length", b"%d" % len(body))]
        else:
            headers = [*self._host, (b"Content-Length", b"0"), *self._headers]
        request = httpx.Request(
            "POST", self.url, headers=headers, stream=httpx.ByteStream(body), extensions=extensions
        )
        request.read()
        return request


@contextlib.contextmanager
def map_transport_errors(provider: str) -> Iterator[None]:
    """Translate httpx's transport errors into ours, at the boundary."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise ProviderTimeout(f"timed out: {type(exc).__name__}", provider=provider) from exc
    except httpx.TransportError as exc:
        raise ProviderConnectionError(
            f"connection failed: {type(exc).__name__}: {exc}", provider=provider
        ) from exc


def classify_status(response: httpx.Response, *, provider: str) -> DeliveryError:
    """The default mapping of an HTTP error status to a DeliveryError."""
    status = response.status_code
    detail = f"HTTP {status}: {excerpt(response)}"
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if status == 429:
        return RateLimited(detail, provider=provider, status_code=status, retry_after=retry_after)
    if status in (401, 403):
        return ProviderConfigError(detail, provider=provider, status_code=status)
    if status == 408 or status >= 500:
        return ProviderUnavailable(
            detail, provider=provider, status_code=status, retry_after=retry_after
        )
    if status in (400, 404, 405, 413, 415, 422):
        return MessageRejected(detail, provider=provider, status_code=status)
    if 400 <= status < 500:
        return PermanentDeliveryError(detail, provider=provider, status_code=status)
    # 1xx/3xx: we never follow redirects for a POST; treat as a transient oddity.
    return ProviderUnavailable(detail, provider=provider, status_code=status)


def excerpt(response: httpx.Response, limit: int = EXCERPT_LIMIT) -> str:
    """A short single-line excerpt of the response body, for logs and errors."""
    try:
        text = response.text
    except (httpx.ResponseNotRead, UnicodeDecodeError):
        return "<unreadable body>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
