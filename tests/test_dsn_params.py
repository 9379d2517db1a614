"""The DSN parameters of MAIL and RCPT (RFC 3461) as the handler checks them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from esprelay.message.dsn import RecipientDSN
from esprelay.smtp import dsnparams
from esprelay.smtp.dsnparams import (
    ENVID_LIMIT,
    MAIL_KEYWORDS,
    RCPT_KEYWORDS,
    mail_parameters,
    rcpt_parameters,
    take,
    xtext_decode,
    xtext_encode,
)


def test_take_splits_dsn_tokens_by_keyword_keeping_case() -> None:
    tokens = ["SIZE=10", "envid=Ab+2Bc", "BODY=8BITMIME", "Ret=hdrs"]
    assert take(tokens, MAIL_KEYWORDS) == (
        ["SIZE=10", "BODY=8BITMIME"],
        ["envid=Ab+2Bc", "Ret=hdrs"],
    )
    assert take(["ORCPT=rfc822;A@B", "X"], RCPT_KEYWORDS) == (["X"], ["ORCPT=rfc822;A@B"])


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([], (None, None)),
        (["RET=FULL"], ("FULL", None)),
        (["ret=hdrs"], ("HDRS", None)),
        (["ENVID=QQ+2B1"], (None, "QQ+1")),
        (["ENVID=a+20b", "RET=HDRS"], ("HDRS", "a b")),
        (["ENVID=" + "x" * ENVID_LIMIT], (None, "x" * ENVID_LIMIT)),
    ],
)
def test_mail_parameters(tokens: list[str], expected: tuple[str | None, str | None]) -> None:
    assert mail_parameters(tokens) == expected


@pytest.mark.parametrize(
    ("tokens", "keyword"),
    [
        (["RET=ALL"], "RET"),
        (["RET"], "RET"),
        (["RET=FULL", "RET=FULL"], "RET"),
        (["ENVID="], "ENVID"),
        (["ENVID=a=b"], "ENVID"),
        (["ENVID=a+b"], "ENVID"),  # "+" must start a hexchar
        (["ENVID=a+2b"], "ENVID"),  # upper-case hex only
        (["ENVID=a+0D+0Ab"], "ENVID"),  # would put CR LF in a header of the report
        (["ENVID=" + "x" * (ENVID_LIMIT + 1)], "ENVID"),
    ],
)
def test_mail_parameters_refused(tokens: list[str], keyword: str) -> None:
    assert mail_parameters(tokens) == f"501 5.5.4 Error: invalid {keyword} parameter"


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([], RecipientDSN()),
        (["NOTIFY=NEVER"], RecipientDSN(notify=("NEVER",))),
        (["notify=delay,Failure"], RecipientDSN(notify=("FAILURE", "DELAY"))),
        (["NOTIFY=SUCCESS,FAILURE,DELAY"], RecipientDSN(notify=("SUCCESS", "FAILURE", "DELAY"))),
        (["ORCPT=rfc822;Bob+2Bx@Example.org"], RecipientDSN(orcpt="rfc822;Bob+x@Example.org")),
        (["ORCPT=x400;a+3Db", "NOTIFY=FAILURE"], RecipientDSN(("FAILURE",), "x400;a=b")),
    ],
)
def test_rcpt_parameters(tokens: list[str], expected: RecipientDSN) -> None:
    assert rcpt_parameters(tokens) == expected


@pytest.mark.parametrize(
    ("tokens", "keyword"),
    [
        (["NOTIFY=NEVER,FAILURE"], "NOTIFY"),
        (["NOTIFY="], "NOTIFY"),
        (["NOTIFY"], "NOTIFY"),
        (["NOTIFY=FAILURE,"], "NOTIFY"),
        (["NOTIFY=FAILURE,FAILURE"], "NOTIFY"),
        (["NOTIFY=ALWAYS"], "NOTIFY"),
        (["NOTIFY=NEVER", "NOTIFY=NEVER"], "NOTIFY"),
        (["ORCPT=rfc822"], "ORCPT"),
        (["ORCPT=;a@b"], "ORCPT"),
        (["ORCPT=rfc822;"], "ORCPT"),
        (["ORCPT=rfc 822;a@b"], "ORCPT"),
        (["ORCPT=rfc822;a@b+"], "ORCPT"),
        (["ORCPT=rfc822;" + "a" * 500], "ORCPT"),
        (["ORCPT=rfc822;a+00b"], "ORCPT"),
    ],
)
def test_rcpt_parameters_refused(tokens: list[str], keyword: str) -> None:
    assert rcpt_parameters(tokens) == f"501 5.5.4 Error: invalid {keyword} parameter"


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
def test_xtext_round_trip(text: str) -> None:
    encoded = xtext_encode(text)
    assert "=" not in encoded and " " not in encoded
    assert xtext_decode(encoded) == text


@pytest.mark.parametrize(
    ("text", "left", "taken"),
    [
        (" <a@x.example> RET=FULL SIZE=10", " <a@x.example> SIZE=10", ["RET=FULL"]),
        (" <a@x.example>RET=HDRS", " <a@x.example>", ["RET=HDRS"]),
        (' <"a> RET=FULL"@x.example>', ' <"a> RET=FULL"@x.example>', []),
        (' <"a\\" >"@x.example> ENVID=z', ' <"a\\" >"@x.example>', ["ENVID=z"]),
        (" a@x.example RET=FULL", " a@x.example RET=FULL", []),
    ],
)
def test_trailing_finds_the_path_end_outside_quotes(text: str, left: str, taken: list[str]) -> None:
    """The aiosmtpd engine's split of a path from its DSN parameters."""
    assert dsnparams.trailing(text, dsnparams.MAIL_KEYWORDS) == (left, taken)
