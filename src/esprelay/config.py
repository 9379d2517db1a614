"""Settings, parsed once at the edge (the CLI) and passed down.

Every setting is an ``ESPRELAY_*`` environment variable or a line in ``.env``;
``.env.example`` documents each one.  Nothing in this module exits the process:
:func:`load_settings` raises :class:`~esprelay.errors.ConfigError` with one
line that names the variable, and the CLI turns that into exit status 78 (EX_CONFIG).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from dotenv import dotenv_values
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from esprelay.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _parse_duration(value: object) -> object:
    """Accept ``30``, ``30s``, ``5m``, ``2h`` or ``5d``; return seconds."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError("expected a duration such as 30, 30s, 5m, 2h or 5d")
        number, unit = match.groups()
        return float(number) * _UNIT_SECONDS[(unit or "s").lower()]
    return value


def _parse_size(value: object) -> object:
    """Accept ``1048576``, ``512K``, ``25M`` or ``1G`` (powers of 1024); return bytes."""
    if isinstance(value, str):
        match = re.match(r"^\s*(\d+)\s*([kmg]i?b?)?\s*$", value, re.IGNORECASE)
        if match is None:
            raise ValueError("expected a size such as 10485760, 512K or 25M")
        number, unit = match.groups()
        factor = {"k": 1024, "m": 1024**2, "g": 1024**3}[unit[0].lower()] if unit else 1
        return int(number) * factor
    return value


def _upper(value: object) -> object:
    """``info`` as well as ``INFO``."""
    return value.upper() if isinstance(value, str) else value


def _parse_list(value: object) -> object:
    """Accept ``a, b c`` (commas and/or spaces) as well as a real list."""
    if isinstance(value, str):
        return tuple(item for item in re.split(r"[\s,]+", value) if item)
    return value


def _check_networks(value: tuple[str, ...]) -> tuple[str, ...]:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not a network such as 10.0.0.0/8 or ::1") from None
    return value


Seconds = Annotated[float, BeforeValidator(_parse_duration), Field(ge=0)]
Bytes = Annotated[int, BeforeValidator(_parse_size), Field(ge=0)]
StrList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_parse_list)]
Networks = Annotated[StrList, AfterValidator(_check_networks)]


class Settings(BaseSettings):
    """All of esprelay's configuration.  Field ``x`` is ``ESPRELAY_X``."""

    model_config = SettingsConfigDict(
        env_prefix="ESPRELAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,
    )

    # SMTP intake
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=2525, ge=0, le=65535)
    hostname: str = Field(default="esprelay", min_length=1)
    max_message_size: Bytes = 25 * 1024 * 1024
    max_recipients: int = Field(default=100, ge=1)
    max_line_length: int = Field(default=65536, ge=1001)
    smtp_timeout: Seconds = 300.0
    smtp_engine: Literal["native", "aiosmtpd"] = "native"
    #: DATA past this size is written to a file as it arrives (esprelay.spill; native engine)
    smtp_spill_size: Annotated[Bytes, Field(ge=256 * 1024)] = 256 * 1024
    #: Bytes of such messages read back into memory at once, when one must be (0: no limit)
    intake_memory: Bytes = 64 * 1024 * 1024

    # Security (issue 5): TLS, AUTH, who may relay, limits, legacy devices
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    smtps_port: int | None = Field(default=None, ge=0, le=65535)
    tls_min_version: Literal["1.0", "1.1", "1.2", "1.3"] = "1.2"
    tls_ciphers: str | None = None
    tls_reload_interval: Seconds = 60.0
    auth_file: Path | None = None
    auth_user: str | None = None
    auth_password: SecretStr | None = None
    trusted_networks: Networks = ("127.0.0.0/8", "::1/128")
    #: Start even with a trusted network of every address (0.0.0.0/0, ::/0): an open relay.
    allow_open_relay: bool = False
    plaintext_auth_networks: Networks = ()
    #: Behind a load balancer: every SMTP connection starts with a PROXY protocol header
    #: (v1 or v2) naming the real client, accepted only from ESPRELAY_PROXY_TRUSTED
    proxy_protocol: bool = False
    proxy_trusted: Networks = ()
    proxy_protocol_timeout: Seconds = Field(default=5.0, gt=0)
    allowed_sender_domains: StrList = ()
    auth_max_failures: int = Field(default=5, ge=1)
    auth_failure_window: Seconds = 300.0
    max_connections: int = Field(default=200, ge=1)
    max_connections_per_client: int = Field(default=20, ge=1)
    max_command_length: int = Field(default=512, ge=64, le=65536)
    max_errors: int = Field(default=10, ge=1)
    data_timeout: Seconds = Field(default=600.0, gt=0)
    #: NOOP, RSET, VRFY, EXPN, HELP and repeated HELO/EHLO a session may send (421 beyond)
    smtp_junk_command_limit: int = Field(default=100, ge=1)
    #: How long one SMTP session may last in all (0: no limit)
    smtp_max_session_seconds: Seconds = 1800.0
    repair_headers: bool = True
    force_from: str | None = None
    #: A signed or encrypted message (S/MIME, PGP/MIME) for a provider that rebuilds
    #: messages from fields (SendGrid, Postmark): refused at the end of DATA, or sent
    #: with the signature lost and a warning (esprelay.message.mime.signed_reason).
    signed_messages: Literal["refuse", "warn"] = "refuse"

    # Provider selection: a registered kind (esprelay.providers.registry), whose own
    # settings are ESPRELAY_<KIND>_* (its ProviderSettings model)
    provider: str = Field(default="outbox", min_length=1)
    provider_timeout: Seconds = 30.0

    # Routing, failover and delivery modes
    routes_file: Path | None = None
    delivery_mode: Literal["queue", "passthrough"] = "queue"
    inline_attempt_seconds: Seconds = 0.0
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_cooldown: Seconds = 30.0

    # Bounces and failure reports
    bounce_mode: str = Field(default="sender", pattern=r"^(sender|off|address:.+@.+)$")
    bounce_from: str | None = None
    failure_webhook_url: str | None = None
    #: ESP event kinds also POSTed to the failure webhook (esprelay.events.forward)
    failure_webhook_events: str = ""
    #: Standard Webhooks secret (whsec_...) signing those events
    failure_webhook_secret: SecretStr | None = None

    # Spool and delivery
    spool_url: str = "sqlite:///esprelay-data/spool.db"
    # PostgreSQL spool only: create/migrate the schema at start, and connections per instance
    spool_auto_migrate: bool = True
    spool_pool_size: int = Field(default=10, ge=1, le=1000)
    delivery_concurrency: int = Field(default=50, ge=0, le=10000)
    delivery_memory: Bytes = 100 * 1024 * 1024
    retry_initial: Seconds = 15.0
    retry_max: Seconds = 3600.0
    retry_config_error: Seconds = 300.0
    max_queue_lifetime: Seconds = 5 * 86400.0
    lease_time: Seconds = Field(default=300.0, gt=0)
    poll_interval: Seconds = Field(default=1.0, gt=0)
    delivered_retention: Seconds = 86400.0
    failed_retention: Seconds = 7 * 86400.0
    shutdown_grace: Seconds = 20.0

    # Performance (bench/README.md)
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    http_transport: Literal["auto", "aiohttp", "httpx"] = "auto"

    # Logging
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)] = (
        "INFO"
    )
    log_format: Literal["text", "json"] = "text"

    # Operations HTTP endpoint (/healthz, /readyz, /metrics, admin API)
    http_enabled: bool = True
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8025, ge=0, le=65535)
    #: Bearer token for the queue admin API and page; without it those routes are off.
    admin_token: SecretStr | None = None

    # ESP event webhooks (esprelay.events): a listener of its own, off unless the port
    # is set; each provider's keys are ESPRELAY_<NAME>_WEBHOOK_* (esprelay.events.settings)
    events_host: str = "127.0.0.1"
    events_port: int | None = Field(default=None, ge=0, le=65535)
    events_tls_cert_file: Path | None = None
    events_tls_key_file: Path | None = None
    events_max_request_size: Bytes = Field(default=4 * 1024 * 1024, ge=1024)
    #: Requests a second (on average) and at once (burst) from one peer address
    events_rate_limit: float = Field(default=100.0, gt=0)
    events_rate_burst: int = Field(default=500, ge=1)
    #: How far a signed timestamp may be from now (SendGrid, Mailgun)
    events_timestamp_tolerance: Seconds = Field(default=300.0, gt=0)
    #: A deferral event this long after intake sends a delay DSN to a NOTIFY=DELAY sender
    delay_dsn_after: Seconds = Field(default=4 * 3600.0, ge=0)

    #: The environment the settings came from (``.env`` under the process environment),
    #: where the providers' own ``ESPRELAY_<KIND>_*`` settings are read.
    _environ: dict[str, str] = PrivateAttr(default_factory=lambda: dict(os.environ))

    #: The .env file the settings were read from (a reload reads the same one).
    _env_file: str | None = PrivateAttr(default=".env")

    @property
    def environ(self) -> Mapping[str, str]:
        return self._environ

    @property
    def env_file(self) -> str | None:
        return self._env_file

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < 16:
            raise ValueError("ESPRELAY_ADMIN_TOKEN must be at least 16 characters long")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("ESPRELAY_TLS_CERT_FILE and ESPRELAY_TLS_KEY_FILE go together")
        if self.smtps_port is not None and self.tls_cert_file is None:
            raise ValueError("ESPRELAY_SMTPS_PORT needs ESPRELAY_TLS_CERT_FILE and _KEY_FILE")
        if (self.auth_user is None) != (self.auth_password is None):
            raise ValueError("ESPRELAY_AUTH_USER and ESPRELAY_AUTH_PASSWORD go together")
        if self.auth_user is not None and ":" in self.auth_user:
            raise ValueError("ESPRELAY_AUTH_USER must not contain ':'")
        if self.force_from is not None and "@" not in self.force_from:
            raise ValueError("ESPRELAY_FORCE_FROM must be an address such as relay@example.com")
        if self.proxy_protocol and not self.proxy_trusted:
            raise ValueError(
                "ESPRELAY_PROXY_PROTOCOL=true needs ESPRELAY_PROXY_TRUSTED (the load balancers)"
            )
        if self.retry_max < self.retry_initial:
            raise ValueError("ESPRELAY_RETRY_MAX must not be smaller than ESPRELAY_RETRY_INITIAL")
        return self

    @model_validator(mode="after")
    def _refuse_open_relay(self) -> Settings:
        """A trusted network of every address (a prefix length of 0) lets anyone who
        reaches the port send mail as you: refused unless asked for by name."""
        if self.allow_open_relay:
            return self
        everyone = [
            item
            for item in self.trusted_networks
            if ipaddress.ip_network(item, strict=False).prefixlen == 0
        ]
        if everyone:
            raise ValueError(
                f"ESPRELAY_TRUSTED_NETWORKS: {', '.join(everyone)} trusts every address:"
                " anyone who can reach the SMTP port could send mail through your ESP"
                " account (an open relay). Trust the clients' own subnet, or configure"
                " SMTP AUTH (ESPRELAY_AUTH_FILE); if this really is what you want, set"
                " ESPRELAY_ALLOW_OPEN_RELAY=true"
            )
        return self


def load_settings(env_file: str | Path | None = ".env") -> Settings:
    """Read the environment (and ``env_file``) once; raise ConfigError on a bad value.

    The provider of ``ESPRELAY_PROVIDER`` (when no routes file names the providers) is
    checked here too, with its own settings: a missing API key is found at start-up.
    """
    try:
        settings = Settings(_env_file=env_file)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    settings._env_file = None if env_file is None else str(env_file)
    if env_file is not None and Path(env_file).is_file():
        from_file = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
        settings._environ = {**from_file, **os.environ}
    if settings.routes_file is None:
        from esprelay.routing import default_provider  # routing imports this module

        default_provider(settings)
    return settings


def _describe(exc: ValidationError) -> str:
    """One line naming the variable(s) at fault, never echoing the value (it may be a secret)."""
    parts = []
    for error in exc.errors():
        loc = [str(item) for item in error["loc"]]
        message = str(error["msg"]).removeprefix("Value error, ")
        if loc:
            parts.append(f"ESPRELAY_{'__'.join(loc).upper()}: {message}")
        else:
            parts.append(message)
    return "; ".join(parts)


class SendmailSettings(BaseSettings):
    """What ``esprelay sendmail`` reads: the bridge's address, never its secrets.

    Separate from :class:`Settings` so that a program calling sendmail needs neither
    the provider's keys nor a complete, valid bridge configuration.
    """

    model_config = SettingsConfigDict(
        env_prefix="ESPRELAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        hide_input_in_errors=True,
    )

    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=2525, ge=1, le=65535)
    sendmail_from: str | None = None
