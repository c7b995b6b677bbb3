"""Tests for mailplat.pop3.wire: line splitting, command parsing, responses, dot-stuffing."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailplat.pop3 import wire


def lines(buffer):
    out = []
    while True:
        event = buffer.nextLine()
        if event is None:
            return out
        out.append(event)


def encoded(content, chunkSize=None):
    chunks = [content] if chunkSize is None else list(wire.iterChunks(content, chunkSize))
    return b"".join(wire.encodeMessage(chunks))


# --- LineBuffer ---------------------------------------------------------------


def test_crlf_and_bare_lf_lines():
    b = wire.LineBuffer()
    b.feed(b"USER bob\r\nPASS x\nNO")
    assert lines(b) == [wire.Line(b"USER bob"), wire.Line(b"PASS x")]
    b.feed(b"OP\r")
    assert lines(b) == []
    b.feed(b"\n")
    assert lines(b) == [wire.Line(b"NOOP")]
    assert b.pending() == 0


def test_embedded_cr_and_nul_are_bad_lines():
    b = wire.LineBuffer()
    b.feed(b"USER a\rb\r\nUSER a\x00b\r\nNOOP\r\n")
    events = lines(b)
    assert isinstance(events[0], wire.BadLine)
    assert isinstance(events[1], wire.BadLine)
    assert events[2] == wire.Line(b"NOOP")


def test_line_limit_is_255_octets_with_crlf():
    b = wire.LineBuffer()
    ok = b"X" * 253
    b.feed(ok + b"\r\n")
    assert lines(b) == [wire.Line(ok)]
    b.feed(b"X" * 254 + b"\r\nNOOP\r\n")
    assert lines(b) == [wire.LineTooLong(255), wire.Line(b"NOOP")]


def test_overlong_line_without_end_reported_once_then_resync():
    b = wire.LineBuffer()
    b.feed(b"A" * 300)
    assert lines(b) == [wire.LineTooLong(255)]
    assert b.pending() == 0
    b.feed(b"B" * 10000)
    assert lines(b) == []
    assert b.pending() == 0
    b.feed(b"CCC\r\nSTAT\r\n")
    assert lines(b) == [wire.Line(b"STAT")]


def test_partial_line_ending_in_cr_at_limit_is_kept():
    b = wire.LineBuffer()
    b.feed(b"X" * 253 + b"\r")
    assert lines(b) == []
    b.feed(b"\n")
    assert lines(b) == [wire.Line(b"X" * 253)]


def test_max_length_can_be_raised_and_clear():
    b = wire.LineBuffer()
    b.maxLength = wire.MAX_SASL_LINE
    b.feed(b"Q" * 5000 + b"\r\n")
    assert lines(b) == [wire.Line(b"Q" * 5000)]
    b.feed(b"NOOP\r\nUSER x\r\n")
    b.clear()
    assert b.pending() == 0 and lines(b) == []


@settings(max_examples=150, derandomize=True, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8), st.integers(1, 7))
def test_lines_independent_of_packet_boundaries(parts, step):
    data = b"\r\n".join(p.replace(b"\r", b"").replace(b"\n", b"") for p in parts) + b"\r\n"
    whole = wire.LineBuffer()
    whole.feed(data)
    pieces = wire.LineBuffer()
    got = []
    for i in range(0, len(data), step):
        pieces.feed(data[i : i + step])
        got += lines(pieces)
    assert got == lines(whole)


# --- commands -----------------------------------------------------------------


def test_parse_keyword_case_insensitive_and_args():
    assert wire.parseCommand(b"list") == wire.Command("LIST", ())
    assert wire.parseCommand(b"LiSt 3") == wire.Command("LIST", (b"3",))
    assert wire.parseCommand(b"top 1 10") == wire.Command("TOP", (b"1", b"10"))
    assert wire.parseCommand(b"AUTH PLAIN AGJvYgBzZWNyZXQ=") == wire.Command("AUTH", (b"PLAIN", b"AGJvYgBzZWNyZXQ="))


def test_pass_keeps_spaces():
    assert wire.parseCommand(b"PASS  my secret pass ") == wire.Command("PASS", (b" my secret pass ",))


@pytest.mark.parametrize(
    "line, message",
    [
        (b"", "Empty command"),
        (b" NOOP", "Command must not start with a space"),
        (b"FROB", "Unknown command"),
        (b"N0OP", "Unknown command"),
        (b"RETR", "RETR requires an argument"),
        (b"TOP 1", "TOP requires 2 arguments"),
        (b"STAT 1", "STAT takes no arguments"),
        (b"LIST 1 2", "Too many arguments for LIST"),
        (b"PASS", "PASS requires an argument"),
    ],
)
def test_parse_errors(line, message):
    with pytest.raises(wire.CommandError) as e:
        wire.parseCommand(line)
    assert str(e.value) == message


def test_parse_number():
    assert wire.parseNumber(b"12") == 12
    assert wire.parseNumber(b"0", positive=False) == 0
    for bad in (b"0", b"-1", b"+1", b"1a", b"", b"12345678901", "١".encode()):
        with pytest.raises(wire.CommandError):
            wire.parseNumber(bad)


def test_decode_base64():
    assert wire.decodeBase64(b"=") == b""
    assert wire.decodeBase64(b"AGJvYgBz") == b"\x00bob\x00s"
    for bad in (b"AGJvYgBz=", b"AGJvYgBz====", b"YQ===="):
        with pytest.raises(wire.CommandError):
            wire.decodeBase64(bad)
    with pytest.raises(wire.CommandError):
        wire.decodeBase64(b"not base64!")


# --- responses ----------------------------------------------------------------


def test_status_lines():
    assert wire.ok() == b"+OK\r\n"
    assert wire.ok("2 320") == b"+OK 2 320\r\n"
    assert wire.err("Maildrop locked", "IN-USE") == b"-ERR [IN-USE] Maildrop locked\r\n"
    assert wire.err("x\r\nINJECTED") == b"-ERR x INJECTED\r\n"
    long = wire.err("é" * 600)
    assert len(long) <= 512 and long.endswith(b"\r\n")
    long.decode("utf-8")


def test_continuation_and_multiline():
    assert wire.continuation(b"") == b"+ \r\n"
    assert wire.continuation(b"Username:") == b"+ VXNlcm5hbWU6\r\n"
    assert wire.multiline([b"TOP", b".hidden"]) == b"TOP\r\n..hidden\r\n.\r\n"
    assert wire.multiline([]) == b".\r\n"
    with pytest.raises(ValueError):
        wire.multiline([b"a\r\nb"])


# --- message encoding -----------------------------------------------------------


def test_leading_dot_on_first_line_is_stuffed():
    assert encoded(b".first\r\nsecond\r\n") == b"..first\r\nsecond\r\n.\r\n"


def test_lone_dot_line_is_stuffed():
    assert encoded(b"a\r\n.\r\nb\r\n") == b"a\r\n..\r\nb\r\n.\r\n"
    # A crafted message that would end the response early if not stuffed.
    assert encoded(b"a\r\n.\r\n") == b"a\r\n..\r\n.\r\n"


def test_bare_lf_and_cr_become_crlf():
    assert encoded(b"a\nb\n") == b"a\r\nb\r\n.\r\n"
    assert encoded(b"a\rb\r\n") == b"a\r\nb\r\n.\r\n"
    assert encoded(b"a\n.b\n") == b"a\r\n..b\r\n.\r\n"


def test_missing_final_line_end_is_added():
    assert encoded(b"no end") == b"no end\r\n.\r\n"
    assert encoded(b"") == b".\r\n"


@pytest.mark.parametrize("chunkSize", [1, 2, 3, 5, 7, 64])
def test_dots_and_line_ends_at_chunk_boundaries(chunkSize):
    content = b".a\r\n..b\n.\r\r\n.c\r" + b"x" * 100 + b"\r\n." + b"\n" * 3 + b"."
    assert encoded(content, chunkSize) == encoded(content)


def test_lines_longer_than_a_chunk():
    content = b"." + b"y" * 200000 + b"\n." + b"z" * 70000 + b"\n"
    out = encoded(content, wire.CHUNK_SIZE)
    assert out == b".." + b"y" * 200000 + b"\r\n.." + b"z" * 70000 + b"\r\n.\r\n"


def test_size_equals_octets_sent_before_stuffing():
    content = b"Subject: x\n\n.dot\nline\r\n.\r\nend"
    body = encoded(content)
    assert wire.decodeMultiline(body) == b"Subject: x\r\n\r\n.dot\r\nline\r\n.\r\nend\r\n"
    stuffed = len(re.findall(rb"(?:^|\r\n)\.", body[: -len(wire.TERMINATOR)]))
    assert wire.normalisedSize(content) == len(body) - len(wire.TERMINATOR) - stuffed


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\r\n.\r\n", b"xyz"]), max_size=40), st.integers(1, 9))
def test_encoding_round_trips(pieces, chunkSize):
    content = b"".join(pieces)
    body = encoded(content, chunkSize)
    assert body == encoded(content)
    assert body.endswith(b".\r\n")
    # Exactly one terminator line: no line of the body (before it) is a lone dot.
    sent = body.split(b"\r\n")
    assert sent[-2:] == [b".", b""] and b"." not in sent[:-2]
    # No bare CR or LF is sent.
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", body) is None
    normalised = wire.decodeMultiline(body)
    assert len(normalised) == wire.normalisedSize(content)
    assert normalised.replace(b"\r\n", b"") == content.replace(b"\r", b"").replace(b"\n", b"")


# --- TOP --------------------------------------------------------------------------


MESSAGE = b"From: a@example.org\nSubject: hi\n\nline 1\n.line 2\nline 3\n"


def test_top_zero_lines_is_header_and_blank_line():
    assert wire.topOf(MESSAGE, 0) == b"From: a@example.org\r\nSubject: hi\r\n\r\n"


def test_top_some_lines_and_more_than_body():
    assert wire.topOf(MESSAGE, 2) == b"From: a@example.org\r\nSubject: hi\r\n\r\nline 1\r\n.line 2\r\n"
    assert wire.topOf(MESSAGE, 99) == b"".join(wire._normalise([MESSAGE]))
    body = b"".join(wire.encodeTop(MESSAGE, 2))
    assert body.endswith(b"line 1\r\n..line 2\r\n.\r\n")


def test_top_without_body_and_empty_header():
    assert wire.topOf(b"Subject: only", 3) == b"Subject: only\r\n"
    assert wire.topOf(b"\r\nbody 1\r\nbody 2\r\n", 1) == b"\r\nbody 1\r\n"
