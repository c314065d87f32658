"""
HTTP that drains: every channel is tracked, and a draining channel finishes the
request it handles, answers it with C{Connection: close} and closes in stages
(docs/design.md, facts 8 and 11).
"""

import socket

from twisted.internet import defer, protocol
from twisted.web import http, server

from twisted_graceful._twisted import GenericHTTPChannelProtocol
from twisted_graceful.drain import DrainableConnection, close_in_stages


class DrainableHTTPChannel(DrainableConnection, http.HTTPChannel):
    protocol_name = "http"
    _idle_close = None
    _lingering = None
    _closing = False

    def connectionMade(self):
        super().connectionMade()
        self.track(getattr(self.site, "drain_tracker", None))

    def in_transaction(self):
        return bool(self.requests)

    def close_at_boundary(self, idle_grace):
        """
        A request in progress finishes and is answered with C{Connection:
        close}; an idle keep-alive connection gets C{idle_grace} seconds in
        which its next request is still answered (with C{Connection: close}),
        so a request sent as we close does not meet a reset.
        """
        if self.requests:
            # requestDone closes the connection after this response.
            self.persistent = False
            for request in self.requests:
                if not request.startedWriting:
                    request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return
        # Idle: leave `persistent` alone (HTTPChannel drops every byte of a
        # non-persistent connection); checkPersistence answers False for the
        # next request, which is then answered and closed.
        if idle_grace > 0:
            self._idle_close = self.callLater(idle_grace, self._close_if_idle)
        else:
            self._close_if_idle()

    def _close_if_idle(self):
        self._idle_close = None
        if not self.requests:
            self.loseConnection()

    def abort_connection(self):
        """
        Cut at the hard deadline, unless a request's commit is already in the
        store: then its response goes out and the connection closes after it.
        """
        if any(getattr(request, "committing", False) for request in self.requests):
            self.drain_state = "aborted"
            return False
        return super().abort_connection()

    def checkPersistence(self, request, version):
        if self.draining and self.drain_state != "open":
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return super().checkPersistence(request, version)

    def loseConnection(self):
        """
        Close in stages: flush, half-close, read (and drop) until the peer
        closes or L{LINGER_SECONDS} pass, then close. Closing a socket with
        unread input sends a reset, which can erase the last response.
        """
        if self._closing:
            return
        self._closing = True
        if self._idle_close is not None and self._idle_close.active():
            self._idle_close.cancel()
        self._networkProducer.unregisterProducer()
        self.dataReceived = self.lineReceived = self.rawDataReceived = lambda *a: None
        self._lingering = close_in_stages(self.transport, self.callLater)

    def connectionLost(self, reason):
        for call in (self._idle_close, self._lingering):
            if call is not None and call.active():
                call.cancel()
        try:
            super().connectionLost(reason)
        finally:
            self.untrack()


class GracefulSite(server.Site):
    """
    A L{Site} whose channels a L{DrainTracker} can drain.
    """

    def __init__(self, resource, drain_tracker=None, **kwargs):
        server.Site.__init__(self, resource, **kwargs)
        self.drain_tracker = drain_tracker

    def protocol(self):
        return GenericHTTPChannelProtocol(DrainableHTTPChannel())


class _SelfTestClient(protocol.Protocol):
    def __init__(self, request, done):
        self._request = request
        self._done = done
        self._data = []

    def connectionMade(self):
        self.transport.write(self._request)

    def dataReceived(self, data):
        self._data.append(data)

    def connectionLost(self, reason):
        if not self._done.called:
            self._done.callback(b"".join(self._data))


def self_test_request(reactor, factory, path=b"/healthz", timeout=10.0):
    """
    Send one real request to C{factory} in-process, over a socket pair, and
    fire with the response bytes; fail if it is not a 200.

    The listening socket is not used: the previous generation shares its queue,
    and a test request could be answered by it.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    done = defer.Deferred()
    try:
        ours.setblocking(False)
        theirs.setblocking(False)
        reactor.adoptStreamConnection(theirs.fileno(), socket.AF_UNIX, factory)
        client = _SelfTestClient(
            b"GET " + path + b" HTTP/1.0\r\nHost: self-test\r\nUser-Agent: twisted-graceful\r\n\r\n",
            done,
        )
        client_factory = protocol.Factory.forProtocol(lambda: client)
        reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, client_factory)
    finally:
        ours.close()
        theirs.close()
    def timed_out():
        if not done.called:
            done.errback(defer.TimeoutError(f"no answer to the HTTP self-test within {timeout} s"))
            if client.transport is not None:
                client.transport.abortConnection()  # and the server side with it

    timer = reactor.callLater(timeout, timed_out)

    def check(response):
        if timer.active():
            timer.cancel()
        status = response.split(b"\r\n", 1)[0]
        if not status.startswith(b"HTTP/1.") or status.split(b" ")[1:2] != [b"200"]:
            raise RuntimeError(f"HTTP self-test answered {status[:80]!r}, expected 200")
        return response

    return done.addCallback(check)
