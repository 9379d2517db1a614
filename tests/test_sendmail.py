"""``esprelay sendmail`` against a real relay: what a legacy app piping into sendmail gets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from esprelay.sendmail import UsageError, parse_args
from tests.relayproc import RelayProcess


def sendmail(
    port: int, args: list[str], stdin: bytes, cwd: Path, command: list[str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
    env.update({"ESPRELAY_SMTP_HOST": "127.0.0.1", "ESPRELAY_SMTP_PORT": str(port)})
    return subprocess.run(
        [*(command or [sys.executable, "-m", "esprelay", "sendmail"]), *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
        env=env,
        cwd=cwd,
    )


def delivered(relay: RelayProcess, count: int = 1) -> list[tuple[dict[str, object], bytes]]:
    ids = relay.wait_delivered(count)
    return [
        (
            json.loads((relay.outbox / f"{i}.json").read_text()),
            (relay.outbox / f"{i}.eml").read_bytes(),
        )
        for i in ids
    ]


def test_t_takes_recipients_from_headers_and_strips_bcc(
    relay: RelayProcess, tmp_path: Path
) -> None:
    message = (
        b"From: App <app@example.com>\n"
        b"To: Alice <alice@example.org>, bob@example.org\n"
        b"Cc: carol@example.org\n"
        b"Bcc: hidden@example.net,\n"
        b"  also-hidden@example.net\n"
        b"Subject: report\n"
        b"\n"
        b"nightly report\n"
    )
    result = sendmail(relay.port, ["-t", "-i", "-oem", "-odb"], message, tmp_path)
    assert result.returncode == 0, result.stderr
    [(record, eml)] = delivered(relay)
    assert record["rcpt_tos"] == [
        "alice@example.org",
        "bob@example.org",
        "carol@example.org",
        "hidden@example.net",
        "also-hidden@example.net",
    ]
    assert b"hidden" not in eml.lower()
    assert b"Bcc" not in eml
    assert b"\r\nSubject: report\r\n" in eml
    assert eml.endswith(b"\r\n\r\nnightly report\r\n")
    assert eml.startswith(b"Date: ") and b"\r\nMessage-ID: <" in eml  # added, as sendmail does
    assert b"\n" not in eml.replace(b"\r\n", b"")  # bare LF became CRLF


def test_f_sets_the_envelope_sender_and_F_the_from_name(
    relay: RelayProcess, tmp_path: Path
) -> None:
    result = sendmail(
        relay.port,
        ["-f", "bounces@example.com", "-F", "Cron Daemon", "ops@example.org"],
        b"Subject: cron output\n\nall good\n",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    [(record, eml)] = delivered(relay)
    assert record["mail_from"] == "bounces@example.com"
    assert record["rcpt_tos"] == ["ops@example.org"]
    assert eml.startswith(b"From: Cron Daemon <bounces@example.com>\r\n")


def test_attached_f_and_existing_headers_kept(relay: RelayProcess, tmp_path: Path) -> None:
    message = (
        b"From: a@example.com\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <x@y>\n\nhi\n"
    )
    result = sendmail(
        relay.port, ["-fsender@example.com", "-oi", "ops@example.org"], message, tmp_path
    )
    assert result.returncode == 0, result.stderr
    [(record, eml)] = delivered(relay)
    assert record["mail_from"] == "sender@example.com"
    assert eml == message.replace(b"\n", b"\r\n")  # nothing added when all is there


def test_dot_lines_kept_with_i(relay: RelayProcess, tmp_path: Path) -> None:
    body = b".\n..two dots\n.leading\n.\n"
    message = b"Subject: dots\n\n" + body + b"last line\n"
    result = sendmail(relay.port, ["-i", "ops@example.org"], message, tmp_path)
    assert result.returncode == 0, result.stderr
    [(_, eml)] = delivered(relay)
    assert eml.endswith(b"\r\n\r\n.\r\n..two dots\r\n.leading\r\n.\r\nlast line\r\n")


def test_single_dot_ends_input_without_i(relay: RelayProcess, tmp_path: Path) -> None:
    message = b"Subject: classic\n\nfirst\n..kept as is\n.\nnot part of the message\n"
    result = sendmail(relay.port, ["ops@example.org"], message, tmp_path)
    assert result.returncode == 0, result.stderr
    [(_, eml)] = delivered(relay)
    assert eml.endswith(b"\r\n\r\nfirst\r\n..kept as is\r\n")
    assert b"not part" not in eml


def test_refused_recipient_exit_67_others_delivered(relay: RelayProcess, tmp_path: Path) -> None:
    result = sendmail(relay.port, ["no-at-sign", "ops@example.org"], b"Subject: x\n\ny\n", tmp_path)
    assert result.returncode == 67, result.stderr
    assert b"<no-at-sign> refused: 553" in result.stderr
    [(record, _)] = delivered(relay)
    assert record["rcpt_tos"] == ["ops@example.org"]


def test_exit_75_when_the_bridge_is_down(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = sendmail(port, ["ops@example.org"], b"Subject: x\n\ny\n", tmp_path)
    assert result.returncode == 75
    assert b"cannot reach the mail bridge" in result.stderr


def test_exit_64_on_usage_errors(tmp_path: Path) -> None:
    assert sendmail(1, [], b"Subject: x\n\ny\n", tmp_path).returncode == 64  # no recipient
    assert sendmail(1, ["-t"], b"Subject: x\n\ny\n", tmp_path).returncode == 64
    assert sendmail(1, ["-bs"], b"", tmp_path).returncode == 64
    assert sendmail(1, ["-Z", "a@example.org"], b"", tmp_path).returncode == 64
    assert sendmail(1, ["-f"], b"", tmp_path).returncode == 64


def test_installed_as_sendmail(relay: RelayProcess, tmp_path: Path) -> None:
    """A symlink named sendmail to the esprelay script is a sendmail (no subcommand)."""
    script = Path(sys.executable).parent / "esprelay"
    if not script.exists():
        pytest.skip("the esprelay console script is not installed next to this Python")
    link = tmp_path / "sendmail"
    link.symlink_to(script)
    result = sendmail(
        relay.port,
        ["-t", "-i"],
        b"To: ops@example.org\nSubject: php\n\nhi\n",
        tmp_path,
        [str(link)],
    )
    assert result.returncode == 0, result.stderr
    [(record, _)] = delivered(relay)
    assert record["rcpt_tos"] == ["ops@example.org"]


@pytest.mark.parametrize(
    ("argv", "sender", "rcpts", "extract", "dots"),
    [
        (["-t", "-i"], None, [], True, True),
        (["-oi", "-f", "a@b.c", "x@y.z"], "a@b.c", ["x@y.z"], False, True),
        (["-fa@b.c", "-FName", "-oem", "-odb", "x@y.z"], "a@b.c", ["x@y.z"], False, False),
        (
            ["-r", "a@b.c", "-bm", "-O", "Opt=1", "--", "-odd@y.z"],
            "a@b.c",
            ["-odd@y.z"],
            False,
            False,
        ),
        (["-N", "never", "-v", "-oQ/var/spool", "x@y.z"], None, ["x@y.z"], False, False),
    ],
)
def test_parse_args(
    argv: list[str], sender: str | None, rcpts: list[str], extract: bool, dots: bool
) -> None:
    opts = parse_args(argv)
    assert (opts.sender, opts.recipients, opts.extract, opts.ignore_dots) == (
        sender,
        rcpts,
        extract,
        dots,
    )


def test_parse_args_refuses_queue_runs() -> None:
    with pytest.raises(UsageError):
        parse_args(["-q"])
