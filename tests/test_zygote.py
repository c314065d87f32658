"""
The zygote's parts that need no master: which commands it can run, when
its imports are stale, how a worker's descriptors are put in place, the
master's side of the protocol against a zygote that misbehaves, and the
reaping of re-parented strays. The whole thing, with real masters, is in
tests/test_zygote_e2e.py.
"""

import json
import os
import socket
import sys
import tempfile
import threading
import time
import types

from twisted.trial import unittest

from twisted_graceful import zygote


class CommandTests(unittest.TestCase):
    def test_a_script_run_by_the_interpreter(self):
        self.assertEqual(zygote.program_of("/py", ["/py", "/bin/twistd", "-n"]), "/bin/twistd")

    def test_what_a_zygote_cannot_run(self):
        self.assertIsNone(zygote.program_of("/py", ["/py", "-m", "twisted"]))
        self.assertIsNone(zygote.program_of("/py", ["/other", "/bin/twistd"]))
        self.assertIsNone(zygote.program_of("/py", ["/py"]))

    def test_the_zygote_runs_the_same_interpreter(self):
        executable, args = zygote.zygote_command("/py", "/bin/twistd", tls=True)
        self.assertEqual(executable, "/py")
        self.assertEqual(args, ["/py", "-m", "twisted_graceful.zygote", "/bin/twistd", "--tls"])

    def test_the_interpreters_environment(self):
        env = {"PYTHONPATH": "/x", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8", "LC_ALL": "C",
               "HOME": "/root", "GRACEFUL_ROLE": "worker"}
        self.assertEqual(zygote.interpreter_environment(env),
                         {"PYTHONPATH": "/x", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8",
                          "LC_ALL": "C"})


class StaleTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "lib.py")
        with open(self.path, "w") as f:
            f.write("x = 1\n")
        module = types.ModuleType("lib")
        module.__file__ = self.path
        self.modules = {"lib": module, "builtin": types.ModuleType("builtin")}

    def test_nothing_changed(self):
        before = zygote.snapshot(self.modules)
        self.assertIn(self.path, before)
        self.assertIsNone(zygote.changed_since(before))

    def test_a_file_rewritten(self):
        before = zygote.snapshot(self.modules)
        with open(self.path, "w") as f:
            f.write("x = 2\n")  # same size; another mtime/ctime
        os.utime(self.path, ns=(0, 0))
        self.assertEqual(zygote.changed_since(before), self.path)

    def test_a_file_replaced_by_rename(self):
        before = zygote.snapshot(self.modules)
        stat = os.stat(self.path)
        new = self.path + ".new"
        with open(new, "w") as f:
            f.write("x = 1\n")
        os.utime(new, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or an unpacker
        os.rename(new, self.path)
        self.assertEqual(zygote.changed_since(before), self.path)

    def test_a_file_removed(self):
        before = zygote.snapshot(self.modules)
        os.remove(self.path)
        self.assertEqual(zygote.changed_since(before), self.path)

    def test_extra_files(self):
        other = os.path.join(self.dir, "program")
        with open(other, "w") as f:
            f.write("#!/bin/sh\n")
        before = zygote.snapshot({}, extra=(other,))
        with open(other, "a") as f:
            f.write("exit 0\n")
        self.assertEqual(zygote.changed_since(before), other)


class RequestTests(unittest.TestCase):
    def setUp(self):
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(self.ours.close)
        self.addCleanup(theirs.close)
        self.program = os.path.abspath(__file__)
        self.env = {"PYTHONPATH": "/a", "HOME": "/root"}
        self.server = zygote.ZygoteServer(theirs, sys.executable, self.program, self.env)
        self.patch(zygote, "why_unusable", lambda: None)  # trial runs a reactor and threads

    def request(self, **changes):
        request = {"executable": sys.executable, "args": [sys.executable, self.program, "-n"],
                   "env": dict(self.env, GRACEFUL_ROLE="worker"), "path": "/", "fds": [0, 1]}
        request.update(changes)
        return request

    def test_a_request_it_can_fork(self):
        self.assertIsNone(self.server.why_not(self.request()))

    def test_another_interpreter(self):
        self.assertIn("the interpreter is /other",
                      self.server.why_not(self.request(executable="/other")))

    def test_another_program(self):
        why = self.server.why_not(self.request(args=[sys.executable, "/bin/other"]))
        self.assertIn("/bin/other", why)

    def test_another_interpreter_environment(self):
        why = self.server.why_not(self.request(env={"PYTHONPATH": "/b"}))
        self.assertIn("environment", why)

    def test_a_changed_file(self):
        self.server.files[self.program] = ("not", "this")
        why = self.server.why_not(self.request())
        self.assertEqual(why, f"{self.program} changed since the zygote imported it")

    def test_descriptors_that_do_not_match(self):
        reply = self.server.handle(self.request(), [5])
        self.assertIn("1 descriptors for 2 + 1", reply["refused"])
        self.assertNotIn("pid", reply)


class UnusableTests(unittest.TestCase):
    def test_a_zygote_with_a_reactor(self):
        self.patch(zygote, "threads", lambda: 1)
        self.assertEqual(zygote.why_unusable({"twisted.internet.reactor": object()}),
                         "a preloaded module installed a reactor")

    def test_a_zygote_with_threads(self):
        self.patch(zygote, "threads", lambda: 3)
        self.assertIn("it runs 3 threads", zygote.why_unusable({}))

    def test_a_zygote_that_can_fork(self):
        self.patch(zygote, "threads", lambda: 1)
        self.assertIsNone(zygote.why_unusable({}))

    def test_the_kernel_counts_the_threads(self):
        started = threading.Event()
        done = threading.Event()
        thread = threading.Thread(target=lambda: (started.set(), done.wait(10)))
        thread.start()
        started.wait(10)
        try:
            self.assertGreaterEqual(zygote.threads(), 2)
        finally:
            done.set()
            thread.join(10)

    def test_mapped_libraries_are_in_the_snapshot(self):
        snap = zygote.snapshot({})
        self.assertTrue(any("libc" in os.path.basename(p) for p in snap), sorted(snap)[:20])


class FakeZygote:
    """
    The zygote's end of the socket, answering with C{reply(request, fds)}.
    """

    def __init__(self, reply):
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.reply = reply
        self.requests = []
        self.ours.sendall(json.dumps({"ready": 1}).encode())
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        message, fds, _, _ = socket.recv_fds(self.ours, 1 << 20, 64)
        request = json.loads(message)
        self.requests.append((request, len(fds)))
        answer = self.reply(request, fds)
        for fd in fds:
            os.close(fd)
        if answer is not None:
            self.ours.sendall(json.dumps(answer).encode())

    def master_side(self):
        z = zygote.Zygote(None, sys.executable, "/bin/twistd", {}, "/")
        z.sock = self.theirs
        return z


class MasterSideTests(unittest.TestCase):
    def fork(self, fake):
        z = fake.master_side()
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        try:
            return z, z.fork(sys.executable, [sys.executable, "/bin/twistd"], {"A": "b"}, "/",
                             {0: r, 1: w})
        finally:
            fake.thread.join(10)
            fake.ours.close()

    def test_a_stale_zygote_is_stopped(self):
        fake = FakeZygote(lambda request, fds: {"refused": "lib.py changed", "stale": True})
        with self.assertRaises(zygote.ZygoteUnavailable) as caught:
            self.fork(fake)
        self.assertEqual(str(caught.exception), "lib.py changed")
        request, nfds = fake.requests[0]
        self.assertEqual(request["fds"], [0, 1])
        self.assertEqual(nfds, 3)  # and the go pipe
        self.assertEqual(request["env"], {"A": "b"})

    def test_a_refusal_that_is_not_staleness_keeps_it(self):
        fake = FakeZygote(lambda request, fds: {"refused": "bad request: x"})
        z = fake.master_side()
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        with self.assertRaises(zygote.ZygoteUnavailable):
            z.fork(sys.executable, [sys.executable, "/bin/twistd"], None, None, {0: r})
        self.assertFalse(z.gone)
        fake.thread.join(10)
        z.sock.close()
        fake.ours.close()

    def test_a_zygote_that_does_not_answer(self):
        self.patch(zygote, "FORK_TIMEOUT", 0.2)
        fake = FakeZygote(lambda request, fds: None)
        with self.assertRaises(zygote.ZygoteUnavailable) as caught:
            self.fork(fake)
        self.assertIn("did not answer", str(caught.exception))

    def test_a_pid_that_is_not_our_child(self):
        go = {}

        def reply(request, fds):
            go["fd"] = os.dup(fds[-1])
            return {"pid": 1}

        fake = FakeZygote(reply)
        with self.assertRaises(zygote.ZygoteUnavailable) as caught:
            self.fork(fake)
        self.assertIn("pid 1 is not our child", str(caught.exception))
        # The fork the master gave up on is told not to go on.
        self.assertEqual(os.read(go["fd"], 1), b"")
        os.close(go["fd"])

    def test_a_zygote_still_importing(self):
        z = zygote.Zygote(None, sys.executable, "/bin/twistd", {}, "/")
        ours, z.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(ours.close)
        self.addCleanup(z.sock.close)
        with self.assertRaises(zygote.ZygoteUnavailable) as caught:
            z.fork(sys.executable, [sys.executable, "/bin/twistd"], None, None, {})
        self.assertIn("still importing", str(caught.exception))


class PlaceDescriptorsTests(unittest.TestCase):
    def test_each_descriptor_at_its_number_and_nothing_else(self):
        """
        In a forked child: the worker's descriptors (one of them already at
        another's target number) end up at their targets, the go pipe above
        them, every other descriptor closed.
        """
        out_r, out_w = os.pipe()
        extra_r, extra_w = os.pipe()
        go_r, go_w = os.pipe()
        stray = os.open(os.devnull, os.O_RDONLY)
        pid = os.fork()
        if pid == 0:
            try:
                # fd 1 is out_w; fd 4 is extra_w; out_w's own number may be 4's target.
                go = zygote._place_fds([1, 4], [out_w, extra_w, go_r])
                open_fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
                os.write(1, json.dumps({"open": open_fds, "go": go}).encode())
                os.write(4, b"four")
                os._exit(0)
            except BaseException:
                os._exit(1)
        for fd in (out_w, extra_w, go_r, stray):
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        os.close(go_w)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        report = json.loads(os.read(out_r, 4096))
        self.assertEqual(os.read(extra_r, 4096), b"four")
        os.close(out_r)
        os.close(extra_r)
        self.assertEqual(report["go"], 5)
        self.assertTrue({1, 4, 5} <= set(report["open"]), report)
        # listdir's own descriptor shows; nothing else may.
        self.assertLessEqual(len(set(report["open"]) - {1, 4, 5}), 1, report)


class StrayTests(unittest.TestCase):
    def exited_child(self, code):
        pid = os.fork()
        if pid == 0:
            os._exit(code)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        return pid

    def test_a_stray_is_reaped(self):
        pid = self.exited_child(5)
        self.assertEqual(zygote.reap_strays(lambda: set()), [pid])
        with self.assertRaises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

    def test_a_known_child_is_left_to_its_reaper(self):
        pid = self.exited_child(6)
        self.assertEqual(zygote.reap_strays(lambda: {pid}), [])
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 6)

    def test_no_children(self):
        self.assertEqual(zygote.reap_strays(lambda: set()), [])


class FakeMasterZygote:
    """
    Stands for L{zygote.Zygote} in the master: started, ready, refusing or
    dying as a test says.
    """

    started = []

    def __init__(self, reactor, executable, program, environ, cwd, tls=False, on_exit=None,
                 on_ready=None):
        self.program, self.tls = program, tls
        self.on_exit, self.on_ready = on_exit, on_ready
        self.pid = 9000 + len(self.started)
        self.gone = False
        self.why_gone = None
        self.unusable = None
        self.ready = False
        self.stopped = None
        self.refusal = None  # (why, stale) for the next fork

    def start(self):
        self.started.append(self)
        return self

    def stop(self, why="stopped", kill=False):
        self.gone, self.stopped, self.why_gone = True, why, why

    def fork(self):
        if self.refusal is not None:
            why, stale = self.refusal
            if stale:
                self.stop(why)
            raise zygote.ZygoteUnavailable(why)


class MasterPolicyTests(unittest.TestCase):
    """
    When the master starts, uses, replaces and stops its zygote (a recorded
    reactor, a fake zygote).
    """

    def setUp(self):
        from twisted_graceful import master as M

        from tests.test_service import FakeProcessTransport, SpawningReactor

        FakeMasterZygote.started = []
        self.patch(zygote, "Zygote", FakeMasterZygote)
        self.patch(zygote, "become_subreaper", lambda: True)
        self.patch(zygote, "supported", lambda: True)
        self.reactor = SpawningReactor()
        self.forked = []
        reactor = self.reactor

        def forking_spawner(z, _reactor):
            def spawn(proto, executable, args, env=None, path=None, childFDs=None):
                z.fork()
                transport = FakeProcessTransport(reactor.next_pid)
                reactor.next_pid += 1
                self.forked.append({"proto": proto, "transport": transport, "zygote": z})
                proto.makeConnection(transport)
                return transport
            return spawn

        self.patch(zygote, "forking_spawner", forking_spawner)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        self.addCleanup(sock.close)
        self.service = M.MasterService(
            self.reactor, {"http": sock}, workers=2, pidfile=os.path.abspath(self.mktemp()),
            environ={"PATH": "/bin"}, install_signal_handlers=False, relay_output=False,
            command=(sys.executable, [sys.executable, "/bin/twistd", "graceful"]), zygote=True)
        self.service.startService()
        self.addCleanup(self.stop)

    def stop(self):
        if self.service.running:
            self.service.stopService()  # its Deferred waits for workers that never exit

    def ready(self, spawned):
        for s in spawned:
            s["proto"].childDataReceived(4, b"READY %d\n" % (s["transport"].pid,))

    def settle(self):
        self.reactor.advance(0)

    def first_set_serves(self):
        """
        The first workers are ready: the master serves and starts its zygote.
        """
        self.ready(self.reactor.spawned)
        self.settle()
        (z,) = FakeMasterZygote.started
        return z

    def retired(self, spawned):
        """
        The old workers say they stopped accepting: the upgrade is over.
        """
        for s in spawned:
            s["proto"].childDataReceived(4, b"STOPPED %d\n" % (s["transport"].pid,))
        self.settle()

    def test_the_first_set_is_spawned_and_a_zygote_follows(self):
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(FakeMasterZygote.started, [])
        z = self.first_set_serves()
        self.assertEqual(z.program, "/bin/twistd")
        self.assertEqual(self.service.master.zygote_pid, z.pid)
        self.assertFalse(self.service.master.zygote_ready)
        z.ready = True  # as Zygote does before it calls on_ready
        z.on_ready(z)
        self.assertTrue(self.service.master.zygote_ready)

    def test_an_upgrade_forks_and_keeps_the_zygote(self):
        z = self.first_set_serves()
        self.assertEqual(self.service.upgrade("SIGHUP"), "started")
        self.assertEqual(len(self.forked), 2)
        self.assertEqual(len(self.reactor.spawned), 2)  # none spawned
        self.ready(self.forked)
        self.settle()
        self.assertEqual(FakeMasterZygote.started, [z])

    def test_a_stale_zygote_spawns_that_upgrade_and_is_replaced_after_it(self):
        z = self.first_set_serves()
        z.refusal = ("lib.py changed since the zygote imported it", True)
        self.service.upgrade("SIGHUP")
        self.assertEqual(len(self.forked), 0)
        self.assertEqual(len(self.reactor.spawned), 4)
        self.assertEqual(z.stopped, "lib.py changed since the zygote imported it")
        self.settle()
        self.assertEqual(len(FakeMasterZygote.started), 1)  # not while upgrading
        self.ready(self.reactor.spawned[2:])
        self.settle()
        self.assertEqual(len(FakeMasterZygote.started), 1)
        self.retired(self.reactor.spawned[:2])
        self.assertEqual(len(FakeMasterZygote.started), 2)

    def test_a_zygote_that_is_not_ready_keeps_it(self):
        z = self.first_set_serves()
        z.refusal = ("the zygote is still importing", False)
        self.service.upgrade("SIGHUP")
        self.assertEqual(len(self.reactor.spawned), 4)
        self.assertFalse(z.gone)
        self.assertIs(self.service.zygote, z)

    def test_a_dead_zygote_is_replaced_at_the_next_event_not_at_once(self):
        z = self.first_set_serves()
        z.gone = True
        z.on_exit(z)
        self.settle()
        self.assertIsNone(self.service.master.zygote_pid)
        self.assertEqual(len(FakeMasterZygote.started), 1)
        self.service.upgrade("SIGHUP")
        self.assertEqual(len(self.reactor.spawned), 4)  # spawned: no zygote
        self.ready(self.reactor.spawned[2:])
        self.retired(self.reactor.spawned[:2])
        self.assertEqual(len(FakeMasterZygote.started), 2)

    def test_a_fault_of_the_zygote_turns_it_off(self):
        z = self.first_set_serves()

        def broken():
            raise OSError("no")

        z.fork = broken
        self.service.upgrade("SIGHUP")
        self.assertEqual(len(self.reactor.spawned), 4)
        self.assertFalse(self.service.use_zygote)
        self.assertTrue(z.gone)
        self.flushLoggedErrors(OSError)
        self.ready(self.reactor.spawned[2:])
        self.retired(self.reactor.spawned[:2])
        self.assertEqual(len(FakeMasterZygote.started), 1)

    def test_shutting_down_stops_it(self):
        z = self.first_set_serves()
        self.service.stopService()
        self.assertTrue(z.gone)
        self.assertIsNone(self.service.master.zygote_pid)


class StrayWithoutWaitidTests(StrayTests):
    """
    The same where the interpreter has no C{os.waitid} (PyPy 7.3.11): the
    zombies among /proc's list of our children.
    """

    def exited_child(self, code):
        pid = os.fork()
        if pid == 0:
            os._exit(code)
        deadline = time.monotonic() + 30
        while zygote.process_state(pid) != "Z":  # exited, not reaped
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.001)
        self.patch(zygote.os, "waitid", None)
        del zygote.os.waitid  # as on PyPy (restored by the patch's cleanup)
        return pid



class StdioTests(unittest.TestCase):
    """
    A forked worker's sys.std* are buffered as a new interpreter's would be:
    with -u (PYTHONUNBUFFERED, Docker's default) a line is written at once,
    and survives an os._exit (a SIGKILL) right after it.
    """

    CODE = ("from twisted_graceful.zygote import _fresh_stdio; _fresh_stdio(); import os, sys; "
            "sys.stderr.write(type(sys.stdout.buffer).__name__ + '\\n'); print('written'); "
            "os._exit(0)")

    def run_child(self, *flags):
        import subprocess

        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
            os.path.abspath(zygote.__file__))))
        env.pop("PYTHONUNBUFFERED", None)
        return subprocess.run([sys.executable, *flags, "-c", self.CODE], capture_output=True,
                              text=True, timeout=60, env=env)

    def test_unbuffered(self):
        result = self.run_child("-u")
        self.assertEqual(result.stderr.strip(), "FileIO")
        self.assertEqual(result.stdout, "written\n")

    def test_buffered_into_a_pipe(self):
        result = self.run_child()
        self.assertEqual(result.stderr.strip(), "BufferedWriter")
        self.assertEqual(result.stdout, "")  # as a new interpreter's: lost by os._exit
