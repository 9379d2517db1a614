"""Cheaper aiosmtpd sessions: answer its per-connection introspection from a cache.

aiosmtpd's ``SMTP.__init__`` runs for every connection and finds its hooks by
introspection: ``inspect.getmembers()`` of the protocol and of the handler (for
``auth_*``), ``dir(handler)`` (for ``handle_*``) and ``dir(self)`` (for ``smtp_*``).
``getmembers`` reads every attribute of both objects, so that alone cost ~0.45 ms of CPU
per connection, about as much as the rest of an SMTP transaction (bench/README.md).

Classes that mix in :class:`HookDirCache` answer ``dir()`` with only the names that
aiosmtpd looks for, computed once per class.  The hooks are class attributes, so the
answer cannot change between two instances of one class; ``dir()`` of such an object
lists its hooks only, which is the one use aiosmtpd (and we) make of it.
"""

from __future__ import annotations

import weakref

HOOK_PREFIXES = ("smtp_", "auth_", "handle_")
# Weak keys: a listener makes its own subclass, and tests make many listeners.
_names: weakref.WeakKeyDictionary[type, list[str]] = weakref.WeakKeyDictionary()


class HookDirCache:
    """Mix in before aiosmtpd's ``SMTP`` (or into a handler) to cache its hook names."""

    __slots__ = ()

    def __dir__(self) -> list[str]:
        cls = type(self)
        names = _names.get(cls)
        if names is None:
            names = sorted(name for name in object.__dir__(self) if name.startswith(HOOK_PREFIXES))
            _names[cls] = names
        return list(names)
