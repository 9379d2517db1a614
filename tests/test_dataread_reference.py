"""The DATA reader against the one it replaced, on any stream however it is split.

``ReferenceReader`` is the previous :class:`~esprelay.smtp.dataread.MessageReader` (one
growing ``bytearray``, a search for the end, then a second pass for the stuffed dots),
kept here as the reference: the reader that keeps the pieces and joins them once must
give exactly its content, error and remaining bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esprelay.errors import SpoolError
from esprelay.message.repair import normalize_line_endings
from esprelay.smtp.dataread import MessageReader
from esprelay.smtp.replies import DATA_LINE_TOO_LONG as TOO_LONG
from esprelay.smtp.replies import TOO_MUCH_DATA as TOO_MUCH
from esprelay.spill import Spilled, Spiller


class ReferenceReader:
    def __init__(self, *, size_limit: int | None, line_limit: int) -> None:
        self.size_limit = size_limit
        self._window = line_limit + 2
        self._buffer = bytearray()
        self._dropped = 0
        self._scan = 0
        self._line_start = 0
        self.content: bytes | None = None
        self.error: str | None = None

    def feed(self, data: bytes) -> bytes | None:
        buffer = self._buffer
        buffer += data
        end = -1
        if self._dropped == 0 and buffer[:3] == b".\r\n":
            end = 0
        else:
            found = buffer.find(b"\r\n.\r\n", max(self._scan - 4, 0))
            if found >= 0:
                end = found + 2
        stop = end if end >= 0 else len(buffer)
        if self.error is None:
            self._check_lines(stop)
            limit = self.size_limit
            if self.error is None and limit and self._dropped + stop > limit:
                self.error = TOO_MUCH
        if end < 0:
            if self.error is not None and len(buffer) > 4:
                self._dropped += len(buffer) - 4
                del buffer[:-4]
            self._scan = len(buffer)
            return None
        rest = bytes(buffer[end + 3 :])
        self._buffer = bytearray()
        if self.error is None:
            del buffer[end:]
            if buffer[:1] == b".":
                del buffer[:1]
            content = bytes(buffer)
            if b"\r\n." in content:
                content = content.replace(b"\r\n.", b"\r\n")
            self.content = content
        return rest

    def _check_lines(self, stop: int) -> None:
        window = self._window
        buffer = self._buffer
        position = self._line_start
        while stop - position >= window:
            last = buffer.rfind(b"\r\n", position, position + window)
            if last < 0:
                self.error = TOO_LONG
                return
            position = last + 2
        self._line_start = position


# Streams rich in what the reader looks for: CR, LF, dots, and line-long runs.
tokens = st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"x", b"yy", b"z" * 9, b"w" * 40])
streams = st.lists(tokens, max_size=80).map(b"".join)


def _feed(reader: MessageReader | ReferenceReader, stream: bytes, cuts: list[int]) -> bytes | None:
    position = 0
    for cut in [*cuts, len(stream)]:
        rest = reader.feed(stream[position : position + cut])
        position += cut
        if rest is not None:
            return rest + stream[position:]
        if position >= len(stream):
            break
    return None


# The final dot (or none), where the stream is cut into reads, the line limit.
endings = st.sampled_from([b".\r\n", b"\r\n.\r\n", b""])
cut_lists = st.lists(st.integers(min_value=0, max_value=120), max_size=20)
line_limits = st.integers(min_value=1, max_value=30)


@settings(max_examples=3000, deadline=None)
@given(
    streams,
    endings,
    streams,
    cut_lists,
    st.sampled_from([None, 0, 10, 40, 200]),
    line_limits,
)
def test_same_as_the_reference(
    head: bytes,
    ending: bytes,
    after: bytes,
    cuts: list[int],
    size_limit: int | None,
    line_limit: int,
) -> None:
    stream = head + ending + after
    new = MessageReader(size_limit=size_limit, line_limit=line_limit)
    old = ReferenceReader(size_limit=size_limit, line_limit=line_limit)
    assert _feed(new, stream, cuts) == _feed(old, stream, cuts)
    assert new.error == old.error
    assert new.content == old.content


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=5000), max_size=8), st.booleans())
def test_large_messages_in_pieces(cuts: list[int], stuffed: bool) -> None:
    line = (b"." if stuffed else b"") + b"x" * 60 + b"\r\n"
    stream = b"Subject: s\r\n\r\n" + line * 300 + b".\r\nQUIT\r\n"
    new = MessageReader(size_limit=None, line_limit=1000)
    old = ReferenceReader(size_limit=None, line_limit=1000)
    assert _feed(new, stream, cuts) == _feed(old, stream, cuts) == b"QUIT\r\n"
    assert new.content == old.content
    assert new.content is not None and len(new.content) == len(stream) - 9 - 300 * stuffed


# Written to a file past a few bytes: the same content, error and remaining bytes, the
# file holding exactly the content and the head being its start.


@settings(max_examples=1500, deadline=None)
@given(
    streams,
    endings,
    streams,
    cut_lists,
    st.sampled_from([None, 0, 40, 200]),
    line_limits,
    st.sampled_from([0, 1, 7, 50]),
)
def test_spilled_messages_are_the_same_as_the_reference(
    tmp_path_factory: pytest.TempPathFactory,
    head: bytes,
    ending: bytes,
    after: bytes,
    cuts: list[int],
    size_limit: int | None,
    line_limit: int,
    spill_at: int,
) -> None:
    directory = tmp_path_factory.mktemp("spill")
    stream = head + ending + after
    new = MessageReader(
        size_limit=size_limit, line_limit=line_limit, spill=Spiller(directory, spill_at)
    )
    old = ReferenceReader(size_limit=size_limit, line_limit=line_limit)
    assert _feed(new, stream, cuts) == _feed(old, stream, cuts)
    assert new.error == old.error
    if old.content is None:
        assert new.content is None
        new.discard()
        assert os.listdir(directory) == []  # a refused message leaves no file
        return
    content = new.take()
    if not isinstance(content, Spilled):
        assert content == old.content
        assert len(old.content) <= spill_at  # (what passes the size is the stream as sent)
        return
    try:
        assert content.read() == old.content
        assert content.size == len(old.content)
        assert old.content.startswith(content.head)
        assert content.head.endswith(b"\n") or content.head == b""
        assert content.bare_line_ends == (normalize_line_endings(old.content) != old.content)
    finally:
        content.discard()
    assert os.listdir(directory) == []


def test_a_large_message_is_written_as_it_arrives(tmp_path: Path) -> None:
    """Only the head and the piece in progress stay in memory; the file grows with
    each piece, and a session that ends before the final dot leaves no file."""
    line = b".x" + b"y" * 70 + b"\r\n"  # arrives stuffed, as "..x..."
    reader = MessageReader(size_limit=None, line_limit=1000, spill=Spiller(tmp_path, 4096))
    assert reader.feed(b"Subject: big\r\n\r\n") is None
    for _ in range(100):
        assert reader.feed((b"." + line) * 20) is None
        assert reader.buffered < 4096 + 2 * 20 * len(line)
    [name] = os.listdir(tmp_path)
    assert name.startswith(".spill-")
    assert (tmp_path / name).stat().st_size > 100 * 20 * len(line) - 4096 * 2
    assert reader.feed(b".\r\nQUIT\r\n") == b"QUIT\r\n"
    spilled = reader.take()
    assert isinstance(spilled, Spilled)
    assert spilled.read() == b"Subject: big\r\n\r\n" + line * 2000
    assert not spilled.bare_line_ends
    spilled.discard()
    spilled.discard()
    assert os.listdir(tmp_path) == []

    reader = MessageReader(size_limit=None, line_limit=1000, spill=Spiller(tmp_path, 100))
    reader.feed(b"Subject: cut\r\n\r\n" + line * 20)
    assert len(os.listdir(tmp_path)) == 1
    reader.discard()
    assert os.listdir(tmp_path) == []


def test_a_file_that_cannot_be_written_is_refused_at_the_final_dot(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    reader = MessageReader(size_limit=None, line_limit=1000, spill=Spiller(gone, 10))
    assert reader.feed(b"Subject: x\r\n\r\n" + b"z" * 100 + b"\r\n") is None
    assert reader.feed(b".\r\nQUIT\r\n") == b"QUIT\r\n"
    assert reader.content is None
    assert reader.error is not None and reader.error.startswith("451 4.3.0")


def test_a_file_without_a_name_leaves_nothing_behind(tmp_path: Path) -> None:
    """Where no spool links the file (PostgreSQL, passthrough), it has no name: nothing
    in the folder while the message arrives, nothing for a crash to leave."""
    reader = MessageReader(
        size_limit=None, line_limit=1000, spill=Spiller(tmp_path, 10, named=False)
    )
    assert reader.feed(b"Subject: x\r\n\r\n" + b"z" * 100 + b"\r\n") is None
    assert reader.feed(b".\r\n") == b""
    spilled = reader.take()
    assert isinstance(spilled, Spilled) and spilled.path is None
    assert os.listdir(tmp_path) == []
    assert spilled.read() == b"Subject: x\r\n\r\n" + b"z" * 100 + b"\r\n"
    with pytest.raises(SpoolError):
        spilled.link_as([tmp_path / "id"])
    spilled.discard()
    assert os.listdir(tmp_path) == []
