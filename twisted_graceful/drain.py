"""
One drain mechanism for every protocol.

A L{DrainTracker} knows every open connection of every protocol and whether it
is inside a transaction (an HTTP request being handled, a transaction between
C{BEGIN} and the reply to its C{COMMIT}). Protocols plug in by mixing in
L{DrainableConnection}; the tracker decides I{when}, the protocol knows I{how}
to close at its own transaction boundary.
"""

import socket
import time
from typing import Any, Callable, Optional

from twisted.internet import defer, interfaces
from twisted.logger import Logger
from zope.interface import implementer

from twisted_graceful.interfaces import IDrainableConnection

LINGER_SECONDS = 2.0  # how long a half-closed connection waits for the peer's FIN
COMMIT_REPLY_WAIT = 10.0  # the most the hard deadline waits for a commit's reply

TRANSACTION = "transaction"
CONNECTION = "connection"
DRAIN_MODES = (TRANSACTION, CONNECTION)


@implementer(IDrainableConnection)
class DrainableConnection:
    """
    Mixin for a protocol whose connections a L{DrainTracker} drains: it
    implements L{IDrainableConnection} but for the two methods only the
    protocol can know.

    Subclasses define C{protocol_name}, C{in_transaction()},
    C{close_at_boundary(idle_grace)} (close now if idle, else right after the
    reply that ends the current transaction) and may override
    C{abort_connection()}.
    """

    protocol_name = "?"
    drain_tracker: Optional["DrainTracker"] = None
    drain_state = "open"  # open, closing (asked to close), aborted
    transport: Any = None  # the protocol's, once connected

    def track(self, tracker: Optional["DrainTracker"]) -> None:
        if tracker is not None:
            self.drain_tracker = tracker
            tracker.add(self)

    def untrack(self) -> None:
        if self.drain_tracker is not None:
            self.drain_tracker.remove(self)

    def in_transaction(self) -> bool:
        raise NotImplementedError()

    def close_at_boundary(self, idle_grace: float) -> None:
        raise NotImplementedError()

    def abort_connection(self) -> bool:
        """
        The hard deadline. Cut the connection and return True; or, when a
        commit is already in the database and its reply is on the way, return
        False and close right after that reply (cutting it would make the
        client retry work that was done).
        """
        self.drain_state = "aborted"
        self.transport.abortConnection()
        return True

    def describe(self) -> str:
        peer = getattr(self.transport, "getPeer", lambda: "?")()
        state = "in a transaction" if self.in_transaction() else "idle"
        return f"{self.protocol_name} connection from {_peer_text(peer)} ({state})"

    @property
    def draining(self) -> bool:
        return self.drain_tracker is not None and self.drain_tracker.draining


def _peer_text(peer):
    host = getattr(peer, "host", None)
    if host is not None:
        return f"{host}:{peer.port}"
    name = getattr(peer, "name", None)
    return str(name or peer)


def close_in_stages(transport, call_later, linger=LINGER_SECONDS):
    """
    Flush, half-close, and let the peer's FIN (or C{linger} seconds) end the
    connection: closing a socket with unread input sends a reset, which can
    erase the last reply before the client reads it (docs/design.md, fact 11). The caller
    drops what is read meanwhile.

    @return: the delayed call that closes for good, or L{None} if the
        transport closed at once (it cannot half-close).
    """
    if interfaces.INegotiated.providedBy(transport):
        # TLS: a close_notify is its half-close (Twisted's TLS transport goes
        # on reading until the peer answers it); a TCP half-close under it
        # would cut the TLS stream without one (docs/design.md, fact 31).
        transport.loseConnection()
        lower = getattr(transport, "transport", None)
        return call_later(linger, lower.loseConnection) if lower is not None else None
    sock = getattr(transport, "socket", None)
    if (sock is not None and getattr(sock, "type", None) == socket.SOCK_STREAM
            and hasattr(transport, "loseWriteConnection")):
        transport.loseWriteConnection()
        return call_later(linger, transport.loseConnection)
    transport.loseConnection()
    return None


class DrainReport:
    def __init__(self):
        self.started = None
        self.duration = 0.0
        self.at_start = 0
        self.busy_at_start = 0
        self.closed_by_client = 0
        self.closed_by_server = 0
        self.cut = []  # descriptions of connections aborted at the deadline

    def summary(self):
        return (
            f"drained {self.at_start} connection(s) in {self.duration * 1000:.0f} ms: "
            f"{self.closed_by_server} closed by the server at a transaction boundary, "
            f"{self.closed_by_client} closed by the client, {len(self.cut)} cut at the deadline"
        )


class DrainTracker:
    """
    Every open connection of every protocol, and how to drain them.
    """

    log = Logger()

    def __init__(self, reactor: Any, idle_grace: float = 1.0, progress_interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._reactor = reactor
        # IDrainableConnection providers -> None: ordered, and removed in O(1)
        self._connections: dict[Any, None] = {}
        self.idle_grace = idle_grace
        self.progress_interval = progress_interval
        self._clock = clock
        self.draining = False
        self.mode: Optional[str] = None
        self.report: Optional[DrainReport] = None
        self._done: Optional[defer.Deferred[DrainReport]] = None
        self._calls: list[Any] = []  # IDelayedCall
        # callables(tracker) told when connections change
        self._change_callbacks: list[Callable[[DrainTracker], None]] = []

    # --- registry -------------------------------------------------------
    # add and remove run once per connection: no work for what is not there
    # (a drain, a change callback).
    def add(self, conn: IDrainableConnection) -> None:
        if not IDrainableConnection.providedBy(conn):
            raise TypeError(
                f"cannot drain {conn!r}: {type(conn).__name__} does not provide "
                f"IDrainableConnection (mix in DrainableConnection, or declare "
                f"@implementer(IDrainableConnection))")
        self._connections[conn] = None
        if self.draining and self.mode == TRANSACTION:
            # Accepted in the instant before the listener closed: serve what it
            # sends within the grace, then close like the others.
            conn.drain_state = "closing"
            conn.close_at_boundary(self.idle_grace)
        if self._change_callbacks:
            self._changed()

    def remove(self, conn: IDrainableConnection) -> None:
        if self._connections.pop(conn, self) is self:
            return
        if self.report is not None:
            if conn.drain_state == "closing":
                self.report.closed_by_server += 1
            elif conn.drain_state == "open":
                self.report.closed_by_client += 1
        if self._change_callbacks:
            self._changed()
        if self._done is not None:
            self._check_done()

    def __len__(self) -> int:
        return len(self._connections)

    def counts(self) -> dict[str, tuple[int, int]]:
        """
        protocol name -> (open connections, connections inside a transaction).
        """
        result: dict[str, tuple[int, int]] = {}
        for conn in self._connections:
            total, busy = result.get(conn.protocol_name, (0, 0))
            result[conn.protocol_name] = (total + 1, busy + (1 if conn.in_transaction() else 0))
        return result

    def add_change_callback(self, callback: Callable[["DrainTracker"], None]) -> None:
        """
        Call C{callback(tracker)} whenever a connection opens or closes, or a
        drain starts or is called off.
        """
        if callback not in self._change_callbacks:
            self._change_callbacks.append(callback)

    def remove_change_callback(self, callback: Callable[["DrainTracker"], None]) -> None:
        if callback in self._change_callbacks:
            self._change_callbacks.remove(callback)

    def _changed(self):
        for callback in list(self._change_callbacks):
            callback(self)

    # --- draining -------------------------------------------------------
    def drain(self, mode: str = TRANSACTION, timeout: float = 60.0,
              abort_grace: float = 5.0) -> "defer.Deferred[DrainReport]":
        """
        Close every connection at a transaction boundary (C{transaction}) or
        let clients close them (C{connection}) until C{timeout}, then close
        the rest at their next boundary; abort what is left C{abort_grace}
        later.

        @return: a L{Deferred} firing with a L{DrainReport} once no connection
            is left.
        """
        if mode not in DRAIN_MODES:
            raise ValueError(f"drain mode must be one of {DRAIN_MODES}, not {mode!r}")
        if self._done is not None:
            return _chain(self._done)
        self.draining = True
        self.mode = mode
        self.report = report = DrainReport()
        report.started = self._clock()
        report.at_start = len(self._connections)
        report.busy_at_start = sum(1 for c in self._connections if c.in_transaction())
        self._done = defer.Deferred()
        self.log.info(
            "Draining ({mode} level): {total} connection(s) open, {busy} inside a transaction",
            mode=mode,
            total=report.at_start,
            busy=report.busy_at_start,
        )
        if mode == TRANSACTION:
            self._close_all_at_boundary()
        self._calls.append(self._reactor.callLater(timeout, self._deadline, timeout, abort_grace))
        self._schedule_progress()
        result = _chain(self._done)
        self._changed()
        self._check_done()
        return result

    def _close_all_at_boundary(self, idle_grace=None):
        grace = self.idle_grace if idle_grace is None else idle_grace
        for conn in list(self._connections):
            if conn.drain_state == "open":
                conn.drain_state = "closing"
                conn.close_at_boundary(grace)

    def _schedule_progress(self):
        if self.progress_interval:
            self._calls.append(self._reactor.callLater(self.progress_interval, self._progress))

    def _progress(self):
        if self._done is None or self._done.called:
            return
        for name, (total, busy) in sorted(self.counts().items()):
            self.log.info(
                "Still draining: {total} {name} connection(s) open, {busy} inside a transaction",
                total=total,
                busy=busy,
                name=name,
            )
        self._schedule_progress()

    def _deadline(self, timeout, abort_grace):
        if not self._connections:
            return
        self.log.warn(
            "Drain timeout ({timeout} s) reached with {n} connection(s) open; closing each at "
            "its next transaction boundary, aborting what remains in {grace} s",
            timeout=timeout,
            n=len(self._connections),
            grace=abort_grace,
        )
        self._close_all_at_boundary(idle_grace=0)
        self._calls.append(self._reactor.callLater(abort_grace, self._abort_all))

    def _abort_all(self, last_call=None):
        waiting = []
        for conn in list(self._connections):
            description = conn.describe()
            if last_call is None and conn.abort_connection() is False:
                self.log.warn("{conn}: its commit is being written; closing after its reply",
                              conn=description)
                waiting.append(conn)
                continue
            if last_call is not None:
                conn.transport.abortConnection()
            self.report.cut.append(description)
            self.log.warn("Cutting {conn} at the hard drain deadline", conn=description)
            # abortConnection reports connectionLost later; do not wait for it.
            self.remove(conn)
        if waiting and last_call is None:
            # A commit takes at most the store's busy timeout; do not wait forever.
            self._calls.append(self._reactor.callLater(COMMIT_REPLY_WAIT, self._abort_all, True))

    def resume(self) -> bool:
        """
        Call the drain off (the generation that took over died): new
        connections are served again. Connections already asked to close
        still close at their boundary; the drain's Deferred never fires.
        """
        if self._done is None or self._done.called:
            return False
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        self.draining = False
        self.mode = None
        self.report = None
        self._done = None
        self._changed()
        return True

    def _check_done(self):
        if self._done is None or self._done.called or self._connections:
            return
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        report = self.report
        report.duration = self._clock() - report.started
        self.log.info("{summary}", summary=report.summary())
        self._done.callback(report)


def _chain(d):
    result = defer.Deferred()

    def fire(value):
        result.callback(value)
        return value

    d.addBoth(fire)
    return result
