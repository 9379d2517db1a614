"""The queue admin API and page of a real relay, and the page in headless Chromium."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from esprelay.httpapi import render_queue_page
from esprelay.models import Envelope, MessageState, SpooledMessage
from tests.conftest import require_tool
from tests.opshttp import TOKEN, admin, http, send
from tests.relayproc import RelayProcess

#: Screenshots land here too, so a CI run keeps them (the tmp dir is removed).
ARTIFACTS = Path(
    os.environ.get("ESPRELAY_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")
)


@pytest.fixture
def paused(relay_factory: type[RelayProcess]) -> RelayProcess:
    """A relay that only queues (delivery paused), with the admin API on."""
    return relay_factory(
        {"ESPRELAY_ADMIN_TOKEN": TOKEN, "ESPRELAY_DELIVERY_CONCURRENCY": "0"}
    ).start()


def test_admin_routes_off_without_a_token(relay: RelayProcess) -> None:
    with http(relay) as client:
        for path in ("/api/messages", "/api/messages/x", "/queue"):
            assert client.get(path, headers={"Authorization": "Bearer x" * 20}).status_code == 404
    assert "admin api off" in relay.log


def test_unauthenticated_requests_are_refused(paused: RelayProcess) -> None:
    message_id = send(paused)
    with http(paused) as client:
        for method, path in [
            ("GET", "/api/messages"),
            ("GET", f"/api/messages/{message_id}"),
            ("POST", f"/api/messages/{message_id}/retry"),
            ("DELETE", f"/api/messages/{message_id}"),
            ("GET", "/queue"),
        ]:
            for headers in (
                {},
                {"Authorization": "Bearer wrong-token-wrong-token"},
                {"Authorization": TOKEN},
            ):
                response = client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                assert message_id not in response.text
        # A cookie never authorizes the JSON API (no CSRF through the page's cookie).
        client.cookies.set("esprelay_admin", TOKEN)
        assert client.delete(f"/api/messages/{message_id}").status_code == 401
    with admin(paused) as client:
        assert client.get(f"/api/messages/{message_id}").status_code == 200


def test_list_show_retry_delete(paused: RelayProcess) -> None:
    ids = [send(paused, subject=f"s{i}") for i in range(3)]
    with admin(paused) as client:
        listed = client.get("/api/messages", params={"state": "queued"}).json()["messages"]
        assert [m["id"] for m in listed] == ids
        assert listed[0]["rcpt_tos"] == ["ops@example.org"]
        assert listed[0]["mail_from"] == "app@example.com"
        assert client.get("/api/messages", params={"state": "failed"}).json() == {"messages": []}
        assert client.get("/api/messages", params={"state": "bogus"}).status_code == 400
        assert (
            client.get("/api/messages", params={"limit": "2"}).json()["messages"][1]["id"] == ids[1]
        )

        shown = client.get(f"/api/messages/{ids[0]}").json()
        assert shown["state"] == "queued"
        assert shown["attempt_history"] == []
        assert "body_base64" not in shown
        with_body = client.get(f"/api/messages/{ids[0]}", params={"body": "1"}).json()
        assert b"body of s0" in base64.b64decode(with_body["body_base64"])
        assert client.get("/api/messages/nope").status_code == 404

        assert client.delete(f"/api/messages/{ids[1]}").json() == {"id": ids[1], "deleted": True}
        assert client.get(f"/api/messages/{ids[1]}").status_code == 404
        assert client.delete(f"/api/messages/{ids[1]}").status_code == 404
        assert client.post(f"/api/messages/{ids[1]}/retry").status_code == 404
        assert client.put(f"/api/messages/{ids[0]}").status_code == 405

        remaining = [m["id"] for m in client.get("/api/messages").json()["messages"]]
        assert remaining == [ids[0], ids[2]]
    # Deleted from the same spool the CLI reads.
    paused.wait_for_log(rf"admin api: deleted id={ids[1]}")


def test_retry_makes_a_message_due_at_once(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    blocker = tmp_path / "outbox"
    blocker.write_text("not a directory\n")
    relay = relay_factory(
        {"ESPRELAY_ADMIN_TOKEN": TOKEN, "ESPRELAY_RETRY_CONFIG_ERROR": "1h"}
    ).start()
    message_id = send(relay)
    relay.wait_for_log(rf"deferred id={message_id}")
    with admin(relay) as client:
        shown = client.get(f"/api/messages/{message_id}").json()
        assert shown["attempts"] == 1
        assert shown["attempt_history"][0]["outcome"] == "deferred"
        assert "cannot write to outbox" in shown["last_error"]
        blocker.unlink()
        assert client.post(f"/api/messages/{message_id}/retry").json() == {
            "id": message_id,
            "due": True,
        }
        relay.wait_delivered(1, timeout=10)  # not an hour later
        relay.wait_for_log(rf"delivered id={message_id}")
        shown = client.get(f"/api/messages/{message_id}").json()
    assert shown["state"] == "delivered"
    assert shown["provider_message_id"] == f"outbox-{message_id}"


def test_page_token_in_query_becomes_a_cookie(paused: RelayProcess) -> None:
    send(paused)
    with http(paused) as client:
        assert client.get("/queue", params={"token": "wrong-token-wrong-token"}).status_code == 401
        response = client.get("/queue", params={"token": TOKEN, "state": "queued"})
        assert response.status_code == 303
        assert response.headers["location"] == "/queue?state=queued"
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        page = client.get("/queue?state=queued")  # the client keeps the cookie
        assert page.status_code == 200
        assert "ops@example.org" in page.text
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        # The cookie is derived from the token, not the token: stolen, it is no bearer token.
        stolen = client.cookies["esprelay_admin"]
        as_bearer = {"Authorization": f"Bearer {stolen}"}
        assert client.get("/api/messages", headers=as_bearer).status_code == 401
        assert stolen != TOKEN


def test_page_escapes_everything() -> None:
    nasty = '<script>alert("x")</script>'
    message = SpooledMessage(
        id="abc<b>",
        envelope=Envelope(mail_from=f"{nasty}@example.com", rcpt_tos=(f"a{nasty}@example.org",)),
        size=10,
        state=MessageState.FAILED,
        attempts=1,
        created_at=0.0,
        next_attempt_at=0.0,
        provider="outbox",
        last_error=f"HTTP 400: {nasty}",
        provider_message_id=nasty,
    )
    page = render_queue_page([message], {"failed": 1}, None)
    assert "<script" not in page
    assert "&lt;script&gt;" in page
    assert "abc&lt;b&gt;" in page


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    binary = require_tool("chromium")
    return subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_queue_page_in_headless_chromium(paused: RelayProcess, tmp_path: Path) -> None:
    require_tool("chromium")
    ids = [send(paused, rcpt=f"user{i}@example.org", subject=f"c{i}") for i in range(3)]
    url = f"http://127.0.0.1:{paused.http_port}/queue?token={TOKEN}"

    dom = _chromium("--dump-dom", url, profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The token in the address was swapped for a cookie and the page followed.
    assert "<title>esprelay queue</title>" in dom.stdout
    for i, message_id in enumerate(ids):
        assert message_id in dom.stdout
        assert f"user{i}@example.org" in dom.stdout
    assert "3 message(s) shown" in dom.stdout

    screenshot = tmp_path / "queue.png"
    shot = _chromium(
        f"--screenshot={screenshot}",
        "--window-size=1280,600",
        url,
        profile=tmp_path / "profile-shot",
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / "queue-page.png")

    # Without the token Chromium gets the 401 text, not the queue.
    refused = _chromium("--dump-dom", url.split("?")[0], profile=tmp_path / "profile-none")
    assert ids[0] not in refused.stdout
