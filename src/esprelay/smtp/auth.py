"""SMTP AUTH users: scrypt password hashes, the users file, failed-login limits.

:func:`login` is the one place a login is decided, for both SMTP engines.  Every attempt
costs exactly one scrypt computation, whether the user is in the users file, is the
``ESPRELAY_AUTH_USER`` (hashed at start-up with a random salt), is unknown or is not even
a valid name, so timing does not tell which names exist.  Each attempt takes its place
in the client's failed-login count *before* the password is checked, so parallel
connections from one address never get more checks than the limit; a success gives its
place back.

A hash looks like ``$scrypt$ln=15,r=8,p=1$<salt>$<key>`` (salt and key in base64), made
by ``esprelay hash-password``.  The users file has one ``user:hash[:allowed_senders]``
a line; ``allowed_senders`` is a comma-separated list of addresses (``app@example.com``)
and domains (``example.com`` or ``@example.com``) this user may send as.

Nothing here ever puts a password or a hash into an exception message or a repr.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from esprelay.errors import ConfigError
from esprelay.smtp.replies import AUTH_BLOCKED, AUTH_INVALID

log = logging.getLogger("esprelay.smtp")


# scrypt with N=2**15, r=8, p=1 takes ~32 MiB and tens of milliseconds: OWASP's minimum
# recommendation is N=2**17 for interactive logins, but AUTH runs on the event loop and is
# rate limited per client, so a cheaper default keeps the listener responsive.
DEFAULT_LOG_N = 15
_R = 8
_P = 1
_MAXMEM = 256 * 1024 * 1024
_HASH = re.compile(
    r"^\$scrypt\$ln=(?P<ln>\d{1,2}),r=(?P<r>\d{1,2}),p=(?P<p>\d{1,2})"
    r"\$(?P<salt>[A-Za-z0-9+/=]+)\$(?P<key>[A-Za-z0-9+/=]+)$"
)
_USER = re.compile(r"^[^\s:\x00-\x1f\x7f]{1,256}$")


def hash_password(password: str, *, log_n: int = DEFAULT_LOG_N) -> str:
    """A new salted scrypt hash of ``password`` in the users-file format."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(
        password.encode(), salt=salt, n=2**log_n, r=_R, p=_P, maxmem=_MAXMEM, dklen=32
    )
    b64 = base64.b64encode
    return f"$scrypt$ln={log_n},r={_R},p={_P}${b64(salt).decode()}${b64(key).decode()}"


def _valid_hash(encoded: str) -> bool:
    match = _HASH.match(encoded)
    if match is None or not 1 <= int(match["ln"]) <= 20:
        return False
    try:  # verify_password must never skip the computation over a bad salt or key
        base64.b64decode(match["salt"], validate=True)
        base64.b64decode(match["key"], validate=True)
    except ValueError:
        return False
    return True


def verify_password(password: bytes, encoded: str) -> bool:
    """True if ``password`` matches the scrypt hash ``encoded`` (constant-time compare)."""
    match = _HASH.match(encoded)
    if match is None:
        return False
    try:
        salt = base64.b64decode(match["salt"], validate=True)
        key = base64.b64decode(match["key"], validate=True)
        derived = hashlib.scrypt(
            password,
            salt=salt,
            n=2 ** int(match["ln"]),
            r=int(match["r"]),
            p=int(match["p"]),
            maxmem=_MAXMEM,
            dklen=len(key),
        )
    except ValueError:
        return False
    return hmac.compare_digest(derived, key)


def parse_sender_rules(text: str) -> tuple[str, ...]:
    """``a@example.com, example.org, @example.net`` -> lower-cased rules."""
    rules = []
    for item in re.split(r"[\s,]+", text):
        if not item:
            continue
        item = item.lower()
        if item.startswith("@"):
            item = item[1:]
        if not item or item.count("@") > 1 or item.endswith("@"):
            raise ValueError("allowed senders must be addresses or domains")
        rules.append(item)
    return tuple(rules)


@dataclass(frozen=True)
class User:
    """An AUTH user.  The secret never shows in repr or str."""

    name: str
    allowed_senders: tuple[str, ...] = ()
    _hash: str = field(repr=False, compare=False, kw_only=True)

    def check(self, password: bytes) -> bool:
        return verify_password(password, self._hash)


class UserDB:
    """The users esprelay knows; empty means AUTH is not offered."""

    def __init__(self, users: Iterable[User] = ()) -> None:
        self._users = {user.name: user for user in users}

    def __len__(self) -> int:
        return len(self._users)

    def __repr__(self) -> str:
        return f"UserDB(users={len(self._users)})"

    def replace_with(self, other: UserDB) -> None:
        """Take ``other``'s users (a reload); listeners sharing this object see them at once."""
        self._users = dict(other._users)

    def known(self, name: bytes) -> bool:
        return name.decode("utf-8", "replace") in self._users

    def authenticate(self, name: bytes, password: bytes) -> User | None:
        """The user if ``password`` is theirs.  One scrypt computation, whatever ``name``
        is: an unknown or undecodable name is checked against a hash nobody matches."""
        try:
            user = self._users.get(name.decode("utf-8"))
        except UnicodeDecodeError:
            user = None
        if user is None:
            verify_password(password, _NOBODY)
            return None
        return user if user.check(password) else None

    @classmethod
    def load(
        cls,
        path: Path | None,
        single_user: str | None = None,
        single_password: str | None = None,
    ) -> UserDB:
        users: list[User] = []
        if path is not None:
            users.extend(_read_users_file(path))
        if single_user is not None and single_password is not None:
            if not _USER.match(single_user):
                raise ConfigError("ESPRELAY_AUTH_USER: not a valid user name")
            # Hashed here, so that its check costs what every other check costs.
            users.append(User(single_user, _hash=hash_password(single_password)))
        names = [u.name for u in users]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"AUTH user(s) defined twice: {', '.join(duplicates)}")
        return cls(users)


def _read_users_file(path: Path) -> list[User]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(f"ESPRELAY_AUTH_FILE: cannot read {path}: {reason}") from None
    users = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # Errors name the line, never echo it: it holds a hash.
        name, _, rest = line.partition(":")
        hashed, _, senders = rest.partition(":")
        if not _USER.match(name):
            raise ConfigError(f"ESPRELAY_AUTH_FILE line {number}: not a valid user name")
        if not _valid_hash(hashed):
            raise ConfigError(
                f"ESPRELAY_AUTH_FILE line {number}: expected user:$scrypt$... "
                "(make one with `esprelay hash-password`)"
            )
        try:
            rules = parse_sender_rules(senders)
        except ValueError as exc:
            raise ConfigError(f"ESPRELAY_AUTH_FILE line {number}: {exc}") from None
        users.append(User(name, rules, _hash=hashed))
    return users


def _unmatchable_hash() -> str:
    """A hash with the default parameters that no password matches (its key is random,
    not derived), made without computing scrypt."""
    b64 = base64.b64encode
    salt, key = b64(secrets.token_bytes(16)).decode(), b64(secrets.token_bytes(32)).decode()
    return f"$scrypt$ln={DEFAULT_LOG_N},r={_R},p={_P}${salt}${key}"


_NOBODY = _unmatchable_hash()


class FailureLimiter:
    """Counts failed logins per client address in a sliding window."""

    def __init__(self, max_failures: int, window: float) -> None:
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.get(client)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[client]
        return times

    def blocked(self, client: str) -> bool:
        return len(self._recent(client, time.monotonic())) >= self.max_failures

    def reserve(self, client: str) -> float | None:
        """Count an attempt as failed before it is checked; None if the client has no
        attempt left.  The returned token gives the place back (:meth:`release`)."""
        now = time.monotonic()
        if len(self._recent(client, now)) >= self.max_failures:
            return None
        self._failures.setdefault(client, deque()).append(now)
        if len(self._failures) > 10000:  # bound memory under a spray from many addresses
            oldest = min(self._failures, key=lambda c: self._failures[c][-1])
            del self._failures[oldest]
        return now

    def release(self, client: str, token: float) -> None:
        """Uncount a reserved attempt that succeeded (if the window has not dropped it)."""
        times = self._failures.get(client)
        if times is None:
            return
        try:
            times.remove(token)
        except ValueError:
            return
        if not times:
            del self._failures[client]


@dataclass(frozen=True, slots=True)
class LoginResult:
    """A login's outcome: the user, or the reply refusing it (535, or 454 when the
    client has used up its failed logins)."""

    user: User | None
    refusal: str = ""


async def login(
    users: UserDB,
    limiter: FailureLimiter,
    slots: asyncio.Semaphore,
    *,
    client: str,
    mechanism: str,
    name: bytes,
    password: bytes,
) -> LoginResult:
    """Decide one AUTH attempt from ``client``: reserve its place in the failed-login
    count, check the password in a worker thread (at most ``slots`` at once), log it."""
    # Counted before the check: a client that hangs up meanwhile keeps it counted.
    token = limiter.reserve(client)
    if token is None:
        log.warning("AUTH refused: too many failures from client=%s", client)
        return LoginResult(None, AUTH_BLOCKED)
    async with slots:
        user = await asyncio.to_thread(users.authenticate, name, password)
    if user is None:
        # A name we do not know may be a password typed into the wrong field: not logged.
        shown = name.decode("utf-8", "replace") if users.known(name) else "(unknown)"
        log.warning("AUTH failed: user=%r client=%s mechanism=%s", shown, client, mechanism)
        return LoginResult(None, AUTH_INVALID)
    limiter.release(client, token)
    log.info("AUTH ok: user=%r client=%s mechanism=%s", user.name, client, mechanism)
    return LoginResult(user)
