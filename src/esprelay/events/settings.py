"""Which configured providers receive events, with which keys.

A provider's webhook settings are environment variables named after the provider:
``ESPRELAY_<NAME>_<SETTING>``, ``<NAME>`` being its name in upper case with ``-`` and
``.`` as ``_``.  The provider of ``ESPRELAY_PROVIDER`` is named after its kind, so its
variables are the documented ones (``ESPRELAY_SENDGRID_WEBHOOK_PUBLIC_KEY``); a named
provider of the routes file (``[providers.brand-a]``) has its own
(``ESPRELAY_BRAND_A_WEBHOOK_SIGNING_KEY``) and its events arrive at
``/webhooks/brand-a``.  A provider none of whose webhook variables is set has no
webhook; one with some set but not all that are required stops start-up with a
:class:`~esprelay.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from esprelay.errors import ConfigError
from esprelay.events.model import EventSource

#: Kinds of provider whose events esprelay can receive, and the module that has them.
#: A later ESP plugs in with a module of the same shape (a ``SOURCE``).
SOURCE_MODULES = {
    "sendgrid": "esprelay.events.sendgrid",
    "mailgun": "esprelay.events.mailgun",
    "ses": "esprelay.events.ses",
    "postmark": "esprelay.events.postmark",
}


class WebhookSettings(BaseModel):
    """One provider's webhook settings; field ``x`` is ``ESPRELAY_<NAME>_X``."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


@dataclass(frozen=True, slots=True)
class SourceContext:
    """What every source may use besides its own settings."""

    #: How far a signed timestamp may be from now (seconds).
    tolerance: float
    #: Seconds since the epoch (a fake clock in tests).
    now: Callable[[], float]
    #: For the sources that fetch (SNS signing certificates, subscription confirmations).
    client: httpx.AsyncClient
    #: Replacements of a source's own checks, by name, for tests: ``sns_url_allowed``
    #: (esprelay.events.ses) lets the SES source fetch from a loopback server.
    overrides: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SourceKind:
    """A kind of ESP's events: its settings and how a source is built from them."""

    name: str
    settings: type[WebhookSettings]
    build: Callable[[str, Any, SourceContext], EventSource]


def prefix(provider: str) -> str:
    """``ESPRELAY_BRAND_A_`` for the provider named ``brand-a``."""
    return "ESPRELAY_" + provider.upper().replace("-", "_").replace(".", "_") + "_"


def source_kind(kind: str) -> SourceKind | None:
    module = SOURCE_MODULES.get(kind)
    if module is None:
        return None
    source: SourceKind = importlib.import_module(module).SOURCE
    return source


def read_settings(
    provider: str, kind: SourceKind, environ: Mapping[str, str]
) -> WebhookSettings | None:
    """``provider``'s webhook settings from ``environ``; None when none is set."""
    start = prefix(provider)
    upper = {key.upper(): value for key, value in environ.items()}
    values = {
        field: upper[start + field.upper()]
        for field in kind.settings.model_fields
        if start + field.upper() in upper
    }
    if not values:
        return None
    try:
        return kind.settings.model_validate(values)
    except ValidationError as exc:
        parts = []
        for error in exc.errors():
            field = ".".join(str(item) for item in error["loc"])
            variable = start + field.upper()
            if error["type"] == "missing":
                parts.append(f"{variable} is required for the events of provider {provider!r}")
            else:
                message = str(error["msg"]).removeprefix("Value error, ")
                parts.append(f"{variable}: {message}")
        raise ConfigError("; ".join(parts)) from None
