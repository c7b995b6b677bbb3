"""
The ESMTP extensions and defences of mailplat.smtp.server through a
StringTransport: CHUNKING/BDAT and BINARYMIME (RFC 3030), DSN (RFC 3461),
SMTPUTF8 (RFC 6531), text line limits, messages per connection, relay
tricks, and the optional hook stages.
"""

import pytest

from mailplat.hooks import PassThroughHook
from mailplat.interfaces.hooks import Decision
from mailplat.smtp import wire

from test_smtp_server import HOST, start

MAIL = "MAIL FROM:<a@example.net>"


def transaction(s, mail=MAIL, rcpts=("alice@example.org",)):
    s.ehlo()
    assert s.cmd(mail) == (250, ["2.1.0 Ok"])
    for r in rcpts:
        assert s.cmd(f"RCPT TO:<{r}>")[0] == 250


def body(s):
    """The content of the only committed message, without our Received: header."""
    ((_, env, content),) = s.queue.committed
    assert content.startswith(b"Received: ")
    return env, content[content.index(b"\r\n", content.index(b"\tfor <") if b"\tfor <" in content else 0) + 2 :]


# -- CHUNKING / BDAT ------------------------------------------------------------------


def test_bdat_chunks_stored_exactly():
    s = start()
    transaction(s)
    s.send("BDAT 12\r\nSubject: a\r\n")
    assert s.replies() == [(250, ["2.0.0 12 octets received"])]
    s.send(b"BDAT 9 LAST\r\n\r\nhello\r\n")
    ((code, (text,)),) = s.replies()
    assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
    env, content = body(s)
    assert content == b"Subject: a\r\n\r\nhello\r\n"
    assert env.recipients == ("alice@example.org",)


def test_bdat_pipelined_in_one_packet_with_data_that_looks_like_commands():
    # The chunk's octets are content, never commands, and the replies come in order.
    s = start()
    s.ehlo()
    chunk = b"Subject: x\r\n\r\nQUIT\r\n.\r\nRSET\r\n"
    s.send(
        b"MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
        + b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n"
    )
    codes = [c for c, _ in s.replies()]
    assert codes == [250, 250, 250, 250, 250]
    env, content = body(s)
    assert content.endswith(chunk)


def test_bdat_split_across_packets_byte_by_byte():
    s = start()
    transaction(s)
    data = b"A: b\r\n\r\n" + bytes(range(32, 127)) + b"\r\n"
    for b in b"BDAT %d LAST\r\n" % len(data) + data:
        s.send(bytes([b]))
    ((code, _),) = s.replies()
    assert code == 250
    assert body(s)[1] == data


def test_binarymime_keeps_every_octet():
    s = start()
    transaction(s, mail=MAIL + " BODY=BINARYMIME")
    binary = b"Content-Type: application/octet-stream\r\n\r\n" + bytes(range(256)) * 8 + b"\n\r\x00.\r\n.\n"
    s.send(b"BDAT %d LAST\r\n" % len(binary) + binary)
    ((code, _),) = s.replies()
    assert code == 250
    env, content = body(s)
    assert content == binary
    assert env.mailParams["BODY"] == "BINARYMIME"


def test_binarymime_refused_with_data():
    s = start()
    transaction(s, mail=MAIL + " BODY=BINARYMIME")
    assert s.cmd("DATA") == (503, ["5.5.1 BODY=BINARYMIME requires BDAT, not DATA"])


def test_data_after_bdat_and_rcpt_after_bdat_refused():
    s = start()
    transaction(s)
    s.send("BDAT 3\r\nA: ")
    assert s.replies()[0][0] == 250
    assert s.cmd("DATA")[0] == 503
    assert s.cmd("RCPT TO:<bob@example.org>")[0] == 503
    s.send("BDAT 0 LAST\r\n")
    assert s.replies()[0][0] == 250


def test_bdat_without_mail_or_recipients_reads_the_chunk_then_refuses():
    s = start()
    s.ehlo()
    s.send("BDAT 6\r\nRSET\r\nNOOP\r\n")
    assert s.replies() == [(503, ["5.5.1 Need MAIL command"]), (250, ["2.0.0 Ok"])]
    assert s.cmd(MAIL)[0] == 250
    assert s.cmd("RCPT TO:<nobody@example.org>")[0] == 550
    s.send("BDAT 4 LAST\r\nQUIT")
    assert s.replies() == [(554, ["5.5.1 No valid recipients"])]
    assert not s.closed


def test_bdat_bad_syntax():
    s = start()
    transaction(s)
    assert s.cmd("BDAT") == (501, ["5.5.4 Syntax: BDAT size [LAST]"])
    assert s.cmd("BDAT -1") == (501, ["5.5.4 Syntax: BDAT size [LAST]"])
    assert s.cmd("BDAT 1 FIRST") == (501, ["5.5.4 Syntax: BDAT size [LAST]"])


def test_bdat_over_size_limit_is_read_refused_and_not_stored():
    s = start(maxMessageSize=100)
    transaction(s)
    s.send(b"BDAT 50\r\n" + b"x" * 48 + b"\r\n")
    assert s.replies()[0][0] == 250
    s.send(b"BDAT 60 LAST\r\n" + b"y" * 58 + b"\r\n")
    assert s.replies() == [(552, ["5.3.4 Message size exceeds fixed maximum message size"])]
    assert s.queue.committed == []
    # The transaction is over: a further chunk needs a new MAIL.
    s.send("BDAT 1 LAST\r\nz")
    assert s.replies()[0][0] == 503
    assert s.cmd("NOOP")[0] == 250


def test_bdat_bare_lf_refused_unless_binary():
    s = start()
    transaction(s)
    data = b"A: b\r\n\r\nx\ny\r\n"
    s.send(b"BDAT %d LAST\r\n" % len(data) + data)
    assert s.replies() == [(550, ["5.6.0 Message contains bare CR or LF: lines must end with CRLF"])]
    assert s.queue.committed == []


def test_bdat_crlf_split_between_chunks_is_not_bare():
    s = start()
    transaction(s)
    s.send(b"BDAT 7\r\nA: b\r\n\r")
    s.send(b"BDAT 4 LAST\r\n\nx\r\n")
    codes = [c for c, _ in s.replies()]
    assert codes == [250, 250]
    assert body(s)[1] == b"A: b\r\n\r\nx\r\n"


def test_bdat_bare_lf_normalised_when_configured():
    s = start(normaliseBareLineEndings=True)
    transaction(s)
    s.send(b"BDAT 9 LAST\r\nA: b\n\nx\n\r")
    assert s.replies()[0][0] == 250
    assert body(s)[1] == b"A: b\r\n\r\nx\r\n\r\n"


def test_bdat_then_rset_throws_the_partial_message_away():
    s = start()
    transaction(s)
    s.send("BDAT 3\r\nA: ")
    s.replies()
    assert s.cmd("RSET")[0] == 250
    assert s.queue.committed == []
    transaction(s)
    s.send("BDAT 8 LAST\r\nA: b\r\n\r\n")
    assert s.replies()[0][0] == 250
    assert body(s)[1] == b"A: b\r\n\r\n"


# -- DSN -------------------------------------------------------------------------------------


def test_dsn_parameters_validated_and_kept():
    s = start()
    s.ehlo()
    assert s.cmd(MAIL + " RET=hdrs ENVID=QQ+2B314") == (250, ["2.1.0 Ok"])
    assert s.cmd("RCPT TO:<alice@example.org> NOTIFY=success,delay ORCPT=rfc822;alice+2Bx@example.org")[0] == 250
    assert s.cmd("RCPT TO:<bob@example.org> NOTIFY=NEVER")[0] == 250
    s.send("DATA\r\nA: b\r\n\r\n.\r\n")
    assert [c for c, _ in s.replies()] == [354, 250]
    ((_, env, _),) = s.queue.committed
    assert env.mailParams == {"RET": "HDRS", "ENVID": "QQ+2B314"}
    assert env.rcptParams == (
        {"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;alice+2Bx@example.org"},
        {"NOTIFY": "NEVER"},
    )
    assert wire.decodeXtext(env.mailParams["ENVID"]) == "QQ+314"


@pytest.mark.parametrize(
    "params",
    ["RET=ALL", "RET", "ENVID=a+2b", "ENVID=" + "x" * 101, "ENVID=a+", "RET=FULL RET=HDRS"],
)
def test_bad_dsn_mail_parameters(params):
    s = start()
    s.ehlo()
    code, (text,) = s.cmd(f"{MAIL} {params}")
    assert code == 501 and text.startswith("5.5.4 ")


@pytest.mark.parametrize(
    "params",
    ["NOTIFY=NEVER,SUCCESS", "NOTIFY=SOMETIMES", "NOTIFY=SUCCESS,SUCCESS", "NOTIFY", "ORCPT=alice@example.org",
     "ORCPT=rfc822;a+zz@b", "ORCPT=;a@b"],
)
def test_bad_dsn_rcpt_parameters(params):
    s = start()
    s.ehlo()
    s.cmd(MAIL)
    code, (text,) = s.cmd(f"RCPT TO:<alice@example.org> {params}")
    assert code == 501 and text.startswith("5.5.4 ")


@pytest.mark.parametrize("addr,ok", [
    ("caf\u00e9@example.org", True), ("caf\\x{E9}@example.org", True), ("\\x{1F600}@example.org", True),
    ("\\x{110000}@example.org", False), ("\\x{D800}@example.org", False), ("\\x{00E9}@example.org", False),
    ("\\x{41}@example.org", False), ("a b@example.org", False),
])
def test_utf8_orcpt_escapes(addr, ok):
    """RFC 6533 §3: C{\\x{HEXPOINT}} names a Unicode scalar value in its shortest form, ASCII only where xtext needs it."""
    params = {"ORCPT": "utf-8;" + addr}
    if ok:
        assert wire.checkDSNRcptParams(params, utf8=True) == params
    else:
        with pytest.raises(wire.SMTPError):
            wire.checkDSNRcptParams(params, utf8=True)


def test_dsn_length_limits():
    with pytest.raises(wire.SMTPError):
        wire.checkDSNRcptParams({"ORCPT": "rfc822;" + "a" * 494})
    assert wire.checkDSNRcptParams({"ORCPT": "rfc822;" + "a" * 493})
    assert wire.checkDSNMailParams({"ENVID": "+41" * 100}) == {"ENVID": "+41" * 100}


# -- SMTPUTF8 -----------------------------------------------------------------------------------


def test_utf8_address_refused_without_smtputf8():
    s = start()
    s.ehlo()
    assert s.cmd("MAIL FROM:<pelé@example.net>") == (
        553,
        ["5.6.7 Non-ASCII sender address needs the SMTPUTF8 parameter on MAIL FROM"],
    )
    assert s.cmd(MAIL)[0] == 250
    assert s.cmd("RCPT TO:<andré@example.org>")[0] == 553


def test_utf8_message_accepted_with_smtputf8():
    s = start()
    s.proto.factory.router.users.add("andré@example.org")
    s.ehlo()
    assert s.cmd("MAIL FROM:<pelé@exämple.net> SMTPUTF8") == (250, ["2.1.0 Ok"])
    assert s.cmd("RCPT TO:<andré@example.org>") == (250, ["2.1.5 OK"])
    message = "From: Pelé <pelé@exämple.net>\r\nSubject: ça va\r\n\r\nolá\r\n".encode()
    s.send(b"DATA\r\n" + message + b".\r\n")
    assert [c for c, _ in s.replies()] == [354, 250]
    ((_, env, content),) = s.queue.committed
    assert env.sender == "pelé@exämple.net" and env.recipients == ("andré@example.org",)
    assert env.protocol == "UTF8SMTP"
    assert "for <andré@example.org>".encode() in content
    assert content.endswith(message)


def test_utf8_headers_refused_without_smtputf8():
    s = start()
    transaction(s)
    s.send("DATA\r\nSubject: ça va\r\n\r\nbody\r\n.\r\n".encode())
    assert s.replies()[1] == (
        550,
        ["5.6.7 Message has non-ASCII header fields: send it with the SMTPUTF8 parameter (RFC 6531)"],
    )
    assert s.queue.committed == []
    # 8-bit in the body is fine (8BITMIME), and so are 8-bit headers when configured.
    transaction(s)
    s.send("DATA\r\nSubject: x\r\n\r\nça va\r\n.\r\n".encode())
    assert s.replies()[1][0] == 250
    s = start(eightBitHeaders=True)
    transaction(s)
    s.send("DATA\r\nSubject: ça va\r\n\r\n.\r\n".encode())
    assert s.replies()[1][0] == 250


def test_invalid_utf8_address_refused_even_with_smtputf8():
    s = start()
    s.ehlo()
    s.send(b"MAIL FROM:<p\xff\xfe@example.net> SMTPUTF8\r\n")
    assert s.replies()[0][0] == 501


# -- limits ---------------------------------------------------------------------------------------


def test_text_line_limit_in_data():
    s = start()
    transaction(s)
    s.send(b"DATA\r\nA: b\r\n\r\n" + b"x" * 998 + b"\r\n.\r\n")
    assert s.replies()[1][0] == 250
    transaction(s)
    s.send(b"DATA\r\nA: b\r\n\r\n" + b"x" * 999 + b"\r\n.\r\nNOOP\r\n")
    assert s.replies()[1:] == [
        (550, ["5.6.0 Message contains a line longer than the limit (RFC 5321 4.5.3.1.6)"]),
        (250, ["2.0.0 Ok"]),
    ]
    assert len(s.queue.committed) == 1


def test_text_line_limit_configurable_and_off_for_binarymime():
    s = start(maxTextLineLength=0)
    transaction(s)
    s.send(b"DATA\r\nA: b\r\n\r\n" + b"x" * 5000 + b"\r\n.\r\n")
    assert s.replies()[1][0] == 250
    s = start()
    transaction(s, mail=MAIL + " BODY=BINARYMIME")
    data = b"A: b\r\n\r\n" + b"x" * 5000
    s.send(b"BDAT %d LAST\r\n" % len(data) + data)
    assert s.replies()[0][0] == 250


def test_messages_per_connection():
    s = start(maxMessagesPerConnection=2)
    s.ehlo()
    for _ in range(2):
        s.send(MAIL + "\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nA: b\r\n\r\n.\r\n")
        assert [c for c, _ in s.replies()] == [250, 250, 354, 250]
    assert s.cmd(MAIL) == (421, [f"4.7.0 {HOST} Too many messages in this connection, reconnect"])
    assert s.closed


@pytest.mark.parametrize(
    "address",
    [
        "user%other.example.net@example.org",
        '"user@other.example.net"@example.org',
        "@example.org:user@other.example.net",
        "@example.org,@example.org:user@other.example.net",
        "user@other.example.net@example.org",
        "other.example.net!user@example.org",
        "user@other.example.net.",
        "user@[192.0.2.99]",
        "user@[IPv6:2001:db8::1]",
        "user%other.example.net@[192.0.2.1]",
    ],
)
def test_relay_tricks_refused(address):
    s = start()
    s.ehlo()
    s.cmd(MAIL)
    assert s.cmd(f"RCPT TO:<{address}>") == (550, ["5.7.1 Relay access denied"]) or s.cmd(
        f"RCPT TO:<{address}>"
    ) == (550, ["5.7.1 Relaying denied"])
    assert s.proto._recipients == []


def test_trailing_dot_on_our_domain_is_ours():
    s = start()
    s.ehlo()
    s.cmd(MAIL)
    assert s.cmd("RCPT TO:<alice@example.org.>") == (250, ["2.1.5 OK"])
    assert s.proto._recipients == ["alice@example.org"]


def test_auth_parameter_on_mail():
    s = start(peer="127.0.0.1", host="127.0.0.1", authOnMX=True)
    s.ehlo()
    s.login()
    assert s.cmd(MAIL + " AUTH=alice@example.org")[0] == 250
    assert s.proto._mailParams["AUTH"] == "alice@example.org"
    s.cmd("RSET")
    assert s.cmd(MAIL + " AUTH=mallory@example.org")[0] == 250
    assert s.proto._mailParams["AUTH"] == "<>"  # not trusted for another identity
    s.cmd("RSET")
    assert s.cmd(MAIL + " AUTH=bad+zz")[0] == 501


# -- hook stages -----------------------------------------------------------------------------------


class RecordingHook(PassThroughHook):
    name = "recording"

    def __init__(self):
        self.calls = []

    def headers(self, context, headers):
        self.calls.append(("headers", headers))
        if b"X-Spam: yes" in headers:
            return Decision.reject("Spam", 550, "5.7.1")
        return None

    def disconnect(self, context):
        self.calls.append(("disconnect", context.sessionId))


def test_headers_and_disconnect_stages():
    hook = RecordingHook()
    s = start(hooks=[hook])
    transaction(s)
    s.send("DATA\r\nA: b\r\nX-Spam: yes\r\n\r\nbody\r\n.\r\n")
    assert s.replies()[1] == (550, ["5.7.1 Spam"])
    transaction(s)
    s.send("BDAT 14 LAST\r\nA: b\r\n\r\nbody\r\n")
    assert s.replies()[0][0] == 250
    assert [c for c in hook.calls] == [
        ("headers", b"A: b\r\nX-Spam: yes\r\n"),
        ("headers", b"A: b\r\n"),
    ]
    s.proto.connectionLost(None)
    assert hook.calls[-1] == ("disconnect", s.proto.sessionId)


def test_pass_through_data_stage_does_not_buffer_the_message():
    hook = RecordingHook()
    s = start(hooks=[hook])
    transaction(s)
    s.send("DATA\r\n")
    assert s.proto._hookChunks is None


# -- found by sending them to the running server ---------------------------------


def test_refused_bdat_outside_a_transaction_counts_for_no_message():
    # RFC 1870 6.3: the limit is the message's; a chunk refused with 503 is part of none.
    s = start(maxMessageSize=3000)
    s.ehlo()
    s.send(b"BDAT 2900\r\n" + b"x" * 2900)
    assert s.replies() == [(503, ["5.5.1 Need MAIL command"])]
    assert s.cmd(MAIL)[0] == 250  # (no EHLO in between: that would reset the session)
    assert s.cmd("RCPT TO:<alice@example.org>")[0] == 250
    content = b"Subject: fits\r\n\r\n" + (b"y" * 98 + b"\r\n") * 5
    s.send(b"BDAT %d LAST\r\n" % len(content) + content)
    assert s.replies()[0][0] == 250
    assert len(s.queue.committed) == 1


def test_extensions_make_mail_and_rcpt_lines_longer():
    # RFC 5321 4.5.3.1.4 and the extensions' own increments: SIZE and DSN (RFC 1870 4, RFC 3461 4).
    s = start()
    s.ehlo()
    domain = "d" * 60 + "." + "e" * 60 + ".example"
    envid = "+2B" * 100  # 100 characters once decoded
    line = f"MAIL FROM:<{'s' * 64}@{domain}> SIZE=1000 RET=HDRS ENVID={envid}"
    assert len(line) + 2 > 512
    assert s.cmd(line) == (250, ["2.1.0 Ok"])
    orcpt = "rfc822;" + "+2B" * 64 + "@" + domain + "." + "f" * 60 + "." + "g" * 60
    line = f"RCPT TO:<alice@example.org> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT={orcpt}"
    assert len(line) + 2 > 512
    assert s.cmd(line)[0] == 250
    # Still bounded.
    assert s.cmd("RCPT TO:<alice@example.org> ORCPT=rfc822;" + "a" * 1100) == (500, ["5.5.2 Line too long"])


def test_a_refused_line_ends_the_auth_exchange():
    # RFC 4954 4: a reply other than 334 completes AUTH; the next line is a command again.
    s = start(role="submission", allowInsecureAuth=True)
    s.ehlo()
    assert s.cmd("AUTH PLAIN")[0] == 334
    s.send(b"A" * (wire.AUTH_LINE_LENGTH + 10) + b"\r\n")
    assert s.replies() == [(500, ["5.5.6 Authentication exchange line is too long"])]
    assert s.cmd("NOOP") == (250, ["2.0.0 Ok"])
    assert s.cmd("AUTH PLAIN")[0] == 334
    s.send(b"YWxp\rY2U=\r\n")
    assert s.replies()[0][0] == 500
    assert s.cmd("NOOP") == (250, ["2.0.0 Ok"])
    s.login()


def test_ipv4_literals_may_have_leading_zeros():
    # RFC 5321 4.1.3: Snum = 1*3DIGIT, a value from 0 to 255.
    for literal in ("[192.000.002.001]", "[010.0.0.1]", "[127.0.0.01]"):
        assert wire.isAddressLiteral(literal), literal
    for literal in ("[256.1.1.1]", "[1.2.3]", "[1.2.3.0004]", "[1..2.3]", "[١.2.3.4]"):
        assert not wire.isAddressLiteral(literal), literal
    s = start()
    s.ehlo("[127.000.000.001]")
    assert s.cmd("MAIL FROM:<a@[192.000.002.001]>") == (250, ["2.1.0 Ok"])
