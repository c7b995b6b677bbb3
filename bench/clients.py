"""
Small asyncio protocol clients for load: IMAP4rev1 and POP3 on raw
streams, so thousands of sessions fit in one process and each command's
time on the wire can be measured (from the first byte sent to the last
byte of the tagged reply).  They speak only what the benchmarks need.
"""

from __future__ import annotations

import asyncio
import re
import time

_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")


class ProtocolError(Exception):
    """A server answered NO/BAD/-ERR (or closed the connection)."""


class IMAPClient:
    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self._n = 0
        self._buf = b""
        self._pos = 0

    @classmethod
    async def connect(cls, port, host="127.0.0.1", timeout=60):
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=2**24), timeout)
        self = cls(reader, writer)
        greeting = await asyncio.wait_for(self._line(), timeout)
        if not greeting.startswith(b"* OK"):
            raise ProtocolError(f"greeting: {greeting[:200]!r}")
        return self

    async def _fill(self):
        data = await self.reader.read(1 << 18)
        if not data:
            raise ProtocolError("connection closed by the server")
        self._buf = self._buf[self._pos:] + data
        self._pos = 0

    async def _line(self) -> bytes:
        while True:
            i = self._buf.find(b"\n", self._pos)
            if i >= 0:
                line = self._buf[self._pos:i + 1]
                self._pos = i + 1
                return line
            await self._fill()

    async def _exact(self, n) -> bytes:
        while len(self._buf) - self._pos < n:
            await self._fill()
        data = self._buf[self._pos:self._pos + n]
        self._pos += n
        return data

    async def readResponse(self) -> bytes:
        """One response line with its literals (returned as one bytes)."""
        line = await self._line()
        if not line.endswith(b"}\r\n"):
            return line
        parts = [line]
        while True:
            m = _LITERAL.search(line)
            if not m:
                return b"".join(parts)
            parts.append(await self._exact(int(m.group(1))))
            line = await self._line()
            parts.append(line)

    async def command(self, text: str | bytes, literal: bytes | None = None, timeout=300):
        """
        Send one command (with an optional synchronizing literal at the end)
        and read up to its tagged reply.  Returns (untagged lines, tagged
        line, seconds); raises L{ProtocolError} on NO or BAD.
        """
        self._n += 1
        tag = b"b%d" % self._n
        if isinstance(text, str):
            text = text.encode()
        start = time.perf_counter()
        untagged = []
        if literal is None:
            self.writer.write(tag + b" " + text + b"\r\n")
        else:
            self.writer.write(tag + b" " + text + b" {%d}\r\n" % len(literal))
            while True:
                line = await asyncio.wait_for(self.readResponse(), timeout)
                if line.startswith(b"+"):
                    break
                if line.startswith(tag + b" "):
                    raise ProtocolError(f"{text.split()[0].decode()}: {line.strip().decode(errors='replace')}")
                untagged.append(line)
            self.writer.write(literal + b"\r\n")
        while True:
            line = await asyncio.wait_for(self.readResponse(), timeout)
            if line.startswith(tag + b" "):
                elapsed = time.perf_counter() - start
                status = line[len(tag) + 1:].split(b" ", 1)[0].upper()
                if status != b"OK":
                    raise ProtocolError(f"{text.split()[0].decode()}: {line.strip().decode(errors='replace')[:300]}")
                return untagged, line, elapsed
            untagged.append(line)

    async def login(self, user, password):
        return await self.command(f'LOGIN "{user}" "{password}"')

    async def idle(self, timeout=30):
        """Start IDLE; returns once the server sent its continuation."""
        self._n += 1
        self._idleTag = b"b%d" % self._n
        self.writer.write(self._idleTag + b" IDLE\r\n")
        while True:
            line = await asyncio.wait_for(self.readResponse(), timeout)
            if line.startswith(b"+"):
                return
            if line.startswith(self._idleTag + b" "):
                raise ProtocolError(f"IDLE: {line.strip().decode(errors='replace')[:300]}")

    async def waitFor(self, pattern: bytes, timeout):
        """Read untagged responses until one matches C{pattern} (a regex)."""
        rx = re.compile(pattern)
        while True:
            line = await asyncio.wait_for(self.readResponse(), timeout)
            if rx.search(line):
                return line

    async def done(self, timeout=30):
        self.writer.write(b"DONE\r\n")
        while True:
            line = await asyncio.wait_for(self.readResponse(), timeout)
            if line.startswith(self._idleTag + b" "):
                return

    async def close(self):
        try:
            self.writer.write(b"z LOGOUT\r\n")
            await asyncio.wait_for(self.writer.drain(), 5)
        except Exception:
            pass
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except Exception:
            pass


def exists(untagged) -> int:
    for line in untagged:
        m = re.match(rb"\* (\d+) EXISTS", line)
        if m:
            return int(m.group(1))
    return -1


class POP3Client:
    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port, host="127.0.0.1", timeout=60):
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=2**24), timeout)
        self = cls(reader, writer)
        greeting = await asyncio.wait_for(reader.readline(), timeout)
        if not greeting.startswith(b"+OK"):
            raise ProtocolError(f"greeting: {greeting[:200]!r}")
        return self

    async def command(self, text: str, multiline=False, timeout=120) -> tuple[bytes, bytes]:
        self.writer.write(text.encode() + b"\r\n")
        status = await asyncio.wait_for(self.reader.readline(), timeout)
        if not status.startswith(b"+OK"):
            raise ProtocolError(f"{text.split()[0]}: {status.strip().decode(errors='replace')[:300]}")
        if not multiline:
            return status, b""
        buf = await asyncio.wait_for(self.reader.readline(), timeout)
        if buf == b".\r\n":
            return status, b""
        while not buf.endswith(b"\r\n.\r\n"):
            chunk = await asyncio.wait_for(self.reader.readuntil(b".\r\n"), timeout)
            buf += chunk
        return status, buf

    async def login(self, user, password):
        await self.command(f"USER {user}")
        await self.command(f"PASS {password}")

    async def quit(self):
        try:
            await self.command("QUIT", timeout=30)
        finally:
            self.writer.close()
