"""
Workers forked from the master's zygote (twisted_graceful.zygote), with real
processes: an upgrade's workers are forked, are the master's children and
serve; a changed library file makes the zygote refuse, the upgrade start
new interpreters, and a new zygote come; a zygote that is killed, or
--no-zygote, changes nothing but the speed; a deploy whose workers cannot
start leaves the old ones serving; SIGTERM leaves no process behind.
"""

import os
import signal
import time

from twisted.trial import unittest

from tests.e2e import ServerProcess, http_get, pid_alive, pid_in
from tests.test_master_e2e import ABORT_GRACE, DRAIN_TIMEOUT, SLACK, WORKERS, MasterTestCase
from tests.test_master_schedules_e2e import parent_of

# Imported at every interpreter's start (the zygote's too); a worker exits at
# once while the file "broken" is beside it.
SITECUSTOMIZE = '''\
import os

if os.environ.get("GRACEFUL_ROLE") == "worker":
    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "broken")):
        os._exit(3)
'''


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def forked(pid):
    """
    Was C{pid} forked by a zygote (it has the zygote's command line), not
    started as twistd?
    """
    return b"twisted_graceful.zygote" in cmdline(pid)


def socket_fds(pid):
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


class ZygoteTestCase(MasterTestCase):
    def start_with_code(self, *extra):
        """
        A master whose interpreters import a sitecustomize.py of ours (the
        zygote imports it too, so changing it is changing a library).
        """
        self.code = os.path.abspath(self.mktemp())
        os.makedirs(self.code)
        self.sitecustomize = os.path.join(self.code, "sitecustomize.py")
        with open(self.sitecustomize, "w") as f:
            f.write(SITECUSTOMIZE)
        path = [self.code] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        return self.start(*extra, env=dict(os.environ, PYTHONPATH=os.pathsep.join(path)))

    def wait_zygote(self, server, master, other_than=None, timeout=60):
        """
        The zygote the master's status entry names, once it has one (other
        than C{other_than}) and it is ready to fork.
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = server.status().get(master, {})
            zygote = entry.get("zygote")
            if zygote and zygote != other_than and entry.get("zygote_ready") \
                    and pid_alive(zygote):
                return zygote
            if time.monotonic() > deadline:
                raise AssertionError(f"master {master} names no zygote (other than "
                                     f"{other_than})\n" + server.output())
            time.sleep(0.05)  # the status file is written by another process

    def upgrade(self, server, master, generation):
        self.assertEqual(server.request_upgrade(master), "started")
        entry = self.wait_master(server, master, generation)
        self.assertEqual(entry["last_upgrade"]["result"], "ok", entry)
        return entry

    def assert_serving(self, server, port, entry):
        """
        Every worker of C{entry} is the master's child and answers with its
        own PID and generation.
        """
        pids = {w["pid"] for w in entry["workers"]
                if w["state"] == "serving" and w["generation"] == entry["generation"]}
        self.assertEqual(len(pids), WORKERS, entry)
        for pid in pids:
            self.assertEqual(parent_of(pid), server.proc.pid, f"worker {pid} is not a child")
        seen = set()
        for _ in range(8 * WORKERS):
            status, body, _ = http_get(port)
            self.assertEqual(status, 200)
            self.assertIn(f"(generation {entry['generation']})", body)
            seen.add(pid_in(body))
        self.assertTrue(seen <= pids, f"answers from {seen}, workers {pids}")
        return pids

    def stop(self, server, master):
        server.signal(master, signal.SIGTERM)
        server.assert_all_gone_within(DRAIN_TIMEOUT + ABORT_GRACE + SLACK)


class ForkedUpgradeTests(ZygoteTestCase):
    def test_an_upgrade_forks_its_workers_from_the_zygote(self):
        server, master, ports = self.start()
        zygote = self.wait_zygote(server, master)
        self.assertEqual(parent_of(zygote), master)
        self.assertEqual(socket_fds(zygote), 1, "the zygote holds a listener")  # its control socket
        first = self.wait_master(server, master, 1)
        old = self.assert_serving(server, ports["http"], first)
        for generation in (2, 3):
            entry = self.upgrade(server, master, generation)
            new = self.assert_serving(server, ports["http"], entry)
            self.assertFalse(new & old)
            for pid in new:
                self.assertTrue(forked(pid), f"worker {pid} was not forked: {cmdline(pid)}")
            self.assertEqual(server.live_processes() - {master}, new)  # the old ones are gone
            old = new
        self.assertEqual(self.wait_zygote(server, master), zygote)  # the same one serves on
        # A worker that dies is replaced by a fork too.
        victim = sorted(old)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            entry = server.status().get(master, {})
            serving = {w["pid"] for w in entry.get("workers") or [] if w["state"] == "serving"}
            if len(serving) == WORKERS and victim not in serving:
                break
            self.assertLess(time.monotonic(), deadline, server.output())
            time.sleep(0.05)
        (replacement,) = serving - old
        self.assertTrue(forked(replacement))
        self.stop(server, master)


class RefusedForkTests(ZygoteTestCase):
    def test_a_changed_library_starts_new_interpreters_and_a_new_zygote(self):
        server, master, ports = self.start_with_code()
        zygote = self.wait_zygote(server, master)
        with open(self.sitecustomize, "a") as f:
            f.write("# a new version\n")
        entry = self.upgrade(server, master, 2)
        for pid in self.assert_serving(server, ports["http"], entry):
            self.assertFalse(forked(pid), f"worker {pid} was forked from a stale zygote")
        server.assert_output("changed since the zygote imported it")
        second = self.wait_zygote(server, master, other_than=zygote)
        server.wait_gone(zygote)
        # The new zygote has the new file: the next upgrade forks again.
        entry = self.upgrade(server, master, 3)
        for pid in self.assert_serving(server, ports["http"], entry):
            self.assertTrue(forked(pid), f"worker {pid} was not forked: {cmdline(pid)}")
        self.assertEqual(self.wait_zygote(server, master), second)
        self.stop(server, master)

    def test_a_killed_zygote_changes_nothing_but_the_speed(self):
        server, master, ports = self.start()
        zygote = self.wait_zygote(server, master)
        os.kill(zygote, signal.SIGKILL)
        server.wait_gone(zygote)
        entry = self.upgrade(server, master, 2)
        for pid in self.assert_serving(server, ports["http"], entry):
            self.assertFalse(forked(pid))
        self.wait_zygote(server, master, other_than=zygote)  # a new one, after the upgrade
        self.stop(server, master)

    def test_workers_that_cannot_start_leave_the_old_ones_serving(self):
        server, master, ports = self.start_with_code()
        zygote = self.wait_zygote(server, master)
        first = self.wait_master(server, master, 1)
        old = self.assert_serving(server, ports["http"], first)
        with open(os.path.join(self.code, "broken"), "w"):
            pass  # every new worker exits 3 as it starts (forked or not)
        self.assertEqual(server.request_upgrade(master), "started")
        deadline = time.monotonic() + 60
        while True:
            entry = server.status().get(master, {})
            if (entry.get("last_upgrade") or {}).get("result") == "failed" \
                    and entry.get("state") == "serving":
                break
            self.assertLess(time.monotonic(), deadline, server.output())
            time.sleep(0.05)
        self.assertEqual(self.assert_serving(server, ports["http"], entry), old)
        self.assertIn("status 3", entry["last_upgrade"]["error"])
        self.assertEqual(self.wait_zygote(server, master), zygote)
        os.remove(os.path.join(self.code, "broken"))
        # Right after a failed upgrade the next one may wait for the backoff.
        self.assertIn(server.request_upgrade(master), ("started", "scheduled"))
        entry = self.wait_master(server, master, 2)  # a failed set takes no generation
        for pid in self.assert_serving(server, ports["http"], entry):
            self.assertTrue(forked(pid))
        self.stop(server, master)

    def test_without_a_zygote(self):
        server, master, ports = self.start("--no-zygote")
        entry = self.upgrade(server, master, 2)
        for pid in self.assert_serving(server, ports["http"], entry):
            self.assertFalse(forked(pid))
        self.assertIsNone(server.status()[master].get("zygote"))
        # wait_master: only the serving set is alive; and no zygote either.
        self.assertEqual(server.live_processes(zygotes=True) - {master},
                         {w["pid"] for w in entry["workers"]
                          if w["generation"] == 2 and w["state"] == "serving"})
        self.stop(server, master)


class ZygoteExitTests(unittest.TestCase):
    def test_the_zygote_leaves_with_a_killed_master(self):
        db = os.path.abspath(self.mktemp())
        os.makedirs(db)
        server = ServerProcess(self, [
            "graceful", "--port", "tcp:0:interface=127.0.0.1", "--workers", "1",
            "--db", os.path.join(db, "store.sqlite3"),
        ]).start()
        master = server.wait_pidfile()
        zygote = ZygoteTestCase.wait_zygote(self, server, master)
        os.kill(master, signal.SIGKILL)
        server.wait_gone(zygote)  # its control socket closed with the master
        server.kill_all()


class ForkedTLSTests(ZygoteTestCase):
    def test_a_forked_worker_serves_tls_with_the_certificate_on_disk(self):
        """
        With a TLS listener the zygote preloads pyOpenSSL (--tls); a forked
        worker loads the certificate on disk when it starts, as a new
        interpreter would.
        """
        from tests.certs import write_certificate
        from tests.test_tls_e2e import https

        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        cert, key = os.path.join(cwd, "cert.pem"), os.path.join(cwd, "key.pem")
        write_certificate(cert, key, "first")
        server, master, ports = self.start(
            "--tls-port", f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1")
        zygote = self.wait_zygote(server, master)
        self.assertIn(b"--tls", cmdline(zygote))
        status, body, _, name, conn = https(ports["https"])
        conn.close()
        self.assertEqual((status, name), (200, "first"))
        write_certificate(cert, key, "second")  # renewed on disk
        entry = self.upgrade(server, master, 2)
        new = {w["pid"] for w in entry["workers"] if w["generation"] == 2}
        for pid in new:
            self.assertTrue(forked(pid), f"worker {pid} was not forked: {cmdline(pid)}")
        for _ in range(4):
            status, body, _, name, conn = https(ports["https"])
            conn.close()
            self.assertEqual((status, name), (200, "second"))
            self.assertIn(pid_in(body), new)
        self.stop(server, master)
