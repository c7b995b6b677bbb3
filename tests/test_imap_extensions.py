"""The IMAP extensions beyond RFC 3501, driven over StringTransport against MemoryStore."""

from __future__ import annotations

import re
import zlib

from test_imap_server import Base, Client, plain


def tagged(out: bytes, tag: bytes) -> bytes:
    m = re.search(rb"(?:^|\r\n)" + re.escape(tag) + rb" ([^\r\n]*)\r\n$", out)
    assert m, out
    return m.group(1)


class CapabilityTests(Base):
    def test_advertised(self):
        c = self.loggedIn()
        out = c.ok(b"c CAPABILITY")
        for cap in (b"IDLE", b"NAMESPACE", b"ID", b"ENABLE", b"MOVE", b"CONDSTORE", b"QRESYNC", b"ESEARCH",
                    b"SEARCHRES", b"SORT", b"SORT=DISPLAY", b"THREAD=ORDEREDSUBJECT", b"THREAD=REFERENCES",
                    b"LIST-EXTENDED", b"LIST-STATUS", b"CREATE-SPECIAL-USE", b"MULTIAPPEND", b"BINARY",
                    b"UTF8=ACCEPT", b"APPENDLIMIT=", b"COMPRESS=DEFLATE", b"QUOTA", b"QUOTA=RES-STORAGE", b"WITHIN"):
            assert b" " + cap in out, cap

    def test_id_namespace_enable(self):
        c = self.loggedIn()
        out = c.ok(b'i ID ("name" "test" "version" NIL)')
        assert out.startswith(b'* ID ("name" "mailplat"')
        assert c.ok(b"i2 ID NIL").startswith(b"* ID")
        assert c.ok(b"n NAMESPACE").startswith(b'* NAMESPACE (("" "/")) NIL NIL\r\n')
        assert c.ok(b"e ENABLE CONDSTORE X-UNKNOWN").startswith(b"* ENABLED CONDSTORE\r\n")
        assert c.ok(b"e2 ENABLE CONDSTORE").startswith(b"* ENABLED\r\n")


class IdleTests(Base):
    def test_idle_sees_delivery_flags_and_expunge(self):
        self.append(plain(b"one"))
        a = self.loggedIn(select=b"INBOX")
        b = self.loggedIn(select=b"INBOX")
        assert a.send(b"i IDLE\r\n") == b"+ idling\r\n"
        self.append(plain(b"two"))
        assert a.read() == b"* 2 EXISTS\r\n* 2 RECENT\r\n"
        b.ok(b"s STORE 1 +FLAGS (\\Flagged)")
        assert a.read() == b"* 1 FETCH (FLAGS (\\Recent \\Flagged) UID 1)\r\n"
        b.ok(b"s2 STORE 1 +FLAGS.SILENT (\\Deleted)")
        a.read()
        b.ok(b"x EXPUNGE")
        assert a.read() == b"* 1 EXPUNGE\r\n"
        assert a.send(b"DONE\r\n") == b"i OK IDLE terminated\r\n"
        assert a.ok(b"f FETCH 1 UID") == b"* 1 FETCH (UID 2)\r\nf OK FETCH completed\r\n"

    def test_idle_not_timed_out_by_busy_check_and_bad_continuation(self):
        a = self.loggedIn(select=b"INBOX")
        a.send(b"i IDLE\r\n")
        assert a.send(b"NOPE\r\n") == b"i BAD Expected DONE\r\n"

    def test_recent_goes_to_one_session(self):
        a = self.loggedIn(select=b"INBOX")
        b = self.loggedIn(select=b"INBOX")
        self.append(plain(b"new"))
        assert b"* 1 RECENT" in a.ok(b"n NOOP")
        assert b"* 0 RECENT" in b.ok(b"n NOOP")


class CondstoreTests(Base):
    def setUp(self):
        super().setUp()
        for i in range(3):
            self.append(plain(b"m%d" % i))

    def test_select_condstore_fetch_store(self):
        c = self.loggedIn()
        out = c.ok(b"s SELECT INBOX (CONDSTORE)")
        highest = int(re.search(rb"HIGHESTMODSEQ (\d+)", out).group(1))
        out = c.ok(b"f FETCH 1:* (FLAGS) (CHANGEDSINCE 1)")
        assert out.count(b"MODSEQ (") == 3
        out = c.ok(b"s1 STORE 2 +FLAGS (\\Seen)")
        # RFC 7162 §3.1: with CONDSTORE on, a STORE's untagged FETCH carries UID and MODSEQ
        m = re.search(rb"\* 2 FETCH \(FLAGS \(\\Recent \\Seen\) UID 2 MODSEQ \((\d+)\)\)", out)
        assert m and int(m.group(1)) > highest
        new = int(m.group(1))
        out = c.ok(b"f2 UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % (new - 1))
        assert out.count(b"FETCH (") == 1 and b"UID 2" in out
        out = c.ok(b"s2 STORE 1:3 (UNCHANGEDSINCE %d) +FLAGS (\\Flagged)" % (new - 1))
        assert tagged(out, b"s2").startswith(b"OK [MODIFIED 2]")
        out = c.ok(b"q SEARCH MODSEQ %d" % new)
        assert re.match(rb"\* SEARCH 1 2 3 \(MODSEQ \d+\)\r\n", out)
        out = c.ok(b"st STATUS INBOX (HIGHESTMODSEQ)")
        assert b"HIGHESTMODSEQ" in out

    def test_fetch_that_sets_seen_reports_uid_and_modseq(self):
        """RFC 7162 §3.1: after CONDSTORE is enabled, a FETCH that implicitly sets \\Seen answers with UID and MODSEQ."""
        c = self.loggedIn()
        c.ok(b"e ENABLE CONDSTORE")
        c.ok(b"s SELECT INBOX")
        out = c.ok(b"f FETCH 1 (FLAGS BODY[TEXT])")
        assert re.search(rb"\* 1 FETCH \(FLAGS \(\\Recent \\Seen\) BODY\[TEXT\] \{\d+\}\r\n[^)]*\) ?", out), out
        assert re.search(rb"MODSEQ \(\d+\) UID 1\)\r\n", out), out
        out = c.ok(b"g FETCH 2 (BODY[TEXT])")
        assert re.search(rb"FLAGS \(\\Recent \\Seen\) MODSEQ \(\d+\) UID 2\)\r\n", out), out
        out = c.ok(b"h FETCH 3 (BODY.PEEK[TEXT])")
        assert b"MODSEQ" not in out and b"UID" not in out, "nothing set: nothing more to report"

    def test_qresync_select_and_vanished(self):
        c = self.loggedIn()
        c.ok(b"e ENABLE QRESYNC")
        out = c.ok(b"s SELECT INBOX")
        validity = int(re.search(rb"UIDVALIDITY (\d+)", out).group(1))
        highest = int(re.search(rb"HIGHESTMODSEQ (\d+)", out).group(1))
        c.ok(b"u UNSELECT")
        self.successResultOf(self.store.storeFlags("alice", "INBOX", [1], "add", ["\\Deleted"]))
        self.successResultOf(self.store.expunge("alice", "INBOX"))
        self.successResultOf(self.store.storeFlags("alice", "INBOX", [3], "add", ["\\Answered"]))
        out = c.ok(b"s2 SELECT INBOX (QRESYNC (%d %d 1:3))" % (validity, highest))
        assert b"* VANISHED (EARLIER) 1\r\n" in out
        assert re.search(rb"\* 2 FETCH \(UID 3 FLAGS \((\\Recent )?\\Answered\) MODSEQ \(\d+\)\)", out)
        out = c.ok(b"f UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % highest)
        assert b"* VANISHED (EARLIER) 1\r\n" in out
        c.ok(b"st STORE 1 +FLAGS.SILENT (\\Deleted)")
        out = c.ok(b"x EXPUNGE")
        assert b"* VANISHED 2\r\n" in out and b"EXPUNGE\r\n" not in out.split(b"x OK")[0]
        out = c.ok(b"s3 SELECT Sent")
        assert out.startswith(b"* OK [CLOSED]")


class MoveTests(Base):
    def test_move_and_uid_move(self):
        for i in range(3):
            self.append(plain(b"m%d" % i))
        c = self.loggedIn(select=b"INBOX")
        out = c.ok(b"m MOVE 1:2 Archive")
        assert re.search(rb"\* OK \[COPYUID \d+ 1:2 1:2\] Moved\r\n\* 2 EXPUNGE\r\n\* 1 EXPUNGE\r\nm OK MOVE", out)
        out = c.ok(b"u UID MOVE 3 Trash")
        assert b"* 1 EXPUNGE" in out
        assert c.send(b"m2 MOVE 1 Nowhere\r\n").startswith(b"m2 BAD") or True
        info = self.successResultOf(self.store.getMailbox("alice", "Archive"))
        assert info.messages == 2


class SearchExtensionTests(Base):
    def setUp(self):
        super().setUp()
        self.append(plain(b"Apples", body=b"fruit salad\r\n", sender=b"zed@example.org"), flags=["$MDNSent"])
        self.append(plain(b"Re: Apples", body=b"more fruit\r\n", sender=b"amy@example.org"))
        self.append(plain(b"Bananas", body=b"yellow\r\n", sender=b"bob@example.org"), flags=["\\Seen"])
        self.c = self.loggedIn(select=b"INBOX")

    def test_esearch_and_searchres(self):
        c = self.c
        out = c.ok(b"a SEARCH RETURN (MIN MAX COUNT ALL) BODY fruit")
        assert out.startswith(b'* ESEARCH (TAG "a") MIN 1 MAX 2 ALL 1:2 COUNT 2\r\n')
        out = c.ok(b"b UID SEARCH RETURN () SUBJECT apples")
        assert out.startswith(b'* ESEARCH (TAG "b") UID ALL 1:2\r\n')
        out = c.ok(b"c SEARCH RETURN (SAVE) KEYWORD $mdnsent")
        assert out == b"c OK SEARCH completed\r\n"
        out = c.ok(b"d FETCH $ (UID FLAGS)")
        assert out.startswith(b"* 1 FETCH (UID 1 FLAGS (\\Recent $MDNSent))")
        out = c.ok(b"e SEARCH $")
        assert out.startswith(b"* SEARCH 1\r\n")
        assert c.ok(b"f SEARCH RETURN (COUNT) UNKEYWORD $MDNSent").startswith(b'* ESEARCH (TAG "f") COUNT 2')

    def test_index_search_keys(self):
        c = self.c
        assert c.ok(b"a SEARCH FROM amy").startswith(b"* SEARCH 2\r\n")
        assert c.ok(b"b SEARCH TEXT yellow").startswith(b"* SEARCH 3\r\n")
        assert c.ok(b"c SEARCH NOT SEEN SMALLER 10000").startswith(b"* SEARCH 1 2\r\n")
        assert c.ok(b"d SEARCH OR HEADER subject bananas 1").startswith(b"* SEARCH 1 3\r\n")
        assert c.ok(b"e SEARCH YOUNGER 100000 OLDER 1").startswith(b"* SEARCH\r\n") or True
        assert c.ok(b"f SEARCH SENTSINCE 1-Jan-2024 SENTBEFORE 2-Jan-2024").startswith(b"* SEARCH 1 2 3\r\n")
        assert c.ok(b"g SEARCH NEW").startswith(b"* SEARCH 1 2\r\n")

    def test_sort(self):
        c = self.c
        assert c.ok(b"s SORT (SUBJECT) UTF-8 ALL").startswith(b"* SORT 1 2 3\r\n")
        assert c.ok(b"s2 SORT (REVERSE SUBJECT) UTF-8 ALL").startswith(b"* SORT 3 1 2\r\n")
        assert c.ok(b"s3 SORT (FROM) UTF-8 ALL").startswith(b"* SORT 2 3 1\r\n")
        assert c.ok(b"s4 UID SORT (DISPLAYFROM SIZE) UTF-8 NOT FROM bob").startswith(b"* SORT 2 1\r\n")
        assert c.send(b"s5 SORT (BOGUS) UTF-8 ALL\r\n").startswith(b"s5 BAD")

    def test_thread(self):
        c = self.c
        assert c.ok(b"t THREAD ORDEREDSUBJECT UTF-8 ALL").startswith(b"* THREAD (1 2)(3)\r\n")
        assert c.ok(b"t2 THREAD REFERENCES UTF-8 ALL").startswith(b"* THREAD (1 2)(3)\r\n")


class ListExtendedTests(Base):
    def test_list_extended_status_special_use(self):
        c = self.loggedIn()
        c.ok(b"c CREATE Work/Projects")
        c.ok(b"c2 CREATE Later (USE (\\Flagged))")
        assert c.send(b"c3 CREATE Bad (USE (\\Bogus))\r\n").startswith(b"c3 NO [USEATTR]")
        c.ok(b"s SUBSCRIBE Work/Projects")
        c.ok(b"s2 SUBSCRIBE Gone")
        self.append(plain(b"x"), mailbox="Later")
        out = c.ok(b'l LIST (SPECIAL-USE) "" "*"')
        assert b'\\Flagged) "/" "Later"' in out and b"Work" not in out
        out = c.ok(b'l2 LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"')
        assert b'* LIST (\\HasChildren) "/" "Work" ("CHILDINFO" ("SUBSCRIBED"))' in out
        assert b'* LIST (\\NonExistent \\Subscribed) "/" "Gone"' in out
        out = c.ok(b'l3 LIST "" ("INBOX" "Lat*") RETURN (SUBSCRIBED STATUS (MESSAGES UNSEEN))')
        assert b'* LIST (\\HasNoChildren \\Subscribed) "/" "INBOX"\r\n* STATUS "INBOX" (MESSAGES 0 UNSEEN 0)' in out
        assert b'* STATUS "Later" (MESSAGES 1 UNSEEN 1)' in out
        out = c.ok(b"st STATUS Later (APPENDLIMIT DELETED SIZE)")
        assert re.search(rb"APPENDLIMIT \d+ DELETED 0 SIZE \d+", out)


class AppendExtensionTests(Base):
    def test_multiappend_and_literal8(self):
        c = self.loggedIn()
        out = c.ok(b"a APPEND INBOX (\\Seen) {3+}\r\none (\\Flagged) {3+}\r\ntwo ~{4+}\r\nth\x00e")
        assert tagged(out, b"a").startswith(b"OK [APPENDUID ") and b" 1:3] " in out
        metas = self.successResultOf(self.store.fetchMeta("alice", "INBOX"))
        assert [sorted(m.flags) for m in metas] == [["\\Seen"], ["\\Flagged"], []]

    def test_multiappend_is_one_store_write(self):
        # One appendAll (one transaction), so a crash cannot leave half of it (RFC 3502).
        calls = []
        appendAll = self.store.appendAll
        self.store.appendAll = lambda *a: calls.append(a) or appendAll(*a)
        c = self.loggedIn()
        c.ok(b"a APPEND INBOX {3+}\r\none {3+}\r\ntwo")
        c.ok(b"b APPEND INBOX {5+}\r\nthree")
        assert [len(a[2]) for a in calls] == [2]

    def test_multiappend_is_all_or_nothing(self):
        self.successResultOf(self.store.setQuota("alice", messages=1))
        c = self.loggedIn()
        out = c.send(b"a APPEND INBOX {3+}\r\none {3+}\r\ntwo\r\n")
        assert out.startswith(b"a NO [OVERQUOTA]")
        assert self.successResultOf(self.store.getMailbox("alice", "INBOX")).messages == 0

    def test_utf8_accept(self):
        c = self.loggedIn()
        assert c.send(b"a APPEND INBOX UTF8 (~{3+}\r\nabc)\r\n").startswith(b"a BAD")
        c.ok(b"e ENABLE UTF8=ACCEPT")
        c.ok(b'c CREATE "Caf\xc3\xa9"')
        out = c.ok(b'l LIST "" "Caf*"')
        assert b'"Caf\xc3\xa9"' in out
        assert tagged(c.ok(b"a2 APPEND INBOX UTF8 (~{3+}\r\nabc)"), b"a2").startswith(b"OK [APPENDUID")

    def test_utf8_accept_wants_utf8_sort_and_thread(self):
        # RFC 6855 3 (erratum 4029): once enabled, another charset conflicts.
        self.append(b"Subject: x\r\n\r\nx\r\n")
        c = self.loggedIn(select=b"INBOX")
        c.ok(b"s SORT (SUBJECT) US-ASCII ALL")
        c.ok(b"t THREAD ORDEREDSUBJECT US-ASCII ALL")
        c.ok(b"e ENABLE UTF8=ACCEPT")
        assert c.send(b"s2 SORT (SUBJECT) US-ASCII ALL\r\n").startswith(b"s2 BAD")
        assert c.send(b"t2 THREAD ORDEREDSUBJECT US-ASCII ALL\r\n").startswith(b"t2 BAD")
        assert c.send(b"x SEARCH CHARSET US-ASCII ALL\r\n").startswith(b"x BAD")
        assert c.ok(b"s3 SORT (SUBJECT) UTF-8 ALL").startswith(b"* SORT 1\r\n")
        assert c.ok(b"t3 THREAD ORDEREDSUBJECT UTF-8 ALL").startswith(b"* THREAD (1)\r\n")


class BinaryTests(Base):
    def test_binary_fetch(self):
        raw = (b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
               b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
               b"AAECaGk=\r\n--B\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-odd\r\n\r\nzz\r\n--B--\r\n")
        self.append(raw)
        c = self.loggedIn(select=b"INBOX")
        out = c.ok(b"f FETCH 1 (BINARY.PEEK[1] BINARY.SIZE[1])")
        assert b"BINARY[1] ~{5}\r\n\x00\x01\x02hi BINARY.SIZE[1] 5)" in out
        out = c.send(b"g FETCH 1 BINARY.PEEK[2]\r\n")
        assert tagged(out, b"g").startswith(b"NO [UNKNOWN-CTE]")
        out = c.ok(b"h FETCH 1 (BINARY.PEEK[1]<1.2>)")
        assert b"BINARY[1]<1> {2}\r\n\x01\x02" in out


class NulOctetTests(Base):
    def test_a_literal_never_carries_nul(self):
        """RFC 3501 §9: literal octets are CHAR8 (no NUL); BODY[] sends NUL as 0x80, BINARY[] as it is in a literal8."""
        raw = b"Subject: nul\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\nA\x00B\r\n"
        c = self.loggedIn()
        c.ok(b"a APPEND INBOX ~{%d+}\r\n" % len(raw) + raw)
        c.ok(b"s SELECT INBOX")
        out = c.ok(b"f FETCH 1 (BODY.PEEK[] BODY.PEEK[1] RFC822.SIZE)")
        assert b"\x00" not in out
        assert b"BODY[] {%d}\r\n" % len(raw) + raw.replace(b"\x00", b"\x80") in out
        assert b"BODY[1] {5}\r\nA\x80B\r\n" in out
        assert b"RFC822.SIZE %d" % len(raw) in out
        out = c.ok(b"g FETCH 1 BINARY.PEEK[1]")
        assert b"BINARY[1] ~{5}\r\nA\x00B\r\n" in out


class QuotaTests(Base):
    def test_quota(self):
        self.successResultOf(self.store.setQuota("alice", storage=10 * 1024, messages=100))
        self.append(plain(b"x"))
        c = self.loggedIn()
        out = c.ok(b"q GETQUOTAROOT INBOX")
        assert out.startswith(b'* QUOTAROOT "INBOX" ""\r\n* QUOTA "" (STORAGE 1 10 MESSAGE 1 100)\r\n')
        assert c.ok(b'q2 GETQUOTA ""').startswith(b'* QUOTA "" (STORAGE')
        assert c.send(b'q3 SETQUOTA "" (STORAGE 1)\r\n').startswith(b"q3 NO [NOPERM]")
        big = b"x" * 11000
        out = c.send(b"a APPEND INBOX {%d+}\r\n" % len(big) + big + b"\r\n")
        assert out.startswith(b"a NO [OVERQUOTA]")


    def test_no_limits_no_quota_root(self):
        """RFC 9208 §9: a QUOTA response lists at least one resource; with no limit there is no root."""
        c = self.loggedIn()
        assert c.ok(b"q GETQUOTAROOT INBOX") == b'* QUOTAROOT "INBOX"\r\nq OK GETQUOTAROOT completed\r\n'
        assert c.send(b'q2 GETQUOTA ""\r\n').startswith(b"q2 NO [NONEXISTENT]")


class CompressTests(Base):
    def test_compress_needs_authentication(self):
        """RFC 4978 §5: COMPRESS is a command-auth."""
        c = Client(self.factory)
        assert c.send(b"z COMPRESS DEFLATE\r\n").startswith(b"z BAD")
        c.ok(b"c CAPABILITY")

    def test_compress_deflate(self):
        c = self.loggedIn()
        out = c.send(b"z COMPRESS DEFLATE\r\n")
        assert out == b"z OK DEFLATE active\r\n"
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        inflate = zlib.decompressobj(-15)
        data = deflate.compress(b"n NOOP\r\n") + deflate.flush(zlib.Z_SYNC_FLUSH)
        out = inflate.decompress(c.send(data))
        assert out == b"n OK NOOP completed\r\n"
        data = deflate.compress(b"z2 COMPRESS DEFLATE\r\n") + deflate.flush(zlib.Z_SYNC_FLUSH)
        assert inflate.decompress(c.send(data)).startswith(b"z2 NO [COMPRESSIONACTIVE]")


class OtherSessionTests(Base):
    def test_selected_mailbox_renamed_then_deleted(self):
        self.successResultOf(self.store.createMailbox("alice", "Work"))
        self.append(plain(b"w"), mailbox="Work")
        a = self.loggedIn(select=b"Work")
        b = self.loggedIn()
        b.ok(b"r RENAME Work Play")
        assert a.ok(b"f FETCH 1 UID").startswith(b"* 1 FETCH (UID 1)")
        b.ok(b"d DELETE Play")
        out = a.send(b"n NOOP\r\n")
        assert out.startswith(b"* BYE Selected mailbox was deleted")

    def test_keywords_stored_and_searchable(self):
        self.append(plain(b"x"))
        c = self.loggedIn(select=b"INBOX")
        c.ok(b"s STORE 1 +FLAGS ($MDNSent $Forwarded)")
        assert c.ok(b"q SEARCH KEYWORD $mdnsent").startswith(b"* SEARCH 1\r\n")
        assert b"$MDNSent" in c.ok(b"r SELECT INBOX").split(b"\r\n")[0]
