"""Direct delivery (mailplat.queue.direct): one local mailbox at the end of DATA, the queue for the rest."""

from twisted.internet import defer
from twisted.trial import unittest

from mailplat.interfaces.queue import Envelope
from mailplat.interfaces.routing import LocalDestination, RemoteDestination, Route
from mailplat.metrics import Metrics
from mailplat.queue.direct import DirectDelivery

from queuestore import openQueueAndStore

MSG = b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: d\r\n\r\nbody\r\n"
A = "a@example.org"


def envelope(*routes, recipients=None, rcptParams=()):
    recipients = recipients or tuple(f"r{i}@example.org" for i in range(len(routes)))
    return Envelope("s@example.net", tuple(recipients), rcptParams=tuple(rcptParams),
                    routes=tuple(Route.deliver(*r) for r in routes))


class DirectDeliveryTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        yield openQueueAndStore(self, [A])
        self.metrics = Metrics()
        self.front = DirectDelivery(self.queue, self.store, self.metrics, maxSize=1000)

    @defer.inlineCallbacks
    def send(self, env, content=MSG):
        t = self.front.begin(env)
        for i in range(0, len(content), 5):
            t.write(content[i:i + 5])
        qid = yield t.commit()
        queued = yield self.queue.listEntries()
        inbox = yield self.store.getMailbox(A, "INBOX")
        return qid, [e.queueId for e in queued], inbox.messages

    @defer.inlineCallbacks
    def test_oneLocalMailboxIsStoredAtOnce(self):
        qid, queued, stored = yield self.send(envelope([LocalDestination(A)]))
        self.assertEqual((queued, stored), ([], 1))
        self.assertRegex(qid, r"^[0-9A-F]{16}$")
        content = yield self.store.getContent(A, "INBOX", 1)
        # final delivery puts the envelope sender first (RFC 5321 §4.4)
        self.assertEqual(content, b"Return-Path: <s@example.net>\r\n" + MSG)
        self.assertEqual(self.metrics.get("mailplat_messages_delivered_total"), 1)

    @defer.inlineCallbacks
    def test_whatTheRunnerMustHandleIsQueued(self):
        cases = [
            envelope([LocalDestination(A)], [LocalDestination(A)]),  # two recipients
            envelope([LocalDestination(A), LocalDestination(A, "Archive")]),  # two mailboxes
            envelope([RemoteDestination("x@example.net")]),
            envelope([LocalDestination(A)], rcptParams=[{"NOTIFY": "SUCCESS"}]),
            envelope([LocalDestination("nobody@example.org")]),  # the store refuses: the runner bounces
            envelope([LocalDestination(A, "NoSuchBox")]),  # the runner falls back to INBOX
        ]
        for i, env in enumerate(cases):
            qid, queued, stored = yield self.send(env)
            self.assertIn(qid, queued, f"case {i}")
            self.assertEqual(stored, 0, f"case {i}")
        # Too big to keep in memory for it, and a mail loop.
        qid, queued, stored = yield self.send(envelope([LocalDestination(A)]), MSG * 20)
        self.assertIn(qid, queued)
        qid, queued, stored = yield self.send(envelope([LocalDestination(A)]), MSG.split(b"Subject")[0] * 51 + MSG)
        self.assertIn(qid, queued)
        self.assertEqual(stored, 0)
        self.assertEqual(len(queued), len(cases) + 2)

    @defer.inlineCallbacks
    def test_aFailingStoreFallsBackToTheQueue(self):
        from mailplat.interfaces.storage import TemporaryStoreFailure

        class Failing:
            def append(self, *a, **kw):
                return defer.fail(TemporaryStoreFailure("down"))

        self.front.store = Failing()
        qid, queued, _ = yield self.send(envelope([LocalDestination(A)]))
        self.assertEqual(queued, [qid])
        self.assertEqual(self.metrics.get("mailplat_messages_delivered_total"), 0)

    @defer.inlineCallbacks
    def test_abortLeavesNothing(self):
        t = self.front.begin(envelope([LocalDestination(A)]))
        t.write(MSG)
        t.abort()
        self.assertEqual((yield self.queue.listEntries()), [])
        self.assertEqual((yield self.store.getMailbox(A, "INBOX")).messages, 0)
