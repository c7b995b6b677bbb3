import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailplat.interfaces.queue import Envelope
from mailplat.interfaces.routing import LocalDestination, RemoteDestination, Route
from mailplat.queue.runner import QueueRunner
from mailplat.queue.sqlite import SQLiteQueue

from queuestore import openQueueAndStore

MSG = b"Subject: q\r\n\r\nbody\r\n"


def envelope(*dests, recipients=None):
    recipients = recipients or [f"r{i}@example.org" for i in range(len(dests))]
    return Envelope("s@example.net", tuple(recipients), routes=tuple(Route.deliver(d) for d in dests))


class QueueTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.dir = self.mktemp()
        self.queue = SQLiteQueue(self.dir, reactor, spillSize=64)
        yield self.queue.open()
        self.addCleanup(lambda: self.queue.close())

    @defer.inlineCallbacks
    def commit(self, env, content=MSG):
        t = self.queue.begin(env)
        for i in range(0, len(content), 7):
            t.write(content[i:i + 7])
        qid = yield t.commit()
        return qid

    @defer.inlineCallbacks
    def test_commitIsDurableAndSettles(self):
        qid = yield self.commit(envelope(LocalDestination("a@example.org"), LocalDestination("b@example.org")))
        self.assertFalse(os.path.exists(self.queue.path(qid)), "a small message is kept inline")
        [entry] = yield self.queue.due(reactor.seconds() + 1)
        self.assertEqual(entry.queueId, qid)
        self.assertEqual((entry.content, entry.path), (MSG, ""))
        self.assertEqual(entry.pending, ("r0@example.org", "r1@example.org"))
        self.assertEqual(entry.envelope.routes[1].destinations, (LocalDestination("b@example.org"),))
        yield self.queue.settle(qid, ["r0@example.org"], [], [("r1@example.org", "4.0.0 later")], retryAt=10 ** 10)
        self.assertEqual((yield self.queue.due(reactor.seconds() + 1)), [])
        [entry] = yield self.queue.listEntries()
        self.assertEqual(entry.pending, ("r1@example.org",))
        yield self.queue.settle(qid, ["r1@example.org"], [], [])
        self.assertEqual((yield self.queue.listEntries()), [])
        self.assertFalse(os.path.exists(self.queue.path(qid)))

    @defer.inlineCallbacks
    def test_largeMessageSpills(self):
        big = MSG * 1000
        qid = yield self.commit(envelope(LocalDestination("a@example.org")), big)
        with open(self.queue.path(qid), "rb") as f:
            self.assertEqual(f.read(), big)
        self.assertEqual(os.listdir(os.path.join(self.dir, "tmp")), [])

    @defer.inlineCallbacks
    def test_openingTheQueueElsewhereLeavesASpillBeingReceived(self):
        # Another process (a worker, the admin command) opens the same queue
        # while a large message is being received: that spill is locked and
        # stays; an unlocked leftover (a dead process's) is removed.
        big = MSG * 1000
        t = self.queue.begin(envelope(LocalDestination("a@example.org")))
        t.write(big)
        tmp = os.path.join(self.dir, "tmp")
        [spill] = os.listdir(tmp)
        with open(os.path.join(tmp, "in-leftover"), "wb") as f:
            f.write(b"never acknowledged")
        other = SQLiteQueue(self.dir, reactor, spillSize=64)
        yield other.open()
        self.addCleanup(other.close)
        self.assertEqual(os.listdir(tmp), [spill])
        qid = yield t.commit()
        with open(self.queue.path(qid), "rb") as f:
            self.assertEqual(f.read(), big)
        self.assertEqual(os.listdir(tmp), [])

    @defer.inlineCallbacks
    def test_largerThanInlineGoesToAFile(self):
        self.queue.inlineSize = 10
        self.queue.spillSize = 1 << 20
        qid = yield self.commit(envelope(LocalDestination("a@example.org")))
        with open(self.queue.path(qid), "rb") as f:
            self.assertEqual(f.read(), MSG)
        [entry] = yield self.queue.listEntries()
        self.assertIsNone(entry.content)
        yield self.queue.settle(qid, ["r0@example.org"], [], [])
        self.assertFalse(os.path.exists(self.queue.path(qid)))

    @defer.inlineCallbacks
    def test_abortLeavesNothing(self):
        t = self.queue.begin(envelope(LocalDestination("a@example.org")))
        t.write(MSG * 100)
        t.abort()
        self.assertEqual((yield self.queue.listEntries()), [])
        self.assertEqual(os.listdir(os.path.join(self.dir, "tmp")), [])

    @defer.inlineCallbacks
    def test_survivesReopen(self):
        qid = yield self.commit(envelope(LocalDestination("a@example.org")))
        yield self.queue.close()
        self.queue = SQLiteQueue(self.dir, reactor)
        yield self.queue.open()
        [entry] = yield self.queue.listEntries()
        self.assertEqual(entry.queueId, qid)

    @defer.inlineCallbacks
    def test_holdReleaseDelete(self):
        qid = yield self.commit(envelope(LocalDestination("a@example.org")))
        yield self.queue.hold(qid)
        self.assertEqual((yield self.queue.due(reactor.seconds() + 1)), [])
        yield self.queue.release(qid)
        self.assertEqual(len((yield self.queue.due(reactor.seconds() + 1))), 1)
        yield self.queue.delete(qid)
        self.assertEqual((yield self.queue.listEntries()), [])
        yield self.assertFailure(self.queue.delete(qid), KeyError)


class LeaseTests(unittest.TestCase):
    """What an SMTP worker process does with the mail it queues."""

    @defer.inlineCallbacks
    def setUp(self):
        yield openQueueAndStore(self, ["a@example.org"])
        self.queue.leaseLocal = 600

    @defer.inlineCallbacks
    def commit(self, env):
        t = self.queue.begin(env)
        t.write(MSG)
        qid = yield t.commit()
        return qid

    @defer.inlineCallbacks
    def test_localMailIsLeasedRemoteMailIsNot(self):
        local = envelope(LocalDestination("a@example.org"))
        remote = envelope(LocalDestination("a@example.org"), RemoteDestination("x@example.net"))
        self.assertTrue(self.queue.leased(local))
        self.assertFalse(self.queue.leased(remote))
        lq = yield self.commit(local)
        rq = yield self.commit(remote)
        now = reactor.seconds()
        # A scanning runner sees the remote one at once, the leased one only when its lease runs out.
        self.assertEqual([e.queueId for e in (yield self.queue.due(now + 1))], [rq])
        self.assertEqual(sorted(e.queueId for e in (yield self.queue.due(now + 601))), sorted([lq, rq]))
        self.queue.leaseLocal = 0
        self.assertFalse(self.queue.leased(local))

    @defer.inlineCallbacks
    def test_aRunnerWithoutScansDeliversWhatItIsGiven(self):
        runner = QueueRunner(self.queue, self.store, reactor=reactor, pollInterval=3600, concurrency=1, scan=False)
        self.queue.onCommitted(runner.take)
        runner.startService()
        for _ in range(3):
            yield self.commit(envelope(LocalDestination("a@example.org")))
        # One at a time (concurrency 1), the others waiting in memory: all delivered, no scan.
        for _ in range(50):
            yield runner.whenIdle()
            if not runner._waiting:
                break
        yield runner.stopService()
        info = yield self.store.getMailbox("a@example.org", "INBOX")
        self.assertEqual(info.messages, 3)
        self.assertEqual((yield self.queue.listEntries()), [])
        runner.kick()  # never scans
        self.assertIsNone(runner._scanning)

    @defer.inlineCallbacks
    def test_leasesOfAnEarlierRunAreReleasedWhenTheServerStarts(self):
        # The worker that leased it died with the server: the next start's
        # scanning runner delivers it at once, not when the lease runs out.
        lq = yield self.commit(envelope(LocalDestination("a@example.org")))
        self.assertEqual((yield self.queue.due(reactor.seconds() + 1)), [])
        runner = QueueRunner(self.queue, self.store, reactor=reactor, pollInterval=3600)
        runner.startService()
        for _ in range(50):
            yield runner.whenIdle()
            if not (yield self.queue.listEntries()):
                break
        yield runner.stopService()
        self.assertEqual((yield self.queue.listEntries()), [], lq)
        self.assertEqual((yield self.store.getMailbox("a@example.org", "INBOX")).messages, 1)


class Tagger:
    name = "tagger"
    errorPolicy = "retry"

    def matches(self, item):
        return tuple(d for d in item.destinations if d.user.startswith("a"))

    def process(self, item):
        item.content = b"X-Tag: yes\r\n" + item.content


class Broken:
    name = "broken"

    def __init__(self, policy):
        self.errorPolicy = policy

    def matches(self, item):
        return item.destinations

    def process(self, item):
        raise RuntimeError("boom")


class RunnerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        yield openQueueAndStore(self, ["a@example.org", "b@example.org"])

    @defer.inlineCallbacks
    def runEntry(self, env, processors=(), content=MSG):
        t = self.queue.begin(env)
        t.write(content)
        qid = yield t.commit()
        runner = QueueRunner(self.queue, self.store, processors, reactor=reactor, pollInterval=3600)
        runner.startService()
        yield runner.whenIdle()
        runner.kick()
        yield runner.whenIdle()
        yield runner.stopService()
        return qid

    @defer.inlineCallbacks
    def test_deliversToEveryLocalDestinationOnce(self):
        yield self.runEntry(envelope(LocalDestination("a@example.org"), LocalDestination("b@example.org")))
        for u in ("a@example.org", "b@example.org"):
            # final delivery puts the envelope sender first (RFC 5321 §4.4)
            self.assertEqual((yield self.store.getContent(u, "INBOX", 1)), b"Return-Path: <s@example.net>\r\n" + MSG)
        self.assertEqual((yield self.queue.listEntries()), [])

    @defer.inlineCallbacks
    def test_returnPathOfANullSenderAndOfContentKeptInAFile(self):
        """A bounce's Return-Path is <>; a message the queue keeps in a file gets its Return-Path too."""
        big = MSG + b"x" * 300_000 + b"\r\n"
        env = Envelope("", ("a@example.org",), routes=(Route.deliver(LocalDestination("a@example.org")),))
        yield self.runEntry(env, content=big)
        self.assertEqual((yield self.store.getContent("a@example.org", "INBOX", 1)), b"Return-Path: <>\r\n" + big)
        self.assertEqual((yield self.queue.listEntries()), [])

    @defer.inlineCallbacks
    def test_redeliveryAfterCrashIsExactlyOnce(self):
        qid = yield self.runEntry(envelope(LocalDestination("a@example.org")))
        # As if the process died after delivery but before settling: deliver again.
        yield self.store.append("a@example.org", "INBOX", MSG, deliveryId=f"{qid}:a@example.org:INBOX")
        self.assertEqual(len((yield self.store.fetchMeta("a@example.org", "INBOX"))), 1)

    @defer.inlineCallbacks
    def test_processorSeesOnlyMatchedDestinations(self):
        yield self.runEntry(envelope(LocalDestination("a@example.org"), LocalDestination("b@example.org")), [Tagger()])
        a = yield self.store.getContent("a@example.org", "INBOX", 1)
        b = yield self.store.getContent("b@example.org", "INBOX", 1)
        self.assertTrue(a.startswith(b"Return-Path: <s@example.net>\r\nX-Tag: yes\r\n"))
        self.assertEqual(b, b"Return-Path: <s@example.net>\r\n" + MSG, "a processor applies only to the destinations it matched")

    @defer.inlineCallbacks
    def test_errorPolicies(self):
        yield self.runEntry(envelope(LocalDestination("a@example.org")), [Broken("skip")])
        self.assertEqual(len((yield self.store.fetchMeta("a@example.org", "INBOX"))), 1)
        yield self.runEntry(envelope(LocalDestination("b@example.org")), [Broken("retry")])
        self.assertEqual(len((yield self.store.fetchMeta("b@example.org", "INBOX"))), 0)
        [entry] = yield self.queue.listEntries()
        self.assertEqual(entry.attempts, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    @defer.inlineCallbacks
    def test_remoteWithoutOutboundStaysDeferred(self):
        yield self.runEntry(envelope(RemoteDestination("x@elsewhere.example"), LocalDestination("a@example.org")))
        [entry] = yield self.queue.listEntries()
        self.assertEqual(entry.pending, ("r0@example.org",))
        details = yield self.queue.details(entry.queueId)
        self.assertIn(("r0@example.org", "deferred", "4.4.0 no outbound transport configured"), details[1])
        self.assertEqual(len((yield self.store.fetchMeta("a@example.org", "INBOX"))), 1)

    @defer.inlineCallbacks
    def test_unknownAccountFails(self):
        yield self.runEntry(envelope(LocalDestination("gone@example.org")))
        self.assertEqual((yield self.queue.listEntries()), [])
