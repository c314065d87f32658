"""
The datagram listener of the C{graceful} server (C{--udp-port}): a
C{PING <token>} datagram is answered C{PONG <token> pid <pid> generation <g>}
to its sender, so a client can see which generation read it; any other
datagram is a log message (syslog style), counted and dropped.

Its socket is handed from generation to generation like the stream
listeners (one socket, one kernel queue, shared by every process holding
it): a new generation starts reading it before the old one stops, so a
datagram that arrives during an upgrade waits in that queue and is read by
one of them, never lost while the queue has room (docs/design.md, fact 29).
A datagram socket has no connections, so there is nothing to drain.
"""

from twisted.internet import defer, protocol
from twisted.logger import Logger

PING = b"PING "
MAX_TOKEN = 256  # bytes of token echoed back: a PONG is never much larger than its PING
RESULTS = ("pong", "log", "refused")


class PingProtocol(protocol.DatagramProtocol):
    """
    Answer C{PING <token>}, count everything else as a log message.

    @ivar counts: result -> datagrams read (C{pong}, C{log}, C{refused}: a
        PING whose token is too long, or whose answer could not be sent).
    @ivar observer: called with each datagram's result (the metrics).
    """

    log = Logger()

    def __init__(self, identity, observer=None):
        self.identity = identity
        self.observer = observer
        self.counts = dict.fromkeys(RESULTS, 0)

    def answer(self, data):
        """
        The reply to datagram C{data} and its result: (bytes or L{None},
        result).
        """
        if not data.startswith(PING):
            return None, "log"
        token = data[len(PING):].strip()
        if not token or len(token) > MAX_TOKEN or b" " in token:
            return None, "refused"
        reply = b"PONG %s pid %d generation %d\n" % (
            token, self.identity.pid, self.identity.generation)
        return reply, "pong"

    def datagramReceived(self, data, addr):
        reply, result = self.answer(data)
        if reply is not None:
            try:
                self.transport.write(reply, addr)
            except OSError as e:  # the sender's buffer is full, it is unreachable...
                self.log.warn("pid {pid}: no PONG sent to {addr}: {err}",
                              pid=self.identity.pid, addr=addr, err=e)
                result = "refused"
        self.counts[result] += 1
        if self.observer is not None:
            self.observer(result)


def self_test_ping(ping_protocol):
    """
    A readiness check: the protocol answers a PING (in-process, nothing sent:
    a datagram sent to the shared socket could be read by the previous
    generation).
    """
    reply, result = ping_protocol.answer(b"PING self-test")
    if result != "pong" or not reply.startswith(b"PONG self-test pid "):
        return defer.fail(RuntimeError(f"the UDP listener answers a PING with {reply!r}"))
    return defer.succeed(reply)
