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


# twisted.web.http is a deprecation proxy: every attribute read through it
# costs a Python call, so the channel's base class is bound once.
_HTTPChannel = http.HTTPChannel


HEAD_STARTED = 1  # DrainableHTTPChannel._head: a head is arriving
HEAD_DONE = 2  # and: a head was complete before


def _drop(*args):
    """What a closing channel does with what it still receives."""


class DrainableHTTPChannel(DrainableConnection, http.HTTPChannel):
    """
    An L{http.HTTPChannel} that drains and bounds requests. Its overrides run
    for every request and connection, so they call the base class directly
    (cheaper than C{super()}) and do nothing for what is not there
    (docs/benchmarks.md, "Per-request and per-connection cost").
    """

    protocol_name = "http"
    _idle_close = None
    _lingering = None
    _closing = False
    # Where the connection's request heads are, in one attribute (see below):
    # HEAD_STARTED, bytes of a head have arrived and it is not complete;
    # HEAD_DONE, at least one head was complete on this connection.
    _head = 0
    _client_closes = False  # the client said this request is its last (Connection: close)

    def connectionMade(self):
        _HTTPChannel.connectionMade(self)
        site = self.site
        tracker = getattr(site, "drain_tracker", None)
        if tracker is not None:  # DrainableConnection.track, without the call
            tracker.add(self)
        deadlines = getattr(site, "head_deadlines", None)
        if deadlines is not None and not self._closing:
            deadlines.start(self)

    # The site's drain tracker and head deadlines are read from the site, not
    # copied onto each channel: CPython (3.11) keeps up to 30 attribute names
    # per class in a table its instances share; HTTPChannel and its parents
    # set 26 (three of them only while a head is parsed), and a channel with
    # more than 30 gets a dict of its own, which makes every attribute access
    # on it slower, Twisted's included (about 20,000 instructions a request).
    # This class adds at most three on a request's path: _head,
    # _client_closes, _closing (each one more cost 10,000 instructions per
    # Connection: close request).
    @property
    def drain_tracker(self):
        return getattr(self.site, "drain_tracker", None)

    @property
    def _deadlines(self):
        return getattr(self.site, "head_deadlines", None)

    def in_transaction(self):
        """
        A request has started once its head (request line and headers) is
        complete; until then there is nothing to finish.
        """
        return any(getattr(request, "_graceful_started", False) for request in self.requests)

    # --- request limits ------------------------------------------------

    def _start_head_timer(self):
        if self._deadlines is not None and not self._closing:
            self._deadlines.start(self)

    def _stop_head_timer(self):
        deadlines = self._deadlines
        if deadlines is not None:
            deadlines.due.pop(self, None)

    def _head_timer_due(self, timeout):
        if self._closing or self.in_transaction():
            return
        if self._head & HEAD_STARTED:
            self._head_timed_out(timeout)
        elif not self._head & HEAD_DONE:
            self.loseConnection()  # a connection that never sent a byte: nothing to answer

    def _head_timed_out(self, timeout):
        self._refuse(408, f"the request's head (request line and headers) did not arrive "
                          f"within {timeout:g} s")

    def _refuse(self, code, text):
        """
        Answer C{code} with a one-line body, then close in stages (what the
        client still sends is dropped, never buffered).
        """
        if self._closing:
            return
        self._stop_head_timer()
        self._client_closes = False  # what it still sends is unread: linger
        body = (text + "\n").encode("utf-8")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n"
            % (code, _REASONS[code], len(body)) + body)
        self.persistent = False
        self.loseConnection()

    def _head_too_big(self):
        if self._HTTPChannel__first_line:
            self._refuse(414, f"the request line is too long (over {self.MAX_LENGTH} bytes)")
        else:
            self._refuse(431, f"the request's header block is too big (at most "
                              f"{self.maxHeaders} headers, {self.totalHeadersSize} bytes in all)")

    def dataReceived(self, data):
        head = self._head
        if not head & HEAD_STARTED and data and self.line_mode and not self._handlingRequest:
            # Bytes of a request's head. The first head's clock started with
            # the connection (as nginx's client_header_timeout); a later
            # one's starts with its first byte.
            self._head = head | HEAD_STARTED
            if head & HEAD_DONE:
                self._start_head_timer()
        _HTTPChannel.dataReceived(self, data)

    def lineLengthExceeded(self, line):
        self._head_too_big()

    def _respondToBadRequestAndDisconnect(self):
        # Twisted's one answer (a bare 400) to every bad head; a head over
        # the limits gets the code that says which limit (414, 431).
        if (self._receivedHeaderSize > self.totalHeadersSize
                or self._receivedHeaderCount > self.maxHeaders):
            self._head_too_big()
        else:
            super()._respondToBadRequestAndDisconnect()

    def allHeadersReceived(self):
        deadlines = getattr(self.site, "head_deadlines", None)  # _stop_head_timer, inline
        if deadlines is not None:
            deadlines.due.pop(self, None)
        self._head = HEAD_DONE
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
        _HTTPChannel.allHeadersReceived(self)

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
        if not self._head & HEAD_DONE and interfaces.INegotiated.providedBy(self.transport):
            # A new TLS connection, its first request not read yet: its
            # handshake takes round trips (and CPU on a loaded machine), and
            # closing it now would reset it (a TLS close before the handshake
            # is an abort). The head timer closes it at --header-timeout if
            # no request comes; one that comes is answered with
            # Connection: close.
            return
        if self._head & HEAD_STARTED:
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
        if self.drain_state != "open" and self.draining:  # the cheap test first
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        persistent = _HTTPChannel.checkPersistence(self, request, version)
        self._client_closes = not persistent
        return persistent

    def loseConnection(self):
        """
        Close in stages: flush, half-close, read (and drop) until the peer
        closes or L{LINGER_SECONDS} pass, then close. Closing a socket with
        unread input sends a reset, which can erase the last response.
        """
        if self._closing:
            return
        self._closing = True
        deadlines = getattr(self.site, "head_deadlines", None)  # _stop_head_timer, inline
        if deadlines is not None:
            deadlines.due.pop(self, None)
        if self._idle_close is not None and self._idle_close.active():
            self._idle_close.cancel()
        self._networkProducer.unregisterProducer()
        if self._client_closes and not self._buffer and not self._dataBuffer:
            # The client said its request was its last and sent nothing
            # after it: it reads nothing more. Close as bare twisted.web and
            # nginx's lingering_close heuristic do, without the half-close
            # and its linger (a delayed call, a wake-up and a read per
            # connection). The transport is now disconnecting (LineReceiver
            # stops parsing), and HTTPChannel drops whatever a TLS transport
            # still delivers on a connection that is not persistent: no
            # methods rebound on the instance (three attribute writes cost
            # 8,000 instructions a connection).
            self.transport.loseConnection()
        else:
            # Half-closed, the transport still reads: drop what comes, even
            # the rest of a buffer LineReceiver is parsing now.
            self.dataReceived = self.lineReceived = self.rawDataReceived = _drop
            self._lingering = close_in_stages(self.transport, self.callLater)

    def connectionLost(self, reason):
        site = self.site
        deadlines = getattr(site, "head_deadlines", None)  # _stop_head_timer, inline
        if deadlines is not None:
            deadlines.due.pop(self, None)
        for call in (self._idle_close, self._lingering):
            if call is not None and call.active():
                call.cancel()
        try:
            _HTTPChannel.connectionLost(self, reason)
        finally:
            tracker = getattr(site, "drain_tracker", None)  # DrainableConnection.untrack, inline
            if tracker is not None:
                tracker.remove(self)


TWISTED_LOG = "twisted"  # GracefulSite(access_log=...): twisted.web's own access log


class HeadDeadlines:
    """
    When each request head in progress on a site is due, and one delayed
    call for all of them.

    Every head gets the same timeout, so the order in which heads start is
    the order in which they come due: a dict (insertion-ordered) is the
    queue, and the one delayed call is for its oldest entry. A head costs an
    insertion and a removal, not a C{callLater} and a C{cancel} per
    connection (docs/benchmarks.md, "Per-request and per-connection cost").
    The first head's clock starts with the connection (as nginx's
    C{client_header_timeout}), a later head's with its first byte.

    The delayed call stays armed (up to the timeout) after the last head is
    done, not cancelled per connection; C{stopFactory} calls it off when no
    head is pending. Tests of a site on the real reactor pass a L{Clock}.
    """

    def __init__(self, reactor, timeout):
        self._reactor = reactor
        self.timeout = timeout
        # channel -> reactor time its head is due, oldest first; a channel
        # whose head is complete removes itself (due.pop(channel, None)).
        self.due = {}
        self._call = None

    def start(self, channel):
        due = self.due
        due.pop(channel, None)
        due[channel] = self._reactor.seconds() + self.timeout
        if self._call is None:
            self._call = self._reactor.callLater(self.timeout, self._expire)

    def stop(self, channel):
        self.due.pop(channel, None)

    def __len__(self):
        return len(self.due)

    def _expire(self):
        self._call = None
        now = self._reactor.seconds()
        due = self.due
        while due:
            channel, when = next(iter(due.items()))
            if when > now:
                self._call = self._reactor.callLater(when - now, self._expire)
                return
            del due[channel]
            channel._head_timer_due(self.timeout)

    def idle(self):
        """
        No head is pending: call the delayed call off (a site that stops
        listening leaves nothing in the reactor; one whose draining
        connections still read heads keeps it).
        """
        if not self.due and self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None


class GracefulSite(server.Site):
    """
    A L{Site} whose channels a L{DrainTracker} can drain.

    @param max_body: the largest request body accepted, in bytes (413
        beyond; L{None}: no limit).
    @param header_timeout: seconds a request's head may take to arrive (408
        beyond; L{None}: no limit).
    @param access_log: where each request's line goes: L{TWISTED_LOG}
        (the default: twisted.web's own, through twisted.logger), L{None}
        (nowhere; C{twistd graceful}'s default), or a
        L{twisted_graceful.access_log.BufferedAccessLog}.
    """

    def __init__(self, resource: IResource, drain_tracker: Optional[DrainTracker] = None,
                 max_body: Optional[int] = DEFAULT_MAX_BODY,
                 header_timeout: Optional[float] = DEFAULT_HEADER_TIMEOUT,
                 protocol_name: str = "http", access_log: Any = TWISTED_LOG,
                 **kwargs: Any) -> None:
        server.Site.__init__(self, resource, **kwargs)
        self.access_log = access_log
        self.drain_tracker = drain_tracker
        self.max_body = max_body
        self.header_timeout = header_timeout
        self.protocol_name = protocol_name  # how the drain and the metrics name its connections
        self.head_deadlines = HeadDeadlines(self.reactor, header_timeout) if header_timeout else None

    def startFactory(self):
        server.Site.startFactory(self)  # and the date of the lines, cached each second
        if self.access_log is not TWISTED_LOG:
            self._logFile = None  # not twisted.logger's
            if self.access_log is not None:
                self.access_log.start()

    def stopFactory(self):
        server.Site.stopFactory(self)
        if self.access_log is not None and self.access_log is not TWISTED_LOG:
            self.access_log.stop()
        if self.head_deadlines is not None:
            self.head_deadlines.idle()

    def log(self, request):
        access_log = self.access_log
        if access_log is TWISTED_LOG:
            server.Site.log(self, request)
        elif access_log is not None:
            access_log.write(self._logFormatter(self._logDateTime, request) + "\n")

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
