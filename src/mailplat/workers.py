"""
Worker processes: one role's sessions served by several processes, so that
they use every core instead of one interpreter lock.

With C{[imap] processes = N} (or C{[pop3]}, C{[smtp]}), the main process keeps the
role's listening sockets and a L{WorkerPool} starts N worker processes
(C{python -m mailplat.workers}).  The pool accepts each connection itself,
applies the C{[limits]} connection limits (so they hold for the whole
server, not per process), and passes the connected socket to the worker
with the fewest open connections over a C{SOCK_SEQPACKET} socket pair
(C{SCM_RIGHTS}).  The worker adopts it into its reactor and serves the whole
session; when the connection closes it says so, and the pool counts it
gone.

A worker builds its own L{mailplat.platform.Platform} from the same
configuration (handed to it pickled on its standard input), opens the store
(and, for SMTP, the queue) and shares the data directory with the other
processes, as C{twistd mailplat-smtp} and C{twistd mailplat-imap}
do: changes made by one process reach the others' sessions through the
store (see L{mailplat.interfaces.storage.IMessageStore.addListener}).

The channel, one datagram per message::

    pool -> worker   b"C <listener index> <connection id>"  + one descriptor
    worker -> pool   b"R"                    ready: the store is open
                     b"X <connection id>"    that connection has closed
                     b"Q"                    mail was queued (SMTP) that the
                                             worker does not deliver itself: the
                                             main process's queue runner looks
                     b"M <json>"             the worker's metrics, whole

A worker's log events come to the pool as JSON on its standard output and
are published here, their system set to C{<role>-worker-<pid>}; the
records of one reactor iteration are written together at its end (a
warning or worse, and an event of another thread or while the reactor is
not running, at once).  A worker
that exits while the pool runs is started again (after 1 s, doubling up to
30 s while it keeps failing at once); its connections are gone with it.  A
worker stops when the pool closes the channel or sends SIGTERM; SIGHUP to
the main process is passed on (the TLS pair is reloaded everywhere).
"""

from __future__ import annotations

import array
import errno
import json
import os
import pickle
import signal
import socket
import sys
import threading

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import ILogObserver, LogLevel, eventAsJSON, eventFromJSON, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

from mailplat.log import _PRIORITY, Logger

_log = Logger()

#: The descriptor number a worker finds its channel on.
CHANNEL_FD = 3
#: How often a worker sends its metrics (when they changed), in seconds.
METRICS_INTERVAL = 2.0
#: Restart delays for a worker that keeps exiting soon after it started.
RESTART_MIN, RESTART_MAX = 1.0, 30.0
#: A worker that lived this long is not "failing at once": its next restart waits RESTART_MIN.
STABLE_AFTER = 10.0
#: How long a stopping pool waits for its workers before SIGKILL.
STOP_TIMEOUT = 10.0
#: Seconds new local-only mail stays leased to the SMTP worker that received
#: it (its own runner delivers it) before the main runner may take it.
LEASE = 600


def socketAddress(description: str):
    """
    C{(family, host, port, backlog)} for a C{tcp:} or C{tcp6:} server
    endpoint description; ValueError for any other kind (a worker pool
    listens with plain sockets it can pass on).
    """
    from twisted.internet import endpoints

    name, args, kwargs = endpoints._parseServer(description, None)
    if name == "TCP":
        port, backlog, host, family = args[0], kwargs.get("backlog", 50), kwargs.get("interface", ""), socket.AF_INET
    elif getattr(name, "prefix", None) == "tcp6":
        port, backlog = int(kwargs.get("port", args[0] if args else 0)), int(kwargs.get("backlog", 50))
        host, family = kwargs.get("interface", "::"), socket.AF_INET6
    else:
        raise ValueError(f"only tcp: and tcp6: listeners can be shared with worker processes, not {description!r}")
    return family, host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), int(port), int(backlog)


def _listen(description):
    family, host, port, backlog = socketAddress(description)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise error.CannotListenError(host, port, e)
    return sock


@implementer(IReadDescriptor)
class _Reader:
    """A plain socket watched by the reactor: C{onReadable} is called when it is."""

    def __init__(self, sock, onReadable, name):
        self.sock = sock
        self._fd = sock.fileno()
        self.onReadable = onReadable
        self.name = name

    def fileno(self):
        return self._fd if self.sock.fileno() != -1 else -1

    def doRead(self):
        return self.onReadable()

    def connectionLost(self, reason):
        pass

    def logPrefix(self):
        return self.name


class _Listener:
    """One listening socket of the pool, with its own connection counter (as each factory has)."""

    def __init__(self, pool, index, kind, description):
        from mailplat.limits import REFUSALS, ConnectionCounter

        self.pool, self.index, self.kind, self.description = pool, index, kind, description
        role = pool.role
        limits = pool.platform.config.limits
        self.counter = ConnectionCounter(role, limits.connections_per_ip, limits.connections, pool.platform.metrics)
        self.refusal = REFUSALS[role]
        self.sock = None
        self.reader = None

    def bind(self):
        self.sock = _listen(self.description)
        self.reader = _Reader(self.sock, self.accept, f"{self.kind} {self.description}")

    def accept(self):
        for _ in range(64):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    _log.error("{kind}: cannot accept a connection: {err}", kind=self.kind, err=e)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPERM, errno.EPROTO):
                    continue
                # Anything else: logged, and the listener stays (an exception
                # here would make the reactor drop it for good).
                _log.error("{kind}: accept failed: {err}", kind=self.kind, err=e)
                return
            self.pool.dispatch(self, conn, addr[0])

    def refuse(self, conn):
        try:
            conn.setblocking(False)
            conn.send(self.refusal)
        except OSError:
            pass
        conn.close()

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _WorkerProcess(protocol.ProcessProtocol):
    """The pool's side of one worker: its process, its channel and its connections."""

    def __init__(self, pool, slot):
        self.pool = pool
        self.slot = slot
        self.channel = None
        self.reader = None
        self.ready = False
        self.connections: dict[int, tuple] = {}  # id -> (listener, host)
        self.metrics: dict = {}
        self.started = 0.0
        self.ended = defer.Deferred()
        self._out = b""
        self._err = b""
        self.pid = None

    # --- the channel --------------------------------------------------------

    def readChannel(self):
        while self.channel is not None:
            try:
                data = self.channel.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.closeChannel()
                return
            kind, _, rest = data.partition(b" ")
            if kind == b"X":
                self.pool.closed(self, int(rest))
            elif kind == b"R":
                self.ready = True
                _log.info("{role} worker {pid} ready", role=self.pool.role, pid=self.pid)
                self.pool.workerReady()
            elif kind == b"Q":
                self.pool.queued()
            elif kind == b"M":
                try:
                    self.metrics = {(n, tuple(map(tuple, labels))): v for n, labels, v in json.loads(rest)}
                except (ValueError, TypeError):
                    pass

    def send(self, message, fd):
        socket.send_fds(self.channel, [message], [fd])

    def closeChannel(self):
        if self.channel is not None:
            self.pool.reactor.removeReader(self.reader)
            self.channel.close()
            self.channel = None
        self.ready = False

    # --- the process ----------------------------------------------------------

    def connectionMade(self):
        self.pid = self.transport.pid
        self.transport.write(self.pool.spec())
        self.transport.closeStdin()

    def outReceived(self, data):
        # jsonFileLogObserver writes each event as RS, JSON, LF (RFC 7464).
        self._out += data
        *records, self._out = self._out.split(b"\n")
        for record in records:
            record = record.strip(b"\x1e \r")
            if not record:
                continue
            try:
                event = eventFromJSON(record.decode("utf-8", "replace"))
            except ValueError:
                event = {"log_format": "{line}", "line": record.decode("utf-8", "replace"), "log_level": LogLevel.info}
            # The process, then what Twisted shows without a system: namespace#level.
            level = event.get("log_level")
            event["log_system"] = (f"{self.pool.role}-worker-{self.pid} {event.get('log_namespace', '-')}#"
                                   f"{getattr(level, 'name', '-')}")
            globalLogPublisher(event)

    def errReceived(self, data):
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line.strip():
                _log.error("{role} worker {pid}: {line}", role=self.pool.role, pid=self.pid,
                           line=line.decode("utf-8", "replace"))

    def processEnded(self, reason):
        self.closeChannel()
        self.pool.ended(self, reason)
        self.ended.callback(None)


class WorkerPool(service.Service):
    """
    The listeners of one role (C{smtp}, C{imap} or C{pop3}), and C{processes} worker
    processes serving their connections.  C{reactor} must provide
    C{IReactorProcess} and C{IReactorFDSet} (the POSIX reactors do).
    """

    def __init__(self, platform, role, processes, executable=None):
        self.platform = platform
        self.reactor = platform.reactor
        self.role = role
        self.processes = processes
        self.executable = executable or sys.executable
        self.setName(f"{role} workers")
        self.listeners = [
            _Listener(self, i, kind, desc) for i, (kind, desc) in enumerate(platform.listenerSpecs((role,)))
        ]
        self.workers: list[_WorkerProcess | None] = [None] * processes
        self._restarts: dict[int, object] = {}
        self._delay = [RESTART_MIN] * processes
        self._nextId = 0
        self._turn = 0
        self._accepting = False

    # --- service --------------------------------------------------------------

    def privilegedStartService(self):
        # Bind here, before twistd gives up its privileges (ports below 1024).
        self._bind()
        service.Service.privilegedStartService(self)

    def startService(self):
        self._bind()  # when started without privilegedStartService (embedded)
        service.Service.startService(self)
        self.platform.workerPools.append(self)
        self.platform.metrics.addSource(self._workerMetrics)
        for slot in range(self.processes):
            self._spawn(slot)

    def stopService(self):
        service.Service.stopService(self)
        if self in self.platform.workerPools:
            self.platform.workerPools.remove(self)
        self.platform.metrics.removeSource(self._workerMetrics)
        self._stopAccepting()
        self._closeListeners()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        waits = []
        for w in self.workers:
            if w is None or w.ended.called:
                continue
            # SIGTERM only: the worker stops its reactor on it (the channel
            # closes when it has exited).
            try:
                w.transport.signalProcess("TERM")
            except error.ProcessExitedAlready:
                continue
            waits.append(w.ended)
        if not waits:
            return defer.succeed(None)
        done = defer.DeferredList(waits)
        kill = self.reactor.callLater(STOP_TIMEOUT, self._killAll)
        done.addBoth(lambda _: kill.cancel() if kill.active() else None)
        return done

    def _bind(self):
        for listener in self.listeners:
            if listener.sock is None:
                try:
                    listener.bind()
                except Exception:
                    self._closeListeners()
                    raise

    def _killAll(self):
        for w in self.workers:
            if w is not None and not w.ended.called:
                _log.warn("{role} worker {pid} did not stop within {t}s: killed", role=self.role, pid=w.pid,
                          t=STOP_TIMEOUT)
                try:
                    w.transport.signalProcess("KILL")
                except error.ProcessExitedAlready:
                    pass

    def _closeListeners(self):
        for listener in self.listeners:
            listener.close()

    # --- workers ----------------------------------------------------------------

    def spec(self):
        """What a worker reads on its standard input: pickled configuration and role."""
        return pickle.dumps({"config": self.platform.config, "role": self.role,
                             "path": [p for p in sys.path if p]})

    def _spawn(self, slot):
        self._restarts.pop(slot, None)
        if not self.running:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        w = _WorkerProcess(self, slot)
        w.channel = ours
        w.reader = _Reader(ours, w.readChannel, f"{self.role}-worker-channel")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            self.reactor.spawnProcess(
                w, self.executable, [self.executable, "-m", "mailplat.workers"], env=env,
                childFDs={0: "w", 1: "r", 2: "r", CHANNEL_FD: theirs.fileno()},
            )
        finally:
            theirs.close()
        w.started = self.reactor.seconds()
        self.reactor.addReader(w.reader)
        self.workers[slot] = w
        _log.info("{role} worker started: pid {pid}", role=self.role, pid=w.pid)

    def workerReady(self):
        if self.running and not self._accepting:
            self._accepting = True
            for listener in self.listeners:
                if listener.sock is not None:
                    self.reactor.addReader(listener.reader)

    def _stopAccepting(self):
        if self._accepting:
            self._accepting = False
            for listener in self.listeners:
                if listener.reader is not None:
                    self.reactor.removeReader(listener.reader)

    def ended(self, w, reason):
        for connId, (listener, host) in list(w.connections.items()):
            listener.counter.release(host)
        w.connections.clear()
        if self.workers[w.slot] is w:
            self.workers[w.slot] = None
        if not self.running:
            return
        lived = self.reactor.seconds() - w.started
        delay = self._delay[w.slot] if lived < STABLE_AFTER else RESTART_MIN
        self._delay[w.slot] = min(delay * 2, RESTART_MAX)
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        _log.error("{role} worker {pid} exited (code {code}, signal {sig}) after {lived:.1f}s; starting another in {d:g}s",
                   role=self.role, pid=w.pid, code=code, sig=sig, lived=lived, d=delay)
        self._restarts[w.slot] = self.reactor.callLater(delay, self._spawn, w.slot)
        if not any(x is not None and x.ready for x in self.workers):
            self._stopAccepting()

    # --- connections --------------------------------------------------------------

    def dispatch(self, listener, conn, host):
        """Hand the accepted C{conn} to the ready worker with the fewest connections (or refuse it)."""
        if not listener.counter.admit(host):
            listener.refuse(conn)
            return
        ready = [w for w in self.workers if w is not None and w.ready]
        n = len(ready)
        # Fewest connections first; among equals, take turns.
        order = sorted(range(n), key=lambda i: (len(ready[i].connections), (i - self._turn) % n))
        self._turn += 1
        self._nextId += 1
        connId = self._nextId
        message = b"C %d %d" % (listener.index, connId)
        for i in order:
            w = ready[i]
            try:
                w.send(message, conn.fileno())
            except OSError as e:
                _log.warn("{role} worker {pid}: could not pass it a connection: {err}", role=self.role, pid=w.pid,
                          err=e)
                continue
            w.connections[connId] = (listener, host)
            conn.close()
            return
        _log.error("{role}: no worker could take a connection from {host}", role=self.role, host=host)
        listener.counter.release(host)
        listener.refuse(conn)

    def closed(self, w, connId):
        entry = w.connections.pop(connId, None)
        if entry is not None:
            listener, host = entry
            listener.counter.release(host)

    def queued(self):
        """A worker has queued mail: the queue runner (in this process) looks for it now."""
        runner = self.platform.runner
        if runner is not None:
            runner.kick()

    def signalWorkers(self, name):
        """Send every running worker the signal C{name} (C{"HUP"}, ...)."""
        for w in self.workers:
            if w is not None and not w.ended.called:
                try:
                    w.transport.signalProcess(name)
                except error.ProcessExitedAlready:
                    pass

    def _workerMetrics(self):
        out = {}
        for w in self.workers:
            if w is not None:
                for k, v in w.metrics.items():
                    out[k] = out.get(k, 0) + v
        return out


# --- the worker process --------------------------------------------------------


class _Worker(service.Service):
    """In a worker: receives connections from the pool and serves them with the role's factories."""

    name = "worker-channel"

    def __init__(self, platform, role, channel, reactor):
        self.platform = platform
        self.role = role
        self.channel = channel
        self.reactor = reactor
        self.factories = [platform.factoryFor(kind, limited=False) for kind, _ in platform.listenerSpecs((role,))]
        self.reader = _Reader(channel, self.readChannel, "worker-channel")
        self._lastMetrics = None
        self._metricsCall = None
        self.runner = None

    def startService(self):
        service.Service.startService(self)
        self.reactor.addReader(self.reader)
        smtp = self.role == "smtp"
        d = self.platform.open(queue=smtp)
        queue = self.platform.queue
        if smtp and hasattr(queue, "onCommitted"):
            if hasattr(queue, "leased"):
                # Mail for local mailboxes only is leased to this process
                # (out of the main runner's scans for LEASE seconds) and
                # delivered here; the rest is the main process's runner's.
                queue.leaseLocal = LEASE
                self.runner = self.platform.queueRunner(scan=False)
            queue.onCommitted(self._queued)
        d.addCallbacks(self._ready, self._failed)

    def _queued(self, entry):
        if self.runner is not None and self.platform.queue.leased(entry.envelope):
            self.runner.take(entry)
        else:
            self._tell(b"Q")

    def _ready(self, _):
        if self.runner is not None:
            self.runner.startService()
        self._tell(b"R")
        self._sendMetrics()

    def _failed(self, f):
        _log.failure("the store could not be opened", f)
        self.reactor.stop()

    def _tell(self, message):
        # A blocking send: a message the main process has not read yet
        # (its socket buffer full) is waited for, never dropped -- a lost
        # "closed" would hold a connection slot of [limits] for good.
        try:
            self.channel.send(message)
        except OSError:
            pass  # the main process has gone: readChannel stops this one

    def _sendMetrics(self):
        snapshot = [[n, [list(p) for p in labels], v] for (n, labels), v in self.platform.metrics.snapshot().items()]
        if snapshot != self._lastMetrics:
            self._lastMetrics = snapshot
            self._tell(b"M " + json.dumps(snapshot).encode())
        self._metricsCall = self.reactor.callLater(METRICS_INTERVAL, self._sendMetrics)

    def readChannel(self):
        while True:
            try:
                data, fds = _receive(self.channel)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data and not fds:
                self.reactor.removeReader(self.reader)
                if self.running:
                    _log.warn("the main process has gone: stopping")
                    self.reactor.stop()
                return
            try:
                kind, index, connId = data.split()
                assert kind == b"C" and len(fds) == 1
                self.adopt(int(index), int(connId), fds[0])
            except Exception:
                _log.failure("a bad message from the main process: {data!r}", data=data)
                for fd in fds:
                    os.close(fd)

    def adopt(self, index, connId, fd):
        sock = socket.socket(fileno=fd)
        try:
            factory = _Announced(self.factories[index], connId, self._tell)
            self.reactor.adoptStreamConnection(sock.fileno(), sock.family, factory)
        except Exception:
            _log.failure("could not take over a connection")
            self._tell(b"X %d" % connId)
        finally:
            sock.close()

    def stopService(self):
        service.Service.stopService(self)
        if self._metricsCall is not None and self._metricsCall.active():
            self._metricsCall.cancel()
        if self.runner is not None and self.runner.running:
            return self.runner.stopService()


def _receive(channel, maxfds=4):
    """
    One message and the descriptors it carries, without waiting (the
    channel itself blocks, for sends; socket.recv_fds ignores its flags on
    some Python versions, so recvmsg directly).
    """
    fds = array.array("i")
    data, ancdata, _, _ = channel.recvmsg(256, socket.CMSG_LEN(maxfds * fds.itemsize), socket.MSG_DONTWAIT)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


class _Told(ProtocolWrapper):
    def connectionLost(self, reason):
        self.factory.tell(b"X %d" % self.factory.connId)
        ProtocolWrapper.connectionLost(self, reason)


class _Announced(WrappingFactory):
    """Builds the one protocol of an adopted connection; tells the pool when it is lost."""

    protocol = _Told

    def __init__(self, factory, connId, tell):
        WrappingFactory.__init__(self, factory)
        self.connId, self.tell = connId, tell

    def buildProtocol(self, addr):
        p = WrappingFactory.buildProtocol(self, addr)
        if p is None:
            self.tell(b"X %d" % self.connId)
        return p


@implementer(ILogObserver)
class _LogRelay:
    """
    A worker's log observer: each event as an RFC 7464 record (RS, JSON, LF)
    on C{out}, for the pool to publish.  What the reactor's thread logs in
    one iteration is written in one write when the iteration ends (an SMTP
    worker logs a line per message: one write and one wake-up of the pool
    per line otherwise); a warning or worse, an event of another thread and
    one while the reactor is not running are written at once, after what
    was waiting.
    """

    URGENT = _PRIORITY[LogLevel.warn]

    def __init__(self, out, reactor):
        """(In the thread that runs C{reactor}.)"""
        self._out = out
        self._reactor = reactor
        self._thread = threading.get_ident()
        self._pending: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, event):
        failure = event.get("log_failure")
        if failure is not None:
            # A Failure's exception does not survive JSON (its arguments come
            # out "unpersistable"): its traceback goes as text instead.
            event = dict(event)
            del event["log_failure"]
            try:
                event["log_worker_traceback"] = failure.getTraceback()
            except Exception:
                event["log_worker_traceback"] = repr(failure)
            event["log_format"] = (event.get("log_format") or "") + "\n{log_worker_traceback}"
        record = "\x1e" + eventAsJSON(event) + "\n"
        urgent = (
            _PRIORITY.get(event.get("log_level"), self.URGENT) >= self.URGENT
            or not self._reactor.running
            or threading.get_ident() != self._thread
        )
        with self._lock:
            self._pending.append(record)
            first = len(self._pending) == 1
        if urgent:
            self.flush()
        elif first:
            self._reactor.callLater(0, self.flush)

    def flush(self):
        with self._lock:
            pending, self._pending = self._pending, []
            if pending:
                try:
                    self._out.write("".join(pending))
                    self._out.flush()
                except (OSError, ValueError):
                    pass  # the pool is gone: nobody is left to read it


def main():
    """The worker process: C{python -m mailplat.workers}, started by a L{WorkerPool}."""
    spec = pickle.loads(sys.stdin.buffer.read())
    for p in reversed(spec["path"]):
        if p not in sys.path:
            sys.path.insert(0, p)
    # Ctrl-C in a terminal reaches the whole process group: the main
    # process stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    relay = _LogRelay(sys.stdout, reactor)
    globalLogBeginner.beginLoggingTo([relay], redirectStandardIO=False)

    from mailplat.platform import Platform, _ReloadOnHangup

    channel = socket.socket(fileno=CHANNEL_FD)
    channel.setblocking(True)  # sends wait (see _Worker._tell); reads never do (MSG_DONTWAIT)
    platform = Platform(spec["config"], reactor=reactor)
    root = service.MultiService()
    _ReloadOnHangup(platform).setServiceParent(root)
    _Worker(platform, spec["role"], channel, reactor).setServiceParent(root)
    root.privilegedStartService()
    root.startService()
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.maybeDeferred(root.stopService).addBoth(lambda _: platform.close()))
    reactor.run()
    relay.flush()


if __name__ == "__main__":
    main()
