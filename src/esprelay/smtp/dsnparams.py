"""The DSN parameters of MAIL and RCPT (RFC 3461), read alike by both engines.

``MAIL FROM:<a> RET=FULL|HDRS ENVID=<xtext>`` and ``RCPT TO:<b> NOTIFY=NEVER|<list of
SUCCESS, FAILURE, DELAY> ORCPT=<addr-type>;<xtext>``.  The engines take these tokens
out of the command as the client wrote them (ENVID and ORCPT are case-sensitive; the
other parameters are upper-cased as aiosmtpd does) and the handler checks them with
:func:`mail_parameters` and :func:`rcpt_parameters`: a bad value, a repeated keyword or
an ENVID/ORCPT that is not xtext of printable ASCII is ``501 5.5.4``.  The values are
stored with the message (:meth:`~esprelay.message.dsn.EnvelopeDSN.meta`) and read back
by the bounce generator (:mod:`esprelay.failures`, :mod:`esprelay.message.dsn`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from esprelay.message.dsn import EnvelopeDSN, RecipientDSN
from esprelay.smtp.replies import BAD_DSN_PARAMETER_F

__all__ = ["EnvelopeDSN", "RecipientDSN", "mail_parameters", "rcpt_parameters", "take"]

MAIL_KEYWORDS = frozenset({"RET", "ENVID"})
RCPT_KEYWORDS = frozenset({"NOTIFY", "ORCPT"})
NOTIFY_VALUES = ("SUCCESS", "FAILURE", "DELAY")
#: RFC 3461 4.4 and 4.2: the longest ENVID and ORCPT values.
ENVID_LIMIT = 100
ORCPT_LIMIT = 500
#: What the DSN parameters may add to a command line (RFC 3461 5: " RET=HDRS ENVID="
#: and 100 characters; " NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=" and 500 characters).
MAIL_LINE_EXTRA = 116
RCPT_LINE_EXTRA = 536

# RFC 3461 4: xtext = *( xchar / hexchar ); xchar is "!" to "~" but "+" and "=";
# hexchar is "+" and two upper-case hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")  # an RFC 5322 atom


def trailing(text: str, keywords: frozenset[str]) -> tuple[str, list[str]]:
    """(``text`` without them, the DSN ones) of the parameters after the path of a MAIL
    or RCPT argument (``<path> [parameters]``).  The path ends at its first ``>``
    outside a quoted string; nothing else of it is parsed (the SMTP parser does that,
    and answers a malformed path as it would without this)."""
    end = _path_end(text)
    if end < 0:
        return text, []
    others, dsn = take(text[end + 1 :].split(), keywords)
    if not dsn:
        return text, []
    return " ".join([text[: end + 1], *others]), dsn


def _path_end(text: str) -> int:
    """The index of the ``>`` that closes the path, or -1."""
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted:
            if char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == ">":
            return index
    return -1


def keyword(token: str) -> str:
    """The upper-cased keyword of a ``keyword[=value]`` parameter."""
    return token.partition("=")[0].upper()


def take(tokens: Iterable[str], keywords: frozenset[str]) -> tuple[list[str], list[str]]:
    """(the other parameters, the DSN ones) of a command's parameter tokens."""
    others: list[str] = []
    dsn: list[str] = []
    for token in tokens:
        (dsn if keyword(token) in keywords else others).append(token)
    return others, dsn


def xtext_decode(text: str) -> str | None:
    """The text an xtext stands for, or None if it is not xtext or decodes to anything
    but printable ASCII (it will be written in a report's header fields)."""
    if not _XTEXT.fullmatch(text):
        return None
    decoded = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text)
    if not all(" " <= c <= "~" for c in decoded):
        return None
    return decoded


def xtext_encode(text: str) -> str:
    """``text`` (printable ASCII) as xtext."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in text)


def mail_parameters(tokens: Iterable[str]) -> tuple[str | None, str | None] | str:
    """(RET, ENVID decoded) of MAIL's DSN parameter tokens, or the ``501`` refusing them."""
    ret: str | None = None
    envid: str | None = None
    seen: set[str] = set()
    for token in tokens:
        name, _, value = token.partition("=")
        name = name.upper()
        if name in seen:
            return BAD_DSN_PARAMETER_F.format(name)
        seen.add(name)
        if name == "RET":
            ret = value.upper()
            if ret not in ("FULL", "HDRS"):
                return BAD_DSN_PARAMETER_F.format(name)
        else:
            envid = xtext_decode(value) if 0 < len(value) <= ENVID_LIMIT else None
            if envid is None:
                return BAD_DSN_PARAMETER_F.format(name)
    return ret, envid


def rcpt_parameters(tokens: Iterable[str]) -> RecipientDSN | str:
    """NOTIFY and ORCPT of RCPT's DSN parameter tokens, or the ``501`` refusing them."""
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    seen: set[str] = set()
    for token in tokens:
        name, _, value = token.partition("=")
        name = name.upper()
        if name in seen:
            return BAD_DSN_PARAMETER_F.format(name)
        seen.add(name)
        if name == "NOTIFY":
            notify = _notify(value)
            if notify is None:
                return BAD_DSN_PARAMETER_F.format(name)
        else:
            orcpt = _orcpt(value)
            if orcpt is None:
                return BAD_DSN_PARAMETER_F.format(name)
    return RecipientDSN(notify=notify, orcpt=orcpt)


def _notify(value: str) -> tuple[str, ...] | None:
    """RFC 3461 4.1: "NEVER" alone, or one or more of SUCCESS, FAILURE, DELAY."""
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return ("NEVER",)
    if not words or len(set(words)) != len(words) or not set(words) <= set(NOTIFY_VALUES):
        return None
    return tuple(w for w in NOTIFY_VALUES if w in words)


def _orcpt(value: str) -> str | None:
    """RFC 3461 4.2: ``addr-type ";" xtext``, at most 500 characters."""
    addr_type, semicolon, address = value.partition(";")
    if not semicolon or not _ADDR_TYPE.fullmatch(addr_type) or len(value) > ORCPT_LIMIT:
        return None
    decoded = xtext_decode(address)
    if not decoded:
        return None
    return f"{addr_type};{decoded}"
