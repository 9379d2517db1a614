"""Server TLS contexts that follow certificate rotation on disk.

:class:`TLSContextSource` builds an :class:`ssl.SSLContext` from the certificate and
key files and, at most every ``reload_interval`` seconds (checked when a connection
or a STARTTLS needs a context), looks at the files' mtimes and sizes: if they changed,
a new context is loaded and used for every new handshake.  A rotation that leaves the
files half-written (a new certificate with the old key) keeps the previous context and
logs a warning until the pair is consistent again.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
import warnings
from pathlib import Path

from esprelay.errors import ConfigError

log = logging.getLogger("esprelay.tls")

_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


def build_context(
    cert_file: Path, key_file: Path, *, min_version: str = "1.2", ciphers: str | None = None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if min_version in ("1.0", "1.1") and ciphers is None:
        # OpenSSL 3 refuses TLS 1.0/1.1 at its default security level (SHA-1 signatures).
        ciphers = "DEFAULT:@SECLEVEL=0"
    if ciphers is not None:
        context.set_ciphers(ciphers)
    with warnings.catch_warnings():
        # Python deprecates TLS 1.0/1.1; the operator asked for it and was warned at start.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = _VERSIONS[min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(cert_file, key_file)
    return context


def _stamp(*paths: Path) -> tuple[tuple[int, int], ...]:
    stamps = []
    for path in paths:
        st = os.stat(path)
        stamps.append((st.st_mtime_ns, st.st_size))
    return tuple(stamps)


class TLSContextSource:
    """The current server context, reloaded when the files change."""

    def __init__(
        self,
        cert_file: Path,
        key_file: Path,
        *,
        min_version: str = "1.2",
        ciphers: str | None = None,
        reload_interval: float = 60.0,
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.min_version = min_version
        self.ciphers = ciphers
        self.reload_interval = reload_interval
        try:
            self._stamp = _stamp(cert_file, key_file)
            self._context = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"ESPRELAY_TLS_CERT_FILE/ESPRELAY_TLS_KEY_FILE: cannot load {cert_file}: "
                f"{getattr(exc, 'strerror', None) or exc.__class__.__name__}"
            ) from None
        self._checked = time.monotonic()
        self.loads = 1

    def _build(self) -> ssl.SSLContext:
        return build_context(
            self.cert_file, self.key_file, min_version=self.min_version, ciphers=self.ciphers
        )

    @property
    def context(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked >= self.reload_interval:
            self._checked = now
            self._maybe_reload()
        return self._context

    def _maybe_reload(self) -> None:
        try:
            stamp = _stamp(self.cert_file, self.key_file)
        except OSError as exc:
            log.warning("TLS certificate files unreadable, keeping the old ones: %s", exc.strerror)
            return
        if stamp == self._stamp:
            return
        try:
            context = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.warning(
                "TLS certificate changed but does not load (%s); keeping the previous one",
                exc.__class__.__name__,
            )
            return
        self._stamp = stamp
        self._context = context
        self.loads += 1
        log.info("TLS certificate reloaded from %s", self.cert_file)

    def listener_context(self) -> ssl.SSLContext:
        """A context for listeners whose every handshake uses the current certificate.

        OpenSSL calls the SNI callback for each ClientHello (with or without a server
        name), before the certificate is chosen; swapping ``sslobj.context`` there picks
        up a rotated certificate without re-creating the listening socket.
        """
        outer = self._build()

        def pick(sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
            sslobj.context = self.context

        outer.sni_callback = pick
        return outer
