"""
Every place where twisted-graceful reaches into Twisted's private API, and
why. A Twisted release that changes one of these breaks here and nowhere
else (docs/design.md, "What the code relies on").

  - L{adopt_listening_port}: C{Port._shouldShutdown}, and C{unix.Port}'s
    C{connectionLost}. Closing a listening port must never C{shutdown(2)} the
    socket (that stops it in every process sharing it) nor unlink a UNIX
    socket's path (the next generation serves it).
  - L{share_accepts}: C{tcp.Port.numberAccepts}. A port accepts up to 100
    queued connections per wake-up (and more each time it empties the
    queue): with several workers on one listening socket, the first to wake
    takes every queued connection and the others none.
  - L{ClosedPort}: stands in for a port after C{stopListening}.
  - L{protect_twistd_pidfile}: twistd's C{UnixApplicationRunner.removePID}
    removes the pidfile at exit without looking whose PID it holds.
  - L{append_to_logfiles}, L{stop_rotating}: twistd's log file is opened
    without C{O_APPEND} (C{BaseLogFile._openFile}), so two overlapping
    generations overwrite each other's lines, and both would rotate it.
  - L{watch_adopted_child}: C{twisted.internet.process}'s reaper registry.
    A master that re-executed itself keeps its workers as children, but its
    new reactor never spawned them: without a registered handler, Twisted's
    SIGCHLD handling would neither reap them nor tell us they exited.
  - L{GenericHTTPChannelProtocol}: C{twisted.web.http._GenericHTTPChannelProtocol},
    the wrapper C{Site.buildProtocol} puts around every C{HTTPChannel}.
  - C{twisted_graceful.http.DrainableHTTPChannel}'s request limits (414, 431,
    413, 408) read C{HTTPChannel._receivedHeaderSize},
    C{_receivedHeaderCount}, C{_handlingRequest} and C{_transferDecoder}
    (whose C{dataCallback}/C{finishCallback} count a chunked body), and
    C{LineReceiver._buffer}: Twisted answers those cases with a bare 400 or a
    silent close, and offers no hook. C{tests/test_http_limits.py} fails if
    they change. To tell 414/431 from 400 without overriding
    C{lineReceived} and C{headerReceived} (paid per header line), it
    overrides C{HTTPChannel._respondToBadRequestAndDisconnect} and reads
    C{_HTTPChannel__first_line}; to close a C{Connection: close} request
    without lingering only when nothing followed it, C{_dataBuffer}.
  - C{GracefulSite.log} (C{--access-log}) formats with C{Site._logFormatter}
    and the date C{Site._logDateTime} caches, as C{HTTPFactory.log} does,
    but writes to its own buffer instead of C{twisted.logger}
    (C{tests/test_access_log.py}).
"""

import fcntl
import functools
import os
import socket
import weakref

from twisted.internet import tcp
from twisted.web import http as _web_http

from twisted_graceful.pidfile import read_pid

# twisted.web.http is a deprecation proxy: bind the class once, not per connection.
GenericHTTPChannelProtocol = _web_http._GenericHTTPChannelProtocol


def adopt_listening_port(reactor, sock, factory):
    """
    Serve C{factory} on the listening socket C{sock} through
    C{adoptStreamPort}, not yet accepting (call C{startReading()} when
    ready), and close C{sock}: the port holds its own copy (a dup).

    Adopted TCP ports already skip C{shutdown()} on close; C{unix.Port}
    ignores adoption, shuts down and unlinks its path: both are switched off.
    """
    port = reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
    port.stopReading()
    sock.close()
    port._shouldShutdown = False
    if sock.family == socket.AF_UNIX:
        # tcp.Port.connectionLost closes without unlinking the path.
        port.connectionLost = functools.partial(tcp.Port.connectionLost, port)
    return port


# Measured with 2 workers on 2 cores (docs/benchmarks.md): 1 balances
# keep-alive connections but costs the most per new connection; Twisted's
# 100 sends every keep-alive connection of a burst to one worker; 4 does both.
ACCEPTS_PER_WAKE_UP = 4


def share_accepts(port, per_wake_up=ACCEPTS_PER_WAKE_UP):
    """
    Make C{port} accept at most C{per_wake_up} connections per readiness
    event, so that workers sharing a listening socket share its
    connections: the kernel wakes every worker waiting on the socket, each
    takes a few, and a busy worker (not waiting) takes fewer. (nginx's
    C{multi_accept off} is the same idea with one.)
    """
    if not hasattr(port, "numberAccepts"):
        return port  # not a tcp.Port or unix.Port (a test's fake)
    accept = port.doRead

    def doRead():
        port.numberAccepts = per_wake_up  # Twisted raises it after a wake-up that emptied the queue
        return accept()

    port.numberAccepts = per_wake_up
    port.doRead = doRead
    return port


class ClosedPort:
    """
    Stands in for a port this generation no longer accepts on: its socket
    object stays readable for descriptions, every operation is a no-op.
    """

    def __init__(self, port):
        self.socket = port.socket

    def fileno(self):
        return -1

    def stopListening(self):
        return None

    def startReading(self):
        pass

    def stopReading(self):
        pass


_pidfile_patched = False


def protect_twistd_pidfile():
    """
    Make twistd remove its pidfile at exit only if it still names this
    process: after a handover it names the next generation. Idempotent.
    """
    global _pidfile_patched
    if _pidfile_patched:
        return
    try:
        from twisted.scripts import _twistd_unix
    except ImportError:  # not on a POSIX twistd
        return
    original = _twistd_unix.UnixApplicationRunner.removePID

    def removePID(self, pidfile):
        if pidfile and read_pid(pidfile) not in (None, os.getpid()):
            return  # another generation's
        original(self, pidfile)

    _twistd_unix.UnixApplicationRunner.removePID = removePID
    _pidfile_patched = True


_logfile_patched = False
_open_logfiles = weakref.WeakSet()


def _set_append(fd):
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_APPEND:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_APPEND)


def append_to_logfiles():
    """
    Make every L{twisted.python.logfile.BaseLogFile} this process opens (or
    reopens on rotation) append-only, so that every write lands at the end
    of the file, whichever generation makes it. Idempotent.
    """
    global _logfile_patched
    if _logfile_patched:
        return
    from twisted.python import logfile

    original = logfile.BaseLogFile._openFile

    def _openFile(self):
        original(self)
        _set_append(self._file.fileno())
        _open_logfiles.add(self)

    logfile.BaseLogFile._openFile = _openFile
    _logfile_patched = True


def stop_rotating():
    """
    Once the next generation writes to the same file, only it may rotate it:
    two processes renaming one log would overwrite each other's files.
    """
    for logfile in list(_open_logfiles):
        logfile.rotateLength = None


def watch_adopted_child(pid, exited):
    """
    Reap C{pid}, a child this process did not spawn through the reactor (it
    was spawned by our previous image), and call C{exited(status)} (a
    C{waitpid} status) once it is gone. Returns a function that stops
    watching.
    """
    from twisted.internet import process

    class Reaper:
        def reapProcess(self):
            try:
                reaped, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                reaped, status = pid, 0
            if reaped:
                process.unregisterReapProcessHandler(pid, self)
                exited(status)

        def processEnded(self, status):  # registerReapProcessHandler, if already gone
            exited(status)

    reaper = Reaper()
    try:
        process.registerReapProcessHandler(pid, reaper)
    except ChildProcessError:
        exited(0)
        return lambda: None

    def stop():
        if process.reapProcessHandlers.get(pid) is reaper:
            process.unregisterReapProcessHandler(pid, reaper)

    return stop
