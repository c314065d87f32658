"""
The demo server's HTTP resources, through a real L{GracefulSite} over
L{StringTransport}: who may write through C{POST /kv}, what a stored value may
be, how store failures are answered and what C{/healthz} says.
"""

import os

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from twisted_graceful.drain import DrainTracker
from twisted_graceful.hello import HelloResource, ServerIdentity
from twisted_graceful.http import GracefulSite
from twisted_graceful.store import CommitResult, KeyReused, StoreBusy, StoreUnusable, apply_ops, keys_of


class Identity:
    pid = 4242
    generation = 3
    draining = False

    def __str__(self):
        return f"pid {self.pid} (generation {self.generation})"


class FakeStore:
    """
    A store in memory; C{fail} makes every call fail with it; C{unusable}
    is what L{Store.unusable} answers.
    """

    def __init__(self):
        self.values = {}
        self.txid = 0
        self.fail = None
        self.unusable_reason = None
        self.idempotency_keys = []

    def commit(self, ops, idempotency_key=None):
        self.idempotency_keys.append(idempotency_key)
        if self.fail is not None:
            return defer.fail(self.fail)
        values = apply_ops(ops, {k: self.values.get(k) for k in keys_of(ops)})
        for key, value in values.items():
            if value is None:
                self.values.pop(key, None)
            else:
                self.values[key] = value
        self.txid += 1
        return defer.succeed(CommitResult(self.txid, values))

    def get(self, key):
        if self.fail is not None:
            return defer.fail(self.fail)
        return defer.succeed(self.values.get(key))

    def unusable(self):
        return self.unusable_reason


REMOTE = IPv4Address("TCP", "192.0.2.7", 40000)
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)


def post(key, body, content_type=b"application/x-www-form-urlencoded"):
    return (b"POST /kv/" + key + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def dechunk(data):
    body = b""
    while True:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return body
        body += rest[:n]
        data = rest[n + 2:]


class KVTestCase(unittest.SynchronousTestCase):
    allow_remote_writes = False
    max_line = 8192

    def setUp(self):
        self.clock = Clock()
        self.store = FakeStore()
        self.identity = Identity()
        self.tracker = DrainTracker(self.clock, progress_interval=0, clock=self.clock.seconds)
        root = HelloResource(self.clock, self.identity, slow_every=0, emit=lambda m: None,
                             store=self.store, allow_remote_writes=self.allow_remote_writes,
                             max_line=self.max_line)
        self.site = GracefulSite(root, drain_tracker=self.tracker, reactor=self.clock)

    def request(self, data, peer=LOOPBACK):
        proto = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        proto.dataReceived(data)
        response = transport.value()
        head, _, body = response.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1]) if head else None
        if b"transfer-encoding: chunked" in head.lower():
            body = dechunk(body)
        return status, body

    def assertOneLine(self, body, *fragments):
        text = body.decode()
        self.assertTrue(text.endswith("\n") and text.count("\n") == 1, text)
        for fragment in fragments:
            self.assertIn(fragment, text)


class RemoteWritesTests(KVTestCase):
    def test_post_from_a_remote_peer_is_refused(self):
        status, body = self.request(post(b"k", b"value=v"), REMOTE)
        self.assertEqual(status, 403)
        self.assertOneLine(body, "192.0.2.7", "--allow-remote-writes")
        self.assertEqual(self.store.values, {})

    def test_incr_from_a_remote_peer_is_refused(self):
        status, _ = self.request(post(b"k", b"incr=1"), REMOTE)
        self.assertEqual(status, 403)
        self.assertEqual(self.store.values, {})

    def test_get_from_a_remote_peer_is_answered(self):
        self.store.values["k"] = "v"
        self.assertEqual(self.request(b"GET /kv/k HTTP/1.1\r\nHost: x\r\n\r\n", REMOTE),
                         (200, b"v\n"))

    def test_loopback_peers_may_write(self):
        peers = [LOOPBACK, IPv4Address("TCP", "127.1.2.3", 1), IPv6Address("TCP", "::1", 1),
                 IPv6Address("TCP", "::ffff:127.0.0.1", 1), UNIXAddress(b"/run/app.sock")]
        for n, peer in enumerate(peers):
            status, body = self.request(post(b"k%d" % n, b"value=v"), peer)
            self.assertEqual(status, 200, (peer, body))
        self.assertEqual(len(self.store.values), len(peers))

    def test_ipv6_remote_is_refused(self):
        status, _ = self.request(post(b"k", b"value=v"), IPv6Address("TCP", "2001:db8::1", 1))
        self.assertEqual(status, 403)


class AllowRemoteWritesTests(KVTestCase):
    allow_remote_writes = True

    def test_post_from_a_remote_peer_is_committed(self):
        status, body = self.request(post(b"k", b"value=v"), REMOTE)
        self.assertEqual(status, 200)
        self.assertIn(b"committed txid=1 k=v", body)


class ValueLimitTests(KVTestCase):
    max_line = 64

    def test_value_the_line_protocol_could_set_is_stored(self):
        value = b"v" * (64 - len("SET k "))
        status, _ = self.request(post(b"k", b"value=" + value))
        self.assertEqual(status, 200)
        self.assertEqual(self.store.values["k"], value.decode())

    def test_value_longer_than_the_line_protocol_allows_is_413(self):
        value = b"v" * (64 - len("SET k ") + 1)
        status, body = self.request(post(b"k", b"value=" + value))
        self.assertEqual(status, 413)
        self.assertOneLine(body, "--max-line")
        self.assertEqual(self.store.values, {})

    def test_value_with_a_space_or_line_break_is_400(self):
        # A value with CRLF would forge reply lines in the line protocol's GET.
        for value in (b"a+b", b"a%0D%0A250+forged", b"a%09b", b"a%00b"):
            status, body = self.request(post(b"k", b"value=" + value))
            self.assertEqual(status, 400, value)
            self.assertOneLine(body, "one word")
        self.assertEqual(self.store.values, {})

    def test_key_with_a_space_is_400(self):
        status, body = self.request(post(b"a%20b", b"value=v"))
        self.assertEqual(status, 400)
        self.assertOneLine(body, "key")

    def test_key_too_long_is_400(self):
        status, body = self.request(post(b"k" * 251, b"value=v"))
        self.assertEqual(status, 400)
        self.assertOneLine(body, "250")


class IdempotencyKeyTests(KVTestCase):
    def keyed_post(self, key_header):
        return post(b"k", b"incr=1").replace(
            b"Content-Length", b"Idempotency-Key: " + key_header + b"\r\nContent-Length")

    def test_the_key_reaches_the_store_quoted_or_bare(self):
        self.assertEqual(self.request(self.keyed_post(b'"abc-1"'))[0], 200)
        self.assertEqual(self.request(self.keyed_post(b"abc-2"))[0], 200)
        self.assertEqual(self.request(post(b"k", b"incr=1"))[0], 200)
        self.assertEqual(self.store.idempotency_keys, ["abc-1", "abc-2", None])

    def test_a_malformed_key_is_400_and_nothing_is_stored(self):
        for header in (b'"a b"', b'""', b"x" * 201, b"caf\xc3\xa9"):
            status, body = self.request(self.keyed_post(header))
            self.assertEqual(status, 400, header)
            self.assertOneLine(body, "Idempotency-Key: an idempotency key has", "nothing stored")
        self.assertEqual(self.store.idempotency_keys, [])
        self.assertEqual(self.store.values, {})

    def test_a_key_reused_for_another_write_is_422(self):
        self.store.fail = KeyReused("idempotency key k1 names another transaction (txid=3)")
        status, body = self.request(self.keyed_post(b"k1"))
        self.assertEqual(status, 422)
        self.assertOneLine(body, "not committed: idempotency key k1 names another transaction")


class StoreFailureTests(KVTestCase):
    def test_busy_is_503_try_again(self):
        self.store.fail = StoreBusy("database is locked")
        status, body = self.request(post(b"k", b"value=v"))
        self.assertEqual(status, 503)
        self.assertOneLine(body, "database is locked", "try again")

    def test_unusable_store_is_500_will_not_succeed(self):
        self.store.fail = StoreUnusable("attempt to write a readonly database")
        status, body = self.request(post(b"k", b"value=v"))
        self.assertEqual(status, 500)
        self.assertOneLine(body, "readonly", "will not succeed on retry")

    def test_healthz_is_503_when_the_store_is_unusable(self):
        self.assertEqual(self.request(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")[0], 200)
        self.store.unusable_reason = "the database file /x/db.sqlite3 was removed"
        status, body = self.request(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status, 503)
        self.assertOneLine(body, "was removed")


class FakeService:
    generation = 1
    running = 0


class ServerIdentityTests(unittest.SynchronousTestCase):
    def test_before_the_service_runs_the_text_is_read_live(self):
        # twistd builds the service, may daemonize (a new PID), then starts
        # it, which reads the generation: until then nothing is kept.
        service = FakeService()
        identity = ServerIdentity(service)
        self.assertEqual(str(identity), f"pid {os.getpid()} (generation 1)")
        service.generation = 4
        self.assertEqual(str(identity), f"pid {os.getpid()} (generation 4)")

    def test_once_the_service_runs_the_text_is_kept(self):
        service = FakeService()
        identity = ServerIdentity(service)
        service.generation, service.running = 5, 1
        self.assertEqual(str(identity), f"pid {os.getpid()} (generation 5)")
        service.generation = 6  # not a process's own change; shows the text is kept
        self.assertEqual(str(identity), f"pid {os.getpid()} (generation 5)")
        self.assertEqual(identity.generation, 6)  # the properties stay live

    def test_the_answer_names_the_running_generation(self):
        service = FakeService()
        service.generation, service.running = 2, 1
        site = GracefulSite(HelloResource(Clock(), ServerIdentity(service), slow_every=0),
                            reactor=Clock(), access_log=None)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        self.assertEqual(transport.value().count(
            f"hello world from pid {os.getpid()} (generation 2)\n".encode()), 2)
        channel.connectionLost(None)
