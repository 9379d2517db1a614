"""``esprelay sendmail``: a drop-in for ``/usr/sbin/sendmail`` that submits to the bridge.

Legacy software (PHP's ``mail()``, cron, monitoring scripts) pipes a message into
``sendmail -t -i`` or ``sendmail -f sender rcpt...``.  This reads the message from
standard input and submits it over SMTP to the running bridge at
``ESPRELAY_SMTP_HOST:ESPRELAY_SMTP_PORT``; the bridge spools and delivers it.

Flags (as Postfix's and Sendmail's)::

    -t          recipients from To, Cc and Bcc (added to any on the command line);
                the Bcc header is removed
    -f SENDER   envelope sender (also -fSENDER, -r SENDER); default
                ESPRELAY_SENDMAIL_FROM, else user@host
    -F NAME     full name for a From header added when the message has none
    -i, -oi     a line with a single dot does not end the message
    -o...       other -o options (-oem, -odb, -oQ dir...) are accepted and ignored
    -bm         deliver (the default)
    -bp         list the queue, as ``mailq`` (``esprelay mailq``); other -b modes
                are refused
    -B, -C, -N, -R, -V, -X, -h, -L, -p take a value and are ignored; -v, -U, -m, -n,
    -G, -I, -c, -x too; -d, -e, -A with an attached value (-em) too

Flags group as with getopt, as Postfix's sendmail takes them: ``-ti``, ``-it``,
``-tfsender``, ``-toi``.

Exit codes (sysexits.h, as sendmail): 0 submitted; 64 EX_USAGE bad flags or no
recipient; 65 EX_DATAERR the bridge refused the message or sender for good; 67
EX_NOUSER a recipient was refused for good (the others still got the message); 75
EX_TEMPFAIL the bridge is unreachable or answered 4xx: try again later; 78
EX_CONFIG bad ESPRELAY_* values.

Only the SMTP address settings are read (never the provider's keys), so the calling
user needs no access to the bridge's secrets.
"""

from __future__ import annotations

import getpass
import os
import re
import smtplib
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.utils import formataddr, formatdate, getaddresses, make_msgid
from typing import BinaryIO

from pydantic import ValidationError

from esprelay.config import SendmailSettings
from esprelay.message.header import read_header
from esprelay.message.mime import header_index
from esprelay.message.rawmime import strip_bcc
from esprelay.message.repair import unambiguous_header

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78

SMTP_TIMEOUT = 60.0

# Flags that take a value (attached or as the next argument) and are ignored.
_IGNORED_WITH_VALUE = frozenset("BCNRVXhLOp")
# Flags whose value, if any, is attached (-em, -d0.1, -Am): the rest of the group.
_IGNORED_ATTACHED = frozenset("deA")
_IGNORED_BARE = frozenset("vUmnGIcx")


class UsageError(Exception):
    pass


@dataclass
class Options:
    sender: str | None = None
    full_name: str | None = None
    extract: bool = False
    ignore_dots: bool = False
    recipients: list[str] = field(default_factory=list)
    #: -bp: list the queue (mailq) instead of sending
    list_queue: bool = False


def parse_args(argv: Sequence[str]) -> Options:
    """Sendmail's flags, grouped as getopt groups them (as Postfix's sendmail does):
    ``-ti`` is ``-t -i``; in a group, a flag that takes a value takes the rest of the
    group, or else the next argument (``-tf sender``, ``-tfsender``, ``-toi``)."""
    opts = Options()
    args = list(argv)
    i = 0

    def value(flag: str, rest: str) -> str:
        nonlocal i
        if rest:
            return rest
        i += 1
        if i >= len(args):
            raise UsageError(f"option -{flag} requires an argument")
        return args[i]

    while i < len(args):
        arg = args[i]
        if arg == "--":
            opts.recipients.extend(args[i + 1 :])
            break
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
            i += 1
            continue
        group = arg[1:]
        while group:
            flag, rest = group[0], group[1:]
            group = ""  # a flag with a value ends the group; a bare one hands on the rest
            if flag in ("f", "r"):
                opts.sender = value(flag, rest)
            elif flag == "F":
                opts.full_name = value(flag, rest)
            elif flag == "t":
                opts.extract = True
                group = rest
            elif flag == "i":
                opts.ignore_dots = True
                group = rest
            elif flag == "o":
                option = value(flag, rest)
                if option == "i":
                    opts.ignore_dots = True
                # every other -oXvalue (-oem, -odb, -oQ/dir...) is a harmless tweak: ignored
            elif flag == "b":
                mode = value(flag, rest)
                if mode == "p":
                    opts.list_queue = True
                elif mode != "m":
                    raise UsageError(
                        f"-b{mode} is not supported (only -bm, deliver a message,"
                        " and -bp, list the queue)"
                    )
            elif flag in _IGNORED_WITH_VALUE:
                value(flag, rest)
            elif flag in _IGNORED_ATTACHED:
                pass  # its value, if any, is the rest of the group
            elif flag in _IGNORED_BARE:
                group = rest
            elif flag == "q":
                raise UsageError("-q (queue runs) is not supported: the bridge runs its own queue")
            else:
                raise UsageError(f"unknown option -{flag} (in {arg})")
        i += 1
    return opts


def read_message(stream: BinaryIO, *, ignore_dots: bool) -> bytes:
    """Read stdin; without -i a line with a single dot ends the message."""
    if ignore_dots:
        data = stream.read()
    else:
        lines = []
        for line in stream:
            if line.rstrip(b"\r\n") == b".":
                break
            lines.append(line)
        data = b"".join(lines)
    # SMTP wants CRLF; smtplib does not convert bytes.  Bare LF and CRLF both become CRLF.
    return re.sub(rb"\r?\n", b"\r\n", data)


def prepare(raw: bytes, opts: Options, sender: str) -> tuple[bytes, list[str]]:
    """The bytes to submit and the envelope recipients.

    The header is read as the bridge reads it (:mod:`esprelay.message.header`), after
    the same fix-up the bridge makes, so ``-t`` finds exactly the recipients that the
    bridge and the ESP will see in the header.
    """
    raw = bytes(unambiguous_header(raw).raw)
    header = read_header(raw)
    if not header.separator:  # headers only: end the last line, then the empty line
        raw += b"\r\n\r\n" if raw and not raw.endswith(b"\r\n") else b"\r\n"
    index = header_index(raw)
    recipients = list(opts.recipients)
    if opts.extract:
        values = [v for name in ("to", "cc", "bcc") for v in index.get(name, [])]
        for _, address in getaddresses(values):
            if address and address not in recipients:
                recipients.append(address)
        raw = strip_bcc(raw).raw
    added = []
    if "from" not in index:
        added.append(f"From: {formataddr((opts.full_name or '', sender))}")
    if "date" not in index:
        added.append(f"Date: {formatdate(localtime=True)}")
    if "message-id" not in index:
        domain = sender.rpartition("@")[2] or socket.getfqdn()
        added.append(f"Message-ID: {make_msgid(domain=domain)}")
    prefix = "".join(f"{line}\r\n" for line in added).encode("utf-8")
    return prefix + raw, recipients


def default_sender(settings: SendmailSettings) -> str:
    if settings.sendmail_from:
        return settings.sendmail_from
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "nobody"
    return str(Address(username=user, domain=socket.getfqdn() or "localhost"))


def _text(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else reply


def submit(
    host: str, port: int, sender: str, recipients: list[str], data: bytes
) -> tuple[int, list[str]]:
    """Submit over SMTP; return an exit code and the problems to print."""
    problems: list[str] = []
    temporary = False
    eight_bit = any(b > 127 for b in data)
    utf8 = not (sender + "".join(recipients)).isascii()
    try:
        with smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT) as smtp:
            smtp.ehlo_or_helo_if_needed()
            options = []
            if eight_bit and smtp.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            if utf8 and smtp.has_extn("smtputf8"):
                options.append("SMTPUTF8")
            if smtp.has_extn("size"):
                options.append(f"SIZE={len(data)}")
            code, reply = smtp.mail(sender, options)
            if code != 250:
                smtp.rset()
                problems.append(f"sender <{sender}> refused: {code} {_text(reply)}")
                return (EX_TEMPFAIL if 400 <= code < 500 else EX_DATAERR), problems
            accepted = []
            for rcpt in recipients:
                code, reply = smtp.rcpt(rcpt)
                if code in (250, 251):
                    accepted.append(rcpt)
                else:
                    temporary = temporary or 400 <= code < 500
                    problems.append(f"recipient <{rcpt}> refused: {code} {_text(reply)}")
            if not accepted:
                smtp.rset()
                return (EX_TEMPFAIL if temporary else EX_NOUSER), problems
            code, reply = smtp.data(data)
            if code != 250:
                problems.append(f"message refused: {code} {_text(reply)}")
                return (EX_TEMPFAIL if 400 <= code < 500 else EX_DATAERR), problems
    except smtplib.SMTPResponseException as exc:
        problems.append(f"refused: {exc.smtp_code} {_text(exc.smtp_error)}")
        return (EX_TEMPFAIL if 400 <= exc.smtp_code < 500 else EX_DATAERR), problems
    except (OSError, smtplib.SMTPException) as exc:
        problems.append(f"cannot reach the mail bridge at {host}:{port}: {exc}")
        return EX_TEMPFAIL, problems
    if problems:
        # The others received it; say so, and fail like sendmail does for a bad user.
        return (EX_TEMPFAIL if temporary else EX_NOUSER), problems
    return EX_OK, problems


def main(argv: Sequence[str], stdin: BinaryIO | None = None, *, env_file: str | None = None) -> int:
    """``env_file``: ``esprelay --env-file PATH sendmail``; else ``ESPRELAY_ENV_FILE``,
    else ``.env`` here if there is one."""
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_USAGE
    named = env_file or os.environ.get("ESPRELAY_ENV_FILE")
    if named and not os.path.isfile(named):
        where = "--env-file" if env_file else "ESPRELAY_ENV_FILE"
        print(f"sendmail: configuration error: {where}: {named} is not a file", file=sys.stderr)
        return EX_CONFIG
    if opts.list_queue:
        # -bp is mailq: the whole configuration (the spool), as `esprelay mailq` reads it.
        from esprelay.cli import main as esprelay_main

        return esprelay_main([*(["--env-file", named] if named else []), "mailq"])
    try:
        settings = SendmailSettings(_env_file=named or ".env")  # type: ignore[call-arg]
    except ValidationError as exc:
        fields = ", ".join(f"ESPRELAY_{str(e['loc'][0]).upper()}" for e in exc.errors() if e["loc"])
        print(f"sendmail: configuration error: {fields or exc}", file=sys.stderr)
        return EX_CONFIG
    raw = read_message(stdin or sys.stdin.buffer, ignore_dots=opts.ignore_dots)
    sender = opts.sender if opts.sender is not None else default_sender(settings)
    if sender == "<>":
        sender = ""
    data, recipients = prepare(raw, opts, sender or "MAILER-DAEMON")
    if not recipients:
        print("sendmail: no recipients (give them as arguments, or use -t)", file=sys.stderr)
        return EX_USAGE
    host = settings.smtp_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    code, problems = submit(host, settings.smtp_port, sender, recipients, data)
    for problem in problems:
        print(f"sendmail: {problem}", file=sys.stderr)
    return code
