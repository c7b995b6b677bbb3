"""`mailplat queue retry` on a held message says it is held (the command runs its own reactor: a subprocess)."""

import os
import subprocess
import sys
import textwrap

MAKE_HELD = textwrap.dedent("""
    import os, sys
    from twisted.internet import defer, task
    from mailplat.interfaces.queue import Envelope
    from mailplat.interfaces.routing import LocalDestination, Route
    from mailplat.queue.sqlite import SQLiteQueue

    @defer.inlineCallbacks
    def main(reactor):
        q = SQLiteQueue(os.path.join(sys.argv[1], "queue"), reactor)
        yield q.open()
        t = q.begin(Envelope("a@example.net", ("x@example.org",), routes=(Route.deliver(LocalDestination("x@example.org")),)))
        t.write(b"Subject: held\\r\\n\\r\\nbody\\r\\n")
        qid = yield t.commit()
        yield q.hold(qid)
        yield q.close()
        print(qid)

    task.react(main)
""")


def run(*argv):
    return subprocess.run([sys.executable, "-m", "mailplat.cli", *argv], capture_output=True, text=True, timeout=60)


def test_retry_of_a_held_message_says_it_is_held(tmp_path):
    data = str(tmp_path / "data")
    os.makedirs(data)
    made = subprocess.run([sys.executable, "-c", MAKE_HELD, data], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    qid = made.stdout.strip()
    r = run("--data", data, "queue", "retry", qid)
    assert r.returncode == 0, r.stderr
    assert f"retry: {qid} is held; it is tried once released" in r.stdout
    r = run("--data", data, "queue", "release", qid)
    assert f"release: {qid} done" in r.stdout
    r = run("--data", data, "queue", "retry", qid)
    assert f"retry: {qid} done" in r.stdout
    r = run("--data", data, "queue", "retry", "0000000000000000")
    assert r.returncode == 1 and "no such queued message" in r.stderr
