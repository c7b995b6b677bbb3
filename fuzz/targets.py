"""
Fuzz targets: one function per parser, taking arbitrary bytes.

Each target drives a sans-IO parser the way its session does and checks the
parser's contract: only the documented errors come out (an L{SMTPError}
reply, an IMAP L{BadCommand} event, a POP3 L{CommandError}), and any other
exception is a crash.  Used by C{fuzz/run} (atheris, coverage-guided) and
by tests/test_fuzz_smoke.py; a crash found becomes a regression test.
"""

from __future__ import annotations

import json


def _split(data: bytes):
    """Cut C{data} into packets at points chosen by its first byte (packet boundaries must not matter)."""
    if not data:
        return [b""]
    step = data[0] % 17 + 1
    rest = data[1:]
    return [rest[i:i + step] for i in range(0, len(rest), step)] or [b""]


def smtp(data: bytes) -> None:
    from mailplat.smtp import wire

    reader = wire.LineReader(maxLength=512, extended={b"AUTH": 12288})
    pieces = _split(data)
    for piece in pieces:
        reader.feed(piece)
        while (item := reader.next()) is not None:
            if isinstance(item, wire.Reply):
                item.encode()
                continue
            try:
                cmd = wire.parseCommand(item)
                args, verb = cmd.args, cmd.verb
                if verb == "MAIL":
                    path = wire.parseMail(args)
                    wire.checkDSNMailParams(path.params)
                elif verb == "RCPT":
                    path = wire.parseRcpt(args, utf8=True)
                    wire.checkDSNRcptParams(path.params, utf8=True)
                elif verb == "BDAT":
                    wire.parseBDAT(args)
                elif verb == "AUTH":
                    try:
                        wire.decodeBase64(args.split(" ")[-1])
                    except ValueError:
                        pass
            except wire.SMTPError as e:
                e.reply.encode()
    # The same bytes as a DATA body.
    decoder = wire.DataDecoder(maxSize=1 << 20, checker=wire.ContentChecker(checkBare=True, eightBitHeaders=False))
    for piece in pieces:
        for chunk in decoder.feed(piece):
            assert isinstance(chunk, (bytes, bytearray, memoryview))
    if decoder.error is not None:
        decoder.error.encode()


def imap(data: bytes) -> None:
    from mailplat.imap import wire

    parser = wire.CommandParser(maxLine=1024, maxLiteral=4096)
    for piece in _split(data):
        parser.feed(piece)
        for _ in range(10000):
            event = parser.nextEvent()
            if event is None:
                break
            assert isinstance(event, (wire.Command, wire.BadCommand, wire.NeedContinuation, wire.RawLine)), event
        else:
            raise AssertionError("the parser keeps returning events without input")


def pop3(data: bytes) -> None:
    from mailplat.pop3 import wire

    buf = wire.LineBuffer()
    for piece in _split(data):
        buf.feed(piece)
        while (event := buf.nextLine()) is not None:
            if not isinstance(event, wire.Line):
                assert isinstance(event, (wire.LineTooLong, wire.BadLine)), event
                continue
            try:
                cmd = wire.parseCommand(event.data)
                for arg in cmd.args:
                    try:
                        wire.parseNumber(arg)
                    except wire.CommandError:
                        pass
                if cmd.args:
                    wire.decodeBase64(cmd.args[-1])
            except wire.CommandError:
                pass


def mime(data: bytes) -> None:
    from mailplat.imap.fetch import formatBodyStructure, formatEnvelope
    from mailplat.mime import structure

    tree = structure.analyze(data)
    json.dumps(tree)  # the store keeps it as JSON
    formatBodyStructure(tree["body"], True)
    formatBodyStructure(tree["body"], False)
    formatEnvelope(tree["envelope"])
    structure.indexFields(tree)
    structure.headerText(tree)
    structure.bodyText(data, tree)
    stack, seen = [tree], 0
    while stack and seen < 2000:
        node = stack.pop()
        seen += 1
        for child in structure.children(node):
            structure.decodedBody(data, child)
            if child is not node:
                stack.append(child)


TARGETS = {"smtp": smtp, "imap": imap, "pop3": pop3, "mime": mime}
