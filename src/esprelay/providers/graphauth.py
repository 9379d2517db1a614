"""Microsoft identity platform: app-only access tokens for Microsoft Graph.

The OAuth 2.0 client credentials grant
(https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-client-creds-grant-flow)::

    POST {authority}/{tenant}/oauth2/v2.0/token
    Content-Type: application/x-www-form-urlencoded

    client_id=...&scope=https://graph.microsoft.com/.default&grant_type=client_credentials
    &client_secret=...                                   (a secret), or
    &client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer
    &client_assertion=<JWT signed with the certificate's key>     (a certificate)

answers ``200 {"token_type": "Bearer", "expires_in": 3599, "access_token": "..."}``
or ``400/401 {"error": "invalid_client", "error_description": "AADSTS7000215: ..."}``.

The certificate assertion is the JWT of "Microsoft identity platform application
authentication certificate credentials"
(https://learn.microsoft.com/en-us/entra/identity-platform/certificate-credentials):
header ``alg`` RS256, ``typ`` JWT, ``x5t`` the base64url SHA-1 thumbprint of the
certificate; claims ``aud`` (the token endpoint), ``iss`` and ``sub`` (the client id),
``jti``, ``nbf``, ``iat`` and ``exp``.  PyJWT signs it (with ``cryptography``); msal,
Microsoft's own library, is not used: it accepts only ``https://`` authorities (its
``authority.canonicalize`` raises for anything else, msal 1.39), fetches OpenID
metadata before the first token and is synchronous (requests).

One token serves every delivery: :meth:`TokenSource.token` returns the cached token
until it nears expiry, and only one refresh runs at a time however many deliveries
want a token then.  Tokens and secrets are never logged nor put in an error.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import SecretStr

from esprelay.clock import SYSTEM_CLOCK, Clock
from esprelay.errors import ConfigError, DeliveryError, ProviderConfigError, ProviderUnavailable
from esprelay.providers.base import json_object, map_transport_errors, parse_retry_after

log = logging.getLogger("esprelay.providers.graph")

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Lifetime of a signed client assertion (Microsoft's examples use 10 minutes).
ASSERTION_LIFETIME = 600
#: A token is refreshed this long before it expires (or at half its life, if shorter).
REFRESH_MARGIN = 300.0
_THUMBPRINT = re.compile(r"[0-9A-Fa-f]{40}")
#: The private key of a PEM file that may also hold the certificate (either order).
_PEM_KEY = re.compile(
    rb"-----BEGIN ((?:RSA |ENCRYPTED )?PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL
)


@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate credential: the private key and the certificate's SHA-1 thumbprint."""

    key: RSAPrivateKey
    thumbprint: str  # 40 hex digits, as the Azure portal shows it

    @classmethod
    def load(cls, path: Path, thumbprint: str) -> Certificate:
        """Read the PEM file's private key; ConfigError naming the setting otherwise."""
        compact = thumbprint.replace(":", "").replace(" ", "")
        if not _THUMBPRINT.fullmatch(compact):
            raise ConfigError(
                "ESPRELAY_GRAPH_CERTIFICATE_THUMBPRINT: expected the certificate's SHA-1"
                " thumbprint (40 hex digits, as the Azure portal shows it)"
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"ESPRELAY_GRAPH_CERTIFICATE_FILE: cannot read {path}: {exc.strerror}"
            ) from None
        found = _PEM_KEY.search(data)
        if found is None:
            raise ConfigError(f"ESPRELAY_GRAPH_CERTIFICATE_FILE: {path} holds no PEM private key")
        try:
            key = load_pem_private_key(found.group(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"ESPRELAY_GRAPH_CERTIFICATE_FILE: {path}: the private key cannot be read"
                f" ({type(exc).__name__}; an encrypted key is not supported)"
            ) from None
        if not isinstance(key, RSAPrivateKey):
            raise ConfigError(
                f"ESPRELAY_GRAPH_CERTIFICATE_FILE: {path}: Microsoft Entra certificate"
                " credentials need an RSA key"
            )
        return cls(key, compact.lower())

    def x5t(self) -> str:
        """The ``x5t`` header: the thumbprint's bytes, base64url without padding."""
        raw = bytes.fromhex(self.thumbprint)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def assertion(self, client_id: str, audience: str, now: float) -> str:
        """A signed client assertion for ``audience`` (the token endpoint)."""
        issued = int(now)
        claims = {
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": str(uuid.uuid4()),
            "nbf": issued,
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME,
        }
        return jwt.encode(
            claims, self.key, algorithm="RS256", headers={"typ": "JWT", "x5t": self.x5t()}
        )


def token_url(authority_url: str, tenant_id: str) -> str:
    return f"{authority_url.rstrip('/')}/{tenant_id}/oauth2/v2.0/token"


def graph_scope(api_url: str) -> str:
    """The ``.default`` scope of the Graph instance at ``api_url`` (sovereign clouds:
    https://graph.microsoft.us/.default, https://microsoftgraph.chinacloudapi.cn/.default)."""
    return f"{api_url.rstrip('/')}/.default"


@dataclass(frozen=True, slots=True)
class _Cached:
    value: str
    refresh_at: float  # monotonic


class TokenSource:
    """The app's access token: cached, refreshed before expiry, one refresh at a time."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        url: str,
        client_id: str,
        scope: str,
        secret: SecretStr | None = None,
        certificate: Certificate | None = None,
        provider: str = "graph",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if (secret is None) == (certificate is None):
            raise ValueError("a client secret or a certificate, not both")
        self._client = client
        self.url = url
        self.client_id = client_id
        self.scope = scope
        self._secret = secret
        self._certificate = certificate
        self.provider = provider
        self._clock = clock
        self._cached: _Cached | None = None
        self._lock = asyncio.Lock()
        #: How many tokens were fetched (for tests and logs).
        self.fetches = 0

    async def token(self) -> str:
        """A valid access token, fetched only when the cached one nears expiry."""
        cached = self._cached
        if cached is not None and self._clock.monotonic() < cached.refresh_at:
            return cached.value
        async with self._lock:
            cached = self._cached  # another delivery may have refreshed it meanwhile
            if cached is not None and self._clock.monotonic() < cached.refresh_at:
                return cached.value
            self._cached = await self._fetch()
            return self._cached.value

    def invalidate(self, token: str) -> None:
        """Graph refused ``token`` (401): the next :meth:`token` fetches a new one."""
        if self._cached is not None and self._cached.value == token:
            self._cached = None

    async def _fetch(self) -> _Cached:
        form = {
            "client_id": self.client_id,
            "scope": self.scope,
            "grant_type": "client_credentials",
        }
        if self._secret is not None:
            form["client_secret"] = self._secret.get_secret_value()
        else:
            assert self._certificate is not None
            form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
            form["client_assertion"] = self._certificate.assertion(
                self.client_id, self.url, self._clock.time()
            )
        started = self._clock.monotonic()
        with map_transport_errors(self.provider):
            response = await self._client.post(
                self.url, data=form, headers={"Accept": "application/json"}
            )
            await response.aread()
        self.fetches += 1
        if response.status_code != 200:
            raise self._token_error(response)
        body = json_object(response)
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise ProviderConfigError(
                f"token endpoint answered {response.status_code} without an access_token;"
                " is ESPRELAY_GRAPH_AUTHORITY_URL the Microsoft identity platform?",
                provider=self.provider,
                status_code=response.status_code,
            )
        assert body is not None  # the token came from it
        try:
            lifetime = float(body.get("expires_in", 3599))
        except (TypeError, ValueError):
            lifetime = 3599.0
        margin = min(REFRESH_MARGIN, lifetime / 2)
        log.info("graph: got an access token valid for %.0fs", lifetime)
        return _Cached(token, started + lifetime - margin)

    def _token_error(self, response: httpx.Response) -> DeliveryError:
        status = response.status_code
        body = json_object(response)
        code = description = ""
        if isinstance(body, dict):
            code = str(body.get("error") or "")
            # "AADSTS7000215: Invalid client secret provided. ...\r\nTrace ID: ..."
            description = str(body.get("error_description") or "").split("\r\n", 1)[0]
            description = " ".join(description.split())[:300]
        detail = f"token endpoint HTTP {status} {code or 'error'}: {description or '-'}"
        if status == 429 or status >= 500 or status == 408:
            return ProviderUnavailable(
                detail,
                provider=self.provider,
                status_code=status,
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        # invalid_client (a wrong or expired secret, an unknown certificate),
        # unauthorized_client, invalid_scope, an unknown tenant: an operator must act.
        return ProviderConfigError(
            f"{detail}; check ESPRELAY_GRAPH_TENANT_ID, ESPRELAY_GRAPH_CLIENT_ID and the"
            " client secret or certificate",
            provider=self.provider,
            status_code=status,
        )
