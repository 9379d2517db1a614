"""A test kit for providers, esprelay's own and third-party ones.

- :mod:`.fakeesp`: a real HTTP server on loopback that records every request and
  answers as a test scripts it (``with FakeESP(respond) as esp: ... esp.url``).
- :mod:`.conformance`: the checks every HTTP provider passes (the request builder is
  pure, the envelope decides who receives, a Bcc is never shown, errors map onto the
  transient/permanent tree); call them from your provider's own tests.
"""
