"""The ``esprelay`` command: thin, no logic of its own.

Exit codes: 0 success, 1 the action failed (no such message...), 2 bad usage, 75
(EX_TEMPFAIL) the bridge, the spool or a port could not be reached (try again), 78
(EX_CONFIG) bad configuration: an invalid setting, a missing --env-file, an unknown
provider, bad routes, a spool that does not exist.  78 is sendmail's code for the same
thing, and the systemd unit does not restart on it (``RestartPreventExitStatus=78``):
restarting cannot fix a setting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import smtplib
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import TYPE_CHECKING

from esprelay import __version__
from esprelay.config import Settings, load_settings
from esprelay.errors import ConfigError, SpoolError
from esprelay.events.status import MessageStatus
from esprelay.models import MessageState, SpooledMessage
from esprelay.queueview import detail, mailq, summary, table_time
from esprelay.queueview import load as load_message

if TYPE_CHECKING:
    from esprelay.spool import Spool

EX_USAGE = 2
EX_TEMPFAIL = 75
EX_CONFIG = 78


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # `esprelay [--env-file PATH] sendmail ...`, or esprelay installed under the name
    # "sendmail": the sendmail flags (-oi, -fuser, -t) are not argparse's, and sendmail
    # needs only the SMTP address, not the whole configuration (see esprelay.sendmail).
    named_env_file, rest = _leading_env_file(args_list)
    if rest[:1] == ["sendmail"] or (argv is None and os.path.basename(sys.argv[0]) == "sendmail"):
        from esprelay.sendmail import main as sendmail_main

        return sendmail_main(
            rest[1:] if rest[:1] == ["sendmail"] else args_list, env_file=named_env_file
        )
    if argv is None and os.path.basename(sys.argv[0]) == "mailq":  # a symlink named mailq
        args_list.append("mailq")
    parser = _parser()
    args = parser.parse_args(args_list)
    if not getattr(args, "func", None):
        parser.print_help()
        return EX_USAGE
    if args.func is _hash_password:
        code: int = _hash_password(args)  # needs no configuration, so no settings
        return code
    try:
        env_file = _env_file(args)
    except ConfigError as exc:
        return _config_error(exc)
    args.env_file = env_file
    if args.func in (_doctor, _config):
        reported: int = args.func(args)  # they load (and report) the configuration themselves
        return reported
    try:
        settings = load_settings(env_file)
        if args.func is _serve and (args.host is not None or args.port is not None):
            update = {"smtp_host": args.host, "smtp_port": args.port}
            settings = settings.model_copy(
                update={k: v for k, v in update.items() if v is not None}
            )
    except ConfigError as exc:
        return _config_error(exc)
    setup_logging(settings.log_level, settings.log_format)
    try:
        result: int = args.func(settings, args)
    except ConfigError as exc:
        return _config_error(exc)
    except SpoolError as exc:
        print(f"esprelay: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except KeyboardInterrupt:
        return 130
    return result


def _config_error(exc: ConfigError) -> int:
    """Print a configuration error; exit 78 (EX_CONFIG), or 75 for a port another
    process holds (a restart may well find it free)."""
    print(f"esprelay: configuration error: {exc}", file=sys.stderr)
    return EX_TEMPFAIL if getattr(exc, "temporary", False) else EX_CONFIG


def _leading_env_file(args: list[str]) -> tuple[str | None, list[str]]:
    """``--env-file PATH`` (or ``--env-file=PATH``) at the front of ``args``, and the rest."""
    if args[:1] == ["--env-file"] and len(args) > 1:
        return args[1], args[2:]
    if args and args[0].startswith("--env-file="):
        return args[0].partition("=")[2], args[1:]
    return None, args


def _env_file(args: argparse.Namespace) -> str:
    """The .env file every command reads: ``--env-file``, else ``ESPRELAY_ENV_FILE``, else
    ``.env`` in the working directory (which may be missing).  A file named explicitly
    must exist: a typo would otherwise run on defaults."""
    named = args.env_file or os.environ.get("ESPRELAY_ENV_FILE")
    if not named:
        return ".env"
    where = "--env-file" if args.env_file else "ESPRELAY_ENV_FILE"
    if not Path(named).is_file():
        raise ConfigError(f"{where}: {named} is not a file")
    if not os.access(named, os.R_OK):
        raise ConfigError(f"{where}: {named} is not readable by this user")
    return str(named)


def setup_logging(level: str, fmt: str = "text") -> None:
    from esprelay.logsetup import setup_logging as _setup

    _setup(level, fmt, sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esprelay",
        description="SMTP to email-service-provider HTTP API bridge."
        " Configuration comes from ESPRELAY_* variables and .env.",
    )
    parser.add_argument("--version", action="version", version=f"esprelay {__version__}")
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        help="read settings from this file instead of ./.env (also ESPRELAY_ENV_FILE);"
        " the environment still wins over it",
    )
    commands = parser.add_subparsers(title="commands")

    serve = commands.add_parser("serve", help="accept SMTP and deliver through the provider")
    serve.add_argument("--host", help="listen on this address (ESPRELAY_SMTP_HOST)")
    serve.add_argument(
        "--port", type=int, help="listen on this port (ESPRELAY_SMTP_PORT)", metavar="PORT"
    )
    serve.set_defaults(func=_serve)

    queue = commands.add_parser("queue", help="inspect and act on the spool")
    queue_commands = queue.add_subparsers(title="queue commands", required=True)
    q_list = queue_commands.add_parser("list", help="list messages")
    q_list.add_argument("--state", choices=[s.value for s in MessageState])
    q_list.add_argument(
        "--limit", type=int, default=None, help="at most this many (default: 100; mailq: all)"
    )
    q_list.add_argument(
        "--format",
        choices=["table", "json", "mailq"],
        default="table",
        help="mailq: the messages still to deliver, as Postfix's mailq prints them",
    )
    q_list.add_argument(
        "--json", dest="format", action="store_const", const="json", help="--format json"
    )
    q_list.set_defaults(func=_queue_list)
    q_show = queue_commands.add_parser("show", help="show one message and its attempts")
    q_show.add_argument("id")
    q_show.add_argument("--body", action="store_true", help="print the raw message too")
    q_show.set_defaults(func=_queue_show)
    q_retry = queue_commands.add_parser("retry", help="make queued or failed messages due now")
    q_retry.add_argument("ids", nargs="*", metavar="id")
    q_retry.add_argument("--all-failed", action="store_true", help="every failed message")
    q_retry.set_defaults(func=_queue_retry)
    q_delete = queue_commands.add_parser("delete", help="delete messages from the spool")
    q_delete.add_argument("ids", nargs="+", metavar="id")
    q_delete.set_defaults(func=_queue_delete)
    q_hold = queue_commands.add_parser(
        "hold", help="hold messages: not delivered until released (ALL: every one)"
    )
    q_hold.add_argument("ids", nargs="+", metavar="ID|ALL")
    q_hold.set_defaults(func=_queue_hold)
    q_release = queue_commands.add_parser(
        "release", help="release held messages, due now (ALL: every one)"
    )
    q_release.add_argument("ids", nargs="+", metavar="ID|ALL")
    q_release.set_defaults(func=_queue_release)
    q_flush = queue_commands.add_parser(
        "flush", help="make every queued (deferred) message that is not held due now"
    )
    q_flush.set_defaults(func=_queue_flush)
    mailq_command = commands.add_parser(
        "mailq", help="the queue as Postfix's mailq prints it (queue list --format mailq)"
    )
    mailq_command.set_defaults(func=_queue_list, format="mailq", state=None, limit=None)

    db = commands.add_parser("db", help="manage the spool's database schema")
    db_commands = db.add_subparsers(title="db commands", required=True)
    db_upgrade = db_commands.add_parser(
        "upgrade", help="create the spool schema or migrate it to this version"
    )
    db_upgrade.set_defaults(func=_db_upgrade)

    # Handled in main() before argparse (sendmail's flags are not argparse's); listed
    # here so that --help shows it.
    commands.add_parser(
        "sendmail",
        help="a /usr/sbin/sendmail drop-in: -t, -f SENDER, -F NAME, -i, recipients;"
        " the message on stdin",
        add_help=False,
    )
    hash_pw = commands.add_parser(
        "hash-password",
        help="print a scrypt hash for ESPRELAY_AUTH_FILE (password from the tty or stdin)",
    )
    hash_pw.add_argument("--user", help="print a whole users-file line for this user")
    hash_pw.set_defaults(func=_hash_password)

    send_test = commands.add_parser("send-test", help="submit a test message to the running bridge")
    send_test.add_argument("--to", required=True, action="append", help="recipient (repeatable)")
    send_test.add_argument("--from", dest="sender", default="esprelay-test@localhost")
    send_test.add_argument("--subject", default="esprelay test message")
    send_test.add_argument("--server", help="HOST:PORT (default: ESPRELAY_SMTP_HOST:PORT)")
    send_test.set_defaults(func=_send_test)

    doctor = commands.add_parser(
        "doctor",
        help="check the configuration, spool, network, providers and certificates;"
        " each finding with its fix",
    )
    doctor.add_argument("--json", action="store_true", help="one JSON object")
    doctor.add_argument(
        "--smtp-probe-host",
        help="host whose SMTP ports (25, 465, 587, 2525) are tried"
        " (default: gmail-smtp-in.l.google.com, a well-known MX)",
    )
    doctor.add_argument(
        "--timeout", type=float, default=5.0, help="seconds per network check (default: 5)"
    )
    doctor.add_argument(
        "--send-test", metavar="ADDR", help="also send a test message through the running bridge"
    )
    doctor.set_defaults(func=_doctor)
    config = commands.add_parser("config", help="print the effective configuration, secrets masked")
    config.add_argument("--json", action="store_true", help="one JSON object")
    config.set_defaults(func=_config)
    return parser


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from esprelay.app import Relay

    async def run() -> None:
        await Relay(settings).run()

    with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
        runner.run(run())
    return 0


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when wanted and importable (``ESPRELAY_EVENT_LOOP``), else asyncio's.

    uvloop roughly halves the event loop's share of the CPU per SMTP session
    (bench/README.md); ``asyncio`` is the escape hatch.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            logging.getLogger("esprelay").warning(
                "ESPRELAY_EVENT_LOOP=uvloop but uvloop is not installed; using asyncio"
            )
        return None
    return uvloop.new_event_loop


def _hash_password(args: argparse.Namespace) -> int:
    """Read a password without echo (or one line of stdin) and print its hash."""
    import getpass

    from esprelay.smtp.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("esprelay: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("esprelay: empty password", file=sys.stderr)
        return 1
    hashed = hash_password(password)
    if args.user:
        if ":" in args.user or not args.user.strip():
            print("esprelay: a user name cannot contain ':'", file=sys.stderr)
            return EX_USAGE
        print(f"{args.user}:{hashed}")
    else:
        print(hashed)
    return 0


@contextlib.asynccontextmanager
async def _admin_spool(settings: Settings) -> AsyncIterator[Spool]:
    """The spool of the running service, open, for a queue command.

    A queue command never creates a spool, nor migrates one: a spool that is not there
    means this command reads another configuration than the service does (a different
    working directory, no ``--env-file``), and an empty new spool would only say
    "0 messages".  It is a configuration error (78) naming the spool looked for.
    """
    from esprelay.spool import open_spool

    url = settings.spool_url
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        from esprelay.spool.sqlite import path_from_url

        path = path_from_url(url)
        if not path.is_file():
            raise ConfigError(
                f"ESPRELAY_SPOOL_URL ({_source(settings, 'ESPRELAY_SPOOL_URL')}): no spool at"
                f" {path.resolve()}; is this the service's configuration? name it with"
                " --env-file PATH (or ESPRELAY_ENV_FILE), e.g. --env-file"
                " /etc/esprelay/esprelay.env; `esprelay db upgrade` creates a new spool"
            )
    elif scheme in ("postgresql", "postgres"):
        from esprelay.spool.postgres import SCHEMA_VERSION, redact_url, schema_version

        version = await schema_version(url)
        if version == 0:
            raise ConfigError(
                f"ESPRELAY_SPOOL_URL ({_source(settings, 'ESPRELAY_SPOOL_URL')}): no esprelay"
                f" spool in {redact_url(url)}; is this the service's configuration? name it"
                " with --env-file PATH (or ESPRELAY_ENV_FILE); `esprelay db upgrade` creates"
                " the spool's tables"
            )
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"ESPRELAY_SPOOL_URL: the spool in {redact_url(url)} has schema version"
                f" {version}, this esprelay needs {SCHEMA_VERSION}: run `esprelay db upgrade`"
            )
    spool = open_spool(url, auto_migrate=False, pool_size=2)
    await spool.open()
    try:
        yield spool
    finally:
        await spool.close()


def _source(settings: Settings, variable: str) -> str:
    """Where a setting came from, for messages: the environment, the .env file, or the
    default."""
    if variable in os.environ:
        return "from the environment"
    env_file = settings.env_file
    if env_file is not None and Path(env_file).is_file() and variable in settings.environ:
        return f"from {Path(env_file).resolve()}"
    return "the default"


def _db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    scheme = settings.spool_url.split(":", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        from esprelay.spool.postgres import migrate

        before, after = asyncio.run(migrate(settings.spool_url))
        if before == after:
            print(f"spool schema is up to date (version {after})")
        else:
            print(f"spool schema migrated from version {before} to {after}")
        return 0

    async def run() -> None:
        from esprelay.spool import open_spool

        spool = open_spool(settings.spool_url)  # SQLite creates its schema on open
        await spool.open()
        await spool.close()

    asyncio.run(run())
    print("spool schema is up to date")
    return 0


def _queue_list(settings: Settings, args: argparse.Namespace) -> int:
    mailq_format = args.format == "mailq"
    limit = args.limit if args.limit is not None else (10_000_000 if mailq_format else 100)

    async def run() -> tuple[list[SpooledMessage], set[str]]:
        async with _admin_spool(settings) as spool:
            if mailq_format and args.state is None:  # the messages still to deliver
                messages = await spool.list(state=MessageState.QUEUED, limit=limit)
                messages += await spool.list(state=MessageState.IN_FLIGHT, limit=limit)
                messages.sort(key=lambda m: (m.created_at, m.id))
                messages = messages[:limit]
            else:
                state = MessageState(args.state) if args.state else None
                messages = await spool.list(state=state, limit=limit)
            return messages, await spool.held_ids()

    messages, held = asyncio.run(run())
    if mailq_format:
        print(mailq(messages, held))
        return 0
    if args.format == "json":
        for message in messages:
            print(json.dumps({**summary(message), "held": message.id in held}))
        return 0
    print(f"{'ID':21}  {'STATE':9}  {'ATT':>3}  {'SIZE':>9}  {'CREATED (UTC)':19}  RCPTS  FROM")
    for m in messages:
        state = "held" if m.id in held and m.state is MessageState.QUEUED else m.state.value
        print(
            f"{m.id:21}  {state:9}  {m.attempts:>3}  {m.size:>9}  "
            f"{table_time(m.created_at):19}  {len(m.envelope.rcpt_tos):>5}"
            f"  <{m.envelope.mail_from}>"
        )
    print(f"{len(messages)} message(s)")
    return 0


def _queue_show(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> tuple[SpooledMessage, MessageStatus | None] | None:
        async with _admin_spool(settings) as spool:
            return await load_message(spool, args.id, with_body=args.body)

    loaded = asyncio.run(run())
    if loaded is None:
        print(f"esprelay: no message {args.id}", file=sys.stderr)
        return 1
    message, status = loaded
    print(json.dumps(detail(message, with_body=False, status=status), indent=2))
    if args.body:
        print()
        if message.raw is None:
            print("(body no longer kept: delivered messages keep only their metadata)")
        else:
            sys.stdout.flush()
            sys.stdout.buffer.write(message.raw)
            sys.stdout.buffer.flush()
    return 0


def _queue_retry(settings: Settings, args: argparse.Namespace) -> int:
    if not args.ids and not args.all_failed:
        print("esprelay: give message ids or --all-failed", file=sys.stderr)
        return EX_USAGE

    async def run() -> tuple[int, list[str]]:
        async with _admin_spool(settings) as spool:
            ids = list(args.ids)
            if args.all_failed:
                failed = await spool.list(state=MessageState.FAILED, limit=1_000_000)
                ids.extend(m.id for m in failed)
            done = 0
            missing = []
            for message_id in ids:
                if await spool.retry_now(message_id):
                    done += 1
                else:
                    missing.append(message_id)
            return done, missing

    done, missing = asyncio.run(run())
    print(f"{done} message(s) due now")
    for message_id in missing:
        print(f"esprelay: {message_id}: no queued or failed message with this id", file=sys.stderr)
    return 1 if missing else 0


def _queue_delete(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> list[str]:
        async with _admin_spool(settings) as spool:
            return [i for i in args.ids if not await spool.delete(i)]

    missing = asyncio.run(run())
    print(f"{len(args.ids) - len(missing)} message(s) deleted")
    for message_id in missing:
        print(f"esprelay: {message_id}: no such message", file=sys.stderr)
    return 1 if missing else 0


def _ids_or_all(ids: list[str]) -> list[str] | None:
    """None for ``ALL`` (Postfix's word for every message), else the ids."""
    return None if "ALL" in ids else ids


def _queue_hold(settings: Settings, args: argparse.Namespace) -> int:
    """Postfix's ``postsuper -h``: a held message stays in the spool, never delivered,
    until ``release``."""

    async def run() -> tuple[str, ...]:
        async with _admin_spool(settings) as spool:
            return await spool.hold(_ids_or_all(args.ids))

    held = asyncio.run(run())
    print(f"{len(held)} message(s) held")
    return _report_missing(args.ids, held, "no queued or in-flight message with this id")


def _queue_release(settings: Settings, args: argparse.Namespace) -> int:
    """Postfix's ``postsuper -H``: released messages are due now."""

    async def run() -> tuple[str, ...]:
        async with _admin_spool(settings) as spool:
            return await spool.release(_ids_or_all(args.ids))

    released = asyncio.run(run())
    print(f"{len(released)} message(s) released, due now")
    return _report_missing(args.ids, released, "no held message with this id")


def _queue_flush(settings: Settings, args: argparse.Namespace) -> int:
    """Postfix's ``postqueue -f``: every deferred message is tried again now."""

    async def run() -> int:
        async with _admin_spool(settings) as spool:
            return await spool.flush()

    print(f"{asyncio.run(run())} message(s) due now")
    return 0


def _report_missing(asked: list[str], done: tuple[str, ...], why: str) -> int:
    if "ALL" in asked:
        return 0
    missing = [i for i in dict.fromkeys(asked) if i not in set(done)]
    for message_id in missing:
        print(f"esprelay: {message_id}: {why}", file=sys.stderr)
    return 1 if missing else 0


def _send_test(settings: Settings, args: argparse.Namespace) -> int:
    host, port = settings.smtp_host, settings.smtp_port
    if args.server:
        host, _, port_text = args.server.rpartition(":")
        if not host or not port_text.isdigit():
            print("esprelay: --server takes HOST:PORT", file=sys.stderr)
            return EX_USAGE
        port = int(port_text)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    message = EmailMessage()
    message["From"] = args.sender
    message["To"] = ", ".join(args.to)
    message["Subject"] = args.subject
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid(domain="esprelay.invalid")
    message.set_content(
        f"This is a test message from esprelay {__version__}, sent at {time.ctime()}.\n"
    )
    try:
        with smtplib.SMTP(host, port, timeout=30) as smtp:
            smtp.ehlo()
            code, text = smtp.mail(args.sender)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, text, args.sender)
            accepted = []
            for rcpt in args.to:
                code, text = smtp.rcpt(rcpt)
                if code in (250, 251):
                    accepted.append(rcpt)
                else:
                    print(f"esprelay: {rcpt} refused: {code} {text.decode(errors='replace')}")
            if not accepted:
                return 1
            code, text = smtp.data(message.as_bytes())
    except smtplib.SMTPResponseException as exc:
        reply: bytes | str = exc.smtp_error
        why = reply.decode(errors="replace") if isinstance(reply, bytes) else reply
        print(f"esprelay: refused: {exc.smtp_code} {why}", file=sys.stderr)
        return EX_TEMPFAIL if 400 <= exc.smtp_code < 500 else 1
    except OSError as exc:
        print(f"esprelay: cannot reach the bridge at {host}:{port}: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    print(f"{code} {text.decode(errors='replace')} (to {', '.join(accepted)} via {host}:{port})")
    if len(accepted) < len(args.to):
        return 1
    return 0


def _doctor(args: argparse.Namespace) -> int:
    import contextlib
    import io

    from esprelay import doctor

    probe_host = args.smtp_probe_host or doctor.DEFAULT_SMTP_PROBE_HOST
    report = doctor.run(
        doctor.Options(smtp_probe_host=probe_host, timeout=args.timeout, env_file=args.env_file)
    )
    if args.send_test:
        settings = load_settings(args.env_file) if report.config else None
        if settings is None:
            report.add(doctor.Check("send-test", "fail", "not sent: the configuration is broken"))
        else:
            output = io.StringIO()
            test = argparse.Namespace(
                to=[args.send_test],
                sender="esprelay-test@localhost",
                subject="esprelay doctor test message",
                server=None,
            )
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                code = _send_test(settings, test)
            text = " ".join(output.getvalue().split())
            report.add(
                doctor.Check("send-test", "pass", text)
                if code == 0
                else doctor.Check(
                    "send-test",
                    "fail",
                    text,
                    "is `esprelay serve` running at ESPRELAY_SMTP_HOST:PORT? see its log",
                )
            )
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(f"esprelay doctor ({__version__})")
        print(report.as_text())
    if any(check.name == "configuration" and check.status == "fail" for check in report.checks):
        return EX_CONFIG  # the settings themselves are wrong, as for every command
    return 0 if report.ok else 1


def _config(args: argparse.Namespace) -> int:
    from esprelay import doctor
    from esprelay.routing import load_routing

    try:
        settings = load_settings(args.env_file)
        providers = load_routing(settings).providers
    except ConfigError as exc:
        return _config_error(exc)
    rows = doctor.effective_config(settings, providers, env_file=args.env_file)
    if args.json:
        print(
            json.dumps({row.variable: {"value": row.value, "source": row.source} for row in rows})
        )
    else:
        print(doctor.config_text(rows))
    return 0
