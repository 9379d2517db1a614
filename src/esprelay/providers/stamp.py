"""esprelay's own id on the send request, for the ESP to echo in its events.

An ESP's event (a bounce, a delivery) names the message by the ESP's own id, and some
events carry none (SendGrid's asynchronous bounces).  So every adapter whose ESP echoes
a value of the sender's choosing sends the spool id (``OutboundMessage.id``) under the
reserved key :data:`ID_KEY`: SendGrid ``custom_args``, Mailgun ``v:esprelay_id``, SES
``EmailTags``, Postmark ``Metadata``, Resend ``tags``, SparkPost ``metadata``; Mailjet
sends it as ``CustomID``.  Brevo gets none (see :mod:`esprelay.providers.brevo`).
The event normalisers (:mod:`esprelay.events`) read it back under the same key.

The reserved key is esprelay's: a value the message's own control headers give under it
(``X-SMTPAPI`` unique_args, ``X-Mailgun-Variables``, ``X-SES-MESSAGE-TAGS``,
``X-PM-Metadata-esprelay_id``...) is dropped with a warning, since an event must lead
back to the message esprelay sent; the message's other keys pass unchanged.  When the
id would take an ESP past its limit (count or size of its arguments), the message's own
values are kept and the id is left out, with a warning: the message still goes, and its
events are matched by the ESP's message id instead (``find_by_provider_message_id`` of
the spools).
"""

from __future__ import annotations

from collections.abc import Mapping

#: The key under which esprelay's id travels (the events read the same one).
ID_KEY = "esprelay_id"


def without_ours(
    values: Mapping[str, str], where: str, *, fold_case: bool = False
) -> tuple[dict[str, str], tuple[str, ...]]:
    """``values`` without a key that is :data:`ID_KEY` (in any case when the ESP treats
    keys without case, ``fold_case``), and the warning that says one was dropped."""
    kept = {
        key: value for key, value in values.items() if (key.lower() if fold_case else key) != ID_KEY
    }
    if len(kept) == len(values):
        return kept, ()
    return kept, (dropped_warning(where),)


def dropped_warning(where: str) -> str:
    return f"{where}: the message's own {ID_KEY!r} was dropped (the key is esprelay's id)"


def left_out_warning(why: str) -> str:
    return f"esprelay's id was not sent ({why}): the ESP's events match by its message id"
