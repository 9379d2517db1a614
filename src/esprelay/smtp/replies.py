"""Every fixed SMTP reply esprelay writes, each defined once, for both engines.

A reply that answers an error of :mod:`esprelay.errors` is that error's
``smtp_reply`` (:func:`esprelay.errors.smtp_reply` picks it); the others are the
dialogue's own.  Most texts are aiosmtpd 1.4's (the native engine answers as it does,
tests/test_smtp_engines.py compares the two byte for byte); the ones with an enhanced
status code (RFC 3463) are esprelay's.
"""

from __future__ import annotations

from esprelay.errors import EsprelayError, ShuttingDown

# region session limits (421 closes the connection)
SHUTTING_DOWN = ShuttingDown.smtp_reply
LOCAL_ERROR = EsprelayError.smtp_reply  # a bug in a hook, an unexpected error
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
TOO_MANY_JUNK_COMMANDS = "421 4.7.0 Too many commands without mail, closing connection"
TIMEOUT = "421 4.4.2 Timeout exceeded, closing connection"
SESSION_TOO_LONG = "421 4.4.2 Session lasted too long, closing connection"
TOO_MANY_UNKNOWN_COMMANDS = "502 5.5.1 Too many unrecognized commands, goodbye."
# endregion
