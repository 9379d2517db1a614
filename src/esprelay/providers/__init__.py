"""Providers: the interface (:mod:`.base`) and the registry of kinds (:mod:`.registry`).

The built-in kinds (outbox, sendgrid, postmark, mailgun, ses) register as entry points
of the ``esprelay.providers`` group, as any third-party provider does.
"""

from __future__ import annotations

from esprelay.providers.base import Built, HttpProvider, Provider, ProviderKind, ProviderSettings
from esprelay.providers.registry import ProviderConfig, get_kind, registered

__all__ = [
    "Built",
    "HttpProvider",
    "Provider",
    "ProviderConfig",
    "ProviderKind",
    "ProviderSettings",
    "get_kind",
    "registered",
]
