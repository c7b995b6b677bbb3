"""A client that sends commands without reading the replies (write back-pressure tests)."""

import socket


def pushUnread(port: int, line: bytes, limit: int = 8 * 1024 * 1024):
    """
    Connect to C{port} on 127.0.0.1 with small kernel buffers, read the
    greeting, then send C{line} over and over without reading until the
    server stops taking them (one second without progress) or C{limit}
    octets went out.  Returns the socket (timeout 30 s) and the octets sent.
    """
    s = socket.create_connection(("127.0.0.1", port), 10)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.recv(4096)
        chunk = line * 8192
        sent = 0
        s.settimeout(1)
        try:
            while sent < limit:
                # (The rest of a chunk the kernel took part of comes first.)
                sent += s.send(chunk[sent % len(chunk):])
        except socket.timeout:
            pass
        s.settimeout(30)
    except BaseException:
        s.close()
        raise
    return s, sent
