"""Listener bookkeeping shared by the stores (L{IMessageStore.addListener})."""

from __future__ import annotations


from mailplat.log import Logger

_log = Logger()


class Listeners:
    """Callables per account, called with each L{MailboxEvent}; one failing never stops the others."""

    def __init__(self):
        self._byUser: dict[str, list] = {}

    def add(self, user, listener):
        """Register C{listener} for C{user}; returns a callable that removes it."""
        self._byUser.setdefault(user, []).append(listener)

        def remove():
            try:
                self._byUser.get(user, []).remove(listener)
            except ValueError:
                pass

        return remove

    def users(self) -> list:
        """The accounts that have listeners now."""
        return [user for user, listeners in self._byUser.items() if listeners]

    def emit(self, event):
        for listener in list(self._byUser.get(event.user, ())):
            try:
                listener(event)
            except Exception:
                _log.failure("mailbox listener failed on {kind} in {mailbox}", kind=event.kind, mailbox=event.mailbox)
