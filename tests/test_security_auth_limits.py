"""AUTH's failed-login limit under parallel attempts, and one scrypt per login, whoever.

The relay runs in this process so that the test can count the scrypt computations
(``hashlib.scrypt`` as the auth module calls it) instead of timing them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import smtplib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from esprelay.app import Relay
from esprelay.config import Settings
from esprelay.smtp import auth
from esprelay.smtp.auth import (
    FailureLimiter,
    UserDB,
    hash_password,
    login,
)
from esprelay.smtp.replies import AUTH_BLOCKED as BLOCKED_REPLY
from esprelay.smtp.replies import AUTH_INVALID as INVALID_REPLY

MAX_FAILURES = 5
CLIENTS = 20
APP_PASSWORD = "app-Secret-42"
PRINTER_PASSWORD = "Pr1nter-sesame"
DEFAULT_PARAMETERS = {"n": 2**auth.DEFAULT_LOG_N, "r": 8, "p": 1, "dklen": 32}


class ScryptCounter:
    """Stands in for ``hashlib.scrypt`` and records the parameters of every computation."""

    def __init__(self) -> None:
        self.calls: list[dict[str, int]] = []
        self._real: Callable[..., bytes] = hashlib.scrypt
        self._lock = threading.Lock()

    def __call__(self, password: bytes, **kwargs: Any) -> bytes:
        with self._lock:
            self.calls.append({k: kwargs[k] for k in ("n", "r", "p", "dklen")})
        return self._real(password, **kwargs)

    def take(self) -> list[dict[str, int]]:
        with self._lock:
            calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def scrypt(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScryptCounter]:
    counter = ScryptCounter()
    monkeypatch.setattr(auth.hashlib, "scrypt", counter)
    yield counter


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.mark.parametrize("engine", ["native", "aiosmtpd"])
async def test_parallel_wrong_passwords_verify_at_most_the_limit(
    tmp_path: Path, scrypt: ScryptCounter, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESPRELAY_OUTBOX_DIR", str(tmp_path / "outbox"))
    users_file = tmp_path / "users"
    users_file.write_text(f"printer:{hash_password(PRINTER_PASSWORD)}\n")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        smtp_engine=engine,
        smtp_host="127.0.0.1",
        smtp_port=0,
        http_enabled=False,
        spool_url=f"sqlite:///{tmp_path / 'spool.db'}",
        auth_file=users_file,
        auth_max_failures=MAX_FAILURES,
        max_connections_per_client=CLIENTS + 5,
    )
    relay = Relay(settings)
    await relay.start()
    scrypt.take()  # whatever start-up computed
    port = relay.smtp_port
    assert port is not None
    # Every client has its EHLO answered before any of them sends AUTH: all of them
    # pass the check at AUTH's start, which sees no failure yet.
    ready = threading.Barrier(CLIENTS, timeout=30)

    def attempt(number: int) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo("parallel.test")
            assert smtp.has_extn("auth")  # loopback is trusted: AUTH without TLS
            ready.wait()
            code, _ = smtp.docmd("AUTH", "PLAIN " + plain("printer", f"wrong-{number}"))
            return code

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            loop = asyncio.get_running_loop()
            codes = await asyncio.gather(
                *(loop.run_in_executor(pool, attempt, n) for n in range(CLIENTS))
            )
        verified = scrypt.take()
        assert len(verified) == MAX_FAILURES, (len(verified), sorted(codes))
        assert sorted(codes) == [454] * (CLIENTS - MAX_FAILURES) + [535] * MAX_FAILURES
        # Blocked now, before any password is asked for, even the right one.
        code = await loop.run_in_executor(None, right_password_code, port)
        assert code == 454
        assert scrypt.take() == []
    finally:
        await relay.shutdown()


def right_password_code(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("late.test")
        return smtp.docmd("AUTH", "PLAIN " + plain("printer", PRINTER_PASSWORD))[0]


async def test_every_login_costs_one_scrypt_with_the_default_parameters(
    tmp_path: Path, scrypt: ScryptCounter
) -> None:
    users_file = tmp_path / "users"
    users_file.write_text(f"printer:{hash_password(PRINTER_PASSWORD)}\n")
    scrypt.take()
    users = UserDB.load(users_file, "app", APP_PASSWORD)
    assert scrypt.take() == [DEFAULT_PARAMETERS]  # ESPRELAY_AUTH_PASSWORD, hashed at start-up
    limiter = FailureLimiter(100, 300.0)
    slots = asyncio.Semaphore(2)
    attempts = [
        ("users file, right password", b"printer", PRINTER_PASSWORD.encode(), True),
        ("users file, wrong password", b"printer", b"wrong", False),
        ("settings user, right password", b"app", APP_PASSWORD.encode(), True),
        ("settings user, wrong password", b"app", b"wrong", False),
        ("settings user, empty password", b"app", b"", False),
        ("unknown user", b"ghost", b"wrong", False),
        ("password as the name", APP_PASSWORD.encode(), b"", False),
        ("empty name", b"", b"wrong", False),
        ("name not UTF-8", b"\xff\xfeapp", APP_PASSWORD.encode(), False),
        ("name with a NUL", b"app\0", APP_PASSWORD.encode(), False),
    ]
    for label, name, password, ok in attempts:
        result = await login(
            users,
            limiter,
            slots,
            client="192.0.2.1",
            mechanism="PLAIN",
            name=name,
            password=password,
        )
        assert (result.user is not None) == ok, label
        assert result.refusal == ("" if ok else INVALID_REPLY), label
        assert scrypt.take() == [DEFAULT_PARAMETERS], label


async def test_a_success_gives_its_place_back(scrypt: ScryptCounter) -> None:
    users = UserDB.load(None, "app", APP_PASSWORD)
    limiter = FailureLimiter(2, 300.0)
    slots = asyncio.Semaphore(2)

    async def attempt(password: str, client: str = "192.0.2.1") -> str:
        result = await login(
            users,
            limiter,
            slots,
            client=client,
            mechanism="LOGIN",
            name=b"app",
            password=password.encode(),
        )
        return "ok" if result.user is not None else result.refusal

    for _ in range(3):
        assert await attempt(APP_PASSWORD) == "ok"
    assert not limiter.blocked("192.0.2.1")
    assert await attempt("wrong-1") == INVALID_REPLY
    assert await attempt(APP_PASSWORD) == "ok"
    assert await attempt("wrong-2") == INVALID_REPLY
    assert limiter.blocked("192.0.2.1")
    scrypt.take()
    # Out of attempts: refused before any password check, even the right one...
    assert await attempt(APP_PASSWORD) == BLOCKED_REPLY
    assert scrypt.take() == []
    # ...for that client only.
    assert await attempt(APP_PASSWORD, client="192.0.2.2") == "ok"


def test_reservations_count_before_the_check() -> None:
    limiter = FailureLimiter(max_failures=3, window=3600)
    tokens = [limiter.reserve("10.0.0.1") for _ in range(3)]
    assert None not in tokens
    assert limiter.blocked("10.0.0.1")
    assert limiter.reserve("10.0.0.1") is None
    token = tokens[1]
    assert token is not None
    limiter.release("10.0.0.1", token)
    assert not limiter.blocked("10.0.0.1")
    assert limiter.reserve("10.0.0.1") is not None
    assert limiter.reserve("10.0.0.1") is None
