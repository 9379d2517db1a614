"""The one error tree of esprelay, and how each branch maps to an SMTP reply.

::

    EsprelayError
    ├── ConfigError                      start-up only; the CLI exits 78 (EX_CONFIG)
    ├── MessageError        permanent    at DATA time          5xx
    │   └── MessageTooLarge                                    552 5.3.4
    ├── SpoolError          transient    spool cannot take it   451 4.3.0
    │   └── SpoolFull                                          452 4.3.1
    ├── ShuttingDown        transient                          421 4.3.2
    └── DeliveryError(provider, status_code, retry_after)
        ├── TransientDeliveryError       retried with backoff
        │   ├── ProviderTimeout          no answer in time (may be a duplicate later)
        │   ├── ProviderConnectionError  could not reach the ESP
        │   ├── RateLimited              429 and the like; honours the ESP's hint
        │   ├── ProviderUnavailable      5xx
        │   └── ProviderConfigError      401/403, unknown domain...: retried slowly, an
        │                                operator problem, so a rotated key loses nothing
        └── PermanentDeliveryError       failed, never retried
            └── MessageRejected          400/413/422 and the ESP's own refusals

Once a message is spooled, delivery errors never reach the SMTP client: they only
decide between retry and failure.  Messages carry context (provider, status, a short
excerpt of the ESP's answer) but never a key, a password or a message body.
"""

from __future__ import annotations


class EsprelayError(Exception):
    """Base of every error esprelay raises on purpose."""

    smtp_reply: str = "451 4.3.0 Requested action aborted: local error in processing"


class ConfigError(EsprelayError):
    """A setting is missing or wrong; raised only at start-up."""


class MessageError(EsprelayError):
    """The message itself cannot be accepted; permanent."""

    smtp_reply = "554 5.6.0 Message content not accepted"


class MessageTooLarge(MessageError):
    smtp_reply = "552 5.3.4 Message size exceeds fixed maximum message size"


class SpoolError(EsprelayError):
    """The spool could not commit the message; the client should try again."""

    smtp_reply = "451 4.3.0 Requested action aborted: local error, try again later"


class SpoolFull(SpoolError):
    smtp_reply = "452 4.3.1 Insufficient system storage"


class ShuttingDown(EsprelayError):
    smtp_reply = "421 4.3.2 Service shutting down, try again later"


class DeliveryError(EsprelayError):
    """A provider could not deliver a message.

    ``retry_after`` is the provider's own hint in seconds (Retry-After and the like).
    """

    permanent: bool = False

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.status_code = status_code
        self.retry_after = retry_after

    def __str__(self) -> str:
        text = super().__str__()
        context = []
        if self.provider:
            context.append(f"provider={self.provider}")
        if self.status_code is not None:
            context.append(f"status={self.status_code}")
        return f"{text} ({', '.join(context)})" if context else text


class TransientDeliveryError(DeliveryError):
    """Worth another try later."""


class ProviderTimeout(TransientDeliveryError):
    """The ESP did not answer in time; it may still have accepted the message."""


class ProviderConnectionError(TransientDeliveryError):
    """The ESP could not be reached."""


class RateLimited(TransientDeliveryError):
    """The ESP asked us to slow down."""


class ProviderUnavailable(TransientDeliveryError):
    """The ESP answered with a server error."""


class ProviderConfigError(TransientDeliveryError):
    """Credentials, domain or account are wrong: an operator must act.

    Retried slowly rather than failed, so that a rotated key throws no mail away.
    """


class PermanentDeliveryError(DeliveryError):
    """The ESP refused this message for good; retrying would not help."""

    permanent = True


class MessageRejected(PermanentDeliveryError):
    """The ESP rejected the request as invalid (400/413/422 and the like)."""


def smtp_reply(error: BaseException) -> str:
    """The SMTP reply line for ``error``; unknown errors are transient (451)."""
    if isinstance(error, EsprelayError):
        return error.smtp_reply
    return EsprelayError.smtp_reply
