"""
End to end, beyond one machine: two `twistd graceful` "hosts" (on 127.0.0.2,
with a master and two workers, and on 127.0.0.3, the self-replacing process)
sharing one real PostgreSQL database, behind a real HAProxy
running the shipped contrib/haproxy/haproxy.cfg. Under HTTP and transaction
load through HAProxy, each host is upgraded in place (SIGHUP), then taken
out (SIGTERM with --shutdown-delay) and started again: no request fails,
HAProxy never meets a refused connection, and the INCRs committed through
both hosts add up exactly.
"""

import http.client
import os
import re
import signal
import socket
import threading
import time

from twisted.trial import unittest

from tests import lb, pg
from tests.e2e import ServerProcess

HOSTS = {"host1": "127.0.0.2", "host2": "127.0.0.3"}
SHUTDOWN_DELAY = 3.0  # > inter x fall + timeout check = 0.25 x 2 + 0.5 s, with a margin
TIMING = {"inter_ms": 250, "fall": 2, "rise": 2, "check_timeout_ms": 500}
COMMITTED = re.compile(r"^250 committed txid=(\d+) ")


def common_free_port(addresses):
    """
    A port free on every one of C{addresses}.
    """
    for _ in range(50):
        port = lb.free_port(addresses[0])
        try:
            for address in addresses[1:]:
                with socket.socket() as s:
                    s.bind((address, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no port free on all of {addresses}")


class Host:
    """
    One "host": its working directory and the server running there (a new
    ServerProcess each time it is started): with a master and C{workers}
    workers, or (C{workers=0}) the self-replacing process.
    """

    def __init__(self, testcase, name, address, http_port, txn_port, db, workers=0, extra=()):
        self.testcase = testcase
        self.name = name
        self.address = address
        self.workers = workers
        self.cwd = os.path.abspath(testcase.mktemp())
        os.makedirs(self.cwd)
        self.args = ["graceful", "--port", f"tcp:{http_port}:interface={address}",
                     "--txn-port", f"tcp:{txn_port}:interface={address}",
                     "--metrics-port", f"tcp:0:interface={address}", "--db", db,
                     "--slow-every", "0", "--workers", str(workers)] + list(extra)
        self.server = None
        self.pid = None  # the master, or the serving generation
        self.generation = 1
        self.serving = []  # per start and generation: the pids that served it

    def start(self):
        self.server = ServerProcess(self.testcase, list(self.args), cwd=self.cwd).start()
        if self.workers:
            _, m = self.server.wait_for(r"master pid (\d+): listening on")
            self.pid = int(m.group(1))
            _, m = self.server.wait_for(rf"master pid {self.pid}: workers generation 1 serve "
                                        rf"\(pids ([\d, ]+)\)")
            self.serving.append({int(p) for p in m.group(1).split(", ")})
        else:
            # By its own output: the status file beside the pidfile still
            # holds the entries of the processes this host ran before.
            _, m = self.server.wait_for(r"pid (\d+) generation 1: (?:listening on|inherited)")
            self.pid = int(m.group(1))
            self.server.wait_for(rf"pid {self.pid} generation 1: serving")
            self.serving.append({self.pid})
        self.generation = 1
        return self

    def upgrade(self):
        mark = len(self.server.lines)
        self.server.signal(self.pid, signal.SIGHUP)
        if self.workers:
            _, m = self.server.wait_for(
                rf"master pid {self.pid}: workers generation {self.generation + 1} are ready "
                rf"after \d+ ms \(pids ([\d, ]+)\)", start=mark)
            self.serving.append({int(p) for p in m.group(1).split(", ")})
        else:
            _, m = self.server.wait_for(
                rf"pid {self.pid} generation {self.generation}: stopped accepting; pid (\d+) "
                rf"\(generation {self.generation + 1}\) serves now", start=mark)
            self.pid = int(m.group(1))
            self.serving.append({self.pid})
        self.generation += 1

    def stop(self):
        try:
            self.server.signal(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            raise AssertionError(f"{self.name}: pid {self.pid} is gone; output:\n"
                                 + self.server.output(200))
        return self.server

    def wait_delay_started(self, server, seconds):
        if self.workers:
            server.wait_for(rf"master pid {self.pid}: shutting down: the workers' /healthz "
                            rf"answers 503; still accepting and serving for {seconds:g} s")
        else:
            server.wait_for(rf"pid {self.pid} generation {self.generation}: shutting down: "
                            rf"/healthz answers 503; still accepting and serving for "
                            rf"{seconds:g} s")


class Load:
    """
    Clients through HAProxy until told to stop (bounded in time and count):
    keep-alive GETs, keep-alive POST /kv increments, and transaction clients
    (BEGIN / INCR lb:total / INCR lb:c<i> / SET lb:tx:<i>:<n> / COMMIT,
    reconnecting after 421). Every failure is kept.
    """

    def __init__(self, http_port, txn_port, clients=2, deadline=240.0, max_each=20000):
        self.http_port = http_port
        self.txn_port = txn_port
        self.deadline = time.monotonic() + deadline
        self.max_each = max_each
        self.stop = threading.Event()
        self.errors = []
        self.gets = 0
        self.pids = set()
        self.posts = {}  # client -> acknowledged POSTs
        self.txns = {}  # client -> set of acknowledged tags
        self.lock = threading.Condition()
        self.threads = []
        for i in range(clients):
            self.threads.append(threading.Thread(target=self._get, daemon=True))
            self.threads.append(threading.Thread(target=self._post, args=(i,), daemon=True))
            self.threads.append(threading.Thread(target=self._txn, args=(i,), daemon=True))

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def done(self):
        with self.lock:
            return self.gets + sum(self.posts.values()) + sum(len(t) for t in self.txns.values())

    def wait_progress(self, n=60, timeout=60.0):
        """
        Wait until C{n} more requests and transactions have succeeded.
        """
        target = self.done() + n
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.done() < target:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no progress; errors: {self.errors[-5:]}")
                self.lock.wait(0.5)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)
        return not any(t.is_alive() for t in self.threads)

    def _running(self, count):
        return not self.stop.is_set() and count < self.max_each \
            and time.monotonic() < self.deadline

    def _error(self, what):
        with self.lock:
            self.errors.append(what)
            self.lock.notify_all()

    def _http(self, method, path, body=None, headers=None, conn=None):
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=15)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return conn, response.status, response.read().decode("utf-8", "replace")

    def _get(self):
        conn, n = None, 0
        while self._running(n):
            n += 1
            try:
                conn, status, body = self._http("GET", "/", conn=conn)
            except (OSError, http.client.HTTPException) as e:
                self._error(f"GET: {e!r}")
                conn = None
                continue
            if status != 200:
                self._error(f"GET: {status} {body!r}")
                continue
            m = re.search(r"pid (\d+)", body)
            with self.lock:
                self.gets += 1
                self.pids.add(int(m.group(1)))
                self.lock.notify_all()

    def _post(self, i):
        conn, n = None, 0
        self.posts[i] = 0
        while self._running(n):
            n += 1
            try:
                conn, status, body = self._http(
                    "POST", f"/kv/lb:post:{i}", body=b"incr=1",
                    headers={"Content-Type": "application/x-www-form-urlencoded"}, conn=conn)
            except (OSError, http.client.HTTPException) as e:
                # The POST may or may not have been applied: a failure either way.
                self._error(f"POST: {e!r}")
                conn = None
                continue
            if status != 200 or not body.startswith("committed txid="):
                self._error(f"POST: {status} {body!r}")
                continue
            with self.lock:
                self.posts[i] += 1
                self.lock.notify_all()

    def _txn(self, i):
        self.txns[i] = set()
        sock = reader = None
        n = 0
        while self._running(n):
            n += 1
            tag = f"lb:tx:{i}:{n}"
            commit_sent = False
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.txn_port), timeout=15)
                    reader = sock.makefile("rb")
                    greeting = reader.readline().decode()
                    if not greeting.startswith("220 "):
                        raise ConnectionError(f"greeting {greeting!r}")
                sock.sendall(f"BEGIN\r\nINCR lb:total\r\nINCR lb:c{i}\r\nSET {tag} 1\r\n"
                             .encode())
                replies = []
                for _ in range(4):
                    replies.append(reader.readline().decode().strip())
                    if not replies[-1].startswith("250"):
                        break
                if replies[-1].startswith("421"):
                    sock.close()
                    sock = None  # closed at a boundary before BEGIN ran: reconnect
                    continue
                if replies != ["250 begin", "250 queued", "250 queued", "250 queued"]:
                    raise ConnectionError(f"replies {replies!r}")
                sock.sendall(b"COMMIT\r\n")
                commit_sent = True
                reply = reader.readline().decode().strip()
                if not COMMITTED.match(reply):
                    raise ConnectionError(f"COMMIT answered {reply!r}")
                with self.lock:
                    self.txns[i].add(tag)
                    self.lock.notify_all()
            except (OSError, ConnectionError) as e:
                self._error(f"txn {tag}: {e!r}" + (" after COMMIT was sent" if commit_sent
                                                   else ""))
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()


class ScaleOutTests(unittest.TestCase):
    def setUp(self):
        for reason in (pg.unavailable(), lb.unavailable()):
            if reason:
                raise unittest.SkipTest(reason)

    def test_hosts_upgraded_and_taken_out_behind_haproxy_with_no_failure(self):
        db = pg.shared_server().new_database()
        addresses = list(HOSTS.values())
        http_port, txn_port = common_free_port(addresses), common_free_port(addresses)
        # host1 with a master and two workers (the default layout), host2 the
        # self-replacing process (--workers 0).
        hosts = [Host(self, name, address, http_port, txn_port, db, workers=workers,
                      extra=["--shutdown-delay", str(SHUTDOWN_DELAY)]).start()
                 for (name, address), workers in zip(HOSTS.items(), (2, 0))]
        proxy = lb.HAProxy(HOSTS, http_port, txn_port, **TIMING)
        self.addCleanup(proxy.stop)
        proxy.start()
        for host in hosts:
            proxy.wait_status(host.name, "UP")

        load = Load(proxy.http_port, proxy.txn_port).start()
        self.addCleanup(load.stop.set)
        load.wait_progress()
        for host in hosts:  # in place: nothing to tell HAProxy
            host.upgrade()
            load.wait_progress()
        for host in hosts:  # out and back in
            old = host.stop()
            host.wait_delay_started(old, SHUTDOWN_DELAY)
            proxy.wait_status(host.name, "DOWN")
            old.wait_all_exited()
            load.wait_progress()
            host.start()
            proxy.wait_status(host.name, "UP")
            load.wait_progress()
        self.assertTrue(load.finish(), "load threads did not stop")

        self.assertEqual(load.errors, [])
        # With its retries and redispatch, HAProxy would hide refused connections
        # from the clients: that it never had to try another host is the proof.
        counters = proxy.counters()
        self.assertEqual((counters["econ"], counters["wredis"]), (0, 0),
                         f"HAProxy met refused connections: {counters}")
        for host in hosts:
            for pids in host.serving:
                self.assertTrue(pids & load.pids, f"{host.name}: none of {pids} served a GET")

        kv, txns = pg.rows(db)
        acked = set().union(*load.txns.values())
        present = {key for key in kv if key.startswith("lb:tx:")}
        self.assertEqual(present, acked)
        self.assertEqual(int(kv["lb:total"]), len(acked))
        for i, tags in load.txns.items():
            self.assertEqual(int(kv.get(f"lb:c{i}", 0)), len(tags))
        for i, count in load.posts.items():
            self.assertEqual(int(kv.get(f"lb:post:{i}", 0)), count)
        self.assertEqual(len(txns), len(acked) + sum(load.posts.values()))
        for host in hosts:
            host.stop()
            host.server.wait_all_exited()
