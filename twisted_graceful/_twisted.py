"""
Every place where twisted-graceful reaches into Twisted's private API, and
why. A Twisted release that changes one of these breaks here and nowhere
else (docs/design.md, "What the code relies on").

  - L{adopt_listening_port}: C{Port._shouldShutdown}, and C{unix.Port}'s
    C{connectionLost}. Closing a listening port must never C{shutdown(2)} the
    socket (that stops it in every process sharing it) nor unlink a UNIX
    socket's path (the next generation serves it). It also does what
    C{PosixReactorBase.adoptStreamPort} and C{adoptDatagramPort} do, calling
    C{Port._fromListeningDescriptor} and C{startListening} itself, so that
    only the former runs with a default socket timeout of 0 (on PyPy,
    wrapping a descriptor otherwise makes the shared socket blocking).
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
  - L{ssl_context}: C{twisted.internet.endpoints._parseSSL}, the parser of
    Twisted's C{ssl:} endpoint keywords (C{privateKey}, C{certKey},
    C{extraCertChain}, C{dhParameters}, C{sslmethod}). The public
    C{serverFromString} would give an endpoint that binds and listens
    itself (and shuts the socket down on stop, fact 1); we need only the
    context factory, for a socket we adopt.
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
  - L{reactor_without_tls}: the reactor's own imports of TLS
    (C{twisted.internet.posixbase} imports C{twisted.protocols.tls} and
    C{twisted.internet.ssl}, C{twisted.internet.tcp} imports
    C{twisted.internet._newtls}, each in a C{try}/C{except ImportError}):
    in a process with no TLS listener they are made to fail, which saves
    the import of pyOpenSSL, C{cryptography} and C{service_identity} at
    every start (docs/design.md, fact 43).
  - L{exit_on_usage_error}: twistd's C{app.run} before Twisted 26.10 prints a
    usage error and returns, so C{twistd graceful --port nonsense} exits 0
    (twisted#12656): a deploy script or systemd would take a refused start
    for a success. We find C{app.run}'s frame on the stack to know that
    twistd is parsing (not the preflight, not a test).
"""

import fcntl
import functools
import os
import socket
import sys
import weakref

import twisted
from twisted.application import app as twistd_app

from twisted_graceful.listeners import wrapping_nonblocking
from twisted_graceful.pidfile import read_pid


def __getattr__(name):
    # GenericHTTPChannelProtocol, bound when first asked for (by
    # twisted_graceful.http, once): a master serves no HTTP and does not
    # import twisted.web. twisted.web.http is a deprecation proxy: the class
    # is bound once, not read through it per connection.
    if name == "GenericHTTPChannelProtocol":
        from twisted.web import http as _web_http

        value = globals()[name] = _web_http._GenericHTTPChannelProtocol
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def adopt_listening_port(reactor, sock, factory):
    """
    Serve C{factory} on the listening socket C{sock} through
    C{adoptStreamPort}, not yet accepting (call C{startReading()} when
    ready), and close C{sock}: the port holds its own copy (a dup).

    Adopted TCP ports already skip C{shutdown()} on close; C{unix.Port}
    ignores adoption, shuts down and unlinks its path: both are switched off.

    A datagram socket goes to C{adoptDatagramPort} (C{factory} is then a
    C{DatagramProtocol}), which starts reading at once: stopped before the
    reactor runs again, so nothing is read. No private reach is needed
    there: C{udp.Port.connectionLost} only C{close()}s its own dup, never
    C{shutdown()}s it (docs/design.md, fact 28).
    """
    # What adoptStreamPort and adoptDatagramPort require (docs/design.md,
    # fact 2); on PyPy Twisted's socket.fromfd puts back the flags it found.
    sock.setblocking(False)
    datagram, family = sock.type == socket.SOCK_DGRAM, sock.family
    port = _adopt(reactor, sock.fileno(), family, datagram, factory)
    port.stopReading()
    sock.close()
    if datagram:
        return port
    port._shouldShutdown = False
    if family == socket.AF_UNIX:
        from twisted.internet import tcp  # (the reactor imported it)

        # tcp.Port.connectionLost closes without unlinking the path.
        port.connectionLost = functools.partial(tcp.Port.connectionLost, port)
    return port


def _adopt(reactor, fd, family, datagram, factory):
    """
    C{reactor.adoptStreamPort} (or, with C{datagram}, C{adoptDatagramPort})
    of the listening socket C{fd} of C{family}, with
    only the wrapping of the descriptor (C{Port._fromListeningDescriptor}, a
    C{socket.fromfd}) under L{wrapping_nonblocking}: on PyPy a plain
    C{fromfd} makes the socket blocking for every process holding it until
    Twisted puts the flags back, and a previous generation's C{accept()} in
    that instant would wait in the kernel (docs/design.md, fact 44).
    C{startListening}, which starts the factory, runs outside it: an
    application's C{startFactory} may make sockets of its own, with the
    usual default timeout.
    """
    from twisted.internet import posixbase, tcp, udp, unix  # (the reactor imported them)

    if not isinstance(reactor, posixbase.PosixReactorBase):
        # A test's MemoryReactor: it wraps no descriptor.
        if datagram:
            return reactor.adoptDatagramPort(fd, family, factory, maxPacketSize=DATAGRAM_MAX_SIZE)
        return reactor.adoptStreamPort(fd, family, factory)
    with wrapping_nonblocking():
        if datagram:
            port = udp.Port._fromListeningDescriptor(reactor, fd, family, factory,
                                                     maxPacketSize=DATAGRAM_MAX_SIZE)
        elif family == socket.AF_UNIX:
            port = unix.Port._fromListeningDescriptor(reactor, fd, factory)
        else:
            port = tcp.Port._fromListeningDescriptor(reactor, fd, family, factory)
    port.startListening()
    return port


# The largest datagram read whole (Twisted's default is 8192): a syslog
# message may be longer; what is beyond is cut by recvfrom.
DATAGRAM_MAX_SIZE = 65535


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
    C{multi_accept off} is the same idea with one.) Not C{EPOLLEXCLUSIVE}:
    it wakes the same idle worker for every new connection, so an idle
    server's keep-alive connections all pile up on one worker
    (docs/design.md, "Master and workers").
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
_open_logfiles: weakref.WeakSet = weakref.WeakSet()


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


def ssl_context(keywords):
    """
    The C{CertificateOptions} Twisted's C{ssl:} endpoint would build from
    C{keywords} (its own parser: the same defaults and the same meaning).
    Imported here, not at module level: importing
    C{twisted.internet.endpoints} consumes systemd's variables (fact 7),
    which are read before any listener is built.
    """
    from twisted.internet import endpoints

    (_port, _factory, context_factory), _ = endpoints._parseSSL(None, "0", **keywords)
    return context_factory


# Twisted 26.10 exits 1 after printing a usage error (twisted#12656).
TWISTD_EXITS_ON_USAGE_ERROR = (twisted.version.major, twisted.version.minor) >= (26, 10)


def _parsed_by_twistd():
    code = twistd_app.run.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


# What the reactor imports for TLS when it can; none of it imported yet, or
# it is too late to do without.
_TLS_MODULES = ("OpenSSL", "twisted.internet.tcp", "twisted.internet.ssl", "twisted.protocols.tls",
                "twisted.internet._newtls", "twisted.internet._sslverify")


def reactor_without_tls(modules=None):
    """
    Under twistd, in a process that will serve no TLS (docs/design.md, fact
    43): make C{import OpenSSL} fail, before the reactor is imported, so that
    Twisted's reactor and TCP transport come up without TLS support (as they
    do when pyOpenSSL is not installed) and the process does not import
    pyOpenSSL, C{cryptography} and C{service_identity}, a fifth of a
    worker's start. Nothing is done outside twistd (a test, the preflight,
    an application of its own) or once any of it is imported.

    @return: whether it was done.
    """
    modules = sys.modules if modules is None else modules
    if any(name in modules for name in _TLS_MODULES) or not _parsed_by_twistd():
        return False
    modules["OpenSSL"] = None  # `import OpenSSL` raises ImportError from now on
    return True


def exit_on_usage_error(options, error):
    """
    Called with a usage error of C{options}: when twistd parses them and
    would print the error and exit 0, print it as twistd would and exit 1;
    otherwise return (the caller raises it again).
    """
    if TWISTD_EXITS_ON_USAGE_ERROR or not _parsed_by_twistd():
        return
    print(options)
    print(f"{' '.join(sys.argv[0:2])}: {error}")
    sys.exit(1)
