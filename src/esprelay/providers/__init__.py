"""Providers by kind.

Each provider module exposes ``from_settings(settings, client) -> Provider``.  The
registry holds import strings, so an adapter and its dependencies are imported only
when selected (as uvicorn does for its protocols).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol, cast

import httpx

from esprelay.errors import ConfigError
from esprelay.providers.base import HttpProvider, Provider

if TYPE_CHECKING:
    from esprelay.config import Settings

__all__ = ["PROVIDERS", "HttpProvider", "Provider", "build_provider"]

PROVIDERS: dict[str, str] = {
    "outbox": "esprelay.providers.outbox:from_settings",
    "postmark": "esprelay.providers.postmark:from_settings",
    "sendgrid": "esprelay.providers.sendgrid:from_settings",
    "mailgun": "esprelay.providers.mailgun:from_settings",
    "ses": "esprelay.providers.ses:from_settings",
}


class _Factory(Protocol):
    def __call__(self, settings: Settings, client: httpx.AsyncClient) -> Provider: ...


def build_provider(settings: Settings, client: httpx.AsyncClient) -> Provider:
    """The provider selected by ``ESPRELAY_PROVIDER``."""
    target = PROVIDERS.get(settings.provider)
    if target is None:
        raise ConfigError(
            f"ESPRELAY_PROVIDER: {settings.provider!r} is not available in this version"
            f" (available: {', '.join(sorted(PROVIDERS))})"
        )
    module_name, _, attribute = target.partition(":")
    factory = cast(_Factory, getattr(importlib.import_module(module_name), attribute))
    return factory(settings, client)
