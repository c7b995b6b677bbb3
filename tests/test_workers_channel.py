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
