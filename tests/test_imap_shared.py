"""The IMAP shared namespace (RFC 2342 section 5): mailplat.imap.shared and the server's use of it."""

from __future__ import annotations

import re

from twisted.internet import task
from twisted.trial import unittest

from mailplat.imap.server import IMAPFactory
from mailplat.imap.shared import Location, NotInNamespace, SharedMailbox, SharedNamespace
from mailplat.testing import MemoryStore, memoryPortal

from test_imap_server import Client, plain

ALICE, BOB, SALES, NEWS = "alice@example.com", "bob@other.org", "sales@example.com", "news@example.com"
GRANTS = (
    SharedMailbox("Sales", SALES, "INBOX", ("@example.com",)),
    SharedMailbox("News", NEWS, "Feeds", ("*",), readOnly=True),
)


def test_who_sees_a_grant():
    g = SharedMailbox("Sales", SALES, users=("@Example.com", "carol@other.org"))
    assert g.visibleTo("alice@example.com") and g.visibleTo("Carol@Other.org")
    assert not g.visibleTo("bob@other.org") and not g.visibleTo("example.com")
    assert SharedMailbox("All", SALES, users=("*",)).visibleTo("anyone@anywhere.example")


def test_where_names_lead():
    ns = SharedNamespace("Shared", GRANTS)
    assert ns.locate(ALICE, "INBOX") == Location(ALICE, "INBOX")
    assert ns.locate(ALICE, "Shared/Sales") == Location(SALES, "INBOX", False, GRANTS[0])
    assert ns.locate(ALICE, "Shared/Sales/2024/Q1") == Location(SALES, "INBOX/2024/Q1", False, GRANTS[0])
    assert ns.locate(BOB, "Shared/News") == Location(NEWS, "Feeds", True, GRANTS[1])
    for user, name in ((BOB, "Shared/Sales"), (ALICE, "Shared"), (ALICE, "Shared/Nothing")):
        try:
            ns.locate(user, name)
        except NotInNamespace:
            pass
        else:
            raise AssertionError(f"{name} leads somewhere for {user}")
    assert ns.displayName(GRANTS[0], "INBOX") == "Shared/Sales"
    assert ns.displayName(GRANTS[0], "INBOX/2024") == "Shared/Sales/2024"
    assert ns.displayName(GRANTS[1], "Feeds/tech") == "Shared/News/tech"
    assert ns.displayName(GRANTS[1], "Feedsx") is None and ns.displayName(GRANTS[1], "INBOX") is None
    assert not SharedNamespace().isReserved("Shared/x") and ns.isReserved("Shared") and not ns.isReserved("Sharedx")


class SharedSessionTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1704067200)
        self.store = MemoryStore(self.clock)
        for user in (ALICE, BOB, SALES, NEWS):
            self.store.createAccount(user)
        self.successResultOf(self.store.createMailbox(SALES, "INBOX/2024"))
        self.successResultOf(self.store.createMailbox(NEWS, "Feeds"))
        for i in range(3):
            self.append(SALES, "INBOX", plain(b"order %d" % i))
        self.append(NEWS, "Feeds", plain(b"headline"))
        self.append(ALICE, "INBOX", plain(b"mine"))
        self.factory = IMAPFactory(
            hostname="imap.example.com", portal=memoryPortal({u: "secret" for u in (ALICE, BOB, SALES)}),
            store=self.store, tlsContextFactory=object(), reactor=self.clock, idleTimeout=600,
            shared=SharedNamespace("Shared", GRANTS),
        )

    def append(self, user, mailbox, raw, flags=()):
        return self.successResultOf(self.store.append(user, mailbox, raw, flags))[1]

    def login(self, user, select=None):
        c = Client(self.factory)
        c.ok(b"L LOGIN " + user.encode() + b" secret")
        if select:
            c.ok(b"S SELECT " + select)
        return c

    def no(self, client, line, code):
        out = client.send(line + b"\r\n")
        tag = line.split(b" ", 1)[0]
        assert re.search(rb"(^|\r\n)" + tag + rb" NO \[" + code + rb"\]", out), out
        return out

    def test_namespace_names_the_shared_prefix(self):
        out = self.login(ALICE).ok(b"n NAMESPACE")
        assert out.startswith(b'* NAMESPACE (("" "/")) NIL (("Shared/" "/"))\r\n')
        self.factory.shared = SharedNamespace()
        assert self.login(ALICE).ok(b"n NAMESPACE").startswith(b'* NAMESPACE (("" "/")) NIL NIL\r\n')

    def test_list_shows_what_the_user_may_see(self):
        out = self.login(ALICE).ok(b'l LIST "" "*"')
        assert b'* LIST (\\Noselect \\HasChildren) "/" "Shared"\r\n' in out
        assert b'* LIST (\\HasChildren) "/" "Shared/Sales"\r\n' in out
        assert b'* LIST (\\HasNoChildren) "/" "Shared/Sales/2024"\r\n' in out
        assert b'* LIST (\\HasNoChildren) "/" "Shared/News"\r\n' in out
        assert b'"/" "INBOX"\r\n' in out
        out = self.login(BOB).ok(b'l LIST "" "Shared/*"')
        assert b"Shared/Sales" not in out and b'"/" "Shared/News"\r\n' in out
        out = self.login(ALICE).ok(b'l LIST "" "Shared/%" RETURN (STATUS (MESSAGES UNSEEN))')
        assert b'* STATUS "Shared/Sales" (MESSAGES 3 UNSEEN 3)\r\n' in out
        assert b'* STATUS "Shared/News" (MESSAGES 1 UNSEEN 1)\r\n' in out

    def test_select_works_on_the_owners_mailbox_and_sees_its_changes(self):
        alice = self.login(ALICE)
        out = alice.ok(b"s SELECT Shared/Sales")
        assert b"* 3 EXISTS\r\n" in out and b"[READ-WRITE]" in out
        out = alice.ok(b"f FETCH 2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"Subject: order 1" in out
        owner = self.login(SALES, select=b"INBOX")
        alice.ok(b"st STORE 1 +FLAGS (\\Flagged)")
        assert b"* 1 FETCH (FLAGS (\\Flagged) UID 1)\r\n" in owner.ok(b"n NOOP")
        # New mail for the owner reaches the session; the user's own does not.
        self.append(SALES, "INBOX", plain(b"order 3"))
        self.append(ALICE, "INBOX", plain(b"mine too"))
        out = alice.ok(b"n NOOP")
        assert out.startswith(b"* 4 EXISTS\r\n") and out.count(b"EXISTS") == 1
        out = alice.ok(b"s2 SELECT INBOX")
        assert b"* 2 EXISTS\r\n" in out
        self.append(SALES, "INBOX", plain(b"order 4"))
        assert alice.ok(b"n2 NOOP") == b"n2 OK NOOP completed\r\n"

    def test_idle_in_a_shared_mailbox(self):
        alice = self.login(ALICE, select=b"Shared/Sales")
        assert alice.send(b"i IDLE\r\n").startswith(b"+ ")
        self.append(SALES, "INBOX", plain(b"rush order"))
        self.clock.advance(0)
        assert b"* 4 EXISTS\r\n" in alice.read()
        assert alice.send(b"DONE\r\n").endswith(b"i OK IDLE terminated\r\n")

    def test_append_copy_and_move_across_accounts(self):
        alice = self.login(ALICE, select=b"INBOX")
        out = alice.ok(b"a APPEND Shared/Sales (\\Seen) {" + b"%d" % len(plain(b"note")) + b"+}\r\n" + plain(b"note"))
        assert b"[APPENDUID " in out
        out = alice.ok(b"c COPY 1 Shared/Sales/2024")
        uidvalidity = self.successResultOf(self.store.getMailbox(SALES, "INBOX/2024")).uidvalidity
        assert b"[COPYUID %d 1 1] COPY completed" % uidvalidity in out
        metas = self.successResultOf(self.store.fetchMeta(SALES, "INBOX"))
        assert len(metas) == 4 and metas[-1].flags == frozenset({"\\Seen"})
        copied = self.successResultOf(self.store.getContent(SALES, "INBOX/2024", 1))
        assert copied == self.successResultOf(self.store.getContent(ALICE, "INBOX", 1))
        alice.ok(b"s SELECT Shared/Sales")
        out = alice.ok(b"m MOVE 1:2 INBOX")
        assert b"* OK [COPYUID " in out and b"* 2 EXPUNGE\r\n* 1 EXPUNGE\r\n" in out
        assert [m.uid for m in self.successResultOf(self.store.fetchMeta(SALES, "INBOX"))] == [3, 4]
        assert len(self.successResultOf(self.store.fetchMeta(ALICE, "INBOX"))) == 3

    def test_a_failed_cross_account_copy_leaves_nothing(self):
        self.store.setQuota(SALES, messages=4)
        alice = self.login(ALICE)
        self.append(ALICE, "INBOX", plain(b"second"))
        alice.ok(b"s SELECT INBOX")
        self.no(alice, b"c COPY 1:2 Shared/Sales", b"OVERQUOTA")
        assert len(self.successResultOf(self.store.fetchMeta(SALES, "INBOX"))) == 3

    def test_read_only_grant(self):
        bob = self.login(BOB)
        out = bob.ok(b"s SELECT Shared/News")
        assert b"[READ-ONLY]" in out and b"[PERMANENTFLAGS ()]" in out
        bob.ok(b"f FETCH 1 BODY[]")
        assert self.successResultOf(self.store.fetchMeta(NEWS, "Feeds"))[0].flags == frozenset()
        self.no(bob, b"st STORE 1 +FLAGS (\\Seen)", b"READ-ONLY")
        self.no(bob, b"a APPEND Shared/News {3+}\r\nx\r\n", b"NOPERM")
        self.append(BOB, "INBOX", plain(b"for the news"))
        bob.ok(b"s2 SELECT INBOX")
        self.no(bob, b"c COPY 1:* Shared/News", b"NOPERM")

    def test_names_in_the_shared_namespace_belong_to_their_owners(self):
        alice = self.login(ALICE)
        self.no(alice, b"c CREATE Shared/Sales/new", b"NOPERM")
        self.no(alice, b"c2 CREATE Shared", b"NOPERM")
        self.no(alice, b"d DELETE Shared/Sales/2024", b"NOPERM")
        self.no(alice, b"r RENAME Shared/Sales/2024 Old", b"NOPERM")
        alice.ok(b"c3 CREATE Projects")
        self.no(alice, b"r2 RENAME Projects Shared/Projects", b"NOPERM")
        self.no(alice, b"s SELECT Shared", b"NONEXISTENT")
        self.no(alice, b"s2 SELECT Shared/Unknown", b"NONEXISTENT")
        self.no(self.login(BOB), b"s SELECT Shared/Sales", b"NONEXISTENT")
        self.no(self.login(BOB), b"st STATUS Shared/Sales (MESSAGES)", b"NONEXISTENT")

    def test_status_quota_root_and_subscriptions(self):
        alice = self.login(ALICE, select=b"INBOX")
        assert alice.ok(b"st STATUS Shared/Sales (MESSAGES UIDNEXT)").startswith(
            b'* STATUS "Shared/Sales" (MESSAGES 3 UIDNEXT 4)\r\n')
        self.store.setQuota(SALES, messages=100)
        assert alice.ok(b"q GETQUOTAROOT Shared/Sales").startswith(b'* QUOTAROOT "Shared/Sales"\r\n')
        alice.ok(b"sub SUBSCRIBE Shared/Sales")
        assert b'* LSUB () "/" "Shared/Sales"\r\n' in alice.ok(b'l LSUB "" "Shared/*"')
        out = alice.ok(b'l2 LIST (SUBSCRIBED) "" "*"')
        assert b'* LIST (\\HasChildren \\Subscribed) "/" "Shared/Sales"\r\n' in out
