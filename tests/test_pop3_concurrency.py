"""
Many POP3 sessions at once: 100 clients on 100 different maildrops of one
real SQLite store, over real TCP connections on 127.0.0.1, each running a
whole pipelined session (login, STAT, LIST, UIDL, RETR, DELE, QUIT) at the
same time as the others.
"""

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from mailplat.pop3 import wire
from mailplat.pop3.server import POP3Factory
from mailplat.store.sqlite import SQLiteStore
from mailplat.testing import memoryPortal

SESSIONS = 100


def message(user, i):
    # Bare LF and a dot line in every third message.
    if i == 2:
        return b"From: a@example.org\nSubject: %s %d\n\n.\nbody\n" % (user.encode(), i)
    return b"From: a@example.org\r\nSubject: %s %d\r\n\r\n%s\r\n" % (user.encode(), i, b"x" * (100 * i))


class Transcript(protocol.Protocol):
    def __init__(self, script):
        self.script = script
        self.data = bytearray()
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.script)

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(bytes(self.data))


class ConcurrentSessionsTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.store = SQLiteStore(self.mktemp(), reactor)
        yield self.store.open()
        self.addCleanup(self.store.close)
        self.users = {f"user{n}@example.org": f"pw{n}" for n in range(SESSIONS)}
        yield defer.gatherResults([self.store.createAccount(u) for u in self.users])
        yield defer.gatherResults(
            [self.store.append(u, "INBOX", message(u, i)) for u in self.users for i in range(3)]
        )
        factory = POP3Factory(hostname="pop.example.org", portal=memoryPortal(self.users), store=self.store,
                              reactor=reactor, apop=False)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def expected(self, user, password, metas, uidvalidity):
        contents = [message(user, i) for i in range(3)]
        sizes = [wire.normalisedSize(c) for c in contents]
        out = [
            b"+OK pop.example.org POP3 server ready\r\n",
            b"+OK Send your password\r\n",
            b"+OK Logged in, 3 messages\r\n",
            b"+OK 3 %d\r\n" % sum(sizes),
            b"+OK 3 messages (%d octets)\r\n" % sum(sizes),
            b"".join(b"%d %d\r\n" % (i, s) for i, s in enumerate(sizes, 1)) + b".\r\n",
            b"+OK Unique-ID listing follows\r\n",
            b"".join(b"%d %d-%d\r\n" % (i, uidvalidity, m.uid) for i, m in enumerate(metas, 1)) + b".\r\n",
        ]
        for content, size in zip(contents, sizes):
            out.append(b"+OK %d octets\r\n" % size)
            out.append(b"".join(wire.encodeMessage([content])))
        out += [b"+OK Message 1 deleted\r\n", b"+OK pop.example.org POP3 server signing off (1 messages deleted)\r\n"]
        return b"".join(out)

    @defer.inlineCallbacks
    def test_hundred_concurrent_sessions(self):
        expectations = {}
        for user, password in self.users.items():
            metas = yield self.store.fetchMeta(user, "INBOX")
            info = yield self.store.getMailbox(user, "INBOX")
            expectations[user] = self.expected(user, password, metas, info.uidvalidity)
        clients = []
        for user, password in self.users.items():
            script = (b"USER %s\r\nPASS %s\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nRETR 2\r\nRETR 3\r\nDELE 1\r\nQUIT\r\n"
                      % (user.encode(), password.encode()))
            client = Transcript(script)
            clients.append((user, client))
            protocol.ClientCreator(reactor, lambda c=client: c).connectTCP("127.0.0.1", self.port.getHost().port)
        transcripts = yield defer.gatherResults([c.done for _, c in clients])
        for (user, _), transcript in zip(clients, transcripts):
            self.assertEqual(transcript, expectations[user], user)
        for user in self.users:
            metas = yield self.store.fetchMeta(user, "INBOX")
            self.assertEqual(len(metas), 2)
            self.assertTrue(all("\\Seen" in m.flags for m in metas))
        self.assertEqual(self.flushLoggedErrors(), [])
