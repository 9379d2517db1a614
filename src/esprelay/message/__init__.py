"""Everything esprelay does to a message's bytes, on one reading of its header.

- :mod:`.header` is the one header reader: where the header ends and which fields
  it holds.  Every consumer below (and the SMTP sender rules) reads fields through it.
- :mod:`.repair` makes what a client sent unambiguous (line endings, a header line
  that is not a field) and fixes the headers legacy devices get wrong.
- :mod:`.sender` says which addresses a message is sent as, the way the providers
  will put them in their requests.
- :mod:`.mime` is the parsed view for the JSON APIs; :mod:`.rawmime` rewrites raw
  MIME for the providers that send it as it is; :mod:`.dsn` builds bounces.
"""
