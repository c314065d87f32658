"""
HTTP that drains: every channel is tracked, and a draining channel finishes the
request it handles, answers it with C{Connection: close} and closes in stages
(docs/design.md, facts 8 and 11).

Requests are bounded: a body over C{max_body} is refused with 413 before it is
read into memory; a request line or header block too long gets 414 or 431
(Twisted alone closes silently or answers 400); a request whose head does not
arrive within C{header_timeout} gets 408. A request whose head is incomplete
has not started: at drain it is idle, so a slow client cannot hold a
draining generation until the deadline.
"""

import socket
from typing import Any, Optional

from twisted.internet import defer, interfaces, protocol
from twisted.internet.interfaces import IProtocolFactory
from twisted.web import http, server
from twisted.web.resource import IResource
from zope.interface import implementer

from twisted_graceful._twisted import GenericHTTPChannelProtocol
from twisted_graceful.drain import DrainableConnection, DrainTracker, close_in_stages
from twisted_graceful.interfaces import IReadinessCheck

DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_HEADER_TIMEOUT = 10.0

_REASONS = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


class DrainableHTTPChannel(DrainableConnection, http.HTTPChannel):
    protocol_name = "http"
    _idle_close = None
    _lingering = None
    _closing = False
    _head_timer = None
    _head_started = False  # bytes of a request's head have arrived
    _head_lines = 0  # lines of the current head received
    _heads = 0  # complete request heads received on this connection

    def connectionMade(self):
        super().connectionMade()
        self.track(getattr(self.site, "drain_tracker", None))
        self._start_head_timer()

    def in_transaction(self):
        """
        A request has started once its head (request line and headers) is
        complete; until then there is nothing to finish.
        """
        return any(getattr(request, "_graceful_started", False) for request in self.requests)

    # --- request limits ------------------------------------------------
    def _start_head_timer(self):
        timeout = getattr(self.site, "header_timeout", None)
        if timeout and self._head_timer is None and not self._closing:
            self._head_timer = self.callLater(timeout, self._head_timed_out, timeout)

    def _stop_head_timer(self):
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self, timeout):
        self._head_timer = None
        if self._closing or self.in_transaction():
            return
        if self._head_started:
            self._refuse(408, f"the request's head (request line and headers) did not arrive "
                              f"within {timeout:g} s")
        else:
            self.loseConnection()  # a connection that never sent a byte: nothing to answer

    def _refuse(self, code, text):
        """
        Answer C{code} with a one-line body, then close in stages (what the
        client still sends is dropped, never buffered).
        """
        if self._closing:
            return
        self._stop_head_timer()
        body = (text + "\n").encode("utf-8")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n"
            % (code, _REASONS[code], len(body)) + body)
        self.persistent = False
        self.loseConnection()

    def _head_too_big(self):
        if self._head_lines == 0:
            self._refuse(414, f"the request line is too long (over {self.MAX_LENGTH} bytes)")
        else:
            self._refuse(431, f"the request's header block is too big (at most "
                              f"{self.maxHeaders} headers, {self.totalHeadersSize} bytes in all)")

    def dataReceived(self, data):
        if data and self.line_mode and not self._handlingRequest:
            # Bytes of a request's head: its clock starts with the first one.
            self._head_started = True
            self._start_head_timer()
        super().dataReceived(data)

    def lineLengthExceeded(self, line):
        self._head_too_big()

    def lineReceived(self, line):
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._head_too_big()
            return
        if line or self._head_lines:
            self._head_lines += 1
        super().lineReceived(line)

    def headerReceived(self, line):
        if self._receivedHeaderCount >= self.maxHeaders:
            self._head_too_big()
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self):
        self._stop_head_timer()
        self._heads += 1
        self._head_lines = 0
        self._head_started = False
        limit = getattr(self.site, "max_body", None)
        if limit is not None and self.length is not None and self.length > limit:
            # Refused on its Content-Length, before a byte of the body is read
            # (and instead of "100 Continue").
            self.length = None  # no body to wait for: what follows is dropped
            self._refuse(413, f"the request body is {self._length_text()} bytes; this server "
                              f"accepts at most {limit} bytes")
            return
        self.requests[-1]._graceful_started = True
        decoder = self._transferDecoder
        if limit is not None and decoder is not None and hasattr(decoder, "dataCallback"):
            self._count_body(decoder, limit)
        super().allHeadersReceived()

    def _length_text(self):
        request = self.requests[-1] if self.requests else None
        lengths = request.requestHeaders.getRawHeaders(b"content-length") if request else None
        return lengths[0].decode("ascii", "replace")[:30] if lengths else "?"

    def _count_body(self, decoder, limit):
        """
        A chunked body has no length up front: count it as it arrives and
        refuse it (413) as soon as it passes C{limit}.
        """
        deliver = decoder.dataCallback
        received = [0]

        def counted(data):
            if self._closing:
                return
            received[0] += len(data)
            if received[0] > limit:
                decoder.finishCallback = lambda rest: None  # never handled
                self._refuse(413, f"the request body is over {limit} bytes, the most this "
                                  f"server accepts")
                content = getattr(self.requests[-1], "content", None) if self.requests else None
                if content is not None:
                    content.close()  # what was received is dropped now (a temporary file)
                return
            deliver(data)

        decoder.dataCallback = counted

    def requestDone(self, request):
        super().requestDone(request)
        if not self._closing and self.line_mode and self._buffer:
            # Part of the next request's head was read with this one.
            self._head_started = True
            self._start_head_timer()

    def close_at_boundary(self, idle_grace):
        """
        A request in progress finishes and is answered with C{Connection:
        close}; an idle keep-alive connection gets C{idle_grace} seconds in
        which its next request is still answered (with C{Connection: close}),
        so a request sent as we close does not meet a reset.
        """
        if self.in_transaction():
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
        if self.in_transaction():
            return
        if not self._heads and interfaces.INegotiated.providedBy(self.transport):
            # A new TLS connection, its first request not read yet: its
            # handshake takes round trips (and CPU on a loaded machine), and
            # closing it now would reset it (a TLS close before the handshake
            # is an abort). The head timer closes it at --header-timeout if
            # no request comes; one that comes is answered with
            # Connection: close.
            return
        if self._head_started:
            # Part of a request arrived but not all of its head: it has not
            # started; tell the client it can send it again (elsewhere).
            self._refuse(408, "this server is shutting down and the request's head was not "
                              "complete; send it again")
        else:
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
        self._stop_head_timer()
        if self._idle_close is not None and self._idle_close.active():
            self._idle_close.cancel()
        self._networkProducer.unregisterProducer()
        self.dataReceived = self.lineReceived = self.rawDataReceived = lambda *a: None
        self._lingering = close_in_stages(self.transport, self.callLater)

    def connectionLost(self, reason):
        self._stop_head_timer()
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

    @param max_body: the largest request body accepted, in bytes (413
        beyond; L{None}: no limit).
    @param header_timeout: seconds a request's head may take to arrive (408
        beyond; L{None}: no limit).
    """

    def __init__(self, resource: IResource, drain_tracker: Optional[DrainTracker] = None,
                 max_body: Optional[int] = DEFAULT_MAX_BODY,
                 header_timeout: Optional[float] = DEFAULT_HEADER_TIMEOUT,
                 protocol_name: str = "http", **kwargs: Any) -> None:
        server.Site.__init__(self, resource, **kwargs)
        self.drain_tracker = drain_tracker
        self.max_body = max_body
        self.header_timeout = header_timeout
        self.protocol_name = protocol_name  # how the drain and the metrics name its connections

    def protocol(self):
        channel = DrainableHTTPChannel()
        if self.protocol_name != channel.protocol_name:
            channel.protocol_name = self.protocol_name
        return GenericHTTPChannelProtocol(channel)


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


def self_test_request(reactor: Any, factory: IProtocolFactory, path: bytes = b"/healthz",
                      timeout: float = 10.0) -> "defer.Deferred[bytes]":
    """
    Send one real request to C{factory} in-process, over a socket pair, and
    fire with the response bytes; fail if it is not a 200.

    The listening socket is not used: the previous generation shares its queue,
    and a test request could be answered by it.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    done: defer.Deferred[bytes] = defer.Deferred()
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


@implementer(IReadinessCheck)
class HTTPSelfTest:
    """
    The readiness check of an HTTP site: one real request through the whole
    stack (L{self_test_request}), so a generation whose resources fail to
    answer is never declared ready.

        graceful.add_readiness_check(HTTPSelfTest(reactor, site))
    """

    def __init__(self, reactor: Any, factory: IProtocolFactory, path: bytes = b"/healthz",
                 timeout: float = 10.0) -> None:
        self.reactor = reactor
        self.factory = factory
        self.path = path
        self.timeout = timeout

    def __call__(self) -> "defer.Deferred[bytes]":
        return self_test_request(self.reactor, self.factory, self.path, self.timeout)

    def __repr__(self):
        return f"<HTTPSelfTest GET {self.path.decode('ascii', 'replace')}>"
