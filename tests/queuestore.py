"""A real SQLite queue and store for a trial test, opened in setUp and closed after it."""

import os

from twisted.internet import defer, reactor

from mailplat.queue.sqlite import SQLiteQueue
from mailplat.store.sqlite import SQLiteStore


@defer.inlineCallbacks
def openQueueAndStore(test, accounts=()):
    """Set C{test.queue} and C{test.store} (under C{test.mktemp()}), with C{accounts} created."""
    base = test.mktemp()
    test.queue = SQLiteQueue(os.path.join(base, "q"), reactor)
    test.store = SQLiteStore(os.path.join(base, "s"), reactor)
    yield test.queue.open()
    yield test.store.open()
    test.addCleanup(lambda: test.store.close())
    test.addCleanup(lambda: test.queue.close())
    for account in accounts:
        yield test.store.createAccount(account)
