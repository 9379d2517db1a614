"""Reading one message's DATA from the pieces a connection delivers.

The rules are aiosmtpd's (its engine reads DATA itself): lines end
at CRLF only, one leading dot is removed from a line (RFC 5321 4.5.2), the message ends
at a line that is a lone dot; a message over the size limit is answered ``552`` and one
with a line over the line limit (as sent, dot-stuffed) ``500``, both only after its end
was read.  What follows the final dot belongs to the next command.

The pieces are kept as they arrive, in a list, and joined once at the end, without the
stuffed dots: a growing ``bytearray`` was copied again each time it grew, and the
unstuffing was a second pass and a second copy.  Each piece costs one search for
``CRLF "."`` (a literal prefix the regular expression engine finds with ``memchr``),
which finds both the end (``CRLF "." CRLF``) and every stuffed dot, and a check for
over-long lines one window at a time (a window of ``limit + 2`` bytes from a line start
holds the CRLF of every line that ends in it, and those lines are short enough; the
window's last CRLF starts the next one).  Both run on the piece with the few bytes
before it that they still need (:attr:`MessageReader._tail`).  Once a message is over a
limit, its bytes are dropped as they come.

With a :class:`~esprelay.spill.Spiller`, a message that grows past its size is written
to a file instead (:mod:`esprelay.spill`): the content read so far becomes the
``head``, kept in memory and written first, and from then on each piece's content, up
to where the dot search has read, goes to the file as it arrives; only the piece in
progress stays in memory.  :attr:`content` is then a :class:`~esprelay.spill.Spilled`.
A file that cannot be written ends in the spool's reply (``452 4.3.1`` for a full disk),
after the final dot like the other refusals.
"""

from __future__ import annotations

import re

from esprelay.errors import SpoolError
from esprelay.smtp.replies import DATA_LINE_TOO_LONG as TOO_LONG
from esprelay.smtp.replies import TOO_MUCH_DATA as TOO_MUCH
from esprelay.spill import Spilled, Spiller, SpillFile

#: A line that starts with a dot: the final ``.`` or a stuffed one.
_DOT_LINE = re.compile(rb"\r\n\.")


class MessageReader:
    """One message's DATA.  :meth:`feed` it pieces until it returns the bytes that
    follow the final dot; then :attr:`content` is the message, or :attr:`error` the
    reply that refuses it.

    Positions are offsets in the stream as sent (dot-stuffed), counted from the first
    byte after the ``DATA`` reply; the stream is read as if a CRLF came before it, so
    that a first line starting with a dot is found like every other.
    """

    __slots__ = (
        "_base",
        "_dots",
        "_file",
        "_head",
        "_line_start",
        "_parts",
        "_parts_start",
        "_received",
        "_scan",
        "_spiller",
        "_tail",
        "_window",
        "content",
        "error",
        "size_limit",
    )

    def __init__(
        self, *, size_limit: int | None, line_limit: int, spill: Spiller | None = None
    ) -> None:
        self.size_limit = size_limit
        self._window = line_limit + 2
        self._spiller = spill
        self._file: SpillFile | None = None  # once the message is being written to one
        self._head = b""
        #: The pieces kept, in order (none after an error), from ``_parts_start`` on.
        self._parts: list[bytes | memoryview] = []
        self._parts_start = 0
        self._received = 0  # bytes of the stream so far
        self._tail = b"\r\n"  # the stream's bytes from _base on (the CRLF before it first)
        self._base = -2  # where _tail starts
        self._scan = -2  # where the search for dot lines resumes
        self._line_start = 0  # where the check for over-long lines resumes
        self._dots: list[int] = []  # positions of the stuffed dots
        self.content: bytes | Spilled | None = None
        self.error: str | None = None

    def feed(self, data: bytes) -> bytes | None:
        """Take the next piece; None while the message goes on, else what follows it."""
        if type(data) is not bytes:
            data = bytes(data)  # kept: it must not change
        self._received = received = self._received + len(data)
        if self.error is None:
            self._parts.append(data)
        base = self._base
        text = self._tail + data  # the stream from base to received
        end = -1
        scan = self._scan - base
        limit = len(text) - 4  # a dot line from here on cannot be told apart yet
        while True:
            match = _DOT_LINE.search(text, scan)
            if match is None:
                scan = max(scan, len(text) - 2)  # a CR or CRLF at the end may start one
                break
            found = match.start()
            if found >= limit:
                scan = found  # read again with the next piece
                break
            if text[found + 3 : found + 5] == b"\r\n":
                end = base + found + 2  # the final dot; the message ends before it
                break
            self._dots.append(base + found + 2)
            scan = found + 3
        stop = end if end >= 0 else received
        if self.error is None:
            self._check_lines(text, base, stop)
            size_limit = self.size_limit
            if self.error is None and size_limit and stop > size_limit:
                self.error = TOO_MUCH
            spiller = self._spiller
            if (
                self.error is None
                and spiller is not None
                and (self._file is not None or stop > spiller.at)
            ):
                self._spill(spiller, end if end >= 0 else base + scan)
            if self.error is not None:
                self._parts.clear()  # nothing is kept any more but what the search needs
                self._dots.clear()
                self.discard()
        if end >= 0:
            rest = text[end + 3 - base :]
            if self.error is None:
                if self._file is not None:
                    self.content = self._file.finish(self._head)
                    self._file = None
                    self._head = b""
                else:
                    self.content = self._join(end)
            self._parts = []
            self._tail = b""
            return rest
        # Keep what the next search and the next line check need of this piece.
        keep = base + scan
        if self.error is None:
            keep = min(keep, self._line_start)
        self._tail = text[keep - base :]
        self._base = keep
        self._scan = base + scan
        return None

    def take(self) -> bytes | Spilled:
        """The message, handed over: the reader keeps no reference to it."""
        content, self.content = self.content, None
        assert content is not None
        return content

    def discard(self) -> None:
        """Remove the file of a message not read to its end (the session ended)."""
        if self._file is not None:
            self._file.discard()
            self._file = None

    def _spill(self, spiller: Spiller, stop: int) -> None:
        """Write the content up to stream position ``stop`` to the message's file."""
        stop = max(stop, self._parts_start)  # (the search may still be before the stream)
        try:
            if self._file is None:
                head = b"".join(self._take(stop))
                self._file = spiller.open()
                self._file.write((head,))
                # The head kept in memory ends with a line: a CR at its end would read
                # as a bare one to the repairs, whose LF is still to come.
                cut = head.rfind(b"\n") + 1
                self._head = head if cut == len(head) else head[:cut]
            else:
                self._file.write(self._take(stop))
        except SpoolError as exc:
            self.error = exc.smtp_reply
            self.discard()

    def _take(self, stop: int) -> list[memoryview]:
        """The content from the first piece kept up to stream position ``stop``, without
        its stuffed dots, as views; the reader lets go of what comes before ``stop``."""
        parts = self._parts
        dots = self._dots
        views: list[memoryview] = []
        offset = self._parts_start
        position = offset  # the next byte of the content in the stream
        dot = 0
        taken = 0
        rest: bytes | None = None
        for part in parts:
            view = memoryview(part)
            part_end = offset + len(view)
            upto = min(part_end, stop)
            while dot < len(dots) and dots[dot] < upto:
                cut = dots[dot]
                if cut > position:
                    views.append(view[position - offset : cut - offset])
                position = cut + 1  # the stuffed dot is left out
                dot += 1
            if upto > position:
                views.append(view[position - offset : upto - offset])
                position = upto
            if part_end > stop:
                # A copy of the few bytes the search has not passed yet: a view would
                # keep the whole piece alive while the session waits for the next one.
                rest = bytes(view[stop - offset :])
                break
            taken += 1
            offset = part_end
        del parts[:taken]
        if rest is not None:
            parts[0] = rest
        del dots[:dot]
        self._parts_start = stop
        return views

    @property
    def buffered(self) -> int:
        return sum(map(len, self._parts)) + len(self._tail)

    def _check_lines(self, text: bytes, base: int, stop: int) -> None:
        window = self._window
        position = self._line_start - base
        stop -= base
        while stop - position >= window:
            last = text.rfind(b"\r\n", position, position + window)
            if last < 0:
                self.error = TOO_LONG
                return
            position = last + 2
        self._line_start = base + position

    def _join(self, end: int) -> bytes:
        """The stream up to ``end`` without its stuffed dots, in one copy."""
        parts = self._parts
        dots = self._dots
        if not dots:
            if len(parts) == 1:
                return bytes(parts[0][:end])
            over = self._received - end  # of the last pieces, what follows the message
            while over and len(parts[-1]) <= over:
                over -= len(parts.pop())
            if over:
                parts[-1] = memoryview(parts[-1])[:-over]
            return b"".join(parts)
        pieces: list[memoryview] = []
        offset = 0
        cuts = iter([*dots, end])
        cut = next(cuts)
        position = 0  # the next byte of the content in the stream
        for part in parts:
            view = memoryview(part)
            part_end = offset + len(part)
            while cut < part_end:
                if cut > position:
                    pieces.append(view[position - offset : cut - offset])
                if cut == end:
                    return b"".join(pieces)
                position = cut + 1  # the stuffed dot is left out
                cut = next(cuts)
            if part_end > position:
                pieces.append(view[position - offset :])
            position = max(position, part_end)
            offset = part_end
        return b"".join(pieces)
