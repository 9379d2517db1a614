from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.relayproc import RelayProcess

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of a command-line tool the test needs: skip without it, fail under CI=true."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (make test installs it from Debian's packages)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[type[RelayProcess]]:
    """Make RelayProcess instances in this test's tmp dir; all are killed at the end."""
    made: list[RelayProcess] = []

    class _Relay(RelayProcess):
        def __init__(self, env: dict[str, str] | None = None, workdir: Path = tmp_path) -> None:
            super().__init__(workdir, env)
            made.append(self)

    yield _Relay
    for relay in made:
        relay.kill()


@pytest.fixture
def relay(relay_factory: type[RelayProcess]) -> RelayProcess:
    """A running esprelay with the outbox provider."""
    return relay_factory().start()


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Collect garbage after every test, so a leaked socket or file is reported by the
    test that leaked it (filterwarnings=error) rather than by whichever test runs next."""
    yield
    gc.collect()
