"""The worker channel's receive: never waits, even though the channel blocks for sends."""

import os
import socket

import pytest

from mailplat.workers import _receive, socketAddress


def test_receiveDoesNotWaitAndCarriesDescriptors():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        theirs.setblocking(True)
        with pytest.raises(BlockingIOError):
            _receive(theirs)  # nothing there: at once, not a hang
        r, w = os.pipe()
        try:
            socket.send_fds(ours, [b"C 0 7"], [w])
            data, fds = _receive(theirs)
            assert data == b"C 0 7" and len(fds) == 1
            os.write(fds[0], b"x")  # the passed descriptor is the pipe's write end
            os.close(fds[0])
            assert os.read(r, 1) == b"x"
            ours.send(b"X 7")
            assert _receive(theirs) == (b"X 7", [])
        finally:
            os.close(r)
            os.close(w)


def test_socketAddress():
    assert socketAddress("tcp:2143:interface=127.0.0.1") == (socket.AF_INET, "127.0.0.1", 2143, 50)
    assert socketAddress("tcp:143:backlog=100") == (socket.AF_INET, "0.0.0.0", 143, 100)
    assert socketAddress(r"tcp6:port=993:interface=\:\:1") == (socket.AF_INET6, "::1", 993, 50)
    with pytest.raises(ValueError, match="only tcp: and tcp6:"):
        socketAddress("unix:/tmp/imap.sock")


class _Out:
    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def _clock():
    """A reactor for the relay: Twisted's Clock (calls run on advance), running."""
    from twisted.internet import task

    clock = task.Clock()
    clock.running = True
    return clock


def _records(out):
    from twisted.logger import eventFromJSON

    return [eventFromJSON(r) for w in out.writes for r in w.split("\x1e") if r.strip()]


def test_logRelayWritesAnIterationsRecordsTogether():
    """What the reactor's thread logs in one iteration goes to the pool in one write when the iteration ends."""
    from twisted.logger import LogLevel, formatEvent

    from mailplat.workers import _LogRelay

    out, reactor = _Out(), _clock()
    relay = _LogRelay(out, reactor)
    for n in range(3):
        relay({"log_level": LogLevel.info, "log_format": "line {n}", "n": n, "log_time": 0.0})
    assert out.writes == [] and len(reactor.getDelayedCalls()) == 1  # one flush scheduled, not three
    reactor.advance(0)
    assert len(out.writes) == 1
    events = _records(out)
    assert [formatEvent(e) for e in events] == ["line 0", "line 1", "line 2"]
    assert [e["log_level"] for e in events] == [LogLevel.info] * 3
    assert out.writes[0].endswith("\n") and out.writes[0].count("\x1e") == 3


def test_logRelayWritesWarningsAndOtherThreadsAtOnce():
    import threading

    from twisted.logger import LogLevel, formatEvent

    from mailplat.workers import _LogRelay

    out, reactor = _Out(), _clock()
    relay = _LogRelay(out, reactor)
    relay({"log_level": LogLevel.info, "log_format": "before", "log_time": 0.0})
    relay({"log_level": LogLevel.warn, "log_format": "warned", "log_time": 0.0})
    # The warning took what was waiting with it, in order.
    assert [formatEvent(e) for e in _records(out)] == ["before", "warned"]
    reactor.advance(0)  # the scheduled flush finds nothing left
    assert len(out.writes) == 1

    t = threading.Thread(target=relay, args=({"log_level": LogLevel.debug, "log_format": "thread", "log_time": 0.0},))
    t.start()
    t.join()
    assert formatEvent(_records(out)[-1]) == "thread" and reactor.getDelayedCalls() == []

    reactor.running = False  # shutting down: nothing would run a scheduled flush
    relay({"log_level": LogLevel.info, "log_format": "last", "log_time": 0.0})
    assert formatEvent(_records(out)[-1]) == "last" and reactor.getDelayedCalls() == []


def test_workerEventsKeepTheirLevelAndTheirExceptionText():
    """A worker's failure arrives with its exception's message, and its line names the level."""
    import sqlite3

    from twisted.logger import LogLevel, formatEventAsClassicLogText, globalLogPublisher
    from twisted.python.failure import Failure

    from mailplat.workers import _LogRelay, _WorkerProcess

    out, reactor = _Out(), _clock()
    relay = _LogRelay(out, reactor)
    try:
        raise sqlite3.OperationalError("database or disk is full")
    except sqlite3.Error:
        failure = Failure()
    relay({"log_level": LogLevel.critical, "log_format": "store commit failed", "log_failure": failure,
           "log_namespace": "mailplat.store.writer", "log_time": 0.0})

    class Pool:
        role = "smtp"

    process = _WorkerProcess(Pool(), 0)
    process.pid = 4242
    published = []
    globalLogPublisher.addObserver(published.append)
    try:
        process.outReceived("".join(out.writes).encode())
    finally:
        globalLogPublisher.removeObserver(published.append)
    text = formatEventAsClassicLogText(published[-1])
    assert "[smtp-worker-4242 mailplat.store.writer#critical] store commit failed" in text
    assert "sqlite3.OperationalError: database or disk is full" in text
