"""``esprelay doctor``: what to check when mail does not go out, each finding with its fix.

Every check is a :class:`Check` (``pass``, ``info``, ``warn`` or ``fail``, a detail and
what to do about it): the configuration (and where each value came from, secrets
masked), the spool (never created here: a missing spool is a finding), DNS, TCP and TLS
to each provider's API host, whether outbound SMTP is blocked from this host, each
provider's credentials by a harmless authenticated call (:data:`CREDENTIAL_CHECKS`),
and the listener's TLS certificate.  Nothing here sends mail.

``esprelay config`` prints :func:`effective_config` alone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import json
import os
import re
import socket
import sqlite3
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import httpx
from cryptography import x509
from dotenv import dotenv_values
from pydantic import BaseModel, SecretStr

from esprelay.config import Settings, load_settings
from esprelay.errors import ConfigError, DeliveryError, SpoolError
from esprelay.models import MessageState
from esprelay.providers.base import HttpProvider, excerpt
from esprelay.providers.registry import ProviderConfig, variable

Status = Literal["pass", "info", "warn", "fail"]

#: A well-known MX: port 25 open to it means this host could send mail directly.
DEFAULT_SMTP_PROBE_HOST = "gmail-smtp-in.l.google.com"
SMTP_PORTS = (25, 465, 587, 2525)
#: A certificate that expires sooner than this is a warning.
CERT_WARN_DAYS = 14
MASK = "********"

_SECRET_NAME = re.compile(r"password|secret|token|api_key|apikey", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/@:\s]*:)[^@/\s]+@", re.IGNORECASE)
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&](?:access_token|api_key|apikey|key|password|secret|sig|signature|token)=)"
    r"[^&#\s]+",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class SettingValue:
    """One effective setting: its variable, its value (masked) and where it came from."""

    variable: str
    value: Any
    source: str


@dataclass(slots=True)
class Report:
    checks: list[Check] = field(default_factory=list)
    config: list[SettingValue] = field(default_factory=list)
    #: Every secret value of the configuration, removed from whatever is printed.
    secrets: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not any(check.status == "fail" for check in self.checks)

    def add(self, *checks: Check) -> None:
        self.checks.extend(checks)

    def redact(self, text: str) -> str:
        """``text`` without any secret of the configuration (longest first)."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, MASK)
        return text

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [
                {k: self.redact(v) for k, v in asdict(check).items()} for check in self.checks
            ],
            "config": [asdict(item) for item in self.config],
        }

    def as_text(self) -> str:
        lines = []
        for check in self.checks:
            lines.append(f"[{check.status.upper():4}] {check.name}: {self.redact(check.detail)}")
            if check.fix:
                lines.append(f"       fix: {self.redact(check.fix)}")
            if check.name == "configuration" and check.status == "pass":
                # What differs from the defaults, and where it came from (masked).
                changed = [row for row in self.config if row.source != "default"]
                lines.extend(f"       {line}" for line in config_text(changed).splitlines())
        fails = sum(check.status == "fail" for check in self.checks)
        warns = sum(check.status == "warn" for check in self.checks)
        lines.append(f"{len(self.checks)} check(s): {fails} failed, {warns} warning(s)")
        return "\n".join(lines)


# -- the effective configuration ----------------------------------------------------------


def mask_text(text: str) -> str:
    """``text`` with a URL's password and secret-looking query parameters masked."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK + "@", text)
    return _QUERY_SECRET.sub(lambda m: m.group("head") + MASK, text)


def masked(name: str, value: Any) -> Any:
    """A setting's value as it may be printed (JSON-compatible)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, Mapping):
        return {str(k): masked(name, v) for k, v in value.items()}
    if isinstance(value, tuple | list | set | frozenset):
        return [masked(name, v) for v in value]
    text = str(value)
    return MASK if _SECRET_NAME.search(name) else mask_text(text)


def _secret_values(name: str, value: Any) -> Iterable[str]:
    if isinstance(value, SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _secret_values(name, item)
    elif isinstance(value, str):
        if _SECRET_NAME.search(name):
            yield value
        for match in _URL_PASSWORD.finditer(value):
            yield match.group(0)[len(match.group("head")) : -1]


def _dotenv(env_file: str | Path | None) -> dict[str, str]:
    if env_file is None or not Path(env_file).is_file():
        return {}
    return {k.upper(): v for k, v in dotenv_values(env_file).items() if v is not None}


def _source(name: str, environ: Mapping[str, str], dotenv: Mapping[str, str]) -> str | None:
    if name in environ:
        return "environment"
    if name in dotenv:
        return ".env"
    return None


def effective_config(
    settings: Settings,
    providers: Mapping[str, ProviderConfig] | None = None,
    *,
    env_file: str | Path | None = ".env",
    secrets: set[str] | None = None,
) -> list[SettingValue]:
    """Every setting with its masked value and its source: ``environment``, ``.env``,
    ``routes file`` (a named provider's table) or ``default``.  The secret values found
    are added to ``secrets``."""
    environ = {k.upper(): v for k, v in os.environ.items()}
    dotenv = _dotenv(env_file)
    found = set() if secrets is None else secrets
    rows: list[SettingValue] = []
    for name in Settings.model_fields:
        value = getattr(settings, name)
        env_name = f"ESPRELAY_{name.upper()}"
        found.update(_secret_values(name, value))
        rows.append(
            SettingValue(
                env_name, masked(name, value), _source(env_name, environ, dotenv) or "default"
            )
        )
    for provider, config in (providers or {}).items():
        model: BaseModel = config.settings
        for name in type(model).model_fields:
            value = getattr(model, name)
            env_name = variable(config.kind, name)
            found.update(_secret_values(name, value))
            source = _source(env_name, environ, dotenv)
            if source is None:
                from_file = settings.routes_file is not None and name in model.model_fields_set
                source = "routes file" if from_file else "default"
            label = env_name if provider == config.kind.name else f"providers.{provider}.{name}"
            rows.append(SettingValue(label, masked(name, value), source))
    found.discard("")
    return rows


def config_text(rows: Iterable[SettingValue]) -> str:
    lines = []
    for row in rows:
        value = row.value
        shown = "" if value is None else value if isinstance(value, str) else _json(value)
        lines.append(f"{row.variable}={shown}  # {row.source}")
    return "\n".join(lines)


def _json(value: Any) -> str:
    return json.dumps(value)


# -- running the checks ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    smtp_probe_host: str = DEFAULT_SMTP_PROBE_HOST
    timeout: float = 5.0
    env_file: str | Path | None = ".env"


def run(options: Options) -> Report:
    """Load the configuration and run every check; never raises for a finding."""
    return asyncio.run(_run(options))


async def _run(options: Options) -> Report:
    report = Report()
    smtp = asyncio.ensure_future(smtp_egress(options.smtp_probe_host, options.timeout))
    try:
        settings = load_settings(options.env_file)
        from esprelay.routing import load_routing

        table = load_routing(settings)
    except ConfigError as exc:
        report.add(
            Check(
                "configuration",
                "fail",
                str(exc),
                "correct the setting named above (.env.example documents each one)",
            )
        )
        report.add(*await smtp)
        return report
    report.config = effective_config(
        settings, table.providers, env_file=options.env_file, secrets=report.secrets
    )
    report.add(*configuration_checks(settings, table.providers, options.env_file))
    report.add(*await spool_checks(settings))
    report.add(*listener_tls_checks(settings))
    report.add(*await provider_checks(settings, table.providers, options.timeout))
    report.add(*await smtp)
    return report


def configuration_checks(
    settings: Settings, providers: Mapping[str, ProviderConfig], env_file: str | Path | None
) -> list[Check]:
    where = (
        f".env at {Path(env_file).resolve()} and the environment"
        if env_file is not None and Path(env_file).is_file()
        else "the environment (no .env here)"
    )
    kinds = ", ".join(f"{name} ({config.kind.name})" for name, config in providers.items())
    checks = [Check("configuration", "pass", f"loaded from {where}; providers: {kinds}")]
    for name, config in providers.items():
        if config.kind.name == "outbox":
            directory = getattr(config.settings, "dir", "outbox")
            checks.append(
                Check(
                    f"provider {name}",
                    "warn",
                    f"the outbox provider writes every message to {Path(directory).resolve()}"
                    " and sends nothing",
                    "set ESPRELAY_PROVIDER to your ESP (sendgrid, mailgun, ses, ...) and its"
                    " ESPRELAY_<KIND>_* settings, unless this is a development setup",
                )
            )
    return checks


# -- the spool --------------------------------------------------------------------------------


async def spool_checks(settings: Settings) -> list[Check]:
    url = settings.spool_url
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        return await _sqlite_checks(settings)
    if scheme in ("postgresql", "postgres"):
        return await _open_checks(settings, f"PostgreSQL spool at {mask_text(url)}")
    return [
        Check(
            "spool",
            "fail",
            f"unsupported ESPRELAY_SPOOL_URL scheme {scheme!r}",
            "use sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE",
        )
    ]


async def _sqlite_checks(settings: Settings) -> list[Check]:
    from esprelay.spool.sqlite import SCHEMA_VERSION, path_from_url

    try:
        path = path_from_url(settings.spool_url)
    except SpoolError as exc:
        return [
            Check("spool", "fail", str(exc), "use sqlite:///relative/path.db or sqlite:////abs")
        ]
    where = f"SQLite spool {path.resolve()} (ESPRELAY_SPOOL_URL={settings.spool_url})"
    if not path.is_file():
        return [
            Check(
                "spool",
                "fail",
                f"no spool at {path.resolve()} (looked there for ESPRELAY_SPOOL_URL="
                f"{settings.spool_url}, from {Path.cwd()})",
                "run doctor with the service's configuration (`esprelay --env-file PATH"
                " doctor`, from its working directory); a new spool is made by"
                " `esprelay serve` or `esprelay db upgrade`",
            )
        ]
    if not (os.access(path, os.R_OK | os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)):
        return [
            Check(
                "spool",
                "fail",
                f"{where} is not writable by this user (uid {os.getuid()})",
                f"run as the service's user, or give it write access to {path.parent.resolve()}",
            )
        ]
    try:
        uri = f"file:{quote(str(path.resolve()))}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.Error as exc:
        return [
            Check(
                "spool",
                "fail",
                f"{where} cannot be read: {exc}",
                "is it an esprelay spool? check ESPRELAY_SPOOL_URL",
            )
        ]
    version = 1 if row is None else int(row[0])
    if version > SCHEMA_VERSION:
        return [
            Check(
                "spool",
                "fail",
                f"{where} has schema version {version}, newer than this esprelay"
                f" ({SCHEMA_VERSION})",
                "run the esprelay version that wrote it, or upgrade esprelay",
            )
        ]
    if version < SCHEMA_VERSION:
        return [
            Check(
                "spool",
                "warn",
                f"{where} has schema version {version}; this esprelay uses {SCHEMA_VERSION}",
                "`esprelay serve` (or `esprelay db upgrade`) migrates it",
            )
        ]
    return await _open_checks(settings, f"{where}, schema version {version}")


async def _open_checks(settings: Settings, where: str) -> list[Check]:
    """Open the spool as the queue commands do (an existing one only) and read its stats."""
    from esprelay.spool import open_spool

    try:
        spool = open_spool(settings.spool_url, auto_migrate=False, pool_size=1)
        await spool.open()
        try:
            stats = await spool.stats()
        finally:
            await spool.close()
    except (SpoolError, ConfigError, OSError) as exc:
        return [
            Check(
                "spool",
                "fail",
                f"{where}: {mask_text(str(exc))}",
                "check ESPRELAY_SPOOL_URL, that the database is up and the credentials",
            )
        ]
    checks = [Check("spool", "pass", f"{where}: reachable and writable")]
    depth = stats.depth
    if stats.oldest_queued_at is None:
        checks.append(Check("queue", "pass", f"{depth} message(s) waiting"))
    else:
        age = max(0.0, time.time() - stats.oldest_queued_at)
        stale = age > max(settings.retry_max, 3600.0)
        checks.append(
            Check(
                "queue",
                "warn" if stale else "pass",
                f"{depth} message(s) waiting; the oldest since {_age(age)}",
                "`esprelay queue list --state queued` shows them and their last error"
                if stale
                else "",
            )
        )
    failed = stats.counts.get(MessageState.FAILED, 0)
    if failed:
        checks.append(
            Check(
                "queue failed",
                "warn",
                f"{failed} message(s) failed (kept for ESPRELAY_FAILED_RETENTION)",
                "`esprelay queue list --state failed` and `esprelay queue show ID` say why;"
                " `esprelay queue retry --all-failed` after the fix",
            )
        )
    return checks


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# -- the listener's certificate ---------------------------------------------------------------


def listener_tls_checks(settings: Settings, now: float | None = None) -> list[Check]:
    cert_file, key_file = settings.tls_cert_file, settings.tls_key_file
    if cert_file is None or key_file is None:
        return []
    from esprelay.smtp.tls import build_context

    name = "listener tls"
    try:
        build_context(cert_file, key_file, min_version=settings.tls_min_version)
        expires = not_after(cert_file.read_bytes())
    except (OSError, ssl.SSLError, ValueError) as exc:
        return [
            Check(
                name,
                "fail",
                f"ESPRELAY_TLS_CERT_FILE/KEY_FILE cannot be loaded: {exc}",
                "give a PEM certificate (chain) and its matching private key",
            )
        ]
    days = (expires - (time.time() if now is None else now)) / 86400
    when = datetime.datetime.fromtimestamp(expires, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    renew = "renew it: the listener loads the new files within ESPRELAY_TLS_RELOAD_INTERVAL"
    if days < 0:
        return [Check(name, "fail", f"{cert_file} expired on {when}", renew)]
    if days < CERT_WARN_DAYS:
        return [Check(name, "warn", f"{cert_file} expires in {days:.1f} days ({when})", renew)]
    return [Check(name, "pass", f"{cert_file} valid until {when} ({days:.0f} days)")]


def not_after(pem: bytes) -> float:
    """The notAfter time of the first certificate of a PEM file, as a POSIX time (read
    with ``cryptography``, installed with PyJWT[crypto])."""
    certificate = x509.load_pem_x509_certificate(pem)
    return certificate.not_valid_after_utc.timestamp()


# -- network: the providers' API hosts, and outbound SMTP ---------------------------------------


async def _resolve(host: str, port: int, timeout: float) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    return sorted({str(info[4][0]) for info in infos})


async def _connect(
    host: str, port: int, timeout: float, context: ssl.SSLContext | None = None
) -> Any:
    """Connect (and handshake with ``context``); the peer certificate, or None."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=context, server_hostname=host if context else None),
        timeout,
    )
    try:
        return writer.get_extra_info("peercert")
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not valid: {exc.verify_message}"
    if isinstance(exc, OSError) and not isinstance(exc, socket.gaierror) and exc.errno:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def endpoint_checks(url: str, users: str, timeout: float) -> list[Check]:
    """DNS, TCP and (for https) TLS to the host of ``url``, used by ``users``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    try:
        port = parts.port or (443 if https else 80)
    except ValueError:
        port = 0
    if not host or parts.scheme not in ("http", "https") or not port:
        return [Check(f"api {users}", "fail", f"not an http(s) URL: {mask_text(url)}", "fix it")]
    target = f"{host}:{port}"
    try:
        addresses = await _resolve(host, port, timeout)
    except (OSError, TimeoutError) as exc:
        return [
            Check(
                f"dns {host}",
                "fail",
                f"{host} (for {users}) does not resolve: {_why(exc)}",
                "check this host's DNS (/etc/resolv.conf, the container's network) and the"
                " provider's API URL setting",
            )
        ]
    checks = [Check(f"dns {host}", "pass", f"{host} is {', '.join(addresses)}")]
    try:
        await _connect(host, port, timeout)
    except (OSError, TimeoutError) as exc:
        checks.append(
            Check(
                f"tcp {target}",
                "fail",
                f"cannot connect to {target} (for {users}): {_why(exc)}",
                f"allow outbound TCP to {target} (firewall, security group, egress policy),"
                " or set HTTPS_PROXY with ESPRELAY_HTTP_TRANSPORT=httpx",
            )
        )
        return checks
    checks.append(Check(f"tcp {target}", "pass", f"connected to {target}"))
    if not https:
        if _is_loopback(host):
            checks.append(Check(f"tls {target}", "info", f"plain http to loopback {target}"))
        else:
            checks.append(
                Check(
                    f"tls {target}",
                    "warn",
                    f"plain http to {target}: the API key crosses the network in clear",
                    "use the provider's https:// URL",
                )
            )
        return checks
    try:
        cert = await _connect(host, port, timeout, ssl.create_default_context())
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        checks.append(
            Check(
                f"tls {target}",
                "fail",
                f"TLS handshake with {target} failed: {_why(exc)}",
                "a TLS-intercepting proxy or an old CA bundle: install its CA in the system"
                " store (or SSL_CERT_FILE), and check the clock",
            )
        )
        return checks
    expires = ssl.cert_time_to_seconds(cert["notAfter"]) if cert else None
    if expires is None:
        checks.append(Check(f"tls {target}", "pass", "handshake and certificate verified"))
    else:
        days = (expires - time.time()) / 86400
        checks.append(
            Check(
                f"tls {target}",
                "pass" if days >= CERT_WARN_DAYS else "warn",
                f"certificate verified, valid for {days:.0f} more days",
                "" if days >= CERT_WARN_DAYS else "the ESP's certificate is about to expire",
            )
        )
    return checks


async def smtp_egress(host: str, timeout: float) -> list[Check]:
    """Can this host open outbound SMTP connections (25, 465, 587, 2525) to ``host``?

    Blocked SMTP is not an error for esprelay (it is why it exists): ``info``, never fail.
    """
    because = (
        "nothing to fix for esprelay: it delivers over HTTPS (443); this is why direct"
        " SMTP from this host does not work"
    )
    try:
        await _resolve(host, 25, timeout)
    except (OSError, TimeoutError) as exc:
        return [
            Check(
                "smtp egress",
                "info",
                f"outbound SMTP blocked or no network: {host} does not resolve ({_why(exc)})",
                because,
            )
        ]

    async def probe(port: int) -> Check:
        name = f"smtp egress {port}"
        try:
            await _connect(host, port, timeout)
        except (OSError, TimeoutError) as exc:
            detail = f"outbound port {port} blocked or no network: {host}:{port} {_why(exc)}"
            return Check(name, "info", detail)
        return Check(name, "pass", f"outbound port {port} open: connected to {host}:{port}")

    checks = list(await asyncio.gather(*(probe(port) for port in SMTP_PORTS)))
    open_ports = [
        str(port) for port, check in zip(SMTP_PORTS, checks, strict=True) if check.status == "pass"
    ]
    if not open_ports:
        summary = Check(
            "smtp egress",
            "info",
            f"outbound SMTP is blocked from this host (or it has no network): no port of"
            f" {', '.join(map(str, SMTP_PORTS))} reaches {host}",
            because,
        )
    else:
        summary = Check(
            "smtp egress",
            "info",
            f"outbound SMTP reaches {host} on port(s) {', '.join(open_ports)}",
        )
    return [*checks, summary]


# -- the providers' credentials ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CredentialProbe:
    """A harmless authenticated request of one kind, and how to read its answer."""

    #: The request for a provider's settings.
    request: Callable[[Any], httpx.Request]
    #: What to do when the ESP refuses the credentials.
    fix: str
    #: Read a 2xx answer (or a kind-specific refusal): a status and a detail, or None for
    #: the generic reading.
    judge: Callable[[httpx.Response, Any], tuple[Status, str] | None] | None = None
    #: Sign the request with the provider's own ``authorize`` (SES's SigV4).
    signed: bool = False


def _bearer(key: SecretStr) -> dict[str, str]:
    return {"Authorization": f"Bearer {key.get_secret_value()}", "Accept": "application/json"}


def _url(base: str, path: str) -> str:
    return base.rstrip("/") + path


def _sendgrid(response: httpx.Response, settings: Any) -> tuple[Status, str] | None:
    if not response.is_success:
        return None
    body = _body(response)
    scopes = body.get("scopes") if isinstance(body, dict) else None
    if isinstance(scopes, list) and "mail.send" not in scopes:
        return "fail", "the API key is valid but lacks the mail.send permission"
    return "pass", "the API key is valid and may send (mail.send)"


def _mailgun(response: httpx.Response, settings: Any) -> tuple[Status, str] | None:
    if response.status_code == 404:
        return "fail", (
            f"the key is accepted but has no domain {settings.domain!r}: a typo, another"
            " account, or the EU region (ESPRELAY_MAILGUN_API_URL=https://api.eu.mailgun.net)"
        )
    if not response.is_success:
        return None
    body = _body(response)
    domain = body.get("domain") if isinstance(body, dict) else None
    state = domain.get("state") if isinstance(domain, dict) else None
    if state is not None and state != "active":
        return "warn", f"domain {settings.domain} is {state!r}, not active: verify its DNS records"
    return "pass", f"the API key may use domain {settings.domain}"


def _ses(response: httpx.Response, settings: Any) -> tuple[Status, str] | None:
    if not response.is_success:
        return None
    body = _body(response)
    if isinstance(body, dict):
        if body.get("SendingEnabled") is False:
            return "fail", "the account's sending is disabled (SendingEnabled: false)"
        if body.get("ProductionAccessEnabled") is False:
            return "warn", (
                "the account is in the SES sandbox: only verified recipients receive mail"
                " (request production access)"
            )
    return "pass", f"the AWS credentials are valid for SES in {settings.region}"


def _resend(response: httpx.Response, settings: Any) -> tuple[Status, str] | None:
    # https://resend.com/docs/api-reference/errors: restricted_api_key (401) is a key
    # that exists and may only send; anything else but 2xx is the generic reading.
    body = _body(response)
    if (
        response.status_code == 401
        and isinstance(body, dict)
        and body.get("name") == "restricted_api_key"
    ):
        return "pass", "a valid sending-only API key (it cannot list domains)"
    return None


def _sparkpost(response: httpx.Response, settings: Any) -> tuple[Status, str] | None:
    # SparkPost keys carry per-API permissions: 403 (code 1100, "permission denied") is
    # a valid key without Account: Read-only, which may still send; 401 is a bad key.
    if response.status_code == 403:
        return "warn", (
            "the API key is valid but may not read the account (Account: Read-only);"
            " it may still send if it has Transmissions: Read/Write"
        )
    return None


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


#: The credential check of each kind, keyed by kind (a provider module may own its own
#: later).  Kinds not in the table are reported as having no check.
CREDENTIAL_CHECKS: dict[str, CredentialProbe] = {
    # SendGrid: GET /v3/scopes lists the key's permissions.
    "sendgrid": CredentialProbe(
        lambda s: httpx.Request("GET", _url(s.api_url, "/v3/scopes"), headers=_bearer(s.api_key)),
        "create an API key with Mail Send permission and set ESPRELAY_SENDGRID_API_KEY",
        _sendgrid,
    ),
    # Mailgun: GET /v3/domains/{domain}, HTTP basic auth as "api".
    "mailgun": CredentialProbe(
        lambda s: httpx.Request(
            "GET",
            _url(s.api_url, f"/v3/domains/{quote(s.domain, safe='')}"),
            headers={
                "Authorization": "Basic "
                + base64.b64encode(f"api:{s.api_key.get_secret_value()}".encode()).decode(),
                "Accept": "application/json",
            },
        ),
        "check ESPRELAY_MAILGUN_API_KEY (a private API key or the domain's sending key)"
        " and the region of ESPRELAY_MAILGUN_API_URL",
        _mailgun,
    ),
    # Postmark: GET /server with the server token.
    "postmark": CredentialProbe(
        lambda s: httpx.Request(
            "GET",
            _url(s.api_url, "/server"),
            headers={
                "X-Postmark-Server-Token": s.server_token.get_secret_value(),
                "Accept": "application/json",
            },
        ),
        "set ESPRELAY_POSTMARK_SERVER_TOKEN to the server's API token (not the account token)",
    ),
    # SES v2 GetAccount: GET /v2/email/account, SigV4-signed by the provider.
    "ses": CredentialProbe(
        lambda s: httpx.Request(
            "GET",
            _url(s.api_urls()[0], "/v2/email/account"),
            headers={"Content-Type": "application/json"},
        ),
        "give the process AWS credentials allowed ses:GetAccount and ses:SendEmail"
        " (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an IAM role)",
        _ses,
        signed=True,
    ),
    # Resend: GET /domains.
    "resend": CredentialProbe(
        lambda s: httpx.Request("GET", _url(s.api_url, "/domains"), headers=_bearer(s.api_key)),
        "create an API key at resend.com/api-keys and set ESPRELAY_RESEND_API_KEY",
        _resend,
    ),
    # Brevo: GET /v3/account.
    "brevo": CredentialProbe(
        lambda s: httpx.Request(
            "GET",
            _url(s.api_url, "/v3/account"),
            headers={"api-key": s.api_key.get_secret_value(), "Accept": "application/json"},
        ),
        "create a v3 API key (not an SMTP key) and set ESPRELAY_BREVO_API_KEY",
    ),
    # Mailjet: GET /v3/REST/apikey (the key's own record), Basic auth key:secret.
    "mailjet": CredentialProbe(
        lambda s: httpx.Request(
            "GET",
            _url(s.api_url, "/v3/REST/apikey"),
            headers={
                "Authorization": "Basic "
                + base64.b64encode(
                    f"{s.api_key.get_secret_value()}:{s.secret_key.get_secret_value()}".encode()
                ).decode(),
                "Accept": "application/json",
            },
        ),
        "set ESPRELAY_MAILJET_API_KEY and ESPRELAY_MAILJET_SECRET_KEY to a pair from"
        " Mailjet's API key management page (the key must be active)",
    ),
    # SparkPost: GET /api/v1/account, the bare key as Authorization.
    "sparkpost": CredentialProbe(
        lambda s: httpx.Request(
            "GET",
            _url(s.api_url, "/api/v1/account"),
            headers={"Authorization": s.api_key.get_secret_value(), "Accept": "application/json"},
        ),
        "create an API key with Transmissions: Read/Write (and Account: Read-only for this"
        " check) and set ESPRELAY_SPARKPOST_API_KEY; an EU account needs"
        " ESPRELAY_SPARKPOST_API_URL=https://api.eu.sparkpost.com",
        _sparkpost,
    ),
}


async def credential_check(name: str, config: ProviderConfig, client: httpx.AsyncClient) -> Check:
    check_name = f"credentials {name}"
    probe = CREDENTIAL_CHECKS.get(config.kind.name)
    if probe is None:
        return Check(check_name, "info", f"no check available for kind {config.kind.name!r}")
    request = probe.request(config.settings)
    label = f"{request.method} {request.url.path}"
    try:
        if probe.signed:
            provider = config.build(client, name)
            try:
                if isinstance(provider, HttpProvider):
                    await provider.authorize(request)
            finally:
                await provider.aclose()
        response = await client.send(request)
    except DeliveryError as exc:  # the provider could not sign: no credentials
        return Check(check_name, "fail", str(exc), probe.fix)
    except httpx.HTTPError as exc:
        return Check(
            check_name,
            "fail",
            f"{label}: no answer ({type(exc).__name__}: {exc})",
            "see the dns/tcp/tls checks of this provider's API host",
        )
    judged = probe.judge(response, config.settings) if probe.judge else None
    status = response.status_code
    if judged is not None:
        verdict, detail = judged
        return Check(
            check_name,
            verdict,
            f"{label}: HTTP {status}: {detail}",
            "" if verdict == "pass" else probe.fix,
        )
    if response.is_success:
        return Check(check_name, "pass", f"{label}: HTTP {status}: credentials accepted")
    if status in (401, 403):
        return Check(
            check_name,
            "fail",
            f"{label}: HTTP {status}: credentials refused: {excerpt(response, 200)}",
            probe.fix,
        )
    if status == 429:
        return Check(check_name, "warn", f"{label}: HTTP 429: rate limited; try again later")
    return Check(
        check_name,
        "warn" if status >= 500 else "fail",
        f"{label}: unexpected HTTP {status}: {excerpt(response, 200)}",
        "check the provider's API URL setting" if status < 500 else "the ESP has trouble: retry",
    )


async def provider_checks(
    settings: Settings, providers: Mapping[str, ProviderConfig], timeout: float
) -> list[Check]:
    from esprelay.httpclient import make_client

    hosts: dict[str, list[str]] = {}
    for name, config in providers.items():
        for url in config.settings.api_urls():
            parts = urlsplit(url)
            hosts.setdefault(f"{parts.scheme}://{parts.netloc}", []).append(name)
    network = await asyncio.gather(
        *(endpoint_checks(url, ", ".join(names), timeout) for url, names in hosts.items())
    )
    checks = [check for group in network for check in group]
    client, _ = make_client(
        timeout=min(settings.provider_timeout, max(timeout, 1.0)),
        max_connections=max(4, len(providers)),
        transport=settings.http_transport,
    )
    async with client:
        credentials = await asyncio.gather(
            *(credential_check(name, config, client) for name, config in providers.items())
        )
    return checks + list(credentials)
