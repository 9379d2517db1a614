"""What ``email.policy.default`` makes of a header, without building it when that is certain.

``policy.default`` turns every header it is asked for into an object: a class made
for the occasion by the ``HeaderRegistry`` and a full RFC 5322 parse of the value.
That is most of the CPU :mod:`esprelay.message.mime` spends on a small message.  For the values
real mail is made of (plain ASCII without encoded words: a Subject or Received line, a
simple ``type/subtype; name=value``, ``<id@host>``, a date, ``Name <a@b>``) the answer
is known without the parse: the value itself once unfolded, the parameters re-quoted
the way the parser writes them, the date in its canonical form.  This module gives
that answer when a strict pattern says the value is of such a form and otherwise asks
``policy.default`` (through a cached class, which is what its registry would build
anyway), so the result is always the one ``policy.default`` gives, exceptions included.
``tests/test_mime_fast.py`` checks this against the real thing on corpora and on
generated values.
"""

from __future__ import annotations

import email.policy
import functools
import re
from email.headerregistry import (
    BaseHeader,
    ContentDispositionHeader,
    ContentTransferEncodingHeader,
    ContentTypeHeader,
    DateHeader,
    HeaderRegistry,
    MessageIDHeader,
    UnstructuredHeader,
)
from email.policy import Compat32
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any


def _default_registry() -> HeaderRegistry:
    factory = email.policy.default.header_factory
    if not isinstance(factory, HeaderRegistry):  # pragma: no cover - stdlib invariant
        raise TypeError("email.policy.default no longer uses a HeaderRegistry")
    return factory


_FACTORY = _default_registry()
#: Registry class -> the class the registry builds for it (``registry[name]`` makes a
#: new one on every call; they only differ in identity).  At most one per registered
#: class, whatever header names a message brings.
_BUILT: dict[type, type[BaseHeader]] = {}

# Plain header text: printable ASCII, tab and the line breaks of a fold (no 8-bit
# bytes, which arrive as surrogates, and no other control characters).
_PLAIN = re.compile(r"[\t\r\n -~]*")

# RFC 2045 token characters; parameter names and bare values also leave out the
# RFC 2231 markers (* ' %), so every extended or continued parameter takes the exact path.
_TOKEN = r"[!#$%&'*+.0-9A-Z^_`a-z{|}~-]+"
_ATTRIBUTE = r"[!#$&+.0-9A-Z^_`a-z{|}~-]+"
_QTEXT = r"[\t !#-\[\]-~]*"  # no backslash, no quote
_QUOTED = rf'"{_QTEXT}"'
_WS = r"[ \t]*"
_ATEXT = r"[!#$%&'*+/0-9=?A-Z^_`a-z{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
#: Values that ``policy.default`` keeps exactly as they are (once unfolded), by the
#: registry's class for the header.
_VERBATIM: dict[type, re.Pattern[str]] = {
    ContentTransferEncodingHeader: re.compile(rf"{_WS}{_TOKEN}{_WS}"),
    MessageIDHeader: re.compile(rf"{_WS}<{_DOT_ATOM}@{_DOT_ATOM}>{_WS}"),
}
#: What comes before the parameters of a Content-Type or Content-Disposition value.
_PARAMETERIZED: dict[type, re.Pattern[str]] = {
    ContentTypeHeader: re.compile(rf"{_WS}{_TOKEN}/{_TOKEN}{_WS}"),
    ContentDispositionHeader: re.compile(rf"{_WS}{_TOKEN}{_WS}"),
}
_PARAM = re.compile(
    rf"{_WS}(?P<name>{_ATTRIBUTE})=(?:(?P<token>{_ATTRIBUTE})|\"(?P<quoted>{_QTEXT})\"){_WS}"
)
_WS_END = re.compile(rf"{_WS}$")
# One mailbox of an address list: "a@b", "<a@b>", "Some Name <a@b>" or
# "\"Name, with specials\" <a@b>" (no comments, no groups, no route, no quoted local part).
_ADDR = rf"{_DOT_ATOM}@{_DOT_ATOM}"
_MAILBOX = re.compile(
    rf"{_WS}(?:(?:(?P<atoms>{_ATEXT}+(?:[ \t]+{_ATEXT}+)*)|(?P<quoted>{_QUOTED})){_WS}"
    rf"<(?P<angle>{_ADDR})>|<(?P<bare_angle>{_ADDR})>|(?P<bare>{_ADDR})){_WS}(?:,|$)"
)
_WSP_RUN = re.compile(r"[ \t]+")


def unfold(value: str) -> str:
    """The value ``policy.default`` parses: every CR and LF removed."""
    return value.replace("\r", "").replace("\n", "") if "\r" in value or "\n" in value else value


def _registered(lname: str) -> type:
    return _FACTORY.registry.get(lname, _FACTORY.default_class)


def _cheap_str(kind: type, value: str) -> str | None:
    """``str()`` of a ``kind`` header made from the unfolded ``value``, or None when
    only building it can tell."""
    if "=?" in value or not _PLAIN.fullmatch(value):
        return None
    if issubclass(kind, UnstructuredHeader):
        # Subject, Received, X-..., any unregistered name: kept character for
        # character; only encoded words change, and there is none.
        return value
    if issubclass(kind, DateHeader):
        # DateHeader.parse: an empty or unparsable date stays as it is, a valid one
        # is rewritten in the canonical format.  Other errors propagate, as there.
        return _date_str(value) if value else value
    pattern = _VERBATIM.get(kind)
    if pattern is not None:
        return value if pattern.fullmatch(value) else None
    head = _PARAMETERIZED.get(kind)
    if head is not None:
        return _parameterized(head, value)
    return None


@functools.lru_cache(maxsize=64)
def _date_str(value: str) -> str:
    """A valid date in the canonical format, an unparsable one as it is.  Remembered:
    messages sent close together carry the same few dates."""
    try:
        moment = parsedate_to_datetime(value)
    except ValueError:
        return value
    return format_datetime(moment)


def _parameterized(head: re.Pattern[str], value: str) -> str | None:
    """What ``policy.default`` writes for ``type/subtype; name=value; ...``: the part
    before the first ``;`` as it is, then each parameter (the first of a name) as
    ``; name="value"`` (an empty value as the bare name), or None if not that simple."""
    match = head.match(value)
    if match is None:
        return None
    pos = match.end()
    if pos == len(value):
        return value
    if value[pos] != ";":
        return None
    out = [value[:pos], ";"]
    seen: set[str] = set()
    pos += 1
    while pos < len(value):
        param = _PARAM.match(value, pos)
        if param is None:
            # Only blanks may follow a last ";".
            return "".join(out) if _WS_END.match(value, pos) else None
        name = param["name"]
        if name not in seen:  # a repeated name is ignored
            out.append("; " if seen else " ")
            seen.add(name)
            text = param["token"] if param["quoted"] is None else param["quoted"]
            out.append(f'{name}="{text}"' if text else name)
        pos = param.end()
        if pos < len(value):
            if value[pos] != ";":
                return None
            pos += 1
    return "".join(out)


def exact_header(name: str, value: str) -> Any:
    """``policy.default.header_fetch_parse(name, value)`` for a raw string value (typed
    ``Any`` like it: the object's attributes depend on the header)."""
    kind = _registered(name.lower())
    built = _BUILT.get(kind)
    if built is None:
        built = _BUILT[kind] = _FACTORY[name]
    return built(name, unfold(value))


def header_str(name: str, value: str) -> str:
    """``str(policy.default.header_fetch_parse(name, value))``, cheaply when certain."""
    unfolded = unfold(value)
    text = _cheap_str(_registered(name.lower()), unfolded)
    if text is not None:
        return text
    return str(exact_header(name, value))


def simple_addresses(value: str) -> list[tuple[str, str]] | None:
    """(display name, addr-spec) of each mailbox, as ``policy.default`` reads them, or
    None when ``value`` is not a plain list of the simple forms (then ask the parser)."""
    value = unfold(value)
    if not value or "=?" in value or not _PLAIN.fullmatch(value):
        return None
    pairs: list[tuple[str, str]] = []
    pos = 0
    end = len(value)
    while pos < end:
        match = _MAILBOX.match(value, pos)
        if match is None or match.end() == pos:
            return None
        atoms, quoted, angle, bare_angle, bare = match.group(
            "atoms", "quoted", "angle", "bare_angle", "bare"
        )
        if atoms is not None:
            # The parser joins the words of a phrase with one space.
            pairs.append((_WSP_RUN.sub(" ", atoms), angle))
        elif quoted is not None:
            pairs.append((quoted[1:-1], angle))
        else:
            pairs.append(("", bare_angle or bare))
        pos = match.end()
        if value[pos - 1] == "," and pos == end:
            return None  # a trailing comma: an empty list member
    return pairs


class CheapPolicy(Compat32):
    """compat32 parsing (raw string headers), but every header fetched reads as the
    string ``policy.default`` would give, so content types, boundaries, parameters and
    transfer encodings come out exactly as with ``policy.default``."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        # The parser and the walker ask for a part's Content-Type up to ten times, and
        # the same short values recur from message to message: remember those.
        if len(value) > _CACHED_LENGTH:
            return header_str(name, value)
        return _cached_header_str(name, value)


_CACHED_LENGTH = 200
_cached_header_str = functools.lru_cache(maxsize=256)(header_str)


cheap = CheapPolicy()
