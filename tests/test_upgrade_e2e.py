"""
End to end: real C{twistd} processes on ephemeral loopback ports, real
signals, real sockets, real PIDs and pidfiles.
"""

import os
import shutil
import signal
import socket
import tempfile
import threading
import time

from twisted.trial import unittest

from tests.e2e import (
    START_UP,
    ClearErrorMixin,
    ServerProcess,
    TacApp,
    graceful_options,
    http_get,
    pid_alive,
    pid_in,
    run_twistd,
)

LOOPBACK = "tcp:0:interface=127.0.0.1"


def graceful(testcase, *extra, **kw):
    args = ["graceful", "--port", LOOPBACK, "--slow-every", "0"] + list(extra)
    return ServerProcess(testcase, args, **kw).start()


class ChainedUpgradeTests(unittest.TestCase):
    def test_three_chained_upgrades(self):
        """
        Each SIGHUP gives a new PID and generation; the pidfile follows; each
        old process exits; nothing is left behind.
        """
        server = graceful(self)
        pid, ports = server.wait_listening()
        server.wait_ready(1)
        self.assertEqual(server.wait_pidfile(pid), pid)
        status, body, _ = http_get(ports["http"])
        self.assertEqual((status, pid_in(body)), (200, pid))
        self.assertIn("generation 1", body)
        seen = [pid]
        for generation in (1, 2, 3):
            server.signal(seen[-1], signal.SIGHUP)
            new_pid = server.wait_handover(generation)
            self.assertNotIn(new_pid, seen)
            server.wait_exit_line(seen[-1])
            self.assertEqual(server.wait_pidfile(new_pid), new_pid)
            status, body, _ = http_get(ports["http"])
            self.assertEqual(status, 200)
            self.assertEqual(pid_in(body), new_pid)
            self.assertIn(f"generation {generation + 1}", body)
            seen.append(new_pid)
        for old in seen[:-1]:
            self._wait_gone(old)
        server.signal(seen[-1], signal.SIGTERM)
        server.wait_all_exited()
        self.assertFalse(os.path.exists(server.pidfile), "the last generation removes its pidfile")

    def _wait_gone(self, pid, timeout=20):
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            self.assertLess(time.monotonic(), deadline, f"pid {pid} did not exit")
            time.sleep(0.02)

    def test_daemonized_three_upgrades(self):
        """
        Daemonized twistd: the pidfile names the daemon, then each successor.
        """
        server = graceful(self, daemon=True)
        pid, ports = server.wait_listening()
        server.wait_ready(1)
        self.assertEqual(server.wait_pidfile(pid), pid)
        current = pid
        for generation in (1, 2, 3):
            server.signal(current, signal.SIGHUP)
            new_pid = server.wait_handover(generation)
            self.assertEqual(server.wait_pidfile(new_pid), new_pid)
            status, body, _ = http_get(ports["http"])
            self.assertEqual((status, pid_in(body)), (200, new_pid))
            self._wait_gone(current)
            current = new_pid
        server.signal(current, signal.SIGTERM)
        self._wait_gone(current)
        server.wait_all_exited()
        self.assertFalse(os.path.exists(server.pidfile))


class OtherListenerTests(unittest.TestCase):
    def test_unix_socket_survives_upgrades(self):
        """
        A UNIX socket path is never unlinked by a generation that hands over.
        """
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        short = tempfile.mkdtemp(prefix="graceful-")  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, short, True)
        path = os.path.join(short, "http.sock")
        server = ServerProcess(self, ["graceful", "--port", "unix:" + path, "--slow-every", "0",
                                      "--txn-port", LOOPBACK, "--db", os.path.join(cwd, "db")],
                               cwd=cwd).start()
        pid, ports = server.wait_listening()
        self.assertEqual(ports["http"], path)
        server.wait_ready(1)
        current = pid
        for generation in (1, 2):
            server.signal(current, signal.SIGHUP)
            previous, current = current, server.wait_handover(generation)
            server.wait_exit_line(previous)
            self._wait_gone(previous)
            self.assertTrue(os.path.exists(path))
            self.assertEqual(pid_in(unix_get(path)), current)

    def test_tcp6_loopback(self):
        if not socket.has_ipv6 or not _ipv6_loopback():
            raise unittest.SkipTest("no IPv6 loopback here")
        server = ServerProcess(self, ["graceful", "--port", "tcp6:0:interface=\\:\\:1",
                                      "--slow-every", "0"]).start()
        pid, ports = server.wait_listening()
        server.wait_ready(1)
        server.signal(pid, signal.SIGHUP)
        new = server.wait_handover(1)
        status, body, _ = http_get(ports["http"], host="::1")
        self.assertEqual((status, pid_in(body)), (200, new))

    def _wait_gone(self, pid, timeout=20):
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            self.assertLess(time.monotonic(), deadline, f"pid {pid} did not exit")
            time.sleep(0.02)


def _ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def unix_get(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data.decode()
            data += chunk


class SlowRequestTests(unittest.TestCase):
    def test_slow_request_finishes_on_old_pid(self):
        """
        A slow request started before SIGHUP completes in full from the old
        PID while new requests are served by the new PID.
        """
        server = graceful(self)
        old, ports = server.wait_listening()
        server.wait_ready(1)
        result = {}

        def slow():
            result["response"] = http_get(ports["http"], "/slow?seconds=3", timeout=30)

        thread = threading.Thread(target=slow)
        thread.start()
        server.wait_inflight(old)
        server.signal(old, signal.SIGHUP)
        new = server.wait_handover(1)
        status, body, _ = http_get(ports["http"])
        self.assertEqual((status, pid_in(body)), (200, new))
        # The old process is still there, finishing its request.
        self.assertTrue(pid_alive(old))
        thread.join(30)
        status, body, headers = result["response"]
        self.assertEqual(status, 200)
        self.assertEqual(pid_in(body), old)
        self.assertIn("slow request of 3.0 s", body)
        self.assertEqual(headers.get("Connection", headers.get("connection")), "close")
        drain = server.wait_exit_line(old)["drain"]
        self.assertEqual((drain["busy_at_start"], drain["cut"]), (1, 0))
        # What a person watching the upgrade reads: the heartbeat, then the
        # end, from the old pid. (Not "3/3 s": the last beat and the end are
        # both due at 3 s, in either order.)
        server.assert_output(rf"pid {old}: slow request #1 1/3 s")
        server.assert_output(rf"pid {old}: slow request #1 done")

    def test_sigterm_waits_for_slow_request(self):
        server = graceful(self)
        pid, ports = server.wait_listening()
        server.wait_ready(1)
        result = {}
        thread = threading.Thread(
            target=lambda: result.setdefault("r", http_get(ports["http"], "/slow?seconds=2")))
        thread.start()
        server.wait_inflight(pid)
        server.signal(pid, signal.SIGTERM)
        server.wait_state(pid, "shutting-down", "exited")
        thread.join(30)
        self.assertEqual(result["r"][0], 200)
        self.assertEqual(pid_in(result["r"][1]), pid)
        server.wait_all_exited()
        # twistd ends a process stopped by a signal with that signal (as
        # systemd expects), after our drain has run.
        self.assertEqual(server.proc.returncode, -signal.SIGTERM)
        entry = server.status()[pid]
        self.assertEqual(entry["state"], "exited")
        # The slow request was in flight when the drain began, and finished.
        self.assertEqual((entry["drain"]["busy_at_start"], entry["drain"]["cut"]), (1, 0))


class NothingRefusedTests(unittest.TestCase):
    def test_500_requests_across_5_upgrades(self):
        """
        A client loop on fresh connections across 5 upgrades: every request
        answered 200.
        """
        server = graceful(self)
        pid, ports = server.wait_listening()
        server.wait_ready(1)
        results = []
        stop = threading.Event()

        def client():
            deadline = time.monotonic() + 120
            while (not stop.is_set() or len(results) < 500) and time.monotonic() < deadline:
                try:
                    status, body, _ = http_get(ports["http"], timeout=10)
                    results.append((status, pid_in(body)))
                except Exception as e:  # a refused or reset request is a failure
                    results.append((repr(e), None))
                if len(results) >= 50000:  # a bound; the deadline comes first
                    break

        thread = threading.Thread(target=client)
        thread.start()
        current = pid
        for generation in range(1, 6):
            start = len(results)
            while len(results) < start + 40:  # some requests inside each window
                # (a client that stopped would leave this loop waiting for ever)
                self.assertTrue(thread.is_alive(), f"the client stopped after {len(results)}")
                time.sleep(0.01)
            server.signal(current, signal.SIGHUP)
            current = server.wait_handover(generation)
        deadline = time.monotonic() + 30
        while current not in {p for _, p in results[-50:]} and time.monotonic() < deadline:
            time.sleep(0.01)  # until the last generation has answered too
        stop.set()
        thread.join(150)
        self.assertGreaterEqual(len(results), 500)
        failures = [r for r in results if r[0] != 200]
        self.assertEqual(failures, [])
        answered = {}
        for _, p in results:
            answered[p] = answered.get(p, 0) + 1
        self.assertGreaterEqual(len(answered), 6, f"answers by pid: {answered}; current "
                                                  f"{current}\n" + server.output(120))
        server.signal(current, signal.SIGTERM)
        server.wait_all_exited()


class SighupStormTests(unittest.TestCase):
    def test_storm_gives_one_generation(self):
        """
        Ten SIGHUPs, each sent as soon as the previous one was answered (a
        signal sent before that could merge with it): the first starts the
        upgrade, every other is refused, and one generation 2 serves.
        """
        server = graceful(self)
        pid, ports = server.wait_listening()
        server.wait_ready(1)
        answers = []
        for _ in range(10):
            answer = server.request_upgrade(pid)
            if answer is None:
                break  # handed over and exited within the storm
            answers.append(answer)
        self.assertEqual(answers[0], "started")
        self.assertEqual(set(answers[1:]), {"refused"} if answers[1:] else set())
        new = server.wait_handover(1)
        entry = server.wait_exit_line(pid)
        self.assertEqual(entry["upgrade_requests"], len(answers))
        self.assertEqual(entry["last_upgrade"]["child_pid"], new)
        status, body, _ = http_get(ports["http"])
        self.assertEqual(pid_in(body), new)
        self.assertEqual(sorted(e["generation"] for e in server.status().values()), [1, 2])
        if answers[1:]:
            # The operator reads why.
            server.assert_output(rf"pid {pid} generation 1: SIGHUP ignored: ")
        server.signal(new, signal.SIGTERM)
        server.wait_all_exited()
        self.assertEqual(server.pids, {pid, new})


class FailedUpgradeTests(unittest.TestCase):
    """
    New code that fails changes nothing: the old generation keeps serving and
    says why; with the fault fixed, the next SIGHUP succeeds. The application
    is a .tac using the library, and each "deploy" rewrites it.
    """

    def deploy(self, fault="", readiness=""):
        self.app.deploy(fault, readiness)

    def setUp(self):
        self.app = TacApp(self)
        self.server, self.pid, self.ports = self.app.start()

    def assertStillServing(self):
        status, body, _ = http_get(self.ports["http"])
        self.assertEqual((status, pid_in(body)), (200, self.pid))
        self.assertEqual(self.server.read_pidfile(), self.pid)

    def fixed_upgrade_succeeds(self):
        self.deploy()
        self.server.signal(self.pid, signal.SIGHUP)
        new = self.server.wait_handover(1)
        self.assertEqual(self.server.wait_pidfile(new), new)
        status, body, _ = http_get(self.ports["http"])
        self.assertEqual((status, pid_in(body)), (200, new))
        self.server.signal(new, signal.SIGTERM)
        self.server.wait_all_exited()

    def failed_upgrade(self):
        """
        SIGHUP, and wait for the outcome of that upgrade; return it.
        """
        before = self.server.status()[self.pid]["last_upgrade"]
        self.server.signal(self.pid, signal.SIGHUP)
        return self.server.wait_upgrade_outcome(self.pid, changed_from=before)

    def test_child_fails_at_startup(self):
        self.deploy(fault='raise RuntimeError("broken deploy: DATABASE_URL is not set")')
        outcome = self.failed_upgrade()
        child = outcome["child_pid"]
        self.assertEqual(outcome["result"], "failed")
        self.assertEqual(outcome["error"], f"pid {child} exited with status 1 before it was ready")
        self.assertTrue(any("DATABASE_URL is not set" in line for line in outcome["output_tail"]),
                        outcome["output_tail"])
        # What the operator reads: the failure, and the child's own words.
        self.server.assert_output(
            rf"Upgrade failed: pid {child} exited with status 1 before it was ready")
        self.server.assert_output(r"broken deploy: DATABASE_URL is not set")
        self.assertStillServing()
        self.fixed_upgrade_succeeds()

    def test_child_never_ready(self):
        self.deploy(readiness="graceful.add_readiness_check(lambda: defer.Deferred())")
        outcome = self.failed_upgrade()
        child = outcome["child_pid"]
        self.assertEqual(outcome["result"], "timeout")
        self.server.assert_output(
            rf"Upgrade failed: pid {child} was not ready within 3(\.0)? s; stopped it")
        self.server.wait_gone(child, timeout=10)
        self.assertStillServing()
        self.fixed_upgrade_succeeds()


def listener_names():
    """
    The listeners `graceful` has, in the order it hands them over.
    """
    options = graceful_options()
    return ["http"] + [name for name, option in (("txn", "txn-port"), ("metrics", "metrics-port"))
                       if option in options]


# The listeners after http in a GRACEFUL_LISTENERS value, at fds never open.
OTHERS = ",".join(f"{name}={90 + i}" for i, name in enumerate(listener_names()[1:])) or "x=99"


class OrphanedChildTests(unittest.TestCase):
    def test_child_takes_over_when_its_parent_dies_before_it_is_ready(self):
        """
        The old generation is killed while the new one gets ready: the new one
        serves anyway, writes the pidfile itself and says so.
        """
        app = TacApp(self, ready_timeout=30)
        server, pid, ports = app.start()
        release = os.path.join(app.cwd, "release")
        checking = os.path.join(app.cwd, "checking")
        app.deploy(readiness=(
            "import os\n"
            "def _released():\n"
            f"    open({checking!r}, 'w').close()\n"
            f"    if not os.path.exists({release!r}):\n"
            "        raise RuntimeError('waiting for the test')\n"
            "graceful.add_readiness_check(_released)"))
        server.signal(pid, signal.SIGHUP)
        child = server.wait_child(pid)
        server.wait_path(checking)  # the child runs its readiness checks
        os.kill(pid, signal.SIGKILL)
        with open(release, "w"):
            pass
        entry = server.wait_entry(child, lambda e: e.get("state") == "serving", "serving")
        self.assertEqual((entry["generation"], entry["source"]), (2, "orphaned"))
        self.assertEqual(server.wait_pidfile(child), child)
        server.assert_output(rf"pid {child} generation 2: the previous generation \(pid {pid}\) "
                             rf"is gone .*serving on our own")
        status, body, _ = http_get(ports["http"])
        self.assertEqual((status, pid_in(body)), (200, child))
        server.signal(child, signal.SIGTERM)
        server.wait_gone(child)
        self.assertFalse(os.path.exists(app.pidfile))


class SuccessorDiesTests(unittest.TestCase):
    def test_old_generation_takes_the_listeners_back(self):
        """
        The new generation dies just after it took over, while the old one
        still drains a slow request: the old one serves again, names itself in
        the pidfile, and a later upgrade works.
        """
        app = TacApp(self, with_metrics=True)  # the metrics show the slow request in flight
        server, pid, ports = app.start()
        # The new code dies by itself once it took over, when the test says
        # so (not after a delay: the test sees each step in the status file).
        die = os.path.join(app.cwd, "die")
        app.deploy(readiness=(
            "import os\n"
            "from twisted.internet import task\n"
            "def _die_when_told():\n"
            f"    if os.path.exists({die!r}):\n"
            "        os._exit(7)\n"
            "graceful.when_ready().addCallback(\n"
            "    lambda _: task.LoopingCall(_die_when_told).start(0.05))"))
        result = {}
        slow = threading.Thread(target=lambda: result.setdefault(
            "r", http_get(ports["http"], f"/slow?seconds={4 + 2 * START_UP}", timeout=30)))
        slow.start()
        server.wait_inflight(pid)
        server.signal(pid, signal.SIGHUP)
        child = server.wait_handover(1)
        self.assertEqual(server.read_pidfile(), child)
        self.assertEqual(pid_in(http_get(ports["http"])[1]), child)
        with open(die, "w"):
            pass
        # The pidfile named the child when it took over; it names us again
        # once the child died and we took the listeners back. (The entry
        # names the successor that died a moment before it says serving
        # again: wait for both.)
        entry = server.wait_entry(
            pid, lambda e: e.get("took_back_from") and e.get("state") == "serving",
            "serving again after a take-back")
        self.assertEqual(entry["took_back_from"]["pid"], child)
        self.assertIn("exited with status 7", entry["took_back_from"]["how"])
        self.assertEqual(server.read_pidfile(), pid)
        server.wait_gone(child)
        status, body, _ = http_get(ports["http"])
        self.assertEqual((status, pid_in(body)), (200, pid))
        slow.join(30)
        self.assertEqual((result["r"][0], pid_in(result["r"][1])), (200, pid))
        app.deploy()
        # Right after a take-back the upgrade may be scheduled (backoff): it
        # runs once the backoff is over.
        server.signal(pid, signal.SIGHUP)
        new, _, entries = server.wait_settled(changed_from=pid)
        self.assertEqual(entries[new]["generation"], 2)
        self.assertEqual(server.wait_pidfile(new), new)
        self.assertEqual(pid_in(http_get(ports["http"])[1]), new)
        server.signal(new, signal.SIGTERM)
        server.wait_all_exited()


class BadInputTests(ClearErrorMixin, unittest.TestCase):
    def run_twistd(self, *args, env=None, pass_fds=()):
        return run_twistd(self, *args, env=env, pass_fds=pass_fds)

    def test_port_in_use(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            result = self.run_twistd("--port", f"tcp:{port}:interface=127.0.0.1")
        self.assertClearError(result, f"--port tcp:{port}:interface=127.0.0.1",
                              "address already in use")

    def test_bad_port(self):
        self.assertClearError(self.run_twistd("--port", "tcp:eighty"), "port must be a number")
        self.assertClearError(self.run_twistd("--port", "udp:53"), "unsupported listener type")
        self.assertClearError(self.run_twistd("--port", "70000"), "from 0 to 65535")

    def test_garbage_listener_variable(self):
        for value, message in [
            ("garbage", "is not of the form name=fd"),
            ("http=abc", "'abc' is not a file descriptor number"),
            ("http=1", "stdin/stdout/stderr"),
            ("http=77," + OTHERS, "fd 77 is not open"),
            ("txn=5", "has no listener named 'http'"),
            ("http=77,ftp=79," + OTHERS, "passes 'ftp', which this generation has no option for"),
            # Absurd numbers: bounded by the fd limit, not an OverflowError traceback.
            ("http=99999999999999999999," + OTHERS, "RLIMIT_NOFILE"),
            ("http=" + "9" * 5000, "too long"),
        ]:
            result = self.run_twistd("--port", LOOPBACK, env={"GRACEFUL_LISTENERS": value})
            self.assertClearError(result, "GRACEFUL_LISTENERS", message)

    def test_inherited_fd_not_listening(self):
        a, b = socket.socketpair()
        with open(os.devnull) as devnull, a, b:
            fd = devnull.fileno()
            result = self.run_twistd(
                "--port", LOOPBACK, env={"GRACEFUL_LISTENERS": f"http={fd}," + OTHERS},
                pass_fds=(fd,))
            self.assertClearError(result, "GRACEFUL_LISTENERS", f"fd {fd} is not a socket")
            result = self.run_twistd(
                "--port", LOOPBACK, env={"GRACEFUL_LISTENERS": f"http={a.fileno()}," + OTHERS},
                pass_fds=(a.fileno(),))
            self.assertClearError(result, "GRACEFUL_LISTENERS", "not listening")

    def test_garbage_ready_fd(self):
        names = listener_names()
        listeners = [socket.socket() for _ in names]
        for sock in listeners:
            self.addCleanup(sock.close)
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        fds = tuple(sock.fileno() for sock in listeners)
        inherited = {"GRACEFUL_LISTENERS": ",".join(f"{n}={fd}" for n, fd in zip(names, fds))}

        def run(**env):
            with open(os.devnull, "w") as devnull:
                return self.run_twistd("--port", LOOPBACK, pass_fds=fds + (devnull.fileno(),),
                                       env=dict(inherited, **{k: v.replace("DEVNULL", str(
                                           devnull.fileno())) for k, v in env.items()}))

        self.assertClearError(run(GRACEFUL_READY_FD="x"), "GRACEFUL_READY_FD",
                              "not a file descriptor number")
        self.assertClearError(run(GRACEFUL_READY_FD="DEVNULL"), "GRACEFUL_READY_FD", "not a pipe")
        self.assertClearError(run(), "GRACEFUL_READY_FD is missing")
        self.assertClearError(run(GRACEFUL_GENERATION="-1"), "GRACEFUL_GENERATION")
        self.assertClearError(run(GRACEFUL_READY_TIMEOUT="soon"), "GRACEFUL_READY_TIMEOUT")
