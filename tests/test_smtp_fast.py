"""The native engine's path parser answers exactly what aiosmtpd's own parser answers.

The native engine parses plain ``<local@domain>`` paths without the email package
(:func:`esprelay.smtp.handler.simple_path`) and hands every other path to aiosmtpd's
parser; both are compared with aiosmtpd's on generated paths.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esprelay.smtp.engine import SMTPSession
from esprelay.smtp.handler import simple_path

# region MAIL/RCPT paths


class _Limits:
    local_part_limit = 0


def _aiosmtpd_getaddr(arg: str, limit: int = 0) -> Any:
    holder = _Limits()
    holder.local_part_limit = limit
    try:
        return SMTP._getaddr(holder, arg)  # type: ignore[arg-type]
    except Exception as exc:  # the parser raises IndexError on "<", for one
        return type(exc)


def _our_getaddr(arg: str) -> Any:
    holder = SMTPSession.__new__(SMTPSession)
    try:
        return SMTPSession._getaddr(holder, arg)
    except Exception as exc:
        return type(exc)


_ATEXT = "aZ09-!#$%&'*+/=?^_`{|}~"
_atom = st.text(st.sampled_from(list(_ATEXT)), min_size=1, max_size=6)
_dot_atom = st.lists(_atom, min_size=1, max_size=3).map(".".join)
_anything = st.text(
    st.sampled_from(list('<>@."()[]:;,\\ \t=?aZ0-!%é\x85\xa0\x00\r\n\udcff~')), max_size=14
)
_after = st.sampled_from(["", " ", "\t", "  ", " (c)", "(c)", "\x85", " \xa0", " =?"])
_paths = st.one_of(
    _anything,
    st.builds(lambda a, b, c, d: f"<{a}@{b}>{c}{d}", _dot_atom, _dot_atom, _after, _anything),
    st.builds(lambda a, b: f"<{a}>{b}", _anything, _after),
    st.builds(lambda a, b: f"<>{a}{b}", _after, _anything),
    st.builds(lambda a, b: f"{a}<{b}", _anything, _anything),
)


@settings(max_examples=3000, suppress_health_check=list(HealthCheck), deadline=None)
@given(_paths)
def test_paths_parse_like_aiosmtpd(arg: str) -> None:
    assert _our_getaddr(arg) == _aiosmtpd_getaddr(arg)
    fast = simple_path(arg)
    if fast is not None:
        assert fast == _aiosmtpd_getaddr(arg)


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.example>",
        "<first.last@mail.example.org> SIZE=2048 BODY=8BITMIME",
        "<>",
        "<> SIZE=10",
        "<x+tag@d-1.example>\tSIZE=1",
    ],
)
def test_common_paths_take_the_fast_path(arg: str) -> None:
    assert simple_path(arg) is not None
    assert simple_path(arg) == _aiosmtpd_getaddr(arg)


@pytest.mark.parametrize(
    "arg",
    ['<"q"@b.example>', "<@r.example:a@b.example>", "<a@[127.0.0.1]>", "<a@b> (c)", "<a@b", "<"],
)
def test_unusual_paths_go_to_aiosmtpd(arg: str) -> None:
    assert simple_path(arg) is None


# endregion
