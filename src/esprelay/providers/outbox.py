"""The embedded default provider: delivers into a directory.

Each message becomes ``<id>.eml`` (the exact bytes received) and ``<id>.json`` (the
envelope and ids).  Both are written to a hidden temporary name, fsynced and renamed,
so no half-written file is ever visible.  The JSON is renamed last: its presence
means the .eml is complete.  Delivering the same spool id twice rewrites the same
two files, so a retry after a crash never duplicates a message here.

Every completed write also appends one line, ``<id> <unix time> <pid>``, to
``deliveries.log``: an audit trail in which a message delivered twice (a kill
between the write and the spool update) shows up twice, as it would at an ESP.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from esprelay.errors import ProviderConfigError
from esprelay.models import OutboundMessage, SendResult
from esprelay.providers.base import Provider, ProviderKind, ProviderSettings

if TYPE_CHECKING:
    import httpx


class OutboxProvider(Provider):
    kind = "outbox"
    smtputf8 = True  # writes the envelope as it is (JSON, UTF-8)

    def __init__(self, directory: Path, name: str | None = None) -> None:
        super().__init__(name)
        self.directory = directory

    async def send(self, message: OutboundMessage) -> SendResult:
        return await asyncio.to_thread(self._write, message)

    def _write(self, message: OutboundMessage) -> SendResult:
        provider_id = f"outbox-{message.id}"
        record = {
            "id": message.id,
            "provider_message_id": provider_id,
            "mail_from": message.envelope.mail_from,
            "rcpt_tos": list(message.envelope.rcpt_tos),
            "size": len(message.raw),
            "delivered_at": time.time(),
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.directory / f"{message.id}.eml", message.raw)
            _atomic_write(
                self.directory / f"{message.id}.json",
                json.dumps(record, indent=2).encode() + b"\n",
            )
            _fsync_dir(self.directory)
            _append_line(
                self.directory / DELIVERY_LOG,
                f"{message.id} {record['delivered_at']:.6f} {os.getpid()}\n".encode(),
            )
        except OSError as exc:
            raise ProviderConfigError(
                f"cannot write to outbox {self.directory}: {exc.strerror}", provider=self.name
            ) from exc
        return SendResult(provider_message_id=provider_id)


DELIVERY_LOG = "deliveries.log"


def _append_line(path: Path, line: bytes) -> None:
    # One write() on an O_APPEND descriptor: lines from several processes never mix.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutboxSettings(ProviderSettings):
    """``ESPRELAY_OUTBOX_DIR``: where the messages are written."""

    dir: Path = Path("outbox")


def build(settings: OutboxSettings, client: httpx.AsyncClient) -> OutboxProvider:
    del client  # the outbox needs no HTTP
    return OutboxProvider(settings.dir)


KIND = ProviderKind("outbox", OutboxSettings, build, "write each message to a directory")
