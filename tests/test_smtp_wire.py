"""Tests for mailplat.smtp.wire: the sans-IO SMTP parser, DATA decoder and reply encoder."""

import pytest

from mailplat.smtp import wire
from mailplat.smtp.wire import (
    DataDecoder,
    LineReader,
    Reply,
    SMTPError,
    parseCommand,
    parseMail,
    parseMailbox,
    parseParameters,
    parseRcpt,
)


def drain(reader):
    out = []
    while (item := reader.next()) is not None:
        out.append(item)
    return out


# -- LineReader ------------------------------------------------------------------


def test_lines_split_at_crlf():
    r = LineReader()
    r.feed(b"EHLO a\r\nMAIL FROM:<>\r\nRC")
    assert drain(r) == [b"EHLO a", b"MAIL FROM:<>"]
    r.feed(b"PT TO:<b@c>\r\n")
    assert drain(r) == [b"RCPT TO:<b@c>"]
    assert len(r) == 0


def test_lines_split_byte_by_byte():
    r = LineReader()
    out = []
    for b in b"NOOP\r\nQUIT\r\n":
        r.feed(bytes([b]))
        out += drain(r)
    assert out == [b"NOOP", b"QUIT"]


def test_bare_lf_is_an_error_not_a_line():
    r = LineReader()
    r.feed(b"MAIL FROM:<a@b>\nRCPT TO:<c@d>\r\n")
    first, second = drain(r)
    assert isinstance(first, Reply) and (first.code, first.enhanced) == (500, "5.5.2")
    assert "LF" in first.text
    # the next, correct line is read normally
    assert second == b"RCPT TO:<c@d>"


def test_bare_cr_is_an_error():
    r = LineReader()
    r.feed(b"MAIL FROM:<a@b>\rRCPT TO:<c@d>\r\nNOOP\r\n")
    first, second = drain(r)
    assert isinstance(first, Reply) and (first.code, first.enhanced) == (500, "5.5.2")
    assert "CR" in first.text
    assert second == b"NOOP"


def test_cr_at_end_of_buffer_waits_for_lf():
    r = LineReader()
    r.feed(b"NOOP\r")
    assert drain(r) == []
    r.feed(b"\n")
    assert drain(r) == [b"NOOP"]


def test_nul_refused():
    r = LineReader()
    r.feed(b"NO\x00OP\r\n")
    (err,) = drain(r)
    assert isinstance(err, Reply) and err.code == 500


def test_line_limit_counts_crlf():
    r = LineReader(maxLength=512)
    ok = b"X" * 510 + b"\r\n"
    r.feed(ok)
    assert drain(r) == [b"X" * 510]
    r.feed(b"X" * 511 + b"\r\n")
    (err,) = drain(r)
    assert err == wire.LINE_TOO_LONG


def test_long_line_is_skipped_and_reader_resyncs():
    r = LineReader(maxLength=64)
    r.feed(b"A" * 100)
    (err,) = drain(r)
    assert err.code == 500 and err.text == "Line too long"
    # the rest of the long line is thrown away, up to its end
    r.feed(b"A" * 1000)
    assert drain(r) == []
    assert len(r) == 0  # nothing piles up while skipping
    r.feed(b"AAAA\r\nNOOP\r\n")
    assert drain(r) == [b"NOOP"]


def test_auth_lines_may_be_longer():
    r = LineReader(maxLength=512, extended={b"AUTH": 12288})
    long = b"AUTH PLAIN " + b"A" * 2000
    r.feed(long + b"\r\n" + b"MAIL " + b"A" * 2000 + b"\r\n")
    first, second = drain(r)
    assert first == long
    assert second == wire.LINE_TOO_LONG


def test_take_buffer_and_clear():
    r = LineReader()
    r.feed(b"DATA\r\nSubject: x\r\n")
    assert r.next() == b"DATA"
    assert r.takeBuffer() == b"Subject: x\r\n"
    r.feed(b"junk\r\nmore")
    assert r.clear() == len(b"junk\r\nmore")
    assert drain(r) == []


# -- commands ----------------------------------------------------------------------


def test_parse_command():
    assert parseCommand(b"ehlo client.example") == wire.Command("EHLO", "client.example")
    assert parseCommand(b"QUIT") == wire.Command("QUIT", "")
    assert parseCommand(b"MAIL  FROM:<a@b>  ") == wire.Command("MAIL", "FROM:<a@b>")
    for bad in (b"", b" NOOP", b"12 x", b"\xff\xfe", b"A" * 40):
        with pytest.raises(SMTPError) as e:
            parseCommand(bad)
        assert e.value.reply.code == 500


def test_parse_mail_simple_and_null():
    assert parseMail("FROM:<alice@example.org>") == wire.Path("alice@example.org", {})
    assert parseMail("from:<>") == wire.Path("", {})
    # common leniency: a space after the colon
    assert parseMail("FROM: <a@b.example>").address == "a@b.example"


def test_parse_mail_params():
    p = parseMail("FROM:<a@b.example> size=1000 BODY=8BITMIME  AUTH=<> X-FLAG")
    assert p.params == {"SIZE": "1000", "BODY": "8BITMIME", "AUTH": "<>", "X-FLAG": None}


def test_parse_params_errors():
    for bad in ("=x", "SIZE=", "A=b=c", "K=v K=w", "-X=1", "K=\x7f"):
        with pytest.raises(SMTPError) as e:
            parseParameters(bad)
        assert (e.value.reply.code, e.value.reply.enhanced) == (501, "5.5.4")
    with pytest.raises(SMTPError):
        parseParameters(" ".join(f"K{i}=1" for i in range(20)))


def test_parse_rcpt_source_route_is_dropped():
    assert parseRcpt("TO:<@relay1.example,@relay2.example:user@final.example>").address == "user@final.example"
    with pytest.raises(SMTPError):
        parseRcpt("TO:<@bad_domain:user@final.example>")
    with pytest.raises(SMTPError):
        parseRcpt("TO:<@relay.example user@final.example>")


def test_parse_rcpt_quoted_local_part():
    assert parseRcpt('TO:<"john doe"@example.org>').address == '"john doe"@example.org'
    assert parseRcpt('TO:<"a>b@c"@example.org>').address == '"a>b@c"@example.org'
    assert parseRcpt(r'TO:<"a\"b"@example.org>').address == r'"a\"b"@example.org'
    # a quoted string that is a plain dot-string is the same mailbox unquoted
    assert parseRcpt('TO:<"john.doe"@example.org>').address == "john.doe@example.org"


def test_parse_rcpt_postmaster_and_literals():
    assert parseRcpt("TO:<Postmaster>").address == "Postmaster"
    assert parseRcpt("TO:<u@[192.0.2.1]>").address == "u@[192.0.2.1]"
    assert parseRcpt("TO:<u@[IPv6:2001:db8::1]>").address == "u@[IPv6:2001:db8::1]"
    # a zone ID (fe80::1%eth0) is not in RFC 5321's IPv6-addr grammar
    for bad in ("TO:<u@[300.1.1.1]>", "TO:<u@[IPv6:zz::1]>", "TO:<u@[IPv6:fe80::1%eth0]>"):
        with pytest.raises(SMTPError):
            parseRcpt(bad)


@pytest.mark.parametrize(
    "args",
    [
        "TO:<>",
        "TO:user@example.org",
        "TO:<user@example.org",
        "TO:<user>",
        "TO:<user@>",
        "TO:<@example.org>",
        "TO:<a..b@example.org>",
        "TO:<.a@example.org>",
        "TO:<a@-example.org>",
        "TO:<a@example-.org>",
        "TO:<a@exa mple.org>",
        "TO:<a b@example.org>",
        'TO:<"unterminated@example.org>',
        "TO:<a@b.example>x",
        "TO:<" + "a" * 65 + "@example.org>",
        "TO:<a@" + "b" * 250 + ".example>",
    ],
)
def test_parse_rcpt_bad_address(args):
    with pytest.raises(SMTPError) as e:
        parseRcpt(args)
    assert (e.value.reply.code, e.value.reply.enhanced) == (501, "5.1.3")


@pytest.mark.parametrize("args", ["", "TO<a@b>", "TO :<a@b.example>", "FROM:<a@b.example>"])
def test_parse_rcpt_bad_keyword(args):
    with pytest.raises(SMTPError) as e:
        parseRcpt(args)
    assert (e.value.reply.code, e.value.reply.enhanced) == (501, "5.5.4")


def test_parse_mail_bad_address_code():
    with pytest.raises(SMTPError) as e:
        parseMail("FROM:<not an address>")
    assert (e.value.reply.code, e.value.reply.enhanced) == (501, "5.1.7")


def test_non_ascii_address():
    with pytest.raises(SMTPError) as e:
        parseRcpt("TO:<jörg@example.org>")
    assert (e.value.reply.code, e.value.reply.enhanced) == (553, "5.6.7")


def test_parse_mailbox_direct():
    assert parseMailbox("a.b+c@sub.example.org") == "a.b+c@sub.example.org"
    with pytest.raises(ValueError):
        parseMailbox("a@b@c")


# -- replies ------------------------------------------------------------------------


def test_reply_single_and_multi_line():
    assert Reply(250, "2.1.0", "Ok").encode() == b"250 2.1.0 Ok\r\n"
    assert Reply(250, "2.0.0", ["one", "two", "three"]).encode() == (
        b"250-2.0.0 one\r\n250-2.0.0 two\r\n250 2.0.0 three\r\n"
    )
    assert Reply(550, "5.7.1", "a\nb").encode() == b"550-5.7.1 a\r\n550 5.7.1 b\r\n"


def test_reply_without_enhanced_code():
    assert Reply(220, "", "mx ESMTP").encode() == b"220 mx ESMTP\r\n"
    assert Reply(250, "2.0.0", ["mx", "PIPELINING"]).encode(enhanced=False) == b"250-mx\r\n250 PIPELINING\r\n"
    # 3xx never carries one (RFC 3463 has no class 3)
    assert Reply(354, "2.0.0", "go").encode() == b"354 go\r\n"


def test_reply_text_cannot_inject():
    assert Reply(550, "5.7.1", ["x\x00y\x1b"]).encode() == b"550 5.7.1 x?y?\r\n"
    with pytest.raises(ValueError):
        Reply(99, "", "x").encode()


# -- DATA ---------------------------------------------------------------------------

BODY = (
    b"Subject: test\r\n"
    b"\r\n"
    b"..leading dot\r\n"
    b".single\r\n"
    b"middle . dot\r\n"
    b"...\r\n"
    b"end\r\n"
)
EXPECTED = b"Subject: test\r\n\r\n.leading dot\r\nsingle\r\nmiddle . dot\r\n..\r\nend\r\n"
WIRE = BODY + b".\r\nQUIT\r\n"


def run(decoder, pieces):
    out = []
    for p in pieces:
        out += decoder.feed(p)
    return out


def test_data_in_one_piece():
    d = DataDecoder()
    out = d.feed(WIRE)
    assert b"".join(out) == EXPECTED
    assert d.done and d.leftover == b"QUIT\r\n" and d.error is None
    assert d.size == len(EXPECTED)


def test_data_split_at_every_offset():
    for i in range(len(WIRE) + 1):
        d = DataDecoder()
        out = run(d, [WIRE[:i], WIRE[i:]])
        assert b"".join(out) == EXPECTED, i
        assert d.done and d.leftover == b"QUIT\r\n", i


def test_data_split_at_every_pair_of_offsets():
    n = len(WIRE)
    for i in range(n + 1):
        for j in range(i, n + 1):
            d = DataDecoder()
            out = run(d, [WIRE[:i], WIRE[i:j], WIRE[j:]])
            assert b"".join(out) == EXPECTED, (i, j)
            assert d.done and d.leftover == b"QUIT\r\n", (i, j)


def test_data_byte_by_byte():
    d = DataDecoder()
    out = run(d, [bytes([b]) for b in WIRE])
    assert b"".join(out) == EXPECTED
    assert d.leftover == b"QUIT\r\n"


def test_empty_message():
    d = DataDecoder()
    assert d.feed(b".\r\n") == []
    assert d.done and d.size == 0


def test_content_passed_in_chunks_not_lines():
    d = DataDecoder()
    out = d.feed(b"a\r\nb\r\nc\r\n")
    assert out == [b"a\r\nb\r\nc\r\n"]


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n"],
)
def test_smuggling_sequences_do_not_end_data(fake_end):
    d = DataDecoder()
    # after the fake end marker comes a smuggled second transaction
    smuggled = b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<v@example.org>\r\nDATA\r\n"
    d.feed(b"Subject: x\r\n\r\nhello" + fake_end + smuggled)
    assert not d.done
    assert d.error == wire.BARE_LINE_ENDING
    # still consumes up to the real end, staying in sync
    assert d.feed(b"more\r\n.\r\nQUIT\r\n") == []
    assert d.done and d.leftover == b"QUIT\r\n"
    assert (d.error.code, d.error.enhanced) == (550, "5.6.0")


def test_bare_lf_split_across_chunks():
    d = DataDecoder()
    d.feed(b"abc\r")
    d.feed(b"x\r\n")
    d.feed(b".\r\n")
    assert d.done and d.error == wire.BARE_LINE_ENDING


def test_bare_line_endings_normalised_when_asked():
    d = DataDecoder(normaliseBareLineEndings=True)
    out = d.feed(b"a\nb\rc\r\n.\n.\r\n")
    # <LF>.<CRLF> is still not the end, even when normalising
    assert not d.done and d.error is None
    out += d.feed(b".\r\n")
    assert d.done and d.error is None
    assert b"".join(out) == b"a\r\nb\r\nc\r\n\r\n.\r\n"


def test_size_limit_keeps_consuming():
    d = DataDecoder(maxSize=10)
    out = d.feed(b"0123456789\r\n")
    assert out == [] and d.error == wire.MESSAGE_TOO_BIG
    assert d.feed(b"x" * 10000 + b"\r\n") == []
    assert d.feed(b".\r\nNOOP\r\n") == []
    assert d.done and d.leftover == b"NOOP\r\n"
    assert (d.error.code, d.error.enhanced) == (552, "5.3.4")


def test_size_limit_exact_fits():
    d = DataDecoder(maxSize=5)
    assert b"".join(d.feed(b"abc\r\n.\r\n")) == b"abc\r\n"
    assert d.error is None and d.size == 5


def test_feed_after_done_goes_to_leftover():
    d = DataDecoder()
    d.feed(b".\r\nNO")
    d.feed(b"OP\r\n")
    assert d.leftover == b"NOOP\r\n"


def test_binary_bytes_exact():
    body = bytes(range(256)).replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"
    d = DataDecoder()
    assert b"".join(d.feed(body + b".\r\n")) == body


def test_decode_base64():
    assert wire.decodeBase64("AGEAYg==") == b"\x00a\x00b"
    assert wire.decodeBase64("YWJj") == b"abc"
    # Padding only completes a short final group (RFC 4648 §3.2).
    for bad in ("AGEAYg===", "YWJj=", "YWJj====", "YQ", "YQ=", "YQ=x", "Y=Q="):
        with pytest.raises(ValueError):
            wire.decodeBase64(bad)
    with pytest.raises(ValueError):
        wire.decodeBase64("not base64!")


# -- properties ---------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=20,
)


def _stuff(lines):
    return b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in lines)


@settings(max_examples=300, deadline=None)
@given(lines=_lines, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6))
def test_property_dot_stuffing_round_trips(lines, cuts):
    content = b"".join(l + b"\r\n" for l in lines)
    data = _stuff(lines) + b".\r\nQUIT\r\n"
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
    d = DataDecoder()
    assert b"".join(run(d, pieces)) == content
    assert d.done and d.error is None and d.leftover == b"QUIT\r\n"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200))
def test_property_reader_and_parser_never_crash(data):
    r = LineReader(maxLength=128)
    r.feed(data)
    for item in drain(r):
        if isinstance(item, Reply):
            item.encode()
            continue
        assert b"\r" not in item and b"\n" not in item and len(item) <= 126
        try:
            cmd = parseCommand(item)
            if cmd.verb == "MAIL":
                parseMail(cmd.args)
            elif cmd.verb == "RCPT":
                parseRcpt(cmd.args)
        except SMTPError as e:
            e.reply.encode()


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('<>@".,:[]\\ =az09-.!é\x00')), max_size=40))
def test_property_path_parser_raises_only_smtp_errors(text):
    for parse, prefix in ((parseMail, "FROM:<"), (parseRcpt, "TO:<")):
        try:
            path = parse(prefix + text)
        except SMTPError as e:
            # A well-formed user@other@ours (e.g. "0@0@0") in RCPT is a relay
            # attempt (550 5.7.1, see test_wellFormedDoubleAtIsARelayAttempt).
            relay = parse is parseRcpt and text.count("@") >= 2 and (e.reply.code, e.reply.enhanced) == (550, "5.7.1")
            assert e.reply.code in (501, 553) or relay, e.reply
        else:
            # whatever is accepted parses again to the same address
            if path.address and path.address != "Postmaster":
                assert parseMailbox(path.address) == path.address


@pytest.mark.parametrize("address", ["0@@", "a@@example.org", "@a@example.org", "a@b@"])
def test_strayAtSignsAreSyntaxErrorsNotRelayAttempts(address):
    # Found by the property test above: "0@@" was answered 550 5.7.1.
    with pytest.raises(wire.SMTPError) as e:
        wire.parseRcpt(f"TO:<{address}>")
    assert e.value.reply.code == 501, e.value.reply


def test_wellFormedDoubleAtIsARelayAttempt():
    with pytest.raises(wire.SMTPError) as e:
        wire.parseRcpt("TO:<user@other.example@example.org>")
    assert (e.value.reply.code, e.value.reply.enhanced) == (550, "5.7.1")
