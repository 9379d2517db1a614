"""What happens to a message once its DATA is complete, in each delivery mode.

``queue`` (the default)
    The message is split by route and committed to the spool; only then is it
    answered ``250``.  Delivery happens in the background.  With
    ``ESPRELAY_INLINE_ATTEMPT_SECONDS`` the first attempt is made while the client
    waits: a permanent rejection within that time is answered ``554`` (and the
    spooled copy is marked failed, with no bounce); anything else is ``250``.
``passthrough``
    No spool: the DATA reply is the ESP's answer.  ``250`` with the provider's
    message id, ``451`` for a transient failure (the client retries), ``554`` with
    the ESP's reason for a permanent one.

A large message arrives in a file (:mod:`esprelay.spill`).  In queue mode it is spooled
from that file (SQLite keeps the file itself, PostgreSQL reads it in pieces), its header
read from the part kept in memory, as long as nothing here needs its body (a provider's
refusal that reads it, a possible signature).  Otherwise it is read back whole, within
``ESPRELAY_INTAKE_MEMORY`` (:meth:`Intake.read_back`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from esprelay.budget import ByteBudget
from esprelay.delivery import Deliverer
from esprelay.dispatch import ProviderSet, Sent
from esprelay.errors import DeliveryError, PermanentDeliveryError, SpoolError
from esprelay.message.header import raw_value, read_header, unfolded
from esprelay.message.mime import may_be_signed, signed_reason
from esprelay.models import Envelope, MessageState, OutboundMessage, SpooledMessage
from esprelay.routing import Part, RoutingTable
from esprelay.smtp.replies import (
    DELIVERED_F,
    FAILED_INLINE_F,
    PROVIDER_REFUSED_F,
    PROVIDER_UNAVAILABLE_F,
    QUEUED_F,
    REJECTED_F,
    SIGNED_REFUSED_F,
)
from esprelay.spill import Spilled, Spiller
from esprelay.spool.base import NewPart, Spool, new_message_id

log = logging.getLogger("esprelay.smtp")

_UNSAFE = re.compile(r"[^\x20-\x7e]+")
REPLY_TEXT_LIMIT = 400


def reply_text(text: str) -> str:
    """Make an ESP's reason safe for one SMTP reply line (ASCII, no CR/LF, bounded)."""
    cleaned = _UNSAFE.sub(" ", text).strip()
    if len(cleaned) > REPLY_TEXT_LIMIT:
        cleaned = cleaned[: REPLY_TEXT_LIMIT - 3] + "..."
    return cleaned


def header_meta(raw: bytes, *, keep_headers: bool) -> dict[str, Any]:
    """The message's Message-ID (without its angle brackets: ``message_id_header``, for
    the status search) and, with ``keep_headers``, its header section (``headers``, the
    bytes as Latin-1 text) for a DSN made after the body is gone."""
    header = read_header(raw)
    meta: dict[str, Any] = {}
    found = header.first(b"message-id")
    if found is not None:
        value = unfolded(raw_value(raw, found)).strip().strip("<>").strip()
        if value and value.isascii():
            meta["message_id_header"] = value
    if keep_headers:
        # (PostgreSQL's jsonb holds no NUL character.)
        meta["headers"] = raw[: header.end].decode("latin-1").replace("\x00", "")
    return meta


@dataclass
class IntakeState:
    """Shared, mutable facts about the listener that hooks consult."""

    draining: bool = False
    accepted: int = 0
    on_accepted: list[Callable[[], None]] = field(default_factory=list)
    #: Called with (stage, reply) for every refusal (4xx, 5xx) to MAIL, RCPT and DATA
    #: (metrics).
    on_reply: list[Callable[[str, str], None]] = field(default_factory=list)
    #: Called with (mechanism, reply) for every AUTH attempt refused (metrics).
    on_auth_failure: list[Callable[[str, str], None]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Client:
    """Who handed us the message."""

    address: str
    helo: str | None = None
    auth_user: str | None = None
    #: More facts for the spooled message's metadata (tls, repairs...).
    meta: dict[str, Any] = field(default_factory=dict)


class Intake:
    def __init__(
        self,
        *,
        mode: Literal["queue", "passthrough"],
        routing: RoutingTable,
        providers: ProviderSet,
        state: IntakeState,
        spool: Spool | None = None,
        deliverer: Deliverer | None = None,
        inline_seconds: float = 0.0,
        signed_messages: Literal["refuse", "warn"] = "refuse",
        keep_headers: bool = False,
        spiller: Spiller | None = None,
        memory: int = 0,
    ) -> None:
        if mode == "queue" and spool is None:
            raise ValueError("queue mode needs a spool")
        self.mode = mode
        self.routing = routing
        self.providers = providers
        self.state = state
        self.spool = spool
        self.deliverer = deliverer
        self.inline_seconds = inline_seconds
        self.signed_messages = signed_messages
        #: Keep each message's header section in its metadata (``meta.headers``), for the
        #: DSNs made from ESP events after the body is dropped at delivery.
        self.keep_headers = keep_headers
        #: Where and from which size the SMTP engine writes a message to a file.
        self.spiller = spiller
        #: Bytes of spilled messages read back at once (ESPRELAY_INTAKE_MEMORY).
        self.memory = ByteBudget(memory) if memory > 0 else None

    @contextlib.asynccontextmanager
    async def read_back(self, spilled: Spilled) -> AsyncIterator[bytes]:
        """``spilled`` read whole, within the memory budget for the block (its file
        removed: the bytes are the message now)."""
        async with contextlib.AsyncExitStack() as stack:
            if self.memory is not None:
                await stack.enter_async_context(self.memory.hold(spilled.size))
            raw = await asyncio.to_thread(spilled.read)
            spilled.discard()
            yield raw

    async def accept(self, envelope: Envelope, raw: bytes | Spilled, client: Client) -> str:
        """Take responsibility for the message, or refuse it; return the DATA reply.

        A :class:`~esprelay.spill.Spilled` message's file is removed on return, whether
        the spool kept it under its own name or not."""
        parts = self.routing.plan(envelope, client.auth_user)
        if isinstance(raw, Spilled):
            try:
                if not self._keeps_file(parts, raw):
                    async with self.read_back(raw) as body:
                        return await self._accept(parts, body, client)
                return await self._accept(parts, raw, client)
            finally:
                raw.discard()
        return await self._accept(parts, raw, client)

    def _keeps_file(self, parts: list[Part], spilled: Spilled) -> bool:
        """Whether ``spilled`` may be spooled from its file, read only in its head."""
        spool = self.spool
        if self.mode != "queue" or spool is None:
            return False
        wanted = spool.body_directory  # (None: any file will do)
        if wanted is not None and (spilled.path is None or spilled.directory != wanted):
            return False
        for part in parts:
            for name in part.providers:
                provider = self.providers.providers.get(name)
                if provider is None:
                    continue
                if provider.refusal_reads_body:
                    return False
                if (
                    provider.rebuilds_message
                    and self.signed_messages == "refuse"
                    and may_be_signed(spilled.head)
                ):
                    return False
        return True

    async def _accept(self, parts: list[Part], raw: bytes | Spilled, client: Client) -> str:
        head = raw.head if isinstance(raw, Spilled) else raw
        refusal = self._refusal(parts, head)
        if refusal is not None:
            log.warning("not accepted: client=%s: %s", client.address, refusal)
            return refusal
        if self.mode == "passthrough":
            assert isinstance(raw, bytes)  # read back (_keeps_file)
            return await self._passthrough(parts, raw, client)
        return await self._queue(parts, raw, client)

    def _refusal(self, parts: list[Part], raw: bytes) -> str | None:
        """The reply refusing the message when a provider of a part's route could never
        send it as it is (its own reasons, or a signature it would have to break)."""
        signed: str | None = None
        for part in parts:
            message = OutboundMessage("", part.envelope, raw)
            for name in part.providers:
                if name not in self.providers:
                    continue
                provider = self.providers[name]
                why = provider.refusal(message)
                if why:
                    return PROVIDER_REFUSED_F.format(reply_text(f"{name}: {why}"))
                if provider.rebuilds_message and self.signed_messages == "refuse":
                    if signed is None:
                        signed = signed_reason(raw) or ""
                    if signed:
                        return SIGNED_REFUSED_F.format(
                            reply_text(
                                f"{signed} cannot be delivered intact through {name};"
                                " see ESPRELAY_SIGNED_MESSAGES"
                            )
                        )
        return None

    async def _queue(self, parts: list[Part], raw: bytes | Spilled, client: Client) -> str:
        assert self.spool is not None
        meta: dict[str, Any] = {**client.meta, "client": client.address, "helo": client.helo}
        if client.auth_user:
            meta["auth_user"] = client.auth_user
        head = raw.head if isinstance(raw, Spilled) else raw
        meta.update(header_meta(head, keep_headers=self.keep_headers))
        new_parts = [
            NewPart(
                part.envelope,
                part.providers[0],
                {**_own_dsn(meta, part), "route": part.route, "providers": list(part.providers)},
            )
            for part in parts
        ]
        deliverer = self.deliverer
        inline = self.inline_seconds > 0 and len(parts) == 1 and deliverer is not None
        # With idle workers, the message is spooled already leased to this instance and
        # handed to them directly: no lease query has to read it back from the spool.
        handoff = not inline and deliverer is not None and deliverer.reserve(len(parts), len(raw))
        body = raw if isinstance(raw, bytes) else None
        try:
            if deliverer is not None and (inline or handoff):
                if isinstance(raw, Spilled):
                    # Read before the commit: a file that cannot be read is then a 451,
                    # not a committed message answered 451 (and sent again).
                    body = await asyncio.to_thread(raw.read)
                ids = await self.spool.put_parts(
                    raw, new_parts, lease_owner=deliverer.owner, lease_time=deliverer.lease_time
                )
            else:
                ids = await self.spool.put_parts(raw, new_parts)
        except SpoolError as exc:
            if handoff and deliverer is not None:
                deliverer.release(len(parts), len(raw))
            log.error("not accepted: spool error from client=%s: %s", client.address, exc)
            return exc.smtp_reply
        self.state.accepted += 1
        for message_id, part in zip(ids, parts, strict=True):
            log.info(
                "accepted id=%s client=%s from=<%s> size=%d rcpts=%d route=%s provider=%s",
                message_id,
                client.address,
                part.envelope.mail_from,
                len(raw),
                len(part.envelope.rcpt_tos),
                part.route,
                ",".join(part.providers),
                extra={
                    "event": "accepted",
                    "message_id": message_id,
                    "client": client.address,
                    "size": len(raw),
                    "rcpts": len(part.envelope.rcpt_tos),
                    "route": part.route,
                    "provider": part.providers[0],
                },
            )
        for callback in self.state.on_accepted:
            callback()
        queued = QUEUED_F.format(",".join(ids))
        if deliverer is None or not (inline or handoff):
            if deliverer is not None:
                deliverer.wake()  # spooled for the workers to lease
            return queued
        assert body is not None
        now = time.time()
        leased = [
            SpooledMessage(
                id=message_id,
                envelope=part.envelope,
                size=len(raw),
                state=MessageState.IN_FLIGHT,
                attempts=0,
                created_at=now,
                next_attempt_at=now,
                provider=new_part.provider,
                raw=body,
                meta=new_part.meta,
            )
            for message_id, part, new_part in zip(ids, parts, new_parts, strict=True)
        ]
        if handoff:
            for message in leased:
                deliverer.dispatch_reserved(message)
            return queued
        outcome = await deliverer.attempt_inline(leased[0], self.inline_seconds)
        if outcome is not None and outcome.outcome == "failed" and not outcome.expired:
            reason = reply_text(str(outcome.error))
            return FAILED_INLINE_F.format(reason)
        return queued

    async def _passthrough(self, parts: list[Part], raw: bytes, client: Client) -> str:
        message_id = new_message_id()
        started = time.monotonic()

        async def send(index: int, part: Part) -> Sent | DeliveryError:
            part_id = message_id if len(parts) == 1 else f"{message_id}-{index}"
            try:
                return await self.providers.send(
                    OutboundMessage(part_id, part.envelope, raw), part.providers
                )
            except DeliveryError as exc:
                return exc

        results = await asyncio.gather(*(send(i, p) for i, p in enumerate(parts)))
        elapsed = (time.monotonic() - started) * 1000
        errors = [r for r in results if isinstance(r, DeliveryError)]
        # Recipients an ESP refused while accepting the others: without a spool nothing
        # can retry them alone, so the client hears of them in the reply (it may then
        # send again to all; queue mode is the one that never repeats a delivery).
        for result in results:
            if isinstance(result, Sent):
                for rcpt, error in result.result.rejected:
                    log.warning(
                        "rejected id=%s mode=passthrough rcpt=<%s> provider=%s error=%s",
                        message_id,
                        rcpt,
                        result.provider,
                        error,
                        extra={
                            "event": "rejected",
                            "message_id": message_id,
                            "mode": "passthrough",
                            "rcpt": rcpt,
                            "error": str(error),
                        },
                    )
                    errors.append(
                        type(error)(
                            f"<{rcpt}> refused: {error.args[0] if error.args else error}",
                            provider=error.provider or result.provider,
                            status_code=error.status_code,
                            retry_after=error.retry_after,
                        )
                    )
        for part, result in zip(parts, results, strict=True):
            if isinstance(result, Sent):
                log.info(
                    "delivered id=%s mode=passthrough client=%s from=<%s> size=%d rcpts=%d"
                    " provider=%s ms=%.0f provider_id=%s",
                    message_id,
                    client.address,
                    part.envelope.mail_from,
                    len(raw),
                    len(part.envelope.rcpt_tos),
                    result.provider,
                    elapsed,
                    result.result.provider_message_id,
                    extra={
                        "event": "delivered",
                        "message_id": message_id,
                        "mode": "passthrough",
                        "provider": result.provider,
                        "provider_message_id": result.result.provider_message_id,
                    },
                )
            else:
                log.warning(
                    "%s id=%s mode=passthrough client=%s rcpts=%d ms=%.0f error=%s",
                    "rejected" if result.permanent else "deferred",
                    message_id,
                    client.address,
                    len(part.envelope.rcpt_tos),
                    elapsed,
                    result,
                    extra={
                        "event": "rejected" if result.permanent else "deferred",
                        "message_id": message_id,
                        "mode": "passthrough",
                        "error": str(result),
                    },
                )
        permanent = [e for e in errors if isinstance(e, PermanentDeliveryError)]
        if permanent:
            return REJECTED_F.format(reply_text(str(permanent[0])))
        if errors:
            return PROVIDER_UNAVAILABLE_F.format(reply_text(str(errors[0])))
        sent = [r for r in results if isinstance(r, Sent)]
        ids = ",".join(f"{s.provider}:{s.result.provider_message_id or '-'}" for s in sent)
        return DELIVERED_F.format(message_id, reply_text(ids))


def _own_dsn(meta: dict[str, Any], part: Part) -> dict[str, Any]:
    """``meta`` with the per-recipient DSN parameters (NOTIFY, ORCPT) of ``part``'s
    recipients only: each part of a routed message is tracked and bounced on its own."""
    rcpts = meta.get("dsn_rcpts")
    if rcpts is None:
        return meta
    own = {r: rcpts[r] for r in part.envelope.rcpt_tos if r in rcpts}
    rest = {k: v for k, v in meta.items() if k != "dsn_rcpts"}
    return {**rest, "dsn_rcpts": own} if own else rest
