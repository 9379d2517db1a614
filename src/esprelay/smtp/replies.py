"""Every fixed SMTP reply esprelay writes, each defined once, for both engines.

A reply that answers an error of :mod:`esprelay.errors` is that error's
``smtp_reply``, and :func:`esprelay.errors.smtp_reply` picks it for an exception (any
other exception, a bug in a hook, is answered ``451 4.3.0``, ``EsprelayError``'s); the
others are the dialogue's own.  The texts without an enhanced status code (RFC 3463) are
aiosmtpd 1.4's: its engine writes them itself, the native engine writes the same ones
(tests/test_smtp_engines.py compares the two byte for byte).  A name ending in ``_F``
is a template for :meth:`str.format`.
"""

from __future__ import annotations

from esprelay.errors import ShuttingDown

# region the session: greeting, limits (421 closes the connection)
SHUTTING_DOWN = ShuttingDown.smtp_reply
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
TOO_MANY_JUNK_COMMANDS = "421 4.7.0 Too many commands without mail, closing connection"
TIMEOUT = "421 4.4.2 Timeout exceeded, closing connection"
SESSION_TOO_LONG = "421 4.4.2 Session lasted too long, closing connection"
TOO_MANY_UNKNOWN_COMMANDS = "502 5.5.1 Too many unrecognized commands, goodbye."
# endregion

# region commands
OK = "250 OK"
BYE = "221 Bye"
LINE_TOO_LONG = "500 Command line too long"
BAD_SYNTAX = "500 Error: bad syntax"
#: Never echoes the unknown line: it may be a credential sent after a refused AUTH.
UNKNOWN_COMMAND = "500 5.5.2 Error: command not recognized"
SEND_HELO_F = "503 Error: send {} first"
HELO_SYNTAX = "501 Syntax: HELO hostname"
EHLO_SYNTAX = "501 Syntax: EHLO hostname"
QUIT_SYNTAX = "501 Syntax: QUIT"
RSET_SYNTAX = "501 Syntax: RSET"
DATA_SYNTAX = "501 Syntax: DATA"
STARTTLS_SYNTAX = "501 Syntax: STARTTLS"
VRFY_SYNTAX = "501 5.5.4 Syntax: VRFY <address>"
#: Never confirms or denies an address (RFC 5321 3.5.3 allows 252), never echoes it.
CANNOT_VRFY = "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery"
NO_EXPN = "502 EXPN not implemented"
HELP_F = "{} Supported commands: {}"
HELP_SYNTAX = "250 Syntax: "
# endregion

# region MAIL and RCPT
MAIL_SYNTAX = "501 Syntax: MAIL FROM: <address>"
RCPT_SYNTAX = "501 Syntax: RCPT TO: <address>"
EXTENDED_SYNTAX = " [SP <mail-parameters>]"
MALFORMED_PATH = "553 5.1.3 Error: malformed address"
NESTED_MAIL = "503 Error: nested MAIL command"
NEED_MAIL = "503 Error: need MAIL command"
NEED_RCPT = "503 Error: need RCPT command"
BAD_BODY = "501 Error: BODY can only be one of 7BIT, 8BITMIME"
BAD_SMTPUTF8 = "501 Error: SMTPUTF8 takes no arguments"
SIZE_TOO_LARGE = "552 Error: message size exceeds fixed maximum message size"
MAIL_PARAMETERS = "555 MAIL FROM parameters not recognized or not implemented"
RCPT_PARAMETERS = "555 RCPT TO parameters not recognized or not implemented"
# The relay's own checks (esprelay.smtp.handler)
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
DUPLICATE_RECIPIENT = "250 2.1.5 Recipient OK (duplicate ignored)"
TOO_MANY_RECIPIENTS_F = "452 4.5.3 Too many recipients (at most {} per message)"
NULL_ADDRESS = "553 5.1.3 Error: null address not allowed here"
SOURCE_ROUTE = "553 5.7.1 Error: source routes and % or ! relaying are not supported"
MALFORMED_ADDRESS = "553 5.1.3 Error: malformed address (expected local-part@domain)"
#: RFC 6531 3.7.4.1: a non-ASCII address without SMTPUTF8.
NEEDS_SMTPUTF8 = "553 5.6.7 Error: non-ASCII address needs the SMTPUTF8 parameter"
#: Bytes that are not UTF-8 (with or without SMTPUTF8): a malformed address.
NOT_UTF8 = "501 5.1.3 Error: address is not valid UTF-8"
#: RFC 6531 3.7.4.1: an address with no ASCII form (a UTF-8 local part) for a provider
#: of the route that takes ASCII only (a domain is sent to it as Punycode).
UTF8_NOT_CARRIED = "553 5.6.7 Error: non-ASCII address not supported by the provider"
#: RFC 3461: a NOTIFY, ORCPT, RET or ENVID that is malformed or repeated.
BAD_DSN_PARAMETER_F = "501 5.5.4 Error: invalid {} parameter"
SENDER_NOT_ALLOWED_F = "553 5.7.1 Sender address not allowed: {}"
#: The From/Sender the providers would send is not allowed (esprelay.message.sender).
HEADER_SENDER_NOT_ALLOWED_F = "550 5.7.1 {}"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
STARTTLS_AND_AUTH_REQUIRED = "530 5.7.0 Must issue a STARTTLS command and authenticate first"
# endregion

# region DATA (esprelay.smtp.dataread: both refusals come after the final dot)
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
DATA_LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
TOO_MUCH_DATA = "552 Error: Too much mail data"
# The end of DATA (esprelay.intake): a spool error answers its own smtp_reply.
QUEUED_F = "250 2.0.0 Ok: queued as {}"
FAILED_INLINE_F = "554 5.0.0 Delivery failed permanently: {}"
DELIVERED_F = "250 2.0.0 Ok: delivered as {} ({})"
REJECTED_F = "554 5.0.0 Rejected by the provider: {}"
#: A provider of the route could never send the message as it is (Provider.refusal).
PROVIDER_REFUSED_F = "550 5.6.0 {}"
#: Signed or encrypted MIME that a provider of the route would have to rebuild
#: (ESPRELAY_SIGNED_MESSAGES=refuse); RFC 3463 X.6.3, conversion not supported.
SIGNED_REFUSED_F = "554 5.6.3 {}"
PROVIDER_UNAVAILABLE_F = "451 4.4.0 Provider unavailable, try again later: {}"
# endregion

# region STARTTLS
READY_FOR_TLS = "220 Ready to start TLS"
TLS_ACTIVE = "503 5.5.1 TLS already active"
NO_TLS = "454 TLS not available"
# endregion

# region AUTH
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_UNAVAILABLE = "502 5.5.1 AUTH not available"
AUTH_BLOCKED = "454 4.7.0 Too many failed logins, try again later"
AUTH_NOT_RECOGNIZED = "500 Error: command 'AUTH' not recognized"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_ALREADY = "503 Already authenticated"
AUTH_NO_VALUE = "501 Not enough value"
AUTH_TOO_MANY_VALUES = "501 Too many values"
AUTH_UNKNOWN_MECHANISM = "504 5.5.4 Unrecognized authentication type"
AUTH_CANNOT_SPLIT = "501 5.5.2 Can't split auth value"
AUTH_ABORTED = "501 5.7.0 Auth aborted"
AUTH_BAD_BASE64 = "501 5.5.2 Can't decode base64"
# endregion
