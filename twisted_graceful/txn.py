"""
The transaction protocol: a line protocol with SMTP-style reply codes in which
the unit of work is a transaction inside a long-lived connection (see
C{docs/txn-protocol.md}).

Writes between C{BEGIN} and C{COMMIT} are queued in memory and reach the
database only at C{COMMIT}, all at once (L{Store.commit}); outside C{BEGIN}
every command is its own transaction. A connection drains at its next
transaction boundary: the reply that ends the transaction is followed by
C{421} and the connection is closed in stages; what the client pipelined after
that boundary is never executed (docs/design.md, fact 12).
"""

import math

from twisted.internet import defer, interfaces, protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from twisted_graceful.drain import DrainableConnection, close_in_stages
from twisted_graceful.slow import SlowWork, heartbeat
from twisted_graceful.store import (
    CommitOutcomeUnknown,
    KeyReused,
    StoreBusy,
    StoreUnusable,
    TransactionFailed,
    apply_ops,
    idempotency_key_problem,
    parse_integer,
)

MAX_KEY_LENGTH = 250
MAX_SLOW_SECONDS = 3600

# name -> (minimum arguments, maximum arguments, usage, description)
COMMANDS = {
    "BEGIN": (0, 0, "BEGIN", "start a transaction: the writes that follow are queued"),
    "SET": (2, 2, "SET key value", "set key to value (one word)"),
    "INCR": (1, 2, "INCR key [n]", "add n (default 1) to an integer value (absent: 0)"),
    "DEL": (1, 1, "DEL key", "delete key"),
    "GET": (1, 1, "GET key", "the committed value (inside BEGIN: with this transaction's writes)"),
    "COMMIT": (0, 1, "COMMIT [idempotency-key]",
               "apply the queued writes, all of them or none; with a key, at most once: "
               "sent again under the same key, the first commit's reply again"),
    "ABORT": (0, 0, "ABORT", "drop the queued writes"),
    "PING": (0, 0, "PING", "which process answers: its pid and generation"),
    "SLOW": (1, 1, "SLOW seconds", f"a transaction that takes that long (0 to {MAX_SLOW_SECONDS})"),
    "HELP": (0, 1, "HELP [command]", "this list"),
    "QUIT": (0, 0, "QUIT", "close the connection (an open transaction is aborted)"),
}
# Commands that are part of a transaction (counted against --max-commands).
_TRANSACTION_COMMANDS = {"SET", "INCR", "DEL", "GET", "SLOW"}

_TOO_LONG = object()


class _Transaction:
    """
    What a client sent between C{BEGIN} and C{COMMIT}.
    """

    def __init__(self):
        self.ops = []
        self.commands = 0
        self.failed = None  # why COMMIT will fail, once a command was rejected


@implementer(interfaces.IHalfCloseableProtocol)
class TxnProtocol(DrainableConnection, TimeoutMixin, protocol.Protocol):
    """
    One connection. It is half-closeable (docs/design.md, fact 24): a client
    that sends its commands and then its FIN (C{printf ... | socat}) still
    gets every reply, in order; the server closes once the last one is
    written.
    """

    protocol_name = "txn"
    log = Logger()

    def __init__(self):
        self._buffer = bytearray()
        self._discarding = False  # dropping the rest of an over-long line
        self._txn = None
        self._busy = False  # a command's work (database, SLOW) is in flight
        self._committing = False
        self._processing = False
        self._paused = False
        self._close_requested = False  # close at the next transaction boundary
        self._closing = False  # the last reply is sent; input is dropped
        self._lost = False
        self._eof = False  # the client sent its FIN: nothing more will come
        self._close_after_reply = False
        self._linger = None
        self._slow = None

    # --- connection ----------------------------------------------------
    def connectionMade(self):
        factory = self.factory
        self.max_line = factory.max_line
        self.max_commands = factory.max_commands
        self.idle_timeout = factory.idle_timeout
        self.callLater = factory.reactor.callLater
        self._reply(220, f"twisted-graceful txn ready, pid {factory.identity.pid} "
                         f"generation {factory.identity.generation}")
        self.setTimeout(self.idle_timeout or None)
        self.track(factory.drain_tracker)

    def readConnectionLost(self):
        """
        The client half-closed: run every command it sent (a last line
        without its newline included), send every reply, then close.
        """
        if self._eof or self._lost:
            return
        self._eof = True
        if self._closing:
            # Our last reply is out; we were waiting for this FIN.
            self.transport.loseConnection()
            return
        if self._buffer.strip() and not self._discarding:
            self._buffer += b"\n"
        self._process()

    def writeConnectionLost(self):
        pass  # we never half-close first without closing after a linger

    def _finish_after_eof(self):
        """
        After the client's FIN, once no command is left: drop an open
        transaction (its COMMIT can never come) and close.
        """
        if not self._eof or self._busy or self._closing or self._lost:
            return
        if self._buffer.find(b"\n") >= 0:
            return  # more commands to run
        if self._txn is not None:
            self._txn = None
            self._count_transaction("aborted")
        self._closing = True
        self.setTimeout(None)
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self._lost = True
        self.setTimeout(None)
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        if self._slow is not None:
            self._slow.client_gone()
        if self._txn is not None:
            self._count_transaction("aborted")
        self._txn = None  # queued writes never reach the database
        self._buffer = bytearray()
        self.untrack()

    # --- draining (DrainableConnection) --------------------------------
    def in_transaction(self):
        return self._txn is not None or self._busy

    def close_at_boundary(self, idle_grace):
        """
        Idle: C{421} and close now (a client reads the 421 before anything it
        sent meanwhile could be lost, so no grace is needed). Inside a
        transaction: let it finish; the reply that ends it is followed by 421.
        """
        self._close_requested = True
        self._at_boundary()

    def abort_connection(self):
        """
        The hard deadline: drop the open transaction (its writes were never
        applied) and cut the connection. A COMMIT already in the database is
        all or nothing; its reply still goes out before the connection closes.
        """
        self.drain_state = "aborted"
        self._txn = None
        if self._slow is not None:
            self._slow.client_gone()
        if self._committing:
            self._close_after_reply = True
            return False
        self.transport.abortConnection()
        return True

    def _at_boundary(self):
        if self._close_requested and not self._closing and not self._lost \
                and not self.in_transaction():
            identity = self.factory.identity
            self._close(421, f"closing: pid {identity.pid} generation {identity.generation} "
                             f"draining, reconnect")

    def timeoutConnection(self):
        if self._txn is not None:
            self._txn = None
            self._count_transaction("aborted")
            self._close(421, f"closing: idle for {self.idle_timeout:g} s; the open transaction "
                             f"is aborted, nothing applied")
        else:
            self._close(421, f"closing: idle for {self.idle_timeout:g} s")

    def _close(self, code, text):
        """
        Send the last reply, drop further input, and close in stages:
        half-close, wait for the peer's FIN (or L{LINGER_SECONDS}), close.
        Closing with unread input would send a reset that can erase the reply.
        """
        if self._closing:
            return
        self._reply(code, text)
        self._closing = True
        self.setTimeout(None)
        self._buffer = bytearray()
        self._discarding = False
        if self._eof:
            # The client sent its FIN already: nothing unread can reset the reply.
            self.transport.loseConnection()
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()  # read (and drop) until the peer's FIN
        self._linger = close_in_stages(self.transport, self.callLater)

    # --- input ---------------------------------------------------------
    def dataReceived(self, data):
        if self._closing or self._lost:
            return
        self.resetTimeout()
        if self._discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return  # still inside the over-long line: drop it, buffer nothing
            data = data[newline + 1:]
            self._discarding = False
        self._buffer += data
        self._process()

    def _next_line(self):
        while True:
            if self._discarding:
                newline = self._buffer.find(b"\n")
                if newline < 0:
                    del self._buffer[:]
                    return None
                del self._buffer[:newline + 1]
                self._discarding = False
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) > self.max_line + 1:  # +1: a CR may still come
                    del self._buffer[:]
                    self._discarding = True
                    return _TOO_LONG
                return None
            line = bytes(self._buffer[:newline])
            del self._buffer[:newline + 1]
            # CRLF or LF; CRs doubled by a client that adds CR to every LF
            # (socat's crlf option on input that had CRLF already) too.
            line = line.rstrip(b"\r")
            if len(line) > self.max_line:
                return _TOO_LONG
            return line

    def _process(self):
        if self._processing:
            return  # a command finished synchronously; the loop below goes on
        self._processing = True
        try:
            while not self._busy and not self._closing and not self._lost:
                line = self._next_line()
                if line is None:
                    break
                self._line(line)
                if not self._busy:
                    self._at_boundary()
        finally:
            self._processing = False
        self._finish_after_eof()

    def _line(self, line):
        if line is _TOO_LONG:
            self._reject(500, f"line too long (over {self.max_line} bytes); discarded")
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._reject(500, "line is not valid UTF-8; ignored")
            return
        if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in text):
            self._reject(501, "control characters are not allowed; line ignored")
            return
        words = text.split()
        if not words:
            return  # blank lines are ignored
        name, args = words[0].upper(), words[1:]
        spec = COMMANDS.get(name)
        if spec is None:
            self._reject(500, f"unknown command {_shorten(words[0])!r}; HELP lists the commands")
            return
        low, high, usage, _ = spec
        if not low <= len(args) <= high:
            self._reject(501, f"syntax: {usage}")
            return
        if name in _TRANSACTION_COMMANDS and self._txn is not None:
            if self._txn.failed is not None:
                self._reply(554, f"not executed: this transaction already failed "
                                 f"({self._txn.failed}); ABORT ends it")
                return
            self._txn.commands += 1
            if self._txn.commands > self.max_commands:
                self._reject(552, f"too many commands in one transaction "
                                  f"(limit {self.max_commands})")
                return
        getattr(self, "cmd_" + name)(*args)

    # --- replies -------------------------------------------------------
    def _reply(self, code, text):
        if not self._lost:
            self.transport.write(f"{code} {text}\r\n".encode())

    def _reply_lines(self, code, lines):
        for line in lines[:-1]:
            if not self._lost:
                self.transport.write(f"{code}-{line}\r\n".encode())
        self._reply(code, lines[-1])

    def _reject(self, code, text):
        """
        A command that was not understood or is not allowed: inside a
        transaction, COMMIT will then fail, so a pipelining client never gets
        a transaction applied without one of its commands.
        """
        if self._txn is not None:
            if self._txn.failed is None:
                self._txn.failed = text
            text += "; this transaction will not commit"
        self._reply(code, text)

    def _run(self, deferred):
        """
        Wait for C{deferred} (which fires with C{(code, text)}) before the
        next line is read, so replies keep the order of the commands.
        """
        self._busy = True
        self.setTimeout(None)
        if not self._paused and not self._closing and not self._lost:
            self._paused = True
            self.transport.pauseProducing()
        deferred.addErrback(self._unexpected)
        deferred.addCallback(self._done)

    def _unexpected(self, failure):
        self.log.failure("Transaction protocol command failed unexpectedly", failure)
        self._committing = False
        return 451, "internal error; nothing applied, try again"

    def _done(self, reply):
        self._busy = False
        self._committing = False
        if self._close_after_reply:
            self._close(*reply)  # the reply, then close in stages: no reset erases it
            return
        self._reply(*reply)
        if self._lost or self._closing:
            return
        self.setTimeout(self.idle_timeout or None)
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._at_boundary()
        self._process()  # and, after the client's FIN, close once it is all answered

    # --- commands ------------------------------------------------------
    def cmd_BEGIN(self):
        if self._txn is not None:
            self._reject(503, "already in a transaction (BEGIN cannot be nested)")
            return
        self._txn = _Transaction()
        self._reply(250, "begin")

    def cmd_SET(self, key, value):
        if self._check_key(key):
            self._write(("set", key, value))

    def cmd_INCR(self, key, amount="1"):
        if not self._check_key(key):
            return
        n = parse_integer(amount)
        if n is None:
            self._reject(501, f"INCR amount must be a 64-bit integer, not {_shorten(amount)!r}")
            return
        self._write(("incr", key, n))

    def cmd_DEL(self, key):
        if self._check_key(key):
            self._write(("del", key))

    def _check_key(self, key):
        if len(key) > MAX_KEY_LENGTH:
            self._reject(501, f"key too long (over {MAX_KEY_LENGTH} characters)")
            return False
        return True

    def _write(self, op):
        if self._txn is not None:
            self._txn.ops.append(op)
            self._reply(250, "queued")
        else:
            self._commit([op])

    def cmd_GET(self, key):
        if not self._check_key(key):
            return
        ops = [op for op in self._txn.ops if op[1] == key] if self._txn is not None else []

        def answer(value):
            try:
                value = apply_ops(ops, {key: value})[key]
            except TransactionFailed as e:
                return 554, f"{e}: this transaction's INCR cannot apply as things stand"
            if value is None:
                return 550, f"no such key: {key}"
            return 250, f"{key}={value}"

        self._run(self.factory.store.get(key).addCallbacks(answer, _store_error))

    def cmd_COMMIT(self, idempotency_key=None):
        if self._txn is None:
            self._reject(503, "COMMIT without BEGIN")
            return
        if idempotency_key is not None:
            problem = idempotency_key_problem(idempotency_key)
            if problem:
                self._txn = None
                self._count_transaction("error")
                self._reply(501, f"{problem}; transaction ended, nothing applied")
                return
        txn = self._txn
        if txn.failed is not None:
            self._txn = None
            self._count_transaction("error")
            self._reply(554, f"transaction failed: {txn.failed}; nothing applied")
            return
        if not txn.ops:
            self._txn = None
            self._count_transaction("committed")
            self._reply(250, "committed, nothing to write")
            return
        self._commit(txn.ops, idempotency_key)

    def _commit(self, ops, idempotency_key=None):
        self._committing = True

        def committed(result):
            values = " ".join(
                f"{key}={'(deleted)' if value is None else value}"
                for key, value in result.values.items()
            )
            return 250, f"committed txid={result.txid} {values}"

        def failed(failure):
            failure.trap(TransactionFailed, KeyReused)
            return 554, f"transaction failed: {failure.value}; nothing applied"

        d = defer.maybeDeferred(self.factory.store.commit, ops, idempotency_key=idempotency_key)
        d.addCallbacks(committed, failed).addErrback(_store_error)
        # The transaction ends with the reply: until then it is in progress.
        d.addBoth(self._end_transaction)
        self._run(d)

    def _end_transaction(self, reply):
        self._txn = None
        self._count_transaction(
            "committed" if isinstance(reply, tuple) and reply[0] == 250 else "error")
        return reply

    def _count_transaction(self, result):
        # Hook for metrics: the factory's transaction_observer(result), result
        # being committed, aborted or error.
        observer = getattr(self.factory, "transaction_observer", None)
        if observer is not None:
            observer(result)

    def cmd_ABORT(self):
        if self._txn is None:
            self._reject(503, "ABORT without BEGIN")
            return
        self._txn = None
        self._count_transaction("aborted")
        self._reply(250, "aborted, nothing applied")

    def cmd_PING(self):
        identity = self.factory.identity
        self._reply(250, f"pong pid {identity.pid} generation {identity.generation}")

    def cmd_SLOW(self, seconds):
        try:
            value = float(seconds)
            if not (math.isfinite(value) and 0 <= value <= MAX_SLOW_SECONDS):
                raise ValueError(seconds)
        except ValueError:
            self._reject(501, f"SLOW needs seconds from 0 to {MAX_SLOW_SECONDS}, "
                              f"not {_shorten(seconds)!r}")
            return
        self._slow = SlowWork(
            self.factory.reactor, self.factory.identity.pid, value,
            self.factory.next_slow_number(), self.factory.emit, what="transaction",
        )

        def finished(_):
            self._slow = None
            return 250, f"slow transaction of {value:g} s done, pid {self.factory.identity.pid}"

        self._run(self._slow.start().addCallback(finished))

    def cmd_HELP(self, command=None):
        if command is not None:
            spec = COMMANDS.get(command.upper())
            if spec is None:
                self._reply(504, f"no such command: {_shorten(command)!r}")
            else:
                self._reply(214, f"{spec[2]}: {spec[3]}")
            return
        lines = ["commands (one per line; every reply starts with a 3-digit code):"]
        lines += [f"  {usage:<15} {text}" for _, _, usage, text in COMMANDS.values()]
        lines.append("outside BEGIN every command is its own transaction")
        self._reply_lines(214, lines)

    def cmd_QUIT(self):
        if self._txn is not None:
            self._txn = None
            self._close(221, "bye; the open transaction is aborted, nothing applied")
        else:
            self._close(221, "bye")


def _store_error(failure):
    if failure.check(CommitOutcomeUnknown):
        # Neither "committed" nor "nothing applied" would be true.
        return 451, (f"outcome unknown: {failure.value}; check the data before you retry")
    if failure.check(StoreUnusable):
        return 557, (f"database unusable ({failure.value}); nothing applied, will not succeed "
                     f"on retry")
    failure.trap(StoreBusy)
    return 451, f"database busy ({failure.value}); nothing applied, try again"


def _shorten(text, limit=40):
    return text if len(text) <= limit else text[:limit] + "..."


class TxnFactory(protocol.Factory):
    """
    Serves the transaction protocol on top of C{store}.

    @param identity: who answers (C{.pid}, C{.generation}).
    @param drain_tracker: the L{DrainTracker} every connection registers with.
    """

    protocol = TxnProtocol

    def __init__(self, store, identity, reactor=None, drain_tracker=None, max_line=8192,
                 max_commands=1000, idle_timeout=300.0, emit=heartbeat):
        if reactor is None:
            from twisted.internet import reactor
        self.store = store
        self.identity = identity
        self.reactor = reactor
        self.drain_tracker = drain_tracker
        self.max_line = max_line
        self.max_commands = max_commands
        self.idle_timeout = idle_timeout
        self.emit = emit
        self.slow_count = 0

    def next_slow_number(self):
        self.slow_count += 1
        return self.slow_count
