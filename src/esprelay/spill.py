"""A large message's DATA written to a file while it arrives.

Held in memory, 200 sessions sending 10 MB each would hold 2 GB at once just before
their final dots.  So once a message passes ``ESPRELAY_SMTP_SPILL_SIZE`` (256 KiB by
default, where the SQLite spool starts keeping bodies in files), the SMTP engine writes
it, unstuffed, to a new file as each read arrives (:class:`SpillFile`) and keeps in
memory only its first bytes (the ``head``, which holds its header) and the bytes of the
read in progress.

The file is made where the spool keeps its body files (``Spool.body_directory``), so a
message is committed by linking that very file under its spool id (:meth:`Spilled.link_as`):
the bytes are written once.  A repaired header (the repairs only ever change the header,
which is in the head) is written with a kernel copy of the rest into a new file.  The
PostgreSQL spool reads the file a piece at a time.  What needs the whole message in
memory (bare line endings to normalise, a header too long for the head, a provider whose
check reads the body, passthrough mode) reads it back, at most ``ESPRELAY_INTAKE_MEMORY``
of such messages at a time (:mod:`esprelay.intake`).  A file whose message was refused,
or whose session ended, is removed; one left by a crash is removed when the SQLite spool
next opens.  Elsewhere (the PostgreSQL spool, passthrough mode: the temporary folder)
the files have no name at all, so a crash leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from esprelay.errors import SpoolError, SpoolFull
from esprelay.message.mime import SIGNED_HINT_READS
from esprelay.message.repair import LineEndWatch

#: A message's header must end this far before the end of its head: the checks at the
#: end of DATA read that much past it (esprelay.message.mime.SIGNED_HINT_READS).
HEAD_MARGIN = SIGNED_HINT_READS + 32 * 1024
#: Names of the files being written start with this (never a spool id).
SPILL_PREFIX = ".spill-"
SPILL_AT = 256 * 1024

if TYPE_CHECKING:
    from esprelay.spool.base import Spool


def sync_directory(directory: Path) -> None:
    """fsync ``directory``: the names made or removed in it are on disk on return."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError) -> SpoolError:
    """The spool error for a failed write of message bytes (full disk: ``452``)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(f"spool storage problem: {exc}")
    return SpoolError(f"spool error: cannot write a message body: {exc}")


def spiller_for(spool: Spool | None, at: int = SPILL_AT) -> Spiller:
    """Where messages are written as they arrive: named files in the spool's own folder
    of body files, or else files without a name (nothing left behind by a crash) in the
    temporary folder (``TMPDIR``)."""
    directory = spool.body_directory if spool is not None else None
    if directory is None:
        return Spiller(Path(tempfile.gettempdir()), at, named=False)
    return Spiller(directory, at)


@dataclass(frozen=True, slots=True)
class Spiller:
    """Where and from which size the SMTP engine writes messages to files."""

    directory: Path
    at: int = SPILL_AT
    #: Files with a name (which a spool can link); else without one.
    named: bool = True

    def open(self) -> SpillFile:
        return SpillFile(self.directory, named=self.named)


class SpillFile:
    """A new file in ``directory`` that message bytes are appended to.

    Raises :class:`~esprelay.errors.SpoolError` (``SpoolFull`` for a full disk) when
    the file cannot be made or written; it is then removed.
    """

    def __init__(self, directory: Path, *, named: bool = True) -> None:
        try:
            fd, path = _named(directory) if named else _unnamed(directory)
        except OSError as exc:
            raise storage_error(exc) from exc
        self._fd = fd
        self.directory = directory
        self.path = path
        self.size = 0
        self._line_ends = LineEndWatch()

    def write(self, pieces: Iterable[bytes | memoryview]) -> None:
        watch = self._line_ends
        try:
            for piece in pieces:
                watch.feed(piece)
                view = memoryview(piece)
                self.size += len(view)
                while view:
                    view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self.discard()
            raise storage_error(exc) from exc

    def finish(self, head: bytes) -> Spilled:
        """The message, complete: ``head`` is its first bytes, kept in memory."""
        spilled = Spilled(
            self.directory, self.path, self._fd, self.size, head, self._line_ends.finish()
        )
        self._fd = -1  # the Spilled owns it now
        return spilled

    def discard(self) -> None:
        if self._fd >= 0:
            _remove(self._fd, self.path)
            self._fd = -1


@dataclass(eq=False, slots=True)
class Spilled:
    """A received message in a file (see the module doc).

    ``head`` is the message's first bytes (at least ``ESPRELAY_SMTP_SPILL_SIZE`` of them)
    and ``bare_line_ends`` whether the message has a bare CR or LF anywhere.  A repaired
    header replaces the head (:meth:`replace_head`): the message is then the new head
    followed by the file's bytes after the old one.  The file stays open until
    :meth:`discard`, which the intake calls once it is done with it, whatever happened:
    a spool that kept it has its own name for it by then.
    """

    directory: Path
    #: None for a file without a name.
    path: Path | None
    fd: int
    file_size: int
    head: bytes
    bare_line_ends: bool
    #: How many of the file's first bytes ``head`` stands for.
    head_in_file: int = -1
    #: Whether the head was replaced: the message is no longer the file as written.
    rewritten: bool = False

    def __post_init__(self) -> None:
        if self.head_in_file < 0:
            self.head_in_file = len(self.head)

    @property
    def size(self) -> int:
        return len(self.head) + self.file_size - self.head_in_file

    def __len__(self) -> int:
        return self.size

    @property
    def header_in_head(self) -> bool:
        """Whether the header ends within the head, :data:`HEAD_MARGIN` before its end:
        what the end of DATA reads of the message is then all in memory."""
        head = self.head
        end = 0 if head.startswith(b"\r\n") else head.find(b"\r\n\r\n")
        return 0 <= end <= len(head) - HEAD_MARGIN

    def replace_head(self, head: bytes) -> None:
        """Make ``head`` (the old head with its header repaired) the message's start;
        the same object changes nothing."""
        if head is not self.head:
            self.head = head
            self.rewritten = True

    def read(self) -> bytes:
        """The whole message (blocking: call it in a thread).  One read of the file, into
        the bytes returned, unless the head was replaced."""
        if not self.rewritten:
            return self._pread(0, self.file_size)
        return self.read_at(0, self.size)

    def read_at(self, start: int, size: int) -> bytes:
        """``size`` bytes of the message from ``start`` on, fewer at its end (blocking)."""
        size = max(0, min(size, self.size - start))
        head = self.head
        if start + size <= len(head):
            return head[start : start + size]
        taken = head[start:] if start < len(head) else b""
        rest = self._pread(start + len(taken) - len(head) + self.head_in_file, size - len(taken))
        return taken + rest if taken else rest

    def _pread(self, offset: int, size: int) -> bytes:
        chunks: list[bytes] = []
        end = offset + size
        while offset < end:
            try:
                chunk = os.pread(self.fd, end - offset, offset)
            except OSError as exc:
                raise SpoolError(f"spool error: cannot read {self._name}: {exc}") from exc
            if not chunk:
                raise SpoolError(f"spool error: {self._name} ended early")
            chunks.append(chunk)
            offset += len(chunk)
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def link_as(self, paths: Iterable[Path]) -> list[Path]:
        """Give the message's file each of ``paths`` as a name, on disk on return
        (blocking: call it in a thread); returns the names made, raising after removing
        them if one cannot be made.  A rewritten message is first written to a new file
        in the same folder: its new head, then the rest copied by the kernel."""
        made: list[Path] = []
        source = self.path
        if source is None:
            raise SpoolError("spool error: a message file without a name cannot be linked")
        try:
            if self.rewritten:
                source = self._rewrite()
            else:
                os.fsync(self.fd)
            for path in paths:
                os.link(source, path)
                made.append(path)
            sync_directory(self.directory)  # the new names
        except OSError as exc:
            for path in made:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise storage_error(exc) from exc
        finally:
            if source != self.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(source)
        return made

    def _rewrite(self) -> Path:
        fd, name = tempfile.mkstemp(prefix=SPILL_PREFIX, dir=self.directory)
        try:
            view = memoryview(self.head)
            while view:
                view = view[os.write(fd, view) :]
            offset, left = self.head_in_file, self.file_size - self.head_in_file
            while left > 0:
                try:
                    copied = os.copy_file_range(self.fd, fd, left, offset)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    copied = 0
                if copied <= 0:  # not here: the plain way, a megabyte at a time
                    chunk = self._pread(offset, min(left, 1024 * 1024))
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    copied = len(chunk)
                offset += copied
                left -= copied
            os.fsync(fd)
        except BaseException:
            _remove(fd, Path(name))
            raise
        os.close(fd)
        return Path(name)

    @property
    def _name(self) -> str:
        return str(self.path or f"a file without a name in {self.directory}")

    def discard(self) -> None:
        """Close the file and remove this name of it (idempotent)."""
        if self.fd >= 0:
            _remove(self.fd, self.path)
            self.fd = -1


def _named(directory: Path) -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(prefix=SPILL_PREFIX, dir=directory)
    return fd, Path(name)


def _unnamed(directory: Path) -> tuple[int, None]:
    """A file in ``directory`` that has no name (Linux's ``O_TMPFILE``; elsewhere one
    removed as soon as it is made): it goes with its last descriptor, a crash's too."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600), None
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
            raise
    fd, path = _named(directory)
    os.unlink(path)
    return fd, None


def _remove(fd: int, path: Path | None) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
