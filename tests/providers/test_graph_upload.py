"""Microsoft Graph: messages over the 4 MB request limit go as a draft, its attachments
(posted under 3 MB, an upload session above) and a send; offline, against the fake
Graph of tests/providers/test_graph.py, and end to end through SMTP."""

from __future__ import annotations

import base64
import email.policy
import hashlib
import re
import smtplib
from email.parser import BytesParser

import httpx
import pytest

from esprelay.errors import MessageRejected, ProviderUnavailable
from esprelay.providers.graph import MAX_MESSAGE_SIZE, Upload
from esprelay.providers.graphupload import CHUNK_SIZE, CHUNK_UNIT, chunks, split_attachments
from tests.providers.test_graph import (
    CLIENT_ID,
    MAILBOX,
    SECRET,
    FakeGraph,
    graph_env,
    outbound,
    provider,
)
from tests.relayproc import RelayProcess
from tests.test_e2e_smtp import queued_id, send_raw

MB = 1024 * 1024


def pattern(size: int, seed: bytes) -> bytes:
    """``size`` bytes that differ everywhere (a shifted or lost range would show)."""
    out = bytearray()
    block = seed
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def b64_part(headers: bytes, data: bytes) -> bytes:
    return (
        headers
        + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(data).replace(b"\n", b"\r\n")
    )


IMAGE = pattern(2 * MB + MB // 2, b"image")  # under 3 MB: one POST
PDF = pattern(6 * MB, b"pdf")  # an upload session
SMALL = pattern(100 * 1024, b"small")  # stays in the MIME
HTML = b'Content-Type: text/html; charset=utf-8\r\n\r\n<p>See <img src="cid:img1@x"></p>\r\n'
IMAGE_PART = b64_part(
    b"Content-Type: image/png\r\nContent-ID: <img1@x>\r\nContent-Disposition: inline", IMAGE
)
PDF_PART = b64_part(
    b'Content-Type: application/pdf; name="r.pdf"\r\n'
    b'Content-Disposition: attachment; filename="=?utf-8?q?Rapport_=C3=A9t=C3=A9.pdf?="',
    PDF,
)
SMALL_PART = b64_part(
    b'Content-Type: text/plain\r\nContent-Disposition: attachment; filename="notes.txt"', SMALL
)
RELATED = (
    b'Content-Type: multipart/related; boundary="rel"\r\n\r\n'
    b"--rel\r\n" + HTML + b"\r\n--rel\r\n" + IMAGE_PART + b"\r\n--rel--"
)
HEAD = (
    b"From: App <app@example.com>\r\nTo: b@example.org\r\nSubject: large\r\n"
    b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="mix"\r\n\r\n'
)
LARGE = (
    HEAD
    + b"--mix\r\n"
    + RELATED
    + b"\r\n--mix\r\n"
    + PDF_PART
    + b"\r\n--mix\r\n"
    + SMALL_PART
    + b"\r\n--mix--\r\n"
)
#: The draft: every byte kept but the two largest attachment parts (and a delimiter each).
DRAFT = LARGE.replace(b"\r\n--rel\r\n" + IMAGE_PART, b"").replace(b"\r\n--mix\r\n" + PDF_PART, b"")


def draft_mime(upload: Upload) -> bytes:
    return base64.b64decode(upload.draft.read())


def test_large_message_is_planned_as_a_draft_and_attachments() -> None:
    graph = provider(httpx.AsyncClient(), "https://graph.example")
    upload = graph.plan(outbound(LARGE))
    assert isinstance(upload, Upload)
    assert upload.draft.method == "POST"
    assert str(upload.draft.url) == "https://graph.example/v1.0/users/app@example.com/messages"
    assert upload.draft.headers["content-type"] == "text/plain"
    assert len(upload.draft.read()) <= 4 * MB
    assert draft_mime(upload) == DRAFT
    assert b"notes.txt" in DRAFT and b"<p>See" in DRAFT and len(DRAFT) < 200_000
    image, pdf = upload.attachments  # in the message's order
    assert (image.name, image.content_type, image.content_id, image.inline) == (
        "attachment-1",
        "image/png",
        "img1@x",
        True,
    )
    assert image.data == IMAGE
    assert (pdf.name, pdf.content_type, pdf.content_id, pdf.inline) == (
        "Rapport été.pdf",
        "application/pdf",
        None,
        False,
    )
    assert pdf.data == PDF
    assert pdf.upload_session() == {
        "AttachmentItem": {
            "attachmentType": "file",
            "name": "Rapport été.pdf",
            "size": len(PDF),
            "contentType": "application/pdf",
            "isInline": False,
        }
    }
    assert any("sent as a draft with 2 attachment(s)" in w for w in upload.warnings)
    # The sendMail builder refuses what needs a session.
    with pytest.raises(MessageRejected, match="needs an upload session"):
        graph.build_request(outbound(LARGE))


def test_what_cannot_be_split_is_refused() -> None:
    graph = provider(httpx.AsyncClient(), "https://graph.example")
    single = b"From: app@example.com\r\nSubject: big\r\n\r\n" + b"x" * (4 * MB)
    with pytest.raises(MessageRejected, match="even without its attachments"):
        graph.plan(outbound(single))
    signed = HEAD.replace(b"multipart/mixed", b'multipart/signed; protocol="a/b"') + (
        b"--mix\r\n" + PDF_PART + b"\r\n--mix\r\n" + SMALL_PART + b"\r\n--mix--\r\n"
    )
    with pytest.raises(MessageRejected, match="signed or encrypted"):
        graph.plan(outbound(signed))
    # A multipart left without parts gets an empty text part (MIME needs one).
    only = HEAD + b"--mix\r\n" + PDF_PART + b"\r\n--mix--\r\n"
    split = split_attachments(only, lambda size: size < 1000)
    assert split is not None and split.attachments[0].data == PDF
    assert split.raw == HEAD + (
        b"--mix\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n\r\n--mix--\r\n"
    )
    # Without upload sessions, the old limit.
    off = provider(httpx.AsyncClient(), "https://graph.example", upload_sessions=False)
    assert off.max_message_size == MAX_MESSAGE_SIZE
    assert graph.max_message_size == 150 * MB
    with pytest.raises(MessageRejected, match="UPLOAD_SESSIONS is off"):
        off.plan(outbound(LARGE))


def test_chunks_are_multiples_of_320_kib() -> None:
    assert CHUNK_SIZE % CHUNK_UNIT == 0 and CHUNK_SIZE <= 4 * MB
    ranges = list(chunks(6 * MB))
    assert ranges == [(0, CHUNK_SIZE), (CHUNK_SIZE, 6 * MB)]
    with pytest.raises(ValueError):
        list(chunks(10, 1000))


async def test_draft_attachments_and_send_through_the_fake() -> None:
    with FakeGraph() as graph:
        async with httpx.AsyncClient() as client:
            result = await provider(client, graph.url).send(outbound(LARGE))
    assert result.provider_message_id is None
    (sent,) = graph.sent
    assert sent.mailbox == MAILBOX
    assert sent.mime == DRAFT
    image, pdf = sent.attachments
    assert (image.via, image.data, image.is_inline, image.content_id) == (
        "post",
        IMAGE,
        True,
        "img1@x",
    )
    assert (pdf.via, pdf.data, pdf.name) == ("session", PDF, "Rapport été.pdf")
    (session,) = graph.sessions.values()
    assert session.puts == [(0, CHUNK_SIZE - 1), (CHUNK_SIZE, len(PDF) - 1)]
    assert not graph.drafts and not graph.deleted and not graph.problems
    puts = [r for r in graph.esp.requests if r.method == "PUT"]
    assert puts and all("authorization" not in r.headers for r in puts)


async def test_a_failure_after_the_draft_deletes_it(caplog: pytest.LogCaptureFixture) -> None:
    with FakeGraph(fail_puts={2}) as graph:
        async with httpx.AsyncClient() as client:
            sender = provider(client, graph.url)
            with pytest.raises(ProviderUnavailable, match="uploading attachment 'Rapport"):
                await sender.send(outbound(LARGE))
            assert len(graph.deleted) == 1 and not graph.drafts and not graph.sent
            # The From address is not the fixed mailbox: the draft's send is refused.
            fixed = provider(client, graph.url, sender_mode="fixed", sender="relay@example.com")
            with pytest.raises(MessageRejected, match="ErrorSendAsDenied"):
                await fixed.send(outbound(LARGE))
            assert len(graph.deleted) == 2 and not graph.drafts and not graph.sent
            # The draft cannot be deleted: said in the log, the first error raised.
            graph.fail_deletes = True
            graph.fail_puts = {graph.puts + 1}
            with pytest.raises(ProviderUnavailable, match="uploading attachment"):
                await sender.send(outbound(LARGE, ("b@example.org",)))
            assert len(graph.drafts) == 1 and len(graph.deleted) == 2
            graph.drafts.clear()
            await sender.send(outbound(LARGE))
    assert len(graph.sent) == 1 and graph.sent[0].attachments[1].data == PDF
    assert "id=m1 provider=graph: could not delete the unsent draft (HTTP 503)" in caplog.text


# -- end to end: SMTP in, the fake Graph out -------------------------------------------------


def attachment_message(data: bytes, head: bytes) -> bytes:
    return (
        head
        + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        + b"--b1\r\nContent-Type: text/plain\r\n\r\nThe data.\r\n--b1\r\n"
        + b64_part(
            b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment;"
            b' filename="data.bin"',
            data,
        )
        + b"\r\n--b1--\r\n"
    )


def test_smtp_to_graph_upload_session(relay_factory: type[RelayProcess]) -> None:
    big = pattern(15 * MB, b"big")
    raw = attachment_message(
        big, b"From: app@example.com\r\nTo: b@example.org\r\nSubject: twenty\r\n"
    )
    assert 20 * MB < len(raw) < 25 * MB
    bcc_data = pattern(5 * MB, b"bcc")
    bcc_only = attachment_message(bcc_data, b"From: app@example.com\r\nSubject: bcc only\r\n")
    with FakeGraph(fail_puts={3}) as graph:
        relay = relay_factory(graph_env(graph)).start()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            assert int(smtp.esmtp_features["size"]) == 25 * MB
        rcpts = ["b@example.org", "hidden@example.net"]
        first = queued_id(send_raw(relay, MAILBOX, rcpts, raw))
        # The third chunk fails: the draft is deleted, and the retry delivers.
        relay.wait_for_log(rf"delivered id={first} provider=graph attempt=2", timeout=60)
        assert len(graph.deleted) == 1
        second = queued_id(send_raw(relay, MAILBOX, ["x@example.org", "y@example.org"], bcc_only))
        relay.wait_for_log(rf"delivered id={second} provider=graph attempt=1", timeout=60)
    assert re.search(rf"deferred id={first} .*uploading attachment 'data.bin'.*HTTP 500", relay.log)
    twenty, bcc = graph.sent
    assert twenty.recipients() == set(rcpts)
    assert twenty.parsed()["Bcc"] == "hidden@example.net"  # Exchange's Bcc, not shown
    (attached,) = twenty.attachments
    assert (attached.name, attached.content_type, attached.via) == (
        "data.bin",
        "application/octet-stream",
        "session",
    )
    assert attached.data == big  # reassembled exactly
    parsed = BytesParser(policy=email.policy.default).parsebytes(twenty.mime)
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain"]
    assert bcc.recipients() == {"x@example.org", "y@example.org"}
    assert bcc.parsed()["To"] is None and bcc.attachments[0].data == bcc_data
    assert not graph.drafts and not graph.problems


def test_without_upload_sessions_size_is_the_request_limit(
    relay_factory: type[RelayProcess],
) -> None:
    with FakeGraph() as graph:
        env = graph_env(graph, ESPRELAY_GRAPH_UPLOAD_SESSIONS="false")
        relay = relay_factory(env).start()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            assert int(smtp.esmtp_features["size"]) == MAX_MESSAGE_SIZE
            code, reply = smtp.mail(MAILBOX, options=[f"SIZE={MAX_MESSAGE_SIZE + 1}"])
            assert code == 552, reply
            smtp.rset()
            smtp.mail(MAILBOX)
            smtp.rcpt("b@example.org")
            code, reply = smtp.data(LARGE)
            assert code == 552, reply
    assert not graph.sent and not graph.drafts


def test_the_fake_upload_url_refuses_what_outlook_refuses() -> None:
    with FakeGraph() as graph, httpx.Client(base_url=graph.url) as client:
        form = {"client_id": CLIENT_ID, "client_secret": SECRET, "scope": f"{graph.url}/.default"}
        token = client.post(graph.token_url, data={**form, "grant_type": "client_credentials"})
        auth = {"Authorization": f"Bearer {token.json()['access_token']}"}
        mime = base64.b64encode(b"From: app@example.com\r\n\r\nx\r\n")
        draft = client.post(
            f"/v1.0/users/{MAILBOX}/messages",
            content=mime,
            headers={**auth, "Content-Type": "text/plain"},
        )
        assert draft.status_code == 201
        item = {"attachmentType": "file", "name": "a.bin", "size": 1_000_000}
        session = client.post(
            f"/v1.0/users/{MAILBOX}/messages/{draft.json()['id']}/attachments/createUploadSession",
            json={"AttachmentItem": item},
            headers=auth,
        )
        assert session.status_code == 201 and session.json()["nextExpectedRanges"] == ["0-"]
        url = session.json()["uploadUrl"]
        assert url.startswith(graph.url + "/upload/")

        def put(start: int, size: int, **headers: str) -> httpx.Response:
            rng = f"bytes {start}-{start + size - 1}/1000000"
            return client.put(url, content=bytes(size), headers={"Content-Range": rng, **headers})

        assert put(0, CHUNK_UNIT, **auth).status_code == 400  # a token on the upload URL
        assert put(0, CHUNK_UNIT + 1).status_code == 400  # not a multiple of 320 KiB
        assert put(CHUNK_UNIT, CHUNK_UNIT).status_code == 400  # not contiguous
        first = put(0, 2 * CHUNK_UNIT)
        assert first.status_code == 200
        assert first.json()["nextExpectedRanges"] == [str(2 * CHUNK_UNIT)]
        assert put(2 * CHUNK_UNIT, 1_000_000 - 2 * CHUNK_UNIT).status_code == 201
    assert len(graph.problems) == 3


def test_draft_gets_the_recipient_and_quoted_printable_rewrites() -> None:
    qp = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable"
    raw = HEAD + (
        b"--mix\r\n"
        + qp
        + b"\r\n\r\ncaf=C3=A9 =\r\nend\r\n--mix\r\n"
        + PDF_PART
        + b"\r\n--mix--\r\n"
    )
    graph = provider(httpx.AsyncClient(), "https://graph.example")
    upload = graph.plan(outbound(raw, ("b@example.org", "hidden@example.net")))
    assert isinstance(upload, Upload) and upload.attachments[0].data == PDF
    draft = BytesParser(policy=email.policy.default).parsebytes(draft_mime(upload))
    assert draft["Bcc"] == "hidden@example.net"
    (text,) = draft.iter_parts()
    assert text["Content-Transfer-Encoding"] == "base64"
    assert text.get_payload(decode=True) == "café end".encode()
    assert any("quoted-printable" in w for w in upload.warnings)
