"""The registered kinds of provider, and their settings read from the environment.

Every kind, the built-in ones too, is an entry point of the ``esprelay.providers``
group whose object is a :class:`~esprelay.providers.base.ProviderKind`::

    [project.entry-points."esprelay.providers"]
    sendgrid = "esprelay.providers.sendgrid:KIND"

A kind is imported only when a configuration selects it (``ESPRELAY_PROVIDER`` or a
``kind`` in the routes file), so an adapter's dependencies cost nothing otherwise.
Its settings come from ``ESPRELAY_<KIND>_<FIELD>`` (environment over ``.env``) and,
for a named provider of the routes file, from its table on top of those.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import httpx
from pydantic import ValidationError

from esprelay.errors import ConfigError
from esprelay.providers.base import Provider, ProviderKind, ProviderSettings
from esprelay.ratelimit import apply_limits

GROUP = "esprelay.providers"


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One configured provider: its kind and its validated settings."""

    kind: ProviderKind[Any]
    settings: ProviderSettings

    def build(self, client: httpx.AsyncClient, name: str | None = None) -> Provider:
        provider = self.kind.build(self.settings, client)
        provider.name = name or self.kind.name
        apply_limits(provider, self.settings)  # ESPRELAY_<KIND>_RATE, _CONCURRENCY
        return provider


@functools.cache
def _registered() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=GROUP):
        found.setdefault(entry.name, entry)
    return found


def registered() -> list[str]:
    """The names of every registered kind, sorted."""
    return sorted(_registered())


def get_kind(name: str, *, where: str = "ESPRELAY_PROVIDER") -> ProviderKind[Any]:
    """The kind registered as ``name``; a one-line ConfigError otherwise."""
    entry = _registered().get(name)
    if entry is None:
        names = ", ".join(registered()) or "none: is esprelay installed (pip install esprelay)?"
        raise ConfigError(f"{where}: {name!r} is not a registered provider (registered: {names})")
    try:
        kind = entry.load()
    except Exception as exc:  # a broken plugin is a configuration problem, said in one line
        raise ConfigError(
            f"{where}: provider {name!r} ({entry.value}) cannot be loaded:"
            f" {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(kind, ProviderKind) or kind.name != name:
        raise ConfigError(f"{where}: {entry.value} is not the ProviderKind named {name!r}")
    return kind


def variable(kind: ProviderKind[Any], field: str) -> str:
    """The environment variable of one of ``kind``'s settings."""
    return f"ESPRELAY_{kind.name.upper()}_{field.upper()}"


def env_values(kind: ProviderKind[Any], environ: Mapping[str, str]) -> dict[str, str]:
    """``kind``'s settings that ``environ`` sets (names compared case-insensitively)."""
    upper = {key.upper(): value for key, value in environ.items()}
    values: dict[str, str] = {}
    for field in kind.settings.model_fields:
        value = upper.get(variable(kind, field))
        if value is not None:
            values[field] = value
    return values


def configure(
    kind: ProviderKind[Any], values: Mapping[str, Any], *, where: str | None = None
) -> ProviderConfig:
    """``kind`` with the settings ``values``; a one-line ConfigError naming the setting.

    ``where`` is None for the settings of ``ESPRELAY_PROVIDER`` (errors name the
    variables), or the routes-file table they came from.
    """
    try:
        return ProviderConfig(kind, kind.settings.model_validate(dict(values)))
    except ValidationError as exc:
        raise ConfigError(_describe(kind, exc, where)) from None


def _describe(kind: ProviderKind[Any], exc: ValidationError, where: str | None) -> str:
    parts = []
    for error in exc.errors():
        field = ".".join(str(item) for item in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            parts.append(f"unknown setting {field!r} for kind {kind.name!r}")
        elif error["type"] == "missing":
            parts.append(f"{variable(kind, field)} is required when ESPRELAY_PROVIDER={kind.name}")
        else:
            parts.append(f"{variable(kind, field)}: {message}")
    text = "; ".join(parts)
    return text if where is None else f"{where}: {text}"
