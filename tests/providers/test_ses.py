"""Amazon SES v2: the request builder and error mapping offline; then esprelay end to
end, against moto's SES in server mode with SigV4 checking switched on (so a wrong
secret really fails), and against a fake SES on loopback for the error replies."""

from __future__ import annotations

import base64
import contextlib
import email.policy
import json
import re
import uuid
from collections.abc import Iterator
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.credentials import Credentials
from botocore.exceptions import CredentialRetrievalError

from esprelay.errors import (
    MessageRejected,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers.ses import MAX_ENCODED_SIZE, MAX_MESSAGE_SIZE, MAX_RECIPIENTS, SesProvider
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.messages import corpus
from tests.providers.common import send_case
from tests.providers.errorcases import Cases, case_message
from tests.providers.rawcheck import assert_arrived_as_meant, without_bcc
from tests.relayproc import RelayProcess
from tests.test_e2e_smtp import queued_id, send_raw

REGION = "eu-west-1"
FAKE_KEY = "AKIAFAKEFAKEFAKE1234"
FAKE_SECRET = "fake/secret/key/for/tests/only/0123456789"
SENDER = "app@example.com"

RAW = (
    b"From: App <app@example.com>\r\n"
    b"To: ops@example.org\r\n"
    b"Bcc: hidden@example.net\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"X-Custom: kept\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="sep"\r\n'
    b"\r\n"
    b"--sep\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xfc\xdfe aus K\xf6ln\r\n"
    b"--sep\r\n"
    b'Content-Type: application/octet-stream; name="blob.bin"\r\n'
    b"Content-Transfer-Encoding: binary\r\n"
    # 8BITMIME allows any octet but a bare CR or LF (esprelay normalises those to CRLF).
    b"\r\n" + bytes(b for b in range(256) if b not in (10, 13)) + b"\r\n"
    b"--sep--\r\n"
)
BLOB = bytes(b for b in range(256) if b not in (10, 13))


def provider(client: httpx.AsyncClient, url: str | None = None, **kw: Any) -> SesProvider:
    kw.setdefault("credentials", lambda: Credentials(FAKE_KEY, FAKE_SECRET))
    return SesProvider(client, region=REGION, endpoint_url=url, **kw)


def raw_data(request: httpx.Request | Recorded) -> bytes:
    body = request.read() if isinstance(request, httpx.Request) else request.body
    return base64.b64decode(json.loads(body)["Content"]["Raw"]["Data"])


def assert_faithful(sent: bytes) -> None:
    """What SES got is RAW without its Bcc header, 7bit, with the same content."""
    assert sent.isascii()
    head = sent.split(b"\r\n\r\n", 1)[0]
    assert head.split(b"\r\n") == [
        b"From: App <app@example.com>",
        b"To: ops@example.org",
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=",
        b"X-Custom: kept",
        b"MIME-Version: 1.0",
        b'Content-Type: multipart/mixed; boundary="sep"',
    ]
    parsed = BytesParser(policy=email.policy.default).parsebytes(sent)
    assert parsed["Bcc"] is None and parsed["Subject"] == "Grüße"
    text, blob = parsed.iter_parts()
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert text.get_content() == "Grüße aus Köln"
    assert blob["Content-Transfer-Encoding"] == "base64"
    assert blob.get_content() == BLOB


# -- the request, offline ---------------------------------------------------------------


def test_build_request_is_what_ses_documents() -> None:
    rcpts = ("ops@example.org", "hidden@example.net", "only@example.org")
    message = OutboundMessage("m1", Envelope(SENDER, rcpts), RAW)
    ses = provider(httpx.AsyncClient(), configuration_set="transactional")
    request = ses.build_request(message).request
    assert request.method == "POST"
    assert str(request.url) == f"https://email.{REGION}.amazonaws.com/v2/email/outbound-emails"
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers  # signed in send(), not here
    payload = json.loads(request.read())
    assert set(payload) == {
        "FromEmailAddress",
        "Destination",
        "Content",
        "ConfigurationSetName",
        "EmailTags",
    }
    assert payload["EmailTags"] == [{"Name": "esprelay_id", "Value": "m1"}]
    assert payload["FromEmailAddress"] == SENDER
    assert payload["Destination"] == {"ToAddresses": list(rcpts)}
    assert payload["ConfigurationSetName"] == "transactional"
    assert_faithful(raw_data(request))
    assert ses.max_recipients == MAX_RECIPIENTS == 50
    assert MAX_MESSAGE_SIZE * 4 // 3 <= 40 * 1024 * 1024


def test_null_sender_and_7bit_message() -> None:
    raw = b"From: a@example.com\r\nSubject: plain\r\n\r\nascii only\r\n"
    message = OutboundMessage("m1", Envelope("", ("b@example.org",)), raw)
    request = provider(httpx.AsyncClient(), "http://127.0.0.1:1/").build_request(message).request
    assert str(request.url) == "http://127.0.0.1:1/v2/email/outbound-emails"
    payload = json.loads(request.read())
    assert "FromEmailAddress" not in payload and "ConfigurationSetName" not in payload
    assert raw_data(request) == raw  # byte-identical


def test_too_large_after_reencoding_is_rejected() -> None:
    body = b"\xff" * (MAX_ENCODED_SIZE // 4)  # a quarter of the limit, tripled by QP
    raw = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body
    message = OutboundMessage("m1", Envelope("a@example.com", ("b@example.org",)), raw)
    with pytest.raises(MessageRejected, match="after base64"):
        provider(httpx.AsyncClient()).build_request(message)


@pytest.fixture(scope="module")
def shared_esp() -> Iterator[FakeESP]:
    """One loopback server for the offline error table (each test scripts its reply)."""
    with FakeESP() as esp:
        yield esp


def ses_error(status: int, code: str, message: str) -> Reply:
    return Reply(status, {"message": message}, {"x-amzn-ErrorType": f"{code}:http://internal/"})


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (ses_error(429, "TooManyRequestsException", "Maximum sending rate exceeded."), RateLimited),
        (Reply(400, {"__type": "LimitExceededException", "message": "Daily quota"}), RateLimited),
        (ses_error(400, "MessageRejected", "Illegal header 'X'."), MessageRejected),
        (ses_error(400, "BadRequestException", "Invalid destination"), MessageRejected),
        (
            ses_error(400, "MessageRejected", "Email address is not verified. The following"
                      " identities failed the check in region EU-WEST-1: app@example.com"),
            ProviderConfigError,
        ),
        (ses_error(400, "MailFromDomainNotVerifiedException", "not verified"), ProviderConfigError),
        (ses_error(400, "AccountSuspendedException", "suspended"), ProviderConfigError),
        (ses_error(400, "SendingPausedException", "paused"), ProviderConfigError),
        (ses_error(404, "NotFoundException", "Configuration set x does not exist"),
         ProviderConfigError),
        (ses_error(403, "UnrecognizedClientException", "The security token is invalid."),
         ProviderConfigError),
        (
            Reply(403, "<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code><Message>The"
                  " request signature we calculated does not match</Message></Error>"
                  "</ErrorResponse>", {"Content-Type": "text/xml"}),
            ProviderConfigError,
        ),
        (ses_error(500, "InternalFailure", "oops"), ProviderUnavailable),
        (Reply(503, "Service Unavailable"), ProviderUnavailable),
        (Reply(200, "<html>not SES</html>"), ProviderConfigError),
    ],
)  # fmt: skip
async def test_error_mapping(shared_esp: FakeESP, reply: Reply, error: type[Exception]) -> None:
    message = OutboundMessage("m1", Envelope(SENDER, ("b@example.org",)), RAW)
    shared_esp.then(reply)
    async with httpx.AsyncClient() as client:
        with pytest.raises(error) as info:
            await provider(client, shared_esp.url).send(message)
    assert FAKE_SECRET not in str(info.value)
    if reply.status != 200:
        code = reply.headers.get("x-amzn-ErrorType", "").split(":")[0]
        assert code in str(info.value)


async def test_credentials_problems_are_configuration_errors() -> None:
    message = OutboundMessage("m1", Envelope(SENDER, ("b@example.org",)), RAW)

    def failing() -> Credentials:
        raise CredentialRetrievalError(provider="web-identity", error_msg="token file missing")

    async with httpx.AsyncClient() as client:
        with pytest.raises(ProviderConfigError, match="no AWS credentials found"):
            await provider(client, "http://127.0.0.1:9", credentials=lambda: None).send(message)
        with pytest.raises(ProviderConfigError, match=r"CredentialRetrievalError.*web-identity"):
            await provider(client, "http://127.0.0.1:9", credentials=failing).send(message)


async def test_signed_request_carries_session_token() -> None:
    def ses(request: Recorded) -> Reply:
        return Reply(200, {"MessageId": "0100018c-test"})

    message = OutboundMessage("m1", Envelope(SENDER, ("b@example.org",)), RAW)
    with FakeESP(ses) as esp:
        async with httpx.AsyncClient() as client:
            ses_provider = provider(
                client, esp.url, credentials=lambda: Credentials(FAKE_KEY, FAKE_SECRET, "tok3n")
            )
            result = await ses_provider.send(message)
    assert result.provider_message_id == "0100018c-test"
    assert result.warnings[0].startswith("removed 1 Bcc header field(s)")
    headers = esp.requests[0].headers
    assert re.fullmatch(
        rf"AWS4-HMAC-SHA256 Credential={FAKE_KEY}/\d{{8}}/{REGION}/ses/aws4_request, "
        r"SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, Signature=[0-9a-f]{64}",
        headers["authorization"],
    )
    assert headers["x-amz-security-token"] == "tok3n"
    assert FAKE_SECRET not in json.dumps(headers)


# -- end to end against moto's SES, signatures checked -------------------------------


class Moto:
    def __init__(self, url: str, key_id: str, secret: str) -> None:
        self.url, self.key_id, self.secret = url, key_id, secret

    def sent(self) -> list[dict[str, Any]]:
        data = httpx.get(f"{self.url}/moto-api/data.json", timeout=10).json()
        return list(data.get("ses", {}).get("RawMessage", []))


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    """moto's server in this process: IAM user + key + policy and a verified sender are
    created first, then every request must carry a valid SigV4 signature."""
    import botocore.session
    from moto import settings as moto_settings
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = moto_settings.INITIAL_NO_AUTH_ACTION_COUNT
    try:
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
        session = botocore.session.Session()
        setup = {
            "endpoint_url": url,
            "region_name": REGION,
            "aws_access_key_id": "setup",
            "aws_secret_access_key": "setup",
        }
        iam = session.create_client("iam", **setup)
        # moto's accounts live as long as the process, not the server: another module's
        # server finds what this one made, so each makes its own user.
        user = f"esprelay-{uuid.uuid4().hex[:12]}"
        iam.create_user(UserName=user)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": ["ses:SendEmail", "ses:SendRawEmail"],
                 "Resource": "*"}
            ],
        }  # fmt: skip
        iam.put_user_policy(UserName=user, PolicyName="send", PolicyDocument=json.dumps(policy))
        sesv2 = session.create_client("sesv2", **setup)
        for identity in (SENDER, "example.com"):  # one address and a whole domain
            with contextlib.suppress(sesv2.exceptions.AlreadyExistsException):
                sesv2.create_email_identity(EmailIdentity=identity)
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on: SigV4 or 403
        yield Moto(url, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = saved
        server.stop()


def ses_env(url: str, key_id: str, secret: str, tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "ESPRELAY_PROVIDER": "ses",
        "ESPRELAY_SES_REGION": REGION,
        "ESPRELAY_SES_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        # Nothing from this machine's own AWS setup may leak into the test.
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        **extra,
    }


def test_smtp_to_moto_ses(moto: Moto, relay_factory: type[RelayProcess], tmp_path: Path) -> None:
    relay = relay_factory(
        ses_env(moto.url, moto.key_id, moto.secret, tmp_path, ESPRELAY_RETRY_CONFIG_ERROR="60")
    ).start()
    rcpts = ["ops@example.org", "hidden@example.net", "only@example.org"]
    message_id = queued_id(send_raw(relay, SENDER, rcpts, RAW, options=["BODY=8BITMIME"]))
    relay.wait_for_log(rf"delivered id={message_id} provider=ses attempt=1")
    found = re.search(rf"delivered id={message_id} .* provider_id=(\S+)", relay.log)
    assert found
    (stored,) = [m for m in moto.sent() if m["id"] == found.group(1)]
    # moto adds the To/Cc header addresses after the Destination it was given.
    assert stored["destinations"][: len(rcpts)] == rcpts
    assert stored["source"] == SENDER
    assert_faithful(stored["raw_data"].encode("ascii"))
    relay.wait_for_log(rf"id={message_id} provider=ses changed the message: removed 1 Bcc")
    relay.wait_for_log(
        rf"id={message_id} provider=ses changed the message: re-encoded 8-bit parts for 7bit"
        " transport: 1 as base64, 1 as quoted-printable"
    )

    # A sender SES has not verified: a configuration problem, retried slowly.
    other = queued_id(send_raw(relay, "stranger@unverified.example", ["ops@example.org"], RAW))
    relay.wait_for_log(
        rf"deferred id={other} provider=ses attempt=1 .*retry_in=\d+s .*MessageRejected.*"
        r"stranger@unverified.example.*configuration problem"
    )
    assert moto.secret not in relay.log


def test_wrong_secret_fails_the_signature(
    moto: Moto, relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    before = len(moto.sent())
    relay = relay_factory(ses_env(moto.url, moto.key_id, "not-the-secret", tmp_path)).start()
    message_id = queued_id(send_raw(relay, SENDER, ["ops@example.org"], RAW))
    relay.wait_for_log(
        rf"deferred id={message_id} provider=ses attempt=1 .*HTTP 403 SignatureDoesNotMatch.*"
        r"configuration problem: operator action needed"
    )
    assert len(moto.sent()) == before


# -- end to end error mapping against a fake SES -------------------------------------


def fake_ses(request: Recorded) -> Reply:
    """Checks what SES's API reference documents for SendEmail; answers like SES."""
    authorization = request.headers.get("authorization", "")
    if not re.fullmatch(
        rf"AWS4-HMAC-SHA256 Credential={FAKE_KEY}/\d{{8}}/{REGION}/ses/aws4_request, "
        r"SignedHeaders=content-type;host;x-amz-date, Signature=[0-9a-f]{64}",
        authorization,
    ) or not re.fullmatch(r"\d{8}T\d{6}Z", request.headers.get("x-amz-date", "")):
        return ses_error(403, "MissingAuthenticationTokenException", "Missing Authentication")
    if request.method != "POST" or request.path != "/v2/email/outbound-emails":
        return ses_error(404, "UnknownOperationException", "unknown operation")
    if request.headers.get("content-type") != "application/json":
        return ses_error(400, "SerializationException", "expected JSON")
    payload = request.json()
    to = payload.get("Destination", {}).get("ToAddresses", [])
    if not 1 <= len(to) <= 50:
        return ses_error(400, "BadRequestException", "1 to 50 recipients")
    data = base64.b64decode(payload["Content"]["Raw"]["Data"], validate=True)
    if len(payload["Content"]["Raw"]["Data"]) > 40 * 1024 * 1024 or not data.isascii():
        return ses_error(400, "MessageRejected", "too large or 8bit")
    return Reply(200, {"MessageId": f"0102018c{uuid.uuid4().hex}-000000"})


def test_error_mapping_end_to_end(relay_factory: type[RelayProcess], tmp_path: Path) -> None:
    def subject(request: Recorded) -> str:
        parsed = BytesParser(policy=email.policy.default).parsebytes(raw_data(request))
        return str(parsed["Subject"])

    cases = Cases(
        subject,
        fake_ses,
        {
            "rate": [Reply(429, {"message": "Maximum sending rate exceeded."},
                           {"x-amzn-ErrorType": "TooManyRequestsException", "Retry-After": "1"})],
            "boom": [ses_error(500, "InternalFailure", "oops"), Reply(503, "unavailable")],
            "bad": [ses_error(400, "MessageRejected", "Illegal header 'X-Foo'.")],
            "key": [ses_error(403, "UnrecognizedClientException", "The security token included"
                              " in the request is invalid.")],
        },
    )  # fmt: skip
    env = {"ESPRELAY_RETRY_INITIAL": "0.1", "ESPRELAY_RETRY_MAX": "0.2",
           "ESPRELAY_RETRY_CONFIG_ERROR": "1.5"}  # fmt: skip
    with FakeESP(cases.respond) as esp:
        relay = relay_factory(ses_env(esp.url, FAKE_KEY, FAKE_SECRET, tmp_path, **env)).start()
        ids = {
            case: queued_id(send_raw(relay, SENDER, ["ops@example.org"], case_message(case)))
            for case in ("rate", "boom", "bad", "key")
        }
        for case in ("rate", "boom", "key"):
            relay.wait_for_log(rf"delivered id={ids[case]} provider=ses", timeout=20)
        relay.wait_for_log(rf"failed id={ids['bad']} provider=ses attempt=1 .*MessageRejected")

    assert cases.calls("rate") == 2 and cases.gap("rate") >= 0.9
    assert cases.calls("boom") == 3
    assert cases.calls("bad") == 1
    assert cases.calls("key") == 2 and cases.gap("key") >= 1.4
    assert re.search(
        rf"deferred id={ids['key']} provider=ses attempt=1 .*UnrecognizedClientException.*"
        r"configuration problem: operator action needed",
        relay.log,
    )
    assert FAKE_SECRET not in relay.log


def test_message_corpus_arrives_as_meant(
    moto: Moto, relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    """Every case of tests.messages through moto: Destination is the envelope, the
    MIME is 7bit, without Bcc, and decodes to exactly what was sent."""
    cases = corpus()
    assert all(case.mail_from.endswith("@example.com") for case in cases)  # verified
    relay = relay_factory(ses_env(moto.url, moto.key_id, moto.secret, tmp_path)).start()
    ids = {send_case(relay, case): case for case in cases}
    for message_id in ids:
        relay.wait_for_log(rf"delivered id={message_id} provider=ses attempt=1")
    for message_id, case in ids.items():
        found = re.search(rf"delivered id={message_id} .* provider_id=(\S+)", relay.log)
        assert found
        (stored,) = [m for m in moto.sent() if m["id"] == found.group(1)]
        assert stored["destinations"][: len(case.rcpts)] == list(case.rcpts), case.id
        assert stored["source"] == case.mail_from
        sent = stored["raw_data"].encode("ascii")
        if case.raw.isascii():
            assert sent == without_bcc(case.raw), case.id
        assert_arrived_as_meant(case, sent)
