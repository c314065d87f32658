"""
A line-based echo server that upgrades on SIGHUP without failing a client:
a second user of twisted-graceful, with no HTTP in it.

A client sends a I{message}: any number of lines, ended by a line holding a
single C{.} (as SMTP's DATA). The server answers each line back, prefixed
with C{"> "}, then C{250 echoed N line(s) by pid P generation G}. A message
is this protocol's transaction: from its first line to that C{250}. On a
drain the connection closes at the next boundary: an idle one at once, a
busy one right after its C{250}, each with C{421 ... draining, reconnect}.
Nothing the client sent after the C{421} is answered, so a client that
reconnects and sends again the message it has no C{250} for loses nothing.

    twistd -n --pidfile echo.pid -y examples/echo/echo.tac
    printf 'hello\\nworld\\n.\\n' | socat - TCP:127.0.0.1:8026
    kill -HUP $(cat echo.pid)

C{ECHO_LISTEN} (default C{tcp:8026:interface=127.0.0.1}) and C{ECHO_PIDFILE}
(default C{echo.pid}, which must be the pidfile given to twistd) configure
it; every generation reads them from the environment it inherits.
"""

import os

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from twisted_graceful import DrainableConnection, GracefulService, IReadinessCheck
from twisted_graceful.drain import close_in_stages
from twisted_graceful.statusfile import StatusFile

END = b"."
MAX_LINES = 1000  # per message: a client that never ends one is cut off


class EchoProtocol(DrainableConnection, LineReceiver):
    """
    One connection: messages in, echoes out. L{DrainableConnection} makes it
    an L{twisted_graceful.IDrainableConnection}: the service's tracker asks
    it to close at its boundary, and it knows where that is.
    """

    protocol_name = "echo"
    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self):
        self.message = None  # the lines of the message being received
        self.close_requested = False
        self.closing = False

    def connectionMade(self):
        self.track(self.factory.tracker)
        self.reply(f"220 echo ready, pid {self.factory.pid} generation "
                   f"{self.factory.generation()}")

    def connectionLost(self, reason):
        self.untrack()

    def reply(self, text):
        self.sendLine(text.encode("utf-8"))

    def lineReceived(self, line):
        if self.closing:
            return  # after our 421: the client sends it again elsewhere
        line = line.rstrip(b"\r")
        if line == END:
            lines, self.message = self.message or [], None
            for each in lines:
                self.sendLine(b"> " + each)
            self.reply(f"250 echoed {len(lines)} line(s) by pid {self.factory.pid} "
                       f"generation {self.factory.generation()}")
            self.at_boundary()
            return
        if self.message is None:
            self.message = []
        self.message.append(line)
        if len(self.message) > MAX_LINES:
            self.message = None
            self.close(f"500 a message holds at most {MAX_LINES} lines; closing")

    def lineLengthExceeded(self, line):
        self.message = None
        self.close(f"500 a line holds at most {self.MAX_LENGTH} bytes; closing")

    # --- IDrainableConnection -------------------------------------------
    def in_transaction(self):
        return self.message is not None

    def close_at_boundary(self, idle_grace):
        """
        Idle: C{421} at once (no grace: the client reads the 421 before
        anything it sends meanwhile could be lost). Inside a message: after
        its C{250}.
        """
        self.close_requested = True
        self.at_boundary()

    def at_boundary(self):
        if self.close_requested and not self.in_transaction():
            self.close(f"421 pid {self.factory.pid} generation {self.factory.generation()} "
                       f"draining, reconnect")

    def close(self, text):
        if self.closing:
            return
        self.closing = True
        self.reply(text)
        # Half-close, then close: a reset would erase the 421 before the
        # client reads it.
        close_in_stages(self.transport, self.factory.reactor.callLater)


class EchoFactory(protocol.Factory):
    protocol = EchoProtocol

    def __init__(self, reactor, tracker, generation, pid=None):
        self.reactor = reactor
        self.tracker = tracker
        self.generation = generation  # a callable: the generation is known once started
        self.pid = os.getpid() if pid is None else pid


def make_application(reactor=None, environ=None):
    """
    The twistd application: a L{GracefulService} serving L{EchoFactory},
    ready once a real connection has been answered.
    """
    if reactor is None:
        from twisted.internet import reactor
    environ = os.environ if environ is None else environ
    application = service.Application("echo")
    graceful = GracefulService(reactor, pidfile=environ.get("ECHO_PIDFILE", "echo.pid"))
    factory = EchoFactory(reactor, graceful.tracker, lambda: graceful.generation)
    graceful.add_listener("echo", environ.get("ECHO_LISTEN", "tcp:8026:interface=127.0.0.1"),
                          factory)
    graceful.add_readiness_check(EchoSelfTest(reactor, factory))
    StatusFile(graceful)  # python -m twisted_graceful status/reload --pidfile echo.pid
    graceful.setServiceParent(application)
    return application


@implementer(IReadinessCheck)
class EchoSelfTest:
    """
    The readiness check: one message through a real protocol instance over
    an in-memory transport, so a generation that cannot echo never takes
    over.
    """

    def __init__(self, reactor, factory):
        self.reactor = reactor
        self.factory = factory

    def __call__(self):
        from twisted.internet.testing import StringTransport

        connection = _Untracked(self.factory).buildProtocol(None)
        transport = StringTransport()
        connection.makeConnection(transport)
        connection.dataReceived(b"self-test\n.\n")
        answer = transport.value().decode("utf-8", "replace").splitlines()
        if len(answer) < 3 or answer[1] != "> self-test" or not answer[2].startswith("250 "):
            return defer.fail(RuntimeError(f"echo self-test answered {answer!r}"))
        return defer.succeed(answer[2])


def _Untracked(factory):
    """
    C{factory}'s twin without a tracker: the self-test's connection is
    neither one to drain nor one to count.
    """
    return EchoFactory(factory.reactor, None, factory.generation, factory.pid)
