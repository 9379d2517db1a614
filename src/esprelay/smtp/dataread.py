"""Reading one message's DATA from the pieces a connection delivers.

The rules are aiosmtpd's (its engine reads DATA itself): lines end
at CRLF only, one leading dot is removed from a line (RFC 5321 4.5.2), the message ends
at a line that is a lone dot; a message over the size limit is answered ``552`` and one
with a line over the line limit (as sent, dot-stuffed) ``500``, both only after its end
was read.  What follows the final dot belongs to the next command.

The bytes are kept in one ``bytearray``; each piece costs a search for the end marker
from where the last one stopped and a check for over-long lines one window at a time
(a window of ``limit + 2`` bytes from a line start holds the CRLF of every line that ends
in it, and those lines are short enough; the window's last CRLF starts the next one).
Once a message is over a limit, its bytes are dropped as they come.
"""

from __future__ import annotations

from esprelay.smtp.replies import DATA_LINE_TOO_LONG as TOO_LONG
from esprelay.smtp.replies import TOO_MUCH_DATA as TOO_MUCH


class MessageReader:
    """One message's DATA.  :meth:`feed` it pieces until it returns the bytes that
    follow the final dot; then :attr:`content` is the message, or :attr:`error` the
    reply that refuses it."""

    __slots__ = (
        "_buffer",
        "_dropped",
        "_line_start",
        "_scan",
        "_window",
        "content",
        "error",
        "size_limit",
    )

    def __init__(self, *, size_limit: int | None, line_limit: int) -> None:
        self.size_limit = size_limit
        self._window = line_limit + 2
        self._buffer = bytearray()
        self._dropped = 0  # bytes of an over-limit message dropped from the buffer
        self._scan = 0  # where the search for the end resumes
        self._line_start = 0  # where the check for over-long lines resumes
        self.content: bytes | None = None
        self.error: str | None = None

    def feed(self, data: bytes) -> bytes | None:
        """Take the next piece; None while the message goes on, else what follows it."""
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
                # Nothing is kept any more but what the search for the end needs.
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
            del buffer  # the only other reference: at most two copies at once
            if b"\r\n." in content:
                content = content.replace(b"\r\n.", b"\r\n")
            self.content = content
        return rest

    def take(self) -> bytes:
        """The message, handed over: the reader keeps no reference to it."""
        content, self.content = self.content, None
        assert content is not None
        return content

    @property
    def buffered(self) -> int:
        return len(self._buffer)

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
