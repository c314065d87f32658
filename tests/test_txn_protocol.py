"""
The transaction protocol over L{StringTransport}: every command, every bad
input, ordering while the database works, and draining at transaction
boundaries with a real L{DrainTracker} and a L{Clock}.
"""

import os

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from twisted_graceful.drain import CONNECTION, LINGER_SECONDS, TRANSACTION, DrainTracker
from twisted_graceful.store import (
    CommitOutcomeUnknown,
    CommitResult,
    KeyReused,
    Store,
    StoreBusy,
    StoreUnusable,
    apply_ops,
    keys_of,
)
from twisted_graceful.txn import TxnFactory


class FakeIdentity:
    pid = 4242
    generation = 3


class FakeStore:
    """
    The L{Store} interface in memory. With C{hold = True}, every call waits
    in C{pending} until the test calls L{release}, as a busy database would.
    """

    def __init__(self):
        self.data = {}
        self.txns = []
        self.keys = {}  # idempotency key -> (txid, ops, values)
        self.hold = False
        self.pending = []
        self.busy = False
        self.unknown = False
        self.unusable = None

    def _answer(self, compute):
        d = defer.Deferred()
        if self.hold:
            self.pending.append((d, compute))
        else:
            self._fire(d, compute)
        return d

    def _fire(self, d, compute):
        try:
            result = compute()
        except Exception:
            d.errback()
        else:
            d.callback(result)

    def release(self):
        pending, self.pending = self.pending, []
        for d, compute in pending:
            self._fire(d, compute)

    def get(self, key):
        return self._answer(lambda: self.data.get(key))

    def commit(self, ops, idempotency_key=None):
        ops = list(ops)

        def apply():
            if idempotency_key in self.keys:
                txid, result_ops, values = self.keys[idempotency_key]
                if result_ops != ops:
                    raise KeyReused(f"idempotency key {idempotency_key} names another "
                                    f"transaction (txid={txid})")
                return CommitResult(txid, values, replayed=True)
            if self.busy:
                raise StoreBusy("database is locked")
            if self.unknown:
                raise CommitOutcomeUnknown("the connection was lost during COMMIT")
            if self.unusable is not None:
                raise self.unusable
            keys = keys_of(ops)
            values = apply_ops(ops, {k: self.data.get(k) for k in keys})
            for key in keys:
                if values[key] is None:
                    self.data.pop(key, None)
                else:
                    self.data[key] = values[key]
            self.txns.append(ops)
            result = {k: values[k] for k in keys}
            if idempotency_key is not None:
                self.keys[idempotency_key] = (len(self.txns), ops, result)
            return CommitResult(len(self.txns), result)

        return self._answer(apply)


class ProtocolTestCase(unittest.TestCase):
    def connect(self, store=None, tracker=None, clock=None, **kwargs):
        self.clock = clock or Clock()
        self.store = store if store is not None else FakeStore()
        self.emitted = []
        self.factory = TxnFactory(
            self.store, FakeIdentity(), self.clock, drain_tracker=tracker,
            emit=self.emitted.append, **kwargs
        )
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        transport = StringTransport()
        proto.makeConnection(transport)
        self.proto, self.transport = proto, transport
        return proto

    def send(self, *lines, ending=b"\r\n"):
        for line in lines:
            if isinstance(line, str):
                line = line.encode("utf-8")
            self.proto.dataReceived(line + ending)

    def replies(self):
        """
        The reply lines written since the last call.
        """
        data = self.transport.value().decode("utf-8")
        self.transport.clear()
        self.assertTrue(data == "" or data.endswith("\r\n"), repr(data))
        return data.split("\r\n")[:-1]

    def ask(self, line):
        self.replies()
        self.send(line)
        return self.replies()

    def lose(self):
        self.proto.connectionLost(Failure(ConnectionDone()))


class CommandTests(ProtocolTestCase):
    def setUp(self):
        self.connect()

    def test_greeting_names_pid_and_generation(self):
        self.assertEqual(self.replies(), ["220 twisted-graceful txn ready, pid 4242 generation 3"])

    def test_the_issue_session(self):
        self.replies()
        self.send("BEGIN", "SET apples 3", "INCR apples 2", "COMMIT", "GET apples", "QUIT")
        self.assertEqual(self.replies(), [
            "250 begin", "250 queued", "250 queued", "250 committed txid=1 apples=5",
            "250 apples=5", "221 bye",
        ])
        self.assertTrue(self.transport.disconnecting)

    def test_lf_endings_and_lower_case(self):
        self.replies()
        self.send("set a 1", "get a", ending=b"\n")
        self.assertEqual(self.replies(), ["250 committed txid=1 a=1", "250 a=1"])

    def test_blank_lines_are_ignored(self):
        self.assertEqual(self.ask("   "), [])
        self.assertEqual(self.ask(""), [])

    def test_command_outside_begin_is_its_own_transaction(self):
        self.assertEqual(self.ask("SET a 1"), ["250 committed txid=1 a=1"])
        self.assertEqual(self.ask("INCR a"), ["250 committed txid=2 a=2"])
        self.assertEqual(self.ask("INCR a -5"), ["250 committed txid=3 a=-3"])
        self.assertEqual(self.ask("INCR fresh 4"), ["250 committed txid=4 fresh=4"])
        self.assertEqual(self.ask("DEL a"), ["250 committed txid=5 a=(deleted)"])
        self.assertEqual(self.store.data, {"fresh": "4"})

    def test_writes_inside_begin_wait_for_commit(self):
        self.assertEqual(self.ask("BEGIN"), ["250 begin"])
        for line in ("SET a 1", "INCR b 3", "DEL c", "SET c 2"):
            self.assertEqual(self.ask(line), ["250 queued"])
        self.assertEqual(self.store.data, {})
        self.assertEqual(self.ask("COMMIT"), ["250 committed txid=1 a=1 b=3 c=2"])
        self.assertEqual(self.store.data, {"a": "1", "b": "3", "c": "2"})
        self.assertEqual(self.store.txns, [[("set", "a", "1"), ("incr", "b", 3), ("del", "c"),
                                            ("set", "c", "2")]])

    def test_get(self):
        self.store.data["k"] = "v"
        self.assertEqual(self.ask("GET k"), ["250 k=v"])
        self.assertEqual(self.ask("GET missing"), ["550 no such key: missing"])

    def test_get_inside_begin_sees_own_writes(self):
        self.store.data.update(a="1", b="2")
        self.send("BEGIN", "INCR a 10", "DEL b")
        self.assertEqual(self.ask("GET a"), ["250 a=11"])
        self.assertEqual(self.ask("GET b"), ["550 no such key: b"])
        self.assertEqual(self.store.data, {"a": "1", "b": "2"})

    def test_get_inside_begin_of_an_incr_that_cannot_apply(self):
        self.store.data["a"] = "apple"
        self.send("BEGIN", "INCR a")
        reply = self.ask("GET a")
        self.assertEqual(len(reply), 1)
        self.assertTrue(reply[0].startswith("554 a is not an integer"), reply)
        # A read, not a rejected command: the transaction still commits if
        # another transaction makes the INCR possible first (COMMIT re-reads).
        self.store.data["a"] = "41"
        self.assertEqual(self.ask("COMMIT"), ["250 committed txid=1 a=42"])

    def test_commit_with_an_idempotency_key_applies_once(self):
        """
        A client that lost the reply to its COMMIT reconnects and sends the
        same transaction under the same key: the first reply again, word for
        word, and nothing applied twice.
        """
        self.send("BEGIN", "INCR n 2", "SET tag t1")
        self.assertEqual(self.ask("COMMIT c1:1"), ["250 committed txid=1 n=2 tag=t1"])
        self.lose()
        self.connect(store=self.store)
        self.replies()
        self.send("BEGIN", "INCR n 2", "SET tag t1")
        self.assertEqual(self.ask("COMMIT c1:1"), ["250 committed txid=1 n=2 tag=t1"])
        self.assertEqual(self.store.data, {"n": "2", "tag": "t1"})
        self.assertEqual(len(self.store.txns), 1)
        self.assertFalse(self.proto.in_transaction())

    def test_an_idempotency_key_reused_for_other_writes_fails(self):
        self.send("BEGIN", "SET a 1", "COMMIT k")
        self.send("BEGIN", "SET a 2")
        self.assertEqual(self.ask("COMMIT k"), [
            "554 transaction failed: idempotency key k names another transaction (txid=1); "
            "nothing applied"])
        self.assertEqual(self.store.data, {"a": "1"})
        self.assertFalse(self.proto.in_transaction())

    def test_commit_with_nothing_to_write(self):
        self.send("BEGIN")
        self.assertEqual(self.ask("COMMIT"), ["250 committed, nothing to write"])
        self.assertEqual(self.store.txns, [])

    def test_abort_discards_the_writes(self):
        self.send("BEGIN", "SET a 1")
        self.assertEqual(self.ask("ABORT"), ["250 aborted, nothing applied"])
        self.assertEqual(self.store.data, {})
        self.assertFalse(self.proto.in_transaction())
        self.assertEqual(self.ask("SET b 2"), ["250 committed txid=1 b=2"])

    def test_ping(self):
        self.assertEqual(self.ask("PING"), ["250 pong pid 4242 generation 3"])

    def test_help(self):
        lines = self.ask("HELP")
        self.assertTrue(all(line.startswith("214-") for line in lines[:-1]), lines)
        self.assertTrue(lines[-1].startswith("214 "))
        text = "\n".join(lines)
        for command in ("BEGIN", "SET", "INCR", "DEL", "GET", "COMMIT", "ABORT", "PING",
                        "SLOW", "HELP", "QUIT"):
            self.assertIn(command, text)
        self.assertEqual(self.ask("HELP incr"),
                         ["214 INCR key [n]: add n (default 1) to an integer value (absent: 0)"])
        self.assertEqual(self.ask("HELP FROB"), ["504 no such command: 'FROB'"])

    def test_quit_inside_a_transaction_aborts_it(self):
        self.send("BEGIN", "SET a 1")
        self.assertEqual(self.ask("QUIT"),
                         ["221 bye; the open transaction is aborted, nothing applied"])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.store.data, {})

    def test_input_after_quit_is_not_executed(self):
        self.replies()
        self.send("QUIT", "SET a 1")
        self.assertEqual(self.replies(), ["221 bye"])
        self.send("SET b 1")
        self.assertEqual(self.replies(), [])
        self.assertEqual(self.store.data, {})

    def test_slow_is_a_transaction_with_a_heartbeat(self):
        self.replies()
        self.send("SLOW 3", "PING")
        self.assertTrue(self.proto.in_transaction())
        self.assertEqual(self.replies(), [])
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(self.replies(), [])
        self.clock.advance(1)
        self.assertEqual(self.replies(), ["250 slow transaction of 3 s done, pid 4242",
                                          "250 pong pid 4242 generation 3"])
        self.assertFalse(self.proto.in_transaction())
        self.assertEqual(self.emitted, [
            "pid 4242: slow transaction #1 started (3 s)",
            "pid 4242: slow transaction #1 1/3 s",
            "pid 4242: slow transaction #1 2/3 s",
            "pid 4242: slow transaction #1 done",
        ])

    def test_slow_client_goes_away(self):
        self.send("SLOW 5")
        self.clock.advance(1)
        self.lose()
        self.clock.advance(10)
        self.assertEqual(self.emitted[-1], "pid 4242: slow transaction #1: client went away")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class BadInputTests(ProtocolTestCase):
    def setUp(self):
        self.connect(max_line=64, max_commands=3, idle_timeout=30)
        self.replies()

    def assertSurvives(self):
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.ask("PING"), ["250 pong pid 4242 generation 3"])

    def test_unknown_command(self):
        self.assertEqual(self.ask("FROB a"), ["500 unknown command 'FROB'; HELP lists the commands"])
        self.assertSurvives()

    def test_wrong_arity(self):
        for line, usage in [
            ("BEGIN now", "BEGIN"), ("SET a", "SET key value"), ("SET a b c", "SET key value"),
            ("INCR", "INCR key [n]"), ("INCR a 1 2", "INCR key [n]"), ("DEL", "DEL key"),
            ("GET", "GET key"), ("GET a b", "GET key"), ("COMMIT x y", "COMMIT [idempotency-key]"),
            ("ABORT x", "ABORT"), ("PING x", "PING"), ("SLOW", "SLOW seconds"),
            ("HELP a b", "HELP [command]"), ("QUIT now", "QUIT"),
        ]:
            self.assertEqual(self.ask(line), [f"501 syntax: {usage}"], line)
        self.assertSurvives()
        self.assertEqual(self.store.data, {})

    def test_incr_of_a_word(self):
        self.store.data["a"] = "apple"
        self.assertEqual(self.ask("INCR a"),
                         ["554 transaction failed: a is not an integer; nothing applied"])
        self.send("BEGIN", "SET b 1", "INCR a")
        self.assertEqual(self.ask("COMMIT"),
                         ["554 transaction failed: a is not an integer; nothing applied"])
        self.assertEqual(self.store.data, {"a": "apple"})
        self.assertFalse(self.proto.in_transaction())
        self.assertSurvives()

    def test_incr_amount_must_be_an_integer(self):
        for amount in ("x", "1.5", str(2**63)):
            self.assertEqual(self.ask(f"INCR a {amount}"),
                             [f"501 INCR amount must be a 64-bit integer, not '{amount}'"])
        self.assertSurvives()

    def test_incr_overflow(self):
        self.store.data["a"] = str(2**63 - 1)
        self.assertEqual(self.ask("INCR a"), [
            "554 transaction failed: INCR a would overflow a 64-bit integer; nothing applied"])
        self.assertEqual(self.store.data["a"], str(2**63 - 1))

    def test_a_malformed_idempotency_key_ends_the_transaction(self):
        self.connect(max_line=1024)
        self.send("BEGIN", "SET a 1")
        self.assertEqual(self.ask("COMMIT " + "k" * 201), [
            "501 an idempotency key has 1 to 200 characters; transaction ended, nothing applied"])
        self.assertEqual(self.store.data, {})
        self.assertFalse(self.proto.in_transaction())
        self.send("BEGIN", "SET a 1")
        self.assertEqual(self.ask("COMMIT a,b"), [
            "501 an idempotency key has only letters, digits and _ . : @ + / = -; "
            "transaction ended, nothing applied"])
        self.assertEqual(self.store.data, {})

    def test_commit_or_abort_without_begin(self):
        self.assertEqual(self.ask("COMMIT"), ["503 COMMIT without BEGIN"])
        self.assertEqual(self.ask("ABORT"), ["503 ABORT without BEGIN"])
        self.assertSurvives()

    def test_nested_begin_fails_the_transaction(self):
        self.send("BEGIN", "SET a 1")
        self.assertEqual(self.ask("BEGIN"), [
            "503 already in a transaction (BEGIN cannot be nested); this transaction will not "
            "commit"])
        self.assertEqual(self.ask("SET b 1"), [
            "554 not executed: this transaction already failed (already in a transaction "
            "(BEGIN cannot be nested)); ABORT ends it"])
        self.assertEqual(self.ask("COMMIT"), [
            "554 transaction failed: already in a transaction (BEGIN cannot be nested); "
            "nothing applied"])
        self.assertEqual(self.store.data, {})
        self.assertSurvives()

    def test_rejected_command_inside_a_transaction_fails_it(self):
        self.send("BEGIN", "SET a 1", "SET b")
        self.assertEqual(self.ask("COMMIT"),
                         ["554 transaction failed: syntax: SET key value; nothing applied"])
        self.assertEqual(self.store.data, {})

    def test_non_utf8(self):
        self.proto.dataReceived(b"SET a \xff\xfe\r\n")
        self.assertEqual(self.replies(), ["500 line is not valid UTF-8; ignored"])
        self.assertSurvives()
        self.assertEqual(self.store.data, {})

    def test_utf8_values_are_fine(self):
        self.assertEqual(self.ask("SET fruit pomme\u0301"), ["250 committed txid=1 fruit=pomme\u0301"])

    def test_control_characters(self):
        self.proto.dataReceived(b"SET a b\x00c\r\n")
        self.assertEqual(self.replies(), ["501 control characters are not allowed; line ignored"])
        self.assertSurvives()

    def test_key_too_long(self):
        self.connect(max_line=8192)
        self.replies()
        self.assertEqual(self.ask("SET " + "k" * 251 + " v"),
                         ["501 key too long (over 250 characters)"])
        self.assertEqual(self.ask("SET " + "k" * 250 + " v")[0][:20], "250 committed txid=1")

    def test_line_at_the_limit_is_accepted(self):
        line = "SET a " + "v" * (64 - 6)
        self.assertEqual(len(line), 64)
        self.assertEqual(self.ask(line), ["250 committed txid=1 a=" + "v" * 58])

    def test_over_long_line_in_one_piece(self):
        self.assertEqual(self.ask("SET a " + "v" * 59),
                         ["500 line too long (over 64 bytes); discarded"])
        self.assertSurvives()
        self.assertEqual(self.store.data, {})

    def test_over_long_line_is_discarded_without_buffering(self):
        """
        A megabyte without a newline: one error, the excess is dropped as it
        arrives, and the line after the next newline is served.
        """
        self.proto.dataReceived(b"SET a ")
        for _ in range(1024):
            self.proto.dataReceived(b"x" * 1024)
            self.assertLessEqual(len(self.proto._buffer), 64 + 2)
        self.assertEqual(self.replies(), ["500 line too long (over 64 bytes); discarded"])
        self.proto.dataReceived(b"xxxx\r\nPI")
        self.assertEqual(self.replies(), [])
        self.proto.dataReceived(b"NG\r\n")
        self.assertEqual(self.replies(), ["250 pong pid 4242 generation 3"])
        self.assertEqual(self.store.data, {})

    def test_over_long_line_inside_a_transaction_fails_it(self):
        self.send("BEGIN", "SET a 1")
        self.send("SET b " + "v" * 100)
        self.assertEqual(self.replies(), [
            "250 begin", "250 queued",
            "500 line too long (over 64 bytes); discarded; this transaction will not commit"])
        self.assertEqual(self.ask("COMMIT")[0][:27], "554 transaction failed: lin")
        self.assertEqual(self.store.data, {})

    def test_too_many_commands_in_one_transaction(self):
        self.send("BEGIN", "SET a 1", "SET b 2", "GET a")
        self.assertEqual(self.replies(), ["250 begin", "250 queued", "250 queued", "250 a=1"])
        self.assertEqual(self.ask("SET c 3"), [
            "552 too many commands in one transaction (limit 3); this transaction will not "
            "commit"])
        self.assertEqual(self.ask("COMMIT"), [
            "554 transaction failed: too many commands in one transaction (limit 3); "
            "nothing applied"])
        self.assertEqual(self.store.data, {})
        # The limit is per transaction.
        self.send("BEGIN", "SET a 1", "SET b 2", "SET c 3")
        self.assertEqual(self.ask("COMMIT"), ["250 committed txid=1 a=1 b=2 c=3"])

    def test_bad_slow_seconds(self):
        for seconds in ("x", "-1", "nan", "inf", "3601"):
            self.assertEqual(self.ask(f"SLOW {seconds}"),
                             [f"501 SLOW needs seconds from 0 to 3600, not '{seconds}'"])
        self.assertSurvives()

    def test_idle_timeout(self):
        self.clock.advance(29)
        self.assertSurvives()  # input resets the timer
        self.clock.advance(29)
        self.assertEqual(self.replies(), [])
        self.clock.advance(1)
        self.assertEqual(self.replies(), ["421 closing: idle for 30 s"])
        self.assertTrue(self.transport.disconnecting)

    def test_idle_timeout_inside_a_transaction_aborts_it(self):
        self.send("BEGIN", "SET a 1")
        self.clock.advance(30)
        self.assertEqual(self.replies()[-1],
                         "421 closing: idle for 30 s; the open transaction is aborted, "
                         "nothing applied")
        self.assertTrue(self.transport.disconnecting)
        self.send("COMMIT")
        self.assertEqual(self.store.data, {})

    def test_no_idle_timeout_while_a_command_works(self):
        self.send("SLOW 100")
        self.clock.advance(100)
        self.assertEqual(self.replies(), ["250 slow transaction of 100 s done, pid 4242"])
        self.clock.advance(29)
        self.assertSurvives()

    def test_database_busy(self):
        self.store.busy = True
        self.assertEqual(self.ask("SET a 1"), [
            "451 database busy (database is locked); nothing applied, try again"])
        self.assertFalse(self.proto.in_transaction())
        self.store.busy = False
        self.assertEqual(self.ask("SET a 1"), ["250 committed txid=1 a=1"])

    def test_commit_outcome_unknown_is_never_a_250_nor_nothing_applied(self):
        self.store.unknown = True
        self.send("BEGIN", "SET a 1")
        self.assertEqual(self.ask("COMMIT")[-1],
                         "451 outcome unknown: the connection was lost during COMMIT; check the "
                         "data before you retry")
        self.assertFalse(self.proto.in_transaction())

    def test_database_unusable_is_permanent(self):
        self.store.unusable = StoreUnusable("attempt to write a readonly database (/x/db)")
        reply = self.ask("SET a 1")
        self.assertEqual(len(reply), 1)
        self.assertRegex(reply[0], r"^5\d\d ")
        self.assertNotEqual(reply[0][:3], "554")
        self.assertIn("readonly", reply[0])
        self.assertIn("will not succeed on retry", reply[0])
        self.assertFalse(self.proto.in_transaction())


class HalfCloseTests(ProtocolTestCase):
    """
    A client that sends its commands and then its FIN (C{printf ... | socat})
    gets every reply, in order, then the server closes.
    """

    def test_is_half_closeable(self):
        from twisted.internet.interfaces import IHalfCloseableProtocol
        self.assertTrue(IHalfCloseableProtocol.providedBy(self.connect()))

    def test_every_reply_after_the_fin(self):
        self.connect()
        self.replies()
        self.store.hold = True
        self.send("SET k 1", "GET k", "QUIT")
        self.proto.readConnectionLost()
        self.assertFalse(self.transport.disconnecting)
        self.store.release()
        self.store.release()
        self.assertEqual(self.replies(), ["250 committed txid=1 k=1", "250 k=1", "221 bye"])
        self.assertTrue(self.transport.disconnecting)

    def test_without_quit_the_server_closes_after_the_last_reply(self):
        self.connect()
        self.replies()
        self.store.hold = True
        self.send("SET k 1", "PING")
        self.proto.readConnectionLost()
        self.store.release()
        self.assertEqual(self.replies(), ["250 committed txid=1 k=1",
                                          "250 pong pid 4242 generation 3"])
        self.assertTrue(self.transport.disconnecting)

    def test_last_line_without_a_newline_is_a_command(self):
        self.connect()
        self.replies()
        self.proto.dataReceived(b"SET k 1\r\nGET k")
        self.proto.readConnectionLost()
        self.assertEqual(self.replies(), ["250 committed txid=1 k=1", "250 k=1"])
        self.assertTrue(self.transport.disconnecting)

    def test_open_transaction_at_the_fin_applies_nothing(self):
        self.connect()
        self.replies()
        self.send("BEGIN", "SET k 1")
        self.proto.readConnectionLost()
        self.assertEqual(self.replies(), ["250 begin", "250 queued"])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.store.txns, [])

    def test_doubled_carriage_returns_are_a_line_ending(self):
        # printf 'SET k 1\r\n' | socat - TCP:...,crlf sends "SET k 1\r\r\n".
        self.connect()
        self.replies()
        self.proto.dataReceived(b"SET k 1\r\r\nGET k\r\r\n")
        self.assertEqual(self.replies(), ["250 committed txid=1 k=1", "250 k=1"])

    def test_fin_on_an_idle_connection_closes_it(self):
        self.connect()
        self.proto.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)


class OrderingTests(ProtocolTestCase):
    def test_input_waits_while_the_database_works(self):
        self.connect()
        self.replies()
        self.store.hold = True
        self.send("SET a 1", "GET a", "PING")
        self.assertEqual(self.replies(), [])
        self.assertEqual(len(self.store.pending), 1)
        self.assertEqual(self.transport.producerState, "paused")
        self.assertTrue(self.proto.in_transaction())
        self.store.release()
        self.assertEqual(self.replies(), ["250 committed txid=1 a=1"])
        self.assertEqual(len(self.store.pending), 1)
        self.store.release()
        self.assertEqual(self.replies(), ["250 a=1", "250 pong pid 4242 generation 3"])
        self.assertEqual(self.transport.producerState, "producing")
        self.assertFalse(self.proto.in_transaction())

    def test_connection_lost_while_the_database_works(self):
        self.connect()
        self.store.hold = True
        self.send("BEGIN", "SET a 1", "COMMIT")
        self.lose()
        self.store.release()  # the commit completes; nobody to tell
        self.assertEqual(self.store.data, {"a": "1"})

    def test_connection_lost_inside_a_transaction_applies_nothing(self):
        self.connect()
        self.send("BEGIN", "SET a 1", "INCR b")
        self.lose()
        self.assertEqual(self.store.data, {})
        self.assertEqual(self.store.txns, [])


class DrainTests(ProtocolTestCase):
    def setUp(self):
        self.clock = Clock()
        self.tracker = DrainTracker(self.clock, progress_interval=0)
        self.connect(tracker=self.tracker, clock=self.clock)
        self.replies()

    def test_tracked_under_txn(self):
        self.assertEqual(self.tracker.counts(), {"txn": (1, 0)})
        self.send("BEGIN")
        self.assertEqual(self.tracker.counts(), {"txn": (1, 1)})
        self.send("COMMIT")
        self.assertEqual(self.tracker.counts(), {"txn": (1, 0)})
        self.lose()
        self.assertEqual(len(self.tracker), 0)

    def test_idle_connection_gets_421_and_closes(self):
        d = self.tracker.drain(TRANSACTION, timeout=60)
        self.assertEqual(self.replies(),
                         ["421 closing: pid 4242 generation 3 draining, reconnect"])
        self.assertTrue(self.transport.disconnecting)
        self.send("SET a 1")
        self.assertEqual(self.replies(), [])
        self.assertEqual(self.store.data, {})
        self.lose()
        report = self.successResultOf(d)
        self.assertEqual(report.closed_by_server, 1)

    def test_transaction_finishes_then_421(self):
        self.send("BEGIN", "SET a 1")
        d = self.tracker.drain(TRANSACTION, timeout=60)
        self.assertEqual(self.replies(), ["250 begin", "250 queued"])
        self.assertFalse(self.transport.disconnecting)
        self.send("INCR a 2")
        self.assertEqual(self.replies(), ["250 queued"])
        # Pipelined after the boundary: never executed.
        self.proto.dataReceived(b"COMMIT\r\nSET b 2\r\nBEGIN\r\nSET c 3\r\nCOMMIT\r\n")
        self.assertEqual(self.replies(), [
            "250 committed txid=1 a=3",
            "421 closing: pid 4242 generation 3 draining, reconnect",
        ])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.store.data, {"a": "3"})
        self.assertNoResult(d)
        self.lose()
        self.successResultOf(d)

    def test_abort_is_a_boundary_too(self):
        self.send("BEGIN", "SET a 1")
        self.tracker.drain(TRANSACTION, timeout=60)
        self.replies()
        self.send("ABORT", "SET b 1")
        self.assertEqual(self.replies(), [
            "250 aborted, nothing applied",
            "421 closing: pid 4242 generation 3 draining, reconnect",
        ])
        self.assertEqual(self.store.data, {})

    def test_commit_in_flight_is_answered_before_421(self):
        self.store.hold = True
        self.send("BEGIN", "SET a 1", "COMMIT", "SET b 2")
        self.tracker.drain(TRANSACTION, timeout=60)
        self.assertEqual(self.replies(), ["250 begin", "250 queued"])
        self.store.release()
        self.assertEqual(self.replies(), [
            "250 committed txid=1 a=1",
            "421 closing: pid 4242 generation 3 draining, reconnect",
        ])
        self.store.release()
        self.assertEqual(self.store.data, {"a": "1"})

    def test_single_command_transaction_finishes_then_421(self):
        self.send("SLOW 2", "SET a 1")
        self.tracker.drain(TRANSACTION, timeout=60)
        self.assertEqual(self.replies(), [])
        self.clock.advance(2)
        self.assertEqual(self.replies(), [
            "250 slow transaction of 2 s done, pid 4242",
            "421 closing: pid 4242 generation 3 draining, reconnect",
        ])
        self.assertEqual(self.store.data, {})

    def test_connection_accepted_while_draining(self):
        self.tracker.drain(TRANSACTION, timeout=60)
        self.connect(tracker=self.tracker, clock=self.clock)
        self.assertEqual(self.replies(), [
            "220 twisted-graceful txn ready, pid 4242 generation 3",
            "421 closing: pid 4242 generation 3 draining, reconnect",
        ])

    def test_connection_mode_serves_until_the_deadline(self):
        d = self.tracker.drain(CONNECTION, timeout=10, abort_grace=5)
        self.send("SET a 1", "BEGIN", "SET b 1")
        self.assertEqual(self.replies(),
                         ["250 committed txid=1 a=1", "250 begin", "250 queued"])
        self.clock.advance(10)
        self.assertEqual(self.replies(), [])
        self.send("COMMIT", "SET c 1")
        self.assertEqual(self.replies(), [
            "250 committed txid=2 b=1",
            "421 closing: pid 4242 generation 3 draining, reconnect",
        ])
        self.lose()
        self.successResultOf(d)

    def test_hard_deadline_rolls_back_an_open_transaction(self):
        self.send("BEGIN", "SET a 1")
        d = self.tracker.drain(TRANSACTION, timeout=10, abort_grace=5)
        self.clock.advance(10)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(5)
        self.assertTrue(self.transport.disconnected)
        report = self.successResultOf(d)
        self.assertEqual(len(report.cut), 1)
        self.assertIn("txn connection from 192.168.1.1:54321", report.cut[0])
        self.assertIn("in a transaction", report.cut[0])
        self.send("COMMIT")
        self.lose()
        self.assertEqual(self.store.data, {})
        self.assertEqual(self.store.txns, [])

    def test_hard_deadline_during_a_commit_still_answers_it(self):
        self.store.hold = True
        self.send("BEGIN", "SET a 1", "COMMIT")
        self.replies()
        self.tracker.drain(TRANSACTION, timeout=10, abort_grace=5)
        self.clock.advance(10)
        self.clock.advance(5)
        self.assertEqual(self.proto.drain_state, "aborted")
        self.assertFalse(self.transport.disconnected)
        self.store.release()
        self.assertEqual(self.replies(), ["250 committed txid=1 a=1"])
        self.assertTrue(self.transport.disconnecting)

    def test_close_in_stages_on_a_socket(self):
        """
        On a real stream socket: half-close, then close after the linger time
        if the peer never closes.
        """
        import socket

        class HalfClosable(StringTransport):
            write_closed = False

            def __init__(self):
                StringTransport.__init__(self)
                self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

            def loseWriteConnection(self):
                self.write_closed = True

        self.connect(tracker=self.tracker, clock=self.clock)
        transport = HalfClosable()
        self.addCleanup(transport.socket.close)
        self.proto.makeConnection(transport)
        self.transport = transport
        self.tracker.drain(TRANSACTION, timeout=60)
        self.assertTrue(transport.write_closed)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(LINGER_SECONDS)
        self.assertTrue(transport.disconnecting)


class RealStoreTests(ProtocolTestCase):
    """
    The protocol on a real SQLite store (adbapi threads): replies arrive
    asynchronously, so each step waits for the reply lines it expects.
    """

    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        store = Store(self.path, reactor)
        store.startService()
        self.addCleanup(store.stopService)
        self.connect(store=store, clock=reactor)
        self.addCleanup(lambda: self.proto._lost or self.lose())
        self.replies()
        self._lines = []

    def until_lines(self, n, timeout=10):
        """
        Fire with the next C{n} reply lines once they have arrived.
        """
        d = defer.Deferred()
        deadline = reactor.seconds() + timeout

        def check():
            self._lines += self.replies()
            if len(self._lines) >= n:
                lines, self._lines = self._lines[:n], self._lines[n:]
                d.callback(lines)
            elif reactor.seconds() > deadline:
                d.errback(AssertionError(f"only {self._lines} after {timeout} s"))
            else:
                # The replies come from adbapi's threads through the reactor:
                # look again on the next reactor iteration.
                reactor.callLater(0.001, check)

        check()
        return d

    @defer.inlineCallbacks
    def test_session_on_sqlite(self):
        self.send("BEGIN", "SET apples 3", "INCR apples 2", "COMMIT", "GET apples", "INCR apples",
                  "GET nope")
        lines = yield self.until_lines(7)
        self.assertEqual(lines, ["250 begin", "250 queued", "250 queued",
                                 "250 committed txid=1 apples=5", "250 apples=5",
                                 "250 committed txid=2 apples=6", "550 no such key: nope"])
        rows = yield self.store.transactions()
        self.assertEqual([r["txid"] for r in rows], [1, 2])

    @defer.inlineCallbacks
    def test_a_keyed_transaction_sent_again_on_a_new_connection_applies_once(self):
        self.send("BEGIN", "INCR n 1", "COMMIT client7:1")
        lines = yield self.until_lines(3)
        self.assertEqual(lines[2], "250 committed txid=1 n=1")
        self.lose()
        self.connect(store=self.store, clock=reactor)
        self.replies()
        self.send("BEGIN", "INCR n 1", "COMMIT client7:1", "BEGIN", "INCR n 1", "COMMIT client7:2")
        lines = yield self.until_lines(6)
        self.assertEqual(lines, ["250 begin", "250 queued", "250 committed txid=1 n=1",
                                 "250 begin", "250 queued", "250 committed txid=2 n=2"])
        rows = yield self.store.transactions()
        self.assertEqual(len(rows), 2)

    @defer.inlineCallbacks
    def test_connection_lost_before_commit_leaves_nothing(self):
        self.send("BEGIN", "SET a 1", "INCR b 5")
        lines = yield self.until_lines(3)
        self.assertEqual(lines, ["250 begin", "250 queued", "250 queued"])
        self.lose()
        values = yield self.store.get_many(["a", "b"])
        self.assertEqual(values, {"a": None, "b": None})
        rows = yield self.store.transactions()
        self.assertEqual(rows, [])

    @defer.inlineCallbacks
    def test_failed_commit_applies_nothing(self):
        self.send("SET word apple", "BEGIN", "SET a 1", "INCR word", "COMMIT", "GET a")
        lines = yield self.until_lines(6)
        self.assertEqual(lines[-2:], [
            "554 transaction failed: word is not an integer; nothing applied",
            "550 no such key: a",
        ])
