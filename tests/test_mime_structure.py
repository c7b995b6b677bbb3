"""Tests for mailplat.mime.structure.analyze and the IMAP views built on it."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from mailplat.imap import fetch
from mailplat.imap.wire import Section
from mailplat.mime.structure import STRUCTURE_VERSION, analyze, findPart, parseAddressList

SIMPLE = (
    b"Date: Tue, 2 Jan 2024 10:00:00 +0000\r\n"
    b"From: \"Doe, John\" <john@example.org>\r\n"
    b"To: alice@example.org,\r\n bob@example.net (Bob B)\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <abc@example.org>\r\n"
    b"\r\n"
    b"Hello\r\nWorld\r\n"
)

MIXED = (
    b"From: a@example.org\r\n"
    b"Subject: mixed\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n"
    b"\r\n"
    b"This is the preamble.\r\n"
    b"--outer\r\n"
    b"Content-Type: multipart/alternative; boundary=inner\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"plain =C3=A9\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<p>html</p>\r\n"
    b"--inner--\r\n"
    b"\r\n"
    b"--outer \r\n"
    b"Content-Type: application/pdf; name=\"r.pdf\"\r\n"
    b"Content-Disposition: attachment; filename=\"r.pdf\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-ID: <pdf1>\r\n"
    b"Content-Description: A report\r\n"
    b"Content-Language: en, de\r\n"
    b"Content-Location: http://example.org/r.pdf\r\n"
    b"\r\n"
    b"JVBERi0xLjQK\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"From: inner@example.org\r\n"
    b"Subject: forwarded\r\n"
    b"Content-Type: multipart/mixed; boundary=nested\r\n"
    b"\r\n"
    b"--nested\r\n"
    b"\r\n"
    b"nested one\r\n"
    b"--nested\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"nested two\r\n"
    b"--nested--\r\n"
    b"--outer--\r\n"
    b"epilogue\r\n"
)


def section(raw, structure, part=(), text=None, fields=()):
    return fetch.sectionBytes(raw, structure, Section(tuple(part), text, tuple(fields)))


def test_simple_text_envelope_and_structure():
    s = analyze(SIMPLE)
    assert s["version"] == STRUCTURE_VERSION
    json.dumps(s)
    env = s["envelope"]
    assert env["date"] == "Tue, 2 Jan 2024 10:00:00 +0000"
    assert env["subject"] == "=?utf-8?q?Gr=C3=BC=C3=9Fe?="  # RFC 2047 kept raw
    assert env["from"] == [["Doe, John", None, "john", "example.org"]]
    assert env["to"] == [[None, None, "alice", "example.org"], ["Bob B", None, "bob", "example.net"]]
    assert env["sender"] is None and env["cc"] is None
    assert env["message-id"] == "<abc@example.org>"
    body = s["body"]
    assert (body["type"], body["subtype"]) == ("text", "plain")
    assert body["params"] == [["charset", "us-ascii"]]
    assert body["size"] == 14 and body["lines"] == 2
    assert section(SIMPLE, s, text="TEXT") == b"Hello\r\nWorld\r\n"
    assert section(SIMPLE, s, (1,)) == b"Hello\r\nWorld\r\n"
    assert section(SIMPLE, s, text="HEADER").endswith(b"<abc@example.org>\r\n\r\n")
    assert section(SIMPLE, s, (2,)) is None
    bs = fetch.formatBodyStructure(body)
    assert bs == b'("TEXT" "PLAIN" ("charset" "us-ascii") NIL NIL "7BIT" 14 2 NIL NIL NIL NIL)'
    assert fetch.formatBodyStructure(body, False) == b'("TEXT" "PLAIN" ("charset" "us-ascii") NIL NIL "7BIT" 14 2)'
    env = fetch.formatEnvelope(s["envelope"])
    assert env.startswith(b'("Tue, 2 Jan 2024 10:00:00 +0000" "=?utf-8?q?Gr=C3=BC=C3=9Fe?=" (("Doe, John" NIL "john" "example.org"))')
    # Sender and Reply-To default to From
    assert env.count(b'("Doe, John" NIL "john" "example.org")') == 3


def test_multipart_mixed_with_alternative_attachment_and_message():
    s = analyze(MIXED)
    json.loads(json.dumps(s))
    body = s["body"]
    assert (body["type"], body["subtype"]) == ("multipart", "mixed")
    assert [p["subtype"] for p in body["parts"]] == ["alternative", "pdf", "rfc822"]
    alt = body["parts"][0]
    assert [p["subtype"] for p in alt["parts"]] == ["plain", "html"]
    assert section(MIXED, s, (1, 1)) == b"plain =C3=A9"
    assert section(MIXED, s, (1, 2)) == b"<p>html</p>"
    assert section(MIXED, s, (1, 2), "MIME") == b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    assert section(MIXED, s, (1,)).startswith(b"--inner\r\n") and section(MIXED, s, (1,)).endswith(b"--inner--\r\n")
    pdf = body["parts"][1]
    assert pdf["encoding"] == "BASE64" and pdf["id"] == "<pdf1>" and pdf["description"] == "A report"
    assert pdf["disposition"] == ["attachment", [["filename", "r.pdf"]]]
    assert pdf["language"] == ["en", "de"] and pdf["location"] == "http://example.org/r.pdf"
    assert section(MIXED, s, (2,)) == b"JVBERi0xLjQK"
    assert pdf["size"] == 12
    msg = body["parts"][2]
    assert msg["envelope"]["subject"] == "forwarded"
    assert msg["envelope"]["from"] == [[None, None, "inner", "example.org"]]
    assert section(MIXED, s, (3,), "HEADER") == b"From: inner@example.org\r\nSubject: forwarded\r\nContent-Type: multipart/mixed; boundary=nested\r\n\r\n"
    assert section(MIXED, s, (3,)).startswith(b"From: inner@example.org")
    assert section(MIXED, s, (3,)).endswith(b"nested two\r\n--nested--")  # CRLF belongs to --outer
    assert section(MIXED, s, (3,), "TEXT").startswith(b"--nested\r\n")
    assert section(MIXED, s, (3, 1)) == b"nested one"
    assert section(MIXED, s, (3, 2)) == b"nested two"
    assert section(MIXED, s, (3, 2), "MIME") == b"Content-Type: text/plain\r\n\r\n"
    assert section(MIXED, s, (3,), "HEADER.FIELDS", ["SUBJECT"]) == b"Subject: forwarded\r\n\r\n"
    assert section(MIXED, s, (2,), "HEADER") is None  # not a message/rfc822 part
    assert section(MIXED, s, (4,)) is None
    assert findPart(s, (3, 2))["lines"] == 1
    bs = fetch.formatBodyStructure(body)
    assert bs.startswith(b'((("TEXT" "PLAIN" ("charset" "utf-8") NIL NIL "QUOTED-PRINTABLE" 12 1 NIL NIL NIL NIL)')
    assert b'"ALTERNATIVE" ("boundary" "inner") NIL NIL NIL)' in bs
    assert b'("APPLICATION" "PDF" ("name" "r.pdf") "<pdf1>" "A report" "BASE64" 12 NIL ("ATTACHMENT" ("filename" "r.pdf")) ("en" "de") "http://example.org/r.pdf")' in bs
    assert b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" ' in bs
    assert bs.endswith(b' "MIXED" ("boundary" "outer") NIL NIL NIL)')
    # the message/rfc822 part carries an envelope and the nested body
    assert b'(NIL "forwarded" ((NIL NIL "inner" "example.org"))' in bs


def test_header_fields_filters():
    s = analyze(SIMPLE)
    got = section(SIMPLE, s, (), "HEADER.FIELDS", ["TO", "SUBJECT"])
    assert got == b"To: alice@example.org,\r\n bob@example.net (Bob B)\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\n"
    got = section(SIMPLE, s, (), "HEADER.FIELDS.NOT", ["TO", "SUBJECT", "DATE"])
    assert got == b'From: "Doe, John" <john@example.org>\r\nMessage-ID: <abc@example.org>\r\n\r\n'
    assert section(SIMPLE, s, (), "HEADER.FIELDS", ["X-NONE"]) == b"\r\n"


def test_lf_only_message():
    raw = MIXED.replace(b"\r\n", b"\n")
    s = analyze(raw)
    assert [p["subtype"] for p in s["body"]["parts"]] == ["alternative", "pdf", "rfc822"]
    assert section(raw, s, (1, 2)) == b"<p>html</p>"
    assert section(raw, s, (3, 2)) == b"nested two"
    assert section(raw, s, (), "HEADER").endswith(b"boundary=\"outer\"\n\n")


def test_missing_final_boundary():
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\none\r\n--b\r\nContent-Type: text/html\r\n\r\ntwo\r\n"
    s = analyze(raw)
    assert len(s["body"]["parts"]) == 2
    assert section(raw, s, (2,)) == b"two\r\n"


def test_boundary_never_found_and_missing():
    raw = b"Content-Type: multipart/mixed; boundary=zzz\r\n\r\njust text\r\n"
    s = analyze(raw)
    (part,) = s["body"]["parts"]
    assert part["type"] == "text" and section(raw, s, (1,)) == b"just text\r\n"
    raw = b"Content-Type: multipart/mixed\r\n\r\njust text\r\n"
    s = analyze(raw)
    assert s["body"]["type"] == "text" and "parts" not in s["body"]


def test_boundary_prefix_is_not_a_delimiter():
    raw = b"Content-Type: multipart/mixed; boundary=ab\r\n\r\n--ab\r\n\r\nx\r\n--abc\r\ny\r\n--ab--\r\n"
    s = analyze(raw)
    assert len(s["body"]["parts"]) == 1
    assert section(raw, s, (1,)) == b"x\r\n--abc\r\ny"


def test_no_header_and_broken_header():
    s = analyze(b"just a body line\r\nanother\r\n")
    assert s["headers"] == [] and s["body"]["offsets"] == [0, 0, 27]
    s = analyze(b"\r\nbody only")
    assert s["body"]["offsets"] == [0, 2, 11]
    s = analyze(b"")
    assert s["body"]["size"] == 0
    s = analyze(b"Subject: no body")
    assert s["envelope"]["subject"] == "no body" and s["body"]["size"] == 0


def test_8bit_headers():
    raw = "Subject: Grüße\r\nFrom: Jörg <j@example.org>\r\n\r\nx".encode("utf-8")
    s = analyze(raw)
    assert s["envelope"]["subject"] == "Grüße"
    assert s["envelope"]["from"] == [["Jörg", None, "j", "example.org"]]
    assert "Grüße".encode("utf-8") in fetch.formatEnvelope(s["envelope"])
    raw = b"Subject: caf\xe9\r\n\r\nx"  # Latin-1, not UTF-8
    assert analyze(raw)["envelope"]["subject"] == "caf\xe9"


def test_address_groups_and_routes():
    got = parseAddressList('undisclosed-recipients:;, "A B" <@r1,@r2:a@x.org>, c@d (Comment), group: e@f, <g@h>;')
    assert got == [
        [None, None, "undisclosed-recipients", None],
        [None, None, None, None],
        ["A B", "@r1,@r2", "a", "x.org"],
        ["Comment", None, "c", "d"],
        [None, None, "group", None],
        [None, None, "e", "f"],
        [None, None, "g", "h"],
        [None, None, None, None],
    ]
    assert parseAddressList("") is None
    assert parseAddressList("John Q. Public <jqp@x>")[0][0] == "John Q. Public"
    assert parseAddressList("nodomain") == [[None, None, "nodomain", ""]]


def test_digest_default_type():
    raw = (
        b"Content-Type: multipart/digest; boundary=d\r\n\r\n"
        b"--d\r\n\r\nSubject: one\r\n\r\nbody1\r\n--d--\r\n"
    )
    s = analyze(raw)
    part = s["body"]["parts"][0]
    assert (part["type"], part["subtype"]) == ("message", "rfc822")
    assert part["envelope"]["subject"] == "one"


def test_depth_is_bounded():
    raw = b""
    for i in range(200):
        raw += b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
    raw += b"\r\nleaf\r\n"
    s = analyze(raw)
    json.dumps(s)
    depth = 0
    node = s["body"]
    while "parts" in node:
        node = node["parts"][0]
        depth += 1
    assert depth <= 51
    assert node["type"] == "application"
    # formatting such a deep structure still works
    assert fetch.formatBodyStructure(s["body"]).count(b"(") > 50


def test_many_parts_bounded():
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n\r\nx\r\n" * 6000 + b"--b--\r\n"
    s = analyze(raw)
    assert len(s["body"]["parts"]) <= 5000


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_analyze_never_raises(data):
    for raw in (data, b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n" + data,
                b"Content-Type: message/rfc822\r\n\r\n" + data):
        s = analyze(raw)
        json.dumps(s)
        fetch.formatBodyStructure(s["body"])
        fetch.formatEnvelope(s["envelope"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([b"--x\r\n", b"--x--\r\n", b"\r\n", b"a: b\r\n", b"text\r\n", b"--y\r\n",
                                 b"Content-Type: multipart/mixed; boundary=y\r\n", b"\n"]), max_size=30))
def test_offsets_stay_in_bounds(chunks):
    raw = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n" + b"".join(chunks)
    s = analyze(raw)

    def walk(part):
        hs, bs, end = part["offsets"]
        assert 0 <= hs <= bs <= end <= len(raw)
        assert part["size"] == end - bs
        for p in part.get("parts", ()):
            walk(p)
        if "body" in part:
            walk(part["body"])

    walk(s["body"])


def test_a_list_tag_alone_does_not_make_a_reply():
    """RFC 5256 §2.1: a reply is marked by a Re:/Fwd: leader, a (fwd) trailer or a [Fwd: ...] wrapper, not by a [blob]."""
    from mailplat.mime.structure import baseSubject, subjectIsReply

    for subject, base, reply in (("Quarterly report", "QUARTERLY REPORT", False),
                                 ("[PATCH] Quarterly report", "QUARTERLY REPORT", False),
                                 ("[list] Re: x", "X", True), ("x (fwd)", "X", True),
                                 ("[Fwd: hello]", "HELLO", True), ("Fwd: [tag] y", "Y", True), ("", "", False)):
        assert (baseSubject(subject), subjectIsReply(subject)) == (base, reply), subject


def test_search_text_of_8bit_bodies_labelled_ascii_and_folded_headers():
    """An 8-bit body with no charset (US-ASCII by default) is searchable as its own charset; TEXT sees unfolded headers."""
    from mailplat.imap.search import Candidate, matches, prepare
    from mailplat.mime.structure import textParts

    raw = "Subject: very long subject that\r\n is folded across lines\r\n\r\nGrüße, naïve façade\r\n".encode()
    st = analyze(raw)
    assert list(textParts(raw, st["body"])) == ["Grüße, naïve façade\r\n"]
    latin = "Subject: x\r\n\r\nna\u00efve\r\n".encode("latin-1")
    assert list(textParts(latin, analyze(latin)["body"])) == ["naïve\r\n"]
    msg = Candidate(seq=1, uid=1, flags=frozenset(), recent=False, size=len(raw), internalDate=0.0,
                    structure=st, content=raw)
    for kind, needle in (("text", "that is folded"), ("body", "naïve"), ("text", "naïve")):
        key = prepare((kind, needle.encode()), "UTF-8")
        assert matches(key, msg, 1, 1), (kind, needle)


def test_encoded_message_rfc822_keeps_the_grammar():
    # RFC 3501 7.4.2: a MESSAGE/RFC822 part has an envelope, a body and lines,
    # even when (against RFC 2046 5.2.1) it is base64: empty ones stand in.
    raw = (b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: message/rfc822\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nU3ViamVjdDogaGkNCg0KYm9keQ0K\r\n--B--\r\n")
    part = analyze(raw)["body"]["parts"][0]
    assert fetch.formatBodyStructure(part, False) == (
        b'("MESSAGE" "RFC822" NIL NIL NIL "BASE64" 28 (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL) '
        b'("TEXT" "PLAIN" ("charset" "us-ascii") NIL NIL "7BIT" 0 0) 1)')
    assert fetch.sectionBytes(raw, analyze(raw), Section(part=(1,), text="HEADER")) == b""


def test_message_global_is_a_basic_body_in_imap4rev1():
    inner = "Subject: caf\u00e9\r\n\r\nbody\r\n".encode("utf-8")
    raw = (b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: message/global\r\n\r\n"
           + inner + b"--B--\r\n")
    s = analyze(raw)
    assert fetch.formatBodyStructure(s["body"]["parts"][0], False) == b'("MESSAGE" "GLOBAL" NIL NIL NIL "7BIT" %d)' % (len(inner) - 2)
    # Its sections are still served from the message inside.
    assert fetch.sectionBytes(raw, s, Section(part=(1,), text="HEADER")) == "Subject: caf\u00e9\r\n\r\n".encode("utf-8")


def test_a_first_line_that_is_not_a_field():
    # An mbox "From " line or a stray folded line before the fields: the
    # header still runs to the first empty line (RFC 5322 2.1).
    for junk in (b"From sender@example.net Mon Jan  1 10:00:00 2024\r\n", b" folded\r\n"):
        raw = junk + b"From: Real <real@example.org>\r\nSubject: kept\r\n\r\nthe body\r\n"
        s = analyze(raw)
        assert s["envelope"]["subject"] == "kept" and s["envelope"]["from"] == [["Real", None, "real", "example.org"]]
        assert fetch.sectionBytes(raw, s, Section(text="TEXT")) == b"the body\r\n"
        assert fetch.sectionBytes(raw, s, Section(text="HEADER")) == raw[:-len(b"the body\r\n")]


def test_header_fields_blank_line():
    # RFC 3501 6.4.5: the empty line ends every header fetch but that of a
    # message with no body and no empty line.
    with_blank = b"Subject: a\r\nX: y\r\n\r\nbody"
    without = b"Subject: a\r\nX: y\r\n"
    for raw, expected in ((with_blank, b"Subject: a\r\n\r\n"), (without, b"Subject: a\r\n")):
        s = analyze(raw)
        assert fetch.sectionBytes(raw, s, Section(text="HEADER.FIELDS", fields=("SUBJECT",))) == expected
        assert fetch.sectionBytes(raw, s, Section(text="HEADER.FIELDS.NOT", fields=("X",))) == expected
