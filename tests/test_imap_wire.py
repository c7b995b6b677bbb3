"""Tests for mailplat.imap.wire: the sans-IO IMAP parser and encoder."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailplat.imap import wire
from mailplat.imap.wire import (
    BadCommand,
    Command,
    CommandParser,
    FetchAtt,
    NeedContinuation,
    RawLine,
    Section,
    SequenceSet,
)


def events(data, parser=None, **kw):
    parser = parser or CommandParser(**kw)
    parser.feed(data)
    out = []
    while True:
        ev = parser.nextEvent()
        if ev is None:
            return out
        out.append(ev)


def one(data):
    evs = events(data)
    assert len(evs) == 1, evs
    return evs[0]


# --- framing --------------------------------------------------------------


def test_simple_commands():
    assert one(b"a1 NOOP\r\n") == Command("a1", "NOOP", {})
    assert one(b"a2 capability\r\n").name == "CAPABILITY"
    assert one(b"x LOGOUT\n").name == "LOGOUT"  # bare LF tolerated


def test_login_quoted_and_atom():
    cmd = one(b'a LOGIN "al\\"ice" p\\w\r\n')
    assert isinstance(cmd, BadCommand)  # backslash is not an atom char
    cmd = one(b'a LOGIN "al\\"ice" "p\\\\w"\r\n')
    assert cmd.args == {"user": b'al"ice', "password": b"p\\w"}


def test_bad_escape_in_quoted():
    ev = one(b'a LOGIN "a\\x" b\r\n')
    assert isinstance(ev, BadCommand) and ev.tag == "a"


def test_synchronising_literal_needs_continuation():
    p = CommandParser()
    evs = events(b"a LOGIN {5}\r\n", p)
    assert evs == [NeedContinuation()]
    evs = events(b"alice {2}\r\n", p)
    assert evs == [NeedContinuation()]
    evs = events(b"pw\r\n", p)
    assert evs == [Command("a", "LOGIN", {"user": b"alice", "password": b"pw"})]


def test_literal_plus_needs_no_continuation():
    evs = events(b"a LOGIN {5+}\r\nalice {2+}\r\npw\r\n")
    assert evs == [Command("a", "LOGIN", {"user": b"alice", "password": b"pw"})]


def test_empty_literal():
    p = CommandParser()
    assert events(b"a APPEND INBOX {0}\r\n", p) == [NeedContinuation()]
    (cmd,) = events(b"\r\n", p)
    assert cmd.args["message"] == b""


def test_literal_split_at_every_offset():
    message = b"From: a@b\r\nSubject: {3}\r\n\r\nbody with \r\n CRLF and ) ( \"\r\n"
    data = b'a APPEND "INBOX" (\\Seen) {%d+}\r\n' % len(message) + message + b"\r\nb NOOP\r\n"
    for cut in range(len(data) + 1):
        for cut2 in (cut, min(len(data), cut + 7)):
            p = CommandParser()
            got = events(data[:cut], p) + events(data[cut:cut2], p) + events(data[cut2:], p)
            assert [(c.tag, c.name) for c in got] == [("a", "APPEND"), ("b", "NOOP")], cut
            args = got[0].args
            assert (args["mailbox"], args["flags"], args["date"], args["message"]) == (
                "INBOX", ["\\Seen"], None, message
            ), cut
            assert len(args["messages"]) == 1


def test_byte_by_byte_with_sync_literal():
    p = CommandParser()
    got = []
    for b in b"t1 LOGIN {3}\r\nbob secret\r\n":
        got += events(bytes([b]), p)
    assert got == [NeedContinuation(), Command("t1", "LOGIN", {"user": b"bob", "password": b"secret"})]


def test_line_too_long():
    p = CommandParser(maxLine=100)
    evs = events(b"a1 LOGIN " + b"x" * 200, p)
    assert evs == []
    evs = events(b"yyy\r\nb NOOP\r\n", p)
    assert evs == [BadCommand("a1", "Line too long"), Command("b", "NOOP", {})]


def test_sync_literal_too_big_is_not_read():
    p = CommandParser(maxLiteral=10)
    evs = events(b"a APPEND INBOX {11}\r\nb NOOP\r\n", p)
    assert evs[0].tag == "a" and evs[0].no and evs[0].code == "TOOBIG"
    assert evs[1] == Command("b", "NOOP", {})


def test_nonsync_literal_too_big_is_discarded():
    p = CommandParser(maxLiteral=10)
    evs = events(b"a APPEND INBOX {20+}\r\n0123456789", p)
    assert evs == []
    evs = events(b"0123456789 trailing\r\nb NOOP\r\n", p)
    assert evs[0].tag == "a" and evs[0].no
    assert evs[1] == Command("b", "NOOP", {})
    assert p.buffered == 0


def test_nesting_limit():
    ev = one(b"a SEARCH " + b"(" * 100 + b"ALL" + b")" * 100 + b"\r\n")
    assert isinstance(ev, BadCommand) and "nested" in ev.text


def test_raw_line_mode():
    p = CommandParser()
    p.feed(b"dGVzdA==\r\na NOOP\r\n")
    p.expectRawLine()
    assert p.nextEvent() == RawLine(b"dGVzdA==")
    assert p.nextEvent() == Command("a", "NOOP", {})


def test_raw_line_too_long_leaves_raw_mode():
    p = CommandParser(maxLine=50)
    p.expectRawLine()
    p.feed(b"x" * 80 + b"\r\na NOOP\r\n")
    assert isinstance(p.nextEvent(), BadCommand)
    assert p.nextEvent() == Command("a", "NOOP", {})


def test_discard_buffered():
    p = CommandParser()
    p.feed(b"a STARTTLS\r\nb LOGIN x y\r\n")
    assert p.nextEvent().name == "STARTTLS"
    p.discardBuffered()
    assert p.nextEvent() is None


def test_unknown_command_and_missing_tag():
    ev = one(b"a FROB\r\n")
    assert ev == BadCommand("a", "unknown command")
    ev = one(b"\r\n")
    assert isinstance(ev, BadCommand) and ev.tag is None
    ev = one(b"a NOOP extra\r\n")
    assert isinstance(ev, BadCommand) and ev.tag == "a"


# --- sequence sets --------------------------------------------------------


def seqset(text):
    return one(b"a FETCH " + text + b" FLAGS\r\n").args["set"]


def test_sequence_sets():
    assert seqset(b"1:*").resolve(5) == [1, 2, 3, 4, 5]
    assert seqset(b"3,5:7").resolve(10) == [3, 5, 6, 7]
    assert seqset(b"*:4").resolve(6) == [4, 5, 6]
    assert seqset(b"7:2").resolve(10) == [2, 3, 4, 5, 6, 7]
    assert seqset(b"*").resolve(9) == [9]
    assert str(seqset(b"1,3:*")) == "1,3:*"
    # UID n:* includes the largest UID even when n is larger (RFC 3501 6.4.8)
    assert seqset(b"50:*").select([3, 10, 20], 20) == [20]
    assert seqset(b"4:15").select([3, 10, 20], 20) == [10]
    assert seqset(b"1:*").select(range(1, 4), 3) == [1, 2, 3]
    # Overlapping and unordered ranges: each member once, ascending.
    assert seqset(b"15:4,3:10,20").select([3, 10, 20, 30], 30) == [3, 10, 20]
    for bad in (b"0", b"1:", b"1,,2", b":3", b"a"):
        assert isinstance(one(b"a FETCH " + bad + b" FLAGS\r\n"), BadCommand)


def test_format_sequence_set():
    assert wire.formatSequenceSet([1, 2, 3, 7, 9, 10]) == "1:3,7,9:10"
    assert wire.formatSequenceSet([]) == ""


# --- fetch attributes -----------------------------------------------------


def atts(text):
    cmd = one(b"a FETCH 1 " + text + b"\r\n")
    assert isinstance(cmd, Command), cmd
    return cmd.args["atts"]


def test_fetch_macros():
    assert [a.name for a in atts(b"ALL")] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"]
    assert [a.name for a in atts(b"fast")] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
    assert [a.name for a in atts(b"FULL")][-1] == "BODY"


def test_fetch_sections():
    (a,) = atts(b"BODY[]")
    assert a == FetchAtt("BODY[]", Section(), False, None)
    (a,) = atts(b"BODY.PEEK[1.2.MIME]<10.20>")
    assert a == FetchAtt("BODY[]", Section((1, 2), "MIME"), True, (10, 20))
    assert a.responseName() == "BODY[1.2.MIME]<10>"
    (a,) = atts(b"BODY[HEADER.FIELDS (Subject \"From\")]")
    assert a.section == Section((), "HEADER.FIELDS", ("SUBJECT", "FROM"))
    assert a.responseName() == "BODY[HEADER.FIELDS (SUBJECT FROM)]"
    (a,) = atts(b"BODY[2.header.fields.not (X-A)]")
    assert a.section == Section((2,), "HEADER.FIELDS.NOT", ("X-A",))
    (a,) = atts(b"BODY[3.TEXT]")
    assert a.section == Section((3,), "TEXT")
    got = atts(b"(UID BODY BODYSTRUCTURE RFC822.HEADER RFC822 RFC822.TEXT ENVELOPE)")
    assert [a.name for a in got] == ["UID", "BODY", "BODYSTRUCTURE", "RFC822.HEADER", "RFC822", "RFC822.TEXT", "ENVELOPE"]
    for bad in (b"BODY[MIME]", b"BODY[1.]", b"BODY[FOO]", b"BODY[]<1>", b"BODY[]<0.0>", b"XYZ", b"()", b"BODY[1HEADER]"):
        assert isinstance(one(b"a FETCH 1 " + bad + b"\r\n"), BadCommand), bad


# --- search, store, dates -------------------------------------------------


def test_search_keys():
    cmd = one(b'a SEARCH CHARSET utf-8 FLAGGED NOT SEEN OR FROM "x y" TO {1+}\r\nz 2:4 UID 5:* (LARGER 10 SMALLER 20)\r\n')
    assert cmd.args["charset"] == "UTF-8"
    key = cmd.args["key"]
    assert key[0] == "and"
    assert key[1][0] == ("flag", "\\Flagged", True)
    assert key[1][1] == ("not", ("flag", "\\Seen", True))
    assert key[1][2] == ("or", ("header", "from", b"x y"), ("header", "to", b"z"))
    assert key[1][3][0] == "seq"
    assert key[1][4][0] == "uid"
    assert key[1][5] == ("and", (("larger", 10), ("smaller", 20)))
    cmd = one(b'a UID SEARCH SINCE 1-Feb-1994 SENTBEFORE "12-Mar-2020" HEADER X-Spam yes KEYWORD $Junk\r\n')
    assert cmd.uid
    assert cmd.args["key"][1][0] == ("date", "since", datetime.date(1994, 2, 1), False)
    assert cmd.args["key"][1][1] == ("date", "before", datetime.date(2020, 3, 12), True)
    assert cmd.args["key"][1][2] == ("header", "x-spam", b"yes")
    assert cmd.args["key"][1][3] == ("keyword", "$Junk", True)
    for bad in (b"FOO", b"SINCE 30-Foo-2020", b"OR SEEN", b"(SEEN", b"LARGER x"):
        assert isinstance(one(b"a SEARCH " + bad + b"\r\n"), BadCommand), bad


def test_store_items():
    cmd = one(b"a STORE 1:3 +FLAGS.SILENT (\\Seen $Label)\r\n")
    assert cmd.args["mode"] == "add" and cmd.args["silent"] and cmd.args["flags"] == ["\\Seen", "$Label"]
    cmd = one(b"a UID STORE 5 -flags \\deleted\r\n")
    assert cmd.uid and cmd.args["mode"] == "remove" and cmd.args["flags"] == ["\\Deleted"]
    cmd = one(b"a STORE 1 FLAGS ()\r\n")
    assert cmd.args["mode"] == "set" and cmd.args["flags"] == []
    for bad in (b"XFLAGS (\\Seen)", b"FLAGS (\\Bogus)", b"FLAGS (\\*)"):
        assert isinstance(one(b"a STORE 1 " + bad + b"\r\n"), BadCommand), bad


def test_append_date_time_and_flags():
    cmd = one(b'a APPEND Sent (\\Seen \\Recent) " 7-Jul-1996 02:44:25 -0700" {1+}\r\nX\r\n')
    assert cmd.args["flags"] == ["\\Seen"]  # \Recent cannot be set
    expected = datetime.datetime(1996, 7, 7, 9, 44, 25, tzinfo=datetime.timezone.utc).timestamp()
    assert cmd.args["date"] == expected
    assert wire.formatDateTime(expected) == b'"07-Jul-1996 09:44:25 +0000"'
    assert isinstance(one(b'a APPEND Sent "32-Jul-1996 02:44:25 -0700" {1+}\r\nX\r\n'), BadCommand)


def test_list_patterns_and_mailbox_names():
    cmd = one(b'a LIST "" %/&AOk-*\r\n')
    assert (cmd.args["reference"], cmd.args["pattern"], cmd.args["extended"]) == ("", "%/\xe9*", False)
    cmd = one(b"a SELECT inbox\r\n")
    assert cmd.args["mailbox"] == "inbox"
    assert isinstance(one(b"a SELECT &Jjo\r\n"), BadCommand)
    assert isinstance(one(b'a SELECT ""\r\n'), BadCommand)


def test_status_and_uid_expunge():
    cmd = one(b"a STATUS INBOX (MESSAGES UIDNEXT unseen)\r\n")
    assert cmd.args["items"] == ["MESSAGES", "UIDNEXT", "UNSEEN"]
    cmd = one(b"a UID EXPUNGE 3:5\r\n")
    assert cmd.uid and cmd.name == "EXPUNGE"
    assert isinstance(one(b"a STATUS INBOX (BOGUS)\r\n"), BadCommand)


def test_authenticate_initial_response():
    cmd = one(b"a AUTHENTICATE plain AGFsaWNlAHB3\r\n")
    assert cmd.args == {"mechanism": "PLAIN", "initial": b"AGFsaWNlAHB3"}
    cmd = one(b"a AUTHENTICATE LOGIN\r\n")
    assert cmd.args["initial"] is None


# --- encoder --------------------------------------------------------------


def test_string_encoding():
    assert wire.string(b'a "b" \\c') == b'"a \\"b\\" \\\\c"'
    assert wire.string("caf\xe9") == b"{5}\r\ncaf\xc3\xa9"
    assert wire.string(b"two\r\nlines") == b"{10}\r\ntwo\r\nlines"
    assert wire.nstring(None) == b"NIL"
    assert wire.astring("INBOX") == b"INBOX"
    assert wire.astring("nil") == b'"nil"'
    assert wire.astring("a b") == b'"a b"'
    assert wire.fetchResponse(3, [(b"UID", b"7"), (b"FLAGS", b"()")]) == b"* 3 FETCH (UID 7 FLAGS ())\r\n"


# --- modified UTF-7 -------------------------------------------------------


@pytest.mark.parametrize(
    "text,encoded",
    [
        ("INBOX", "INBOX"),
        ("A&B", "A&-B"),
        ("~peter/mail/\u53f0\u5317/\u65e5\u672c\u8a9e", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
        ("Entw\xfcrfe", "Entw&APw-rfe"),
        ("\U0001f600", "&2D3eAA-"),
        ("&", "&-"),
    ],
)
def test_mutf7_known(text, encoded):
    assert wire.encodeMailbox(text) == encoded
    assert wire.decodeMailbox(encoded) == text


@pytest.mark.parametrize("bad", ["&", "&AGE-", "&U,BTFw-&ZeVnLIqe-", "a\x7fb", "&Jjo!-", "&AOk", "&AOl-"])
def test_mutf7_invalid(bad):
    with pytest.raises(ValueError):
        wire.decodeMailbox(bad)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_mutf7_round_trip(text):
    encoded = wire.encodeMailbox(text)
    assert all(0x20 <= ord(c) <= 0x7E for c in encoded)
    assert wire.decodeMailbox(encoded) == text


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parser_never_raises(data):
    p = CommandParser(maxLine=64, maxLiteral=16)
    p.feed(data + b"\r\n")
    for _ in range(1000):
        ev = p.nextEvent()
        if ev is None:
            break
        assert isinstance(ev, (Command, BadCommand, NeedContinuation, RawLine))
