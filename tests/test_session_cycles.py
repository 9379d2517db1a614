"""An ended SMTP session is freed by reference counting, not left to the collector.

aiosmtpd's session object keeps bound methods of itself (dispatch tables, the stream
callback, the idle timer) and its finished task, whose traceback holds its frames: a
reference cycle per connection that only the garbage collector freed, with the message
bytes inside, and a collector that ran several times per message (bench/README.md).
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from esprelay.app import Relay
from esprelay.config import Settings
from esprelay.gctune import YOUNG_THRESHOLD, tune_for_serving


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# Only the native engine: aiosmtpd's session keeps bound methods of itself in private
# attributes, which the aiosmtpd engine no longer touches (it uses aiosmtpd's public API).
@pytest.mark.parametrize("engine", ["native"])
async def test_ended_session_is_freed_without_the_collector(
    tmp_path: Path, collector_off: None, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESPRELAY_OUTBOX_DIR", str(tmp_path / "outbox"))
    settings = Settings(
        smtp_engine=engine,
        smtp_host="127.0.0.1",
        smtp_port=0,
        http_enabled=False,
        spool_url=f"sqlite:///{tmp_path / 'spool.db'}",
    )
    relay = Relay(settings)
    await relay.start()
    try:
        assert relay.smtp_port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
        await reader.readline()
        (session,) = relay.sessions
        ref = weakref.ref(session)
        del session
        writer.write(
            b"EHLO test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        )
        await writer.drain()
        writer.write(b"Subject: cycles\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        replies = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert b"250 " in replies and b"221" in replies, replies
        for _ in range(50):  # the server side ends a few loop iterations later
            if ref() is None:
                break
            await asyncio.sleep(0.01)
        assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]
    finally:
        await relay.shutdown()


def test_tune_for_serving_freezes_start_up_objects_and_collects_young_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_for_serving()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
        assert before[0] < YOUNG_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_large_blocks_get_their_own_mappings_on_glibc() -> None:
    import platform

    from esprelay.gctune import return_large_blocks_to_the_system

    applied = return_large_blocks_to_the_system()
    if platform.libc_ver()[0] == "glibc":
        assert applied
