"""
The queue runner with remote recipients: outcomes per recipient, retries,
delay and expiry, and the delivery status notifications it queues (parsed
back with Python's email package).
"""

import email
from email import policy

from twisted.internet import defer, reactor
from twisted.trial import unittest

from queuestore import openQueueAndStore

from mailplat.interfaces.queue import Envelope
from mailplat.interfaces.routing import LocalDestination, RemoteDestination, Route
from mailplat.outbound.client import Result
from mailplat.queue.notify import Notifier
from mailplat.queue.runner import QueueRunner
from mailplat.testing import StaticRouter

MSG = b"From: sender@example.org\r\nTo: x@remote.test\r\nSubject: outbound\r\n\r\nhello\r\n"


class ScriptedTransport:
    """Answers from a dict address -> (state, status, diagnostic); records every call."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def deliver(self, sender, recipients, content, ret=None, envid=None, needsSMTPUTF8=False):
        self.calls.append((sender, [(r.address, r.notify, r.orcpt) for r in recipients], content, ret, envid))
        out = []
        for r in recipients:
            state, status, text = self.answers.get(r.address, ("delivered", "2.0.0", "250 2.0.0 ok"))
            out.append(Result(r.address, state, status, text, "mx.remote.test"))
        return defer.succeed(out)


class RunnerOutboundTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        yield openQueueAndStore(self, ["sender@example.org", "local@example.org"])
        self.router = StaticRouter(domains=["example.org"], users=["sender@example.org", "local@example.org"])
        self.transport = ScriptedTransport({})

    @defer.inlineCallbacks
    def runQueue(self, rounds=1, **kw):
        runner = QueueRunner(self.queue, self.store, reactor=reactor, pollInterval=3600, outbound=self.transport,
                             notifier=Notifier(self.queue, self.router, "mx.example.org", reactor), **kw)
        runner.startService()
        for _ in range(rounds):
            yield runner.whenIdle()
            yield self.queue.retryNow()
            runner.kick()
            yield runner.whenIdle()
        yield runner.stopService()

    @defer.inlineCallbacks
    def submit(self, recipients, sender="sender@example.org", rcptParams=None, mailParams=None, content=MSG):
        routes = tuple(Route.deliver(LocalDestination(r) if r.endswith("@example.org") else RemoteDestination(r))
                       for r in recipients)
        env = Envelope(sender, tuple(recipients), mailParams=mailParams or {},
                       rcptParams=tuple(rcptParams or [{} for _ in recipients]), routes=routes)
        t = self.queue.begin(env)
        t.write(content)
        qid = yield t.commit()
        return qid

    @defer.inlineCallbacks
    def notices(self, user="sender@example.org"):
        metas = yield self.store.fetchMeta(user, "INBOX")
        out = []
        for m in metas:
            raw = yield self.store.getContent(user, "INBOX", m.uid)
            out.append(email.message_from_bytes(raw, policy=policy.default))
        return out

    @defer.inlineCallbacks
    def test_permanentFailureBouncesToTheSender(self):
        self.transport.answers["bad@remote.test"] = ("failed", "5.1.1", "550 5.1.1 no such user")
        qid = yield self.submit(["ok@remote.test", "bad@remote.test"], mailParams={"ENVID": "ENV1"},
                                rcptParams=[{}, {"ORCPT": "rfc822;bad@remote.test"}])
        yield self.runQueue()
        self.assertEqual((yield self.queue.listEntries()), [])
        [notice] = yield self.notices()
        self.assertEqual(notice["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(notice.get_content_type(), "multipart/report")
        _, status, returned = notice.get_payload()
        perMessage, perRecipient = status.get_payload()
        self.assertEqual(perMessage["Reporting-MTA"], "dns; mx.example.org")
        self.assertEqual(perMessage["Original-Envelope-Id"], "ENV1")
        self.assertEqual(perMessage["X-Mailplat-Queue-ID"], qid)
        self.assertEqual(perRecipient["Final-Recipient"], "rfc822; bad@remote.test")
        self.assertEqual(perRecipient["Original-Recipient"], "rfc822; bad@remote.test")
        self.assertEqual((perRecipient["Action"], perRecipient["Status"]), ("failed", "5.1.1"))
        self.assertEqual(perRecipient["Remote-MTA"], "dns; mx.remote.test")
        self.assertEqual(perRecipient["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")
        self.assertEqual(returned.get_payload()[0]["Subject"], "outbound")
        # One transaction for both remote recipients.
        self.assertEqual(len(self.transport.calls), 1)

    @defer.inlineCallbacks
    def test_notifyNeverAndNullSender(self):
        self.transport.answers["bad@remote.test"] = ("failed", "5.1.1", "550 no")
        yield self.submit(["bad@remote.test"], rcptParams=[{"NOTIFY": "NEVER"}])
        yield self.submit(["bad@remote.test"], sender="")
        yield self.runQueue()
        self.assertEqual((yield self.notices()), [])
        self.assertEqual((yield self.queue.listEntries()), [])

    @defer.inlineCallbacks
    def test_successAndRelayedNotices(self):
        self.transport.answers["relay@remote.test"] = ("relayed", "2.0.0", "250 ok")
        yield self.submit(["ok@remote.test", "relay@remote.test", "local@example.org"],
                          rcptParams=[{"NOTIFY": "SUCCESS"}, {"NOTIFY": "SUCCESS,FAILURE"}, {"NOTIFY": "SUCCESS"}],
                          mailParams={"RET": "HDRS"})
        yield self.runQueue()
        notices = yield self.notices()
        self.assertEqual(len(notices), 2)
        byAction = {}
        for n in notices:
            for block in n.get_payload()[1].get_payload()[1:]:
                byAction.setdefault(block["Action"], []).append(block["Final-Recipient"])
        # Relayed to a DSN-capable next hop: reporting success is that hop's job (RFC 3461 6.2).
        self.assertEqual(sorted(byAction["delivered"]), ["rfc822; local@example.org"])
        self.assertEqual(byAction["relayed"], ["rfc822; relay@remote.test"])
        # Success notices carry only the header of the original.
        for n in notices:
            self.assertEqual(n.get_payload()[2].get_content_type(), "text/rfc822-headers")

    @defer.inlineCallbacks
    def test_deferredRetriedWithoutResendingTheDelivered(self):
        self.transport.answers["later@remote.test"] = ("deferred", "4.2.2", "452 4.2.2 mailbox full")
        yield self.submit(["ok@remote.test", "later@remote.test"])
        yield self.runQueue()
        [entry] = yield self.queue.listEntries()
        self.assertEqual(entry.pending, ("later@remote.test",))
        self.assertEqual(entry.done, ("remote:ok@remote.test",))
        del self.transport.answers["later@remote.test"]
        yield self.runQueue()
        self.assertEqual((yield self.queue.listEntries()), [])
        sent = [addr for call in self.transport.calls for addr, _, _ in call[1]]
        self.assertEqual(sent.count("ok@remote.test"), 1, "a delivered destination is never sent again")
        self.assertGreaterEqual(sent.count("later@remote.test"), 2)
        self.assertEqual((yield self.notices()), [], "nothing to report without NOTIFY=SUCCESS")

    @defer.inlineCallbacks
    def test_delayWarningOnceThenExpiry(self):
        self.transport.answers["slow@remote.test"] = ("deferred", "4.4.1", "connection timed out")
        yield self.submit(["slow@remote.test"])
        yield self.runQueue(rounds=2, delayWarning=0)
        [notice] = yield self.notices()
        self.assertEqual(notice["Subject"], "Delayed Mail (still being retried)")
        block = notice.get_payload()[1].get_payload()[1]
        self.assertEqual((block["Action"], block["Status"]), ("delayed", "4.4.1"))
        self.assertIn("Will-Retry-Until", block)
        self.assertEqual(len((yield self.queue.listEntries())), 1)
        yield self.runQueue(delayWarning=0, maxLifetime=0)
        self.assertEqual((yield self.queue.listEntries()), [])
        notices = yield self.notices()
        self.assertEqual(len(notices), 2)
        block = notices[1].get_payload()[1].get_payload()[1]
        self.assertEqual((block["Action"], block["Status"]), ("failed", "4.4.7"))
        self.assertIn("delivery time expired", block["Diagnostic-Code"])

    @defer.inlineCallbacks
    def test_mailLoopFails(self):
        looping = b"".join(b"Received: from a by b; Sun, 22 Nov 2026 10:00:00 +0000\r\n" for _ in range(60)) + MSG
        yield self.submit(["x@remote.test"], content=looping)
        yield self.runQueue()
        self.assertEqual(self.transport.calls, [])
        [notice] = yield self.notices()
        block = notice.get_payload()[1].get_payload()[1]
        self.assertEqual(block["Status"], "5.4.6")

    @defer.inlineCallbacks
    def test_noOutboundTransportDefers(self):
        self.transport = None
        yield self.submit(["x@remote.test"])
        runner = QueueRunner(self.queue, self.store, reactor=reactor, pollInterval=3600)
        runner.startService()
        yield runner.whenIdle()
        yield runner.stopService()
        [entry] = yield self.queue.listEntries()
        details = yield self.queue.details(entry.queueId)
        self.assertEqual(details[1][0][1:], ("deferred", "4.4.0 no outbound transport configured"))
