"""
Real processes for end-to-end tests: start C{twistd}, read its output line by
line, signal it, and wait for state, never for a fixed time: the status file
C{<pidfile>.status.json} (each generation's state, listeners, last upgrade,
drain report), the pidfile, a port answering, a process gone. The output is
for assertions on what an operator reads, not for synchronisation.
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from twisted_graceful.pidfile import pid_alive  # noqa: F401 (tests import it from here)
from twisted_graceful.statusfile import STATUS_SUFFIX, read_status

# The twistd script installed with this interpreter (a `twistd` found on PATH
# may be a version manager's shell shim, which this interpreter cannot run).
_BESIDE = os.path.join(os.path.dirname(sys.executable), "twistd")
TWISTD = _BESIDE if os.path.exists(_BESIDE) else shutil.which("twistd")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTENING = re.compile(r"pid (\d+) generation (\d+): (?:listening on|inherited) (.*)$")
DEFAULT_TIMEOUT = 30.0
# Seconds one upgrade (the next generation's start-up) may take on a loaded
# machine: PyPy starts a generation in 3 to 5 s (docs/benchmarks.md). A slow
# request that must outlast upgrades is that much longer.
START_UP = 5 if sys.implementation.name == "pypy" else 1
MARKER_ENV = "GRACEFUL_TEST_SERVER"
SETTLED_STATES = ("serving", "draining", "shutting-down", "exited")

# A signal ignored by a process is still ignored by the program it execs: a
# suite started in the background (`cmd &` in a script, nohup) ignores
# SIGINT and SIGQUIT (and SIGHUP), and so would every server it starts,
# which Twisted then leaves ignored (a SIGINT handler is installed only where
# Python installed its own). A server started by a shell in the foreground,
# or by a service manager, has every signal at its default: start ours that
# way, through this trampoline, which resets what this interpreter ignores,
# as Twisted's spawnProcess does for a child, then execs the command (same
# pid).
_DEFAULT_SIGNALS = (
    "import os, signal, sys\n"
    "for signum in signal.valid_signals():\n"
    "    if signal.getsignal(signum) == signal.SIG_IGN:\n"
    "        signal.signal(signum, signal.SIG_DFL)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def with_default_signals(argv):
    """
    C{argv} run with every signal at its default disposition, whatever this
    process ignores (see L{_DEFAULT_SIGNALS}); the process keeps its pid.
    """
    return [sys.executable, "-I", "-S", "-c", _DEFAULT_SIGNALS] + list(argv)


class ServerProcess:
    """
    One C{twistd} command line and every generation it becomes. All
    generations share our stdout pipe: the first writes to it, the next ones
    through the first until they are ready, then directly.
    """

    def __init__(self, testcase, args, cwd=None, env=None, daemon=False, twistd_args=()):
        self.testcase = testcase
        self.cwd = cwd or os.path.abspath(testcase.mktemp())
        os.makedirs(self.cwd, exist_ok=True)
        self.pidfile = os.path.join(self.cwd, "twistd.pid")
        self.logfile = os.path.join(self.cwd, "twistd.log")
        self.daemon = daemon
        command = [sys.executable, TWISTD]
        if not daemon:
            command.append("--nodaemon")
        command += ["--pidfile", self.pidfile]
        if daemon:
            command += ["--logfile", self.logfile]
        command += list(twistd_args) + with_ephemeral_listeners(list(args))
        self.command = command
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        # What a server leaves in its temporary directory (a master killed by
        # the cleanup cannot remove its metrics directory) goes with the test's.
        self.env["TMPDIR"] = self.cwd
        # The processes run this working tree's code (the installed plugin
        # file only names the module).
        self.env["PYTHONPATH"] = os.pathsep.join(
            [REPO] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p])
        # Every generation inherits our environment: this marks the
        # processes of this server, whoever their parent is now.
        self.marker = f"{os.getpid()}-{id(self)}-{time.monotonic_ns()}"
        self.env[MARKER_ENV] = self.marker
        self.lines = []
        self._cond = threading.Condition()
        self._eof = False
        self.pids = set()
        self.proc = None
        self._log_pos = 0

    def start(self):
        self.proc = subprocess.Popen(
            with_default_signals(self.command), cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.testcase.addCleanup(self.kill_all)
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        if self.daemon:
            threading.Thread(target=self._follow_log, daemon=True).start()
        return self

    def _read(self, stream):
        for raw in iter(stream.readline, b""):
            self._add(raw.decode("utf-8", "replace").rstrip("\n"))
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _follow_log(self):
        # A daemon logs to a file: follow it like tail -f, until every
        # generation is gone.
        deadline = time.monotonic() + 600
        buf = b""
        while time.monotonic() < deadline:
            try:
                with open(self.logfile, "rb") as f:
                    f.seek(self._log_pos)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                self._log_pos += len(chunk)
                buf += chunk
                *complete, buf = buf.split(b"\n")
                for raw in complete:
                    self._add(raw.decode("utf-8", "replace"))
            elif self._stopped_following():
                return
            else:
                time.sleep(0.05)  # polling a file; no event to wait on

    def _stopped_following(self):
        return getattr(self, "_stop_follow", False)

    def _add(self, line):
        with self._cond:
            self.lines.append(line)
            m = LISTENING.search(line)
            if m:
                self.pids.add(int(m.group(1)))
            self._cond.notify_all()

    # --- waiting ----------------------------------------------------------
    def wait_for(self, pattern, timeout=DEFAULT_TIMEOUT, start=0):
        """
        Wait for a line matching C{pattern} (a regex) at index >= C{start};
        return (index, match). Tests synchronise on state (the status file,
        the pidfile, a port, a process gone), not on the wording of a line:
        see L{assert_output}.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.lines):
                    m = regex.search(self.lines[index])
                    if m:
                        return index, m
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._eof and not self.daemon):
                    raise AssertionError(
                        f"no line matching {pattern!r} within {timeout} s; output:\n"
                        + self.output()
                    )
                self._cond.wait(remaining)

    def count(self, pattern):
        regex = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if regex.search(line))

    def output(self, last=80):
        with self._cond:
            return "\n".join(self.lines[-last:])

    def assert_output(self, pattern, timeout=10.0):
        """
        What an operator reads: a line matching C{pattern} is in the output.
        Not a way to wait for an event: synchronise on state first (the line
        was written before the state changed, but our pipe may deliver it a
        moment later, hence the short C{timeout}); return (index, match).
        """
        return self.wait_for(pattern, timeout)

    # --- waiting on state -------------------------------------------------
    def wait_status(self, find, what, timeout=DEFAULT_TIMEOUT):
        """
        Read the status file until C{find(entries)} (pid -> status entry)
        returns something true; return it. C{what} says what we waited for,
        if it never comes.
        """
        deadline = time.monotonic() + timeout
        while True:
            entries = self.status()
            found = find(entries)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: not in the status file {self.pidfile}{STATUS_SUFFIX} after "
                    f"{timeout} s; states {describe_states(entries)}; output:\n" + self.output())
            time.sleep(0.02)  # the status file is written by other processes

    def wait_entry(self, pid, predicate, what, timeout=DEFAULT_TIMEOUT):
        """
        Wait until the status entry of C{pid} satisfies C{predicate}; return
        the entry. Fails at once if C{pid} is gone without it.
        """
        def find(entries):
            entry = entries.get(pid)
            if entry is not None and predicate(entry):
                return entry
            if not pid_alive(pid):
                # Gone: its last write is in the file already.
                entry = self.status().get(pid)
                if entry is not None and predicate(entry):
                    return entry
                raise AssertionError(
                    f"pid {pid} is gone and its status entry never showed {what}: {entry}\n"
                    + self.output())
            return None

        return self.wait_status(find, f"pid {pid}: {what}", timeout)

    def _newest(self, entries, predicate):
        matches = [e for e in entries.values() if predicate(e)]
        if not matches:
            return None
        entry = max(matches, key=lambda e: e.get("started_at") or 0)
        self.pids.add(entry["pid"])
        return entry

    def wait_listening(self, generation=1, timeout=DEFAULT_TIMEOUT):
        """
        Wait until C{generation} serves on its listeners (its status entry
        says so); return (pid, ports) where ports maps listener name -> port
        number (or unix path).
        """
        entry = self.wait_status(
            lambda entries: self._newest(entries, lambda e: e.get("generation") == generation
                                         and e.get("serving_since") and e.get("listeners")),
            f"generation {generation} serving", timeout)
        return entry["pid"], listener_ports(entry)

    def wait_ready(self, generation=1, timeout=DEFAULT_TIMEOUT):
        """
        Wait until C{generation} serves (it took over, the pidfile names it,
        and it accepts); return its pid.
        """
        return self.wait_listening(generation, timeout)[0]

    def wait_handover(self, old_generation, timeout=DEFAULT_TIMEOUT):
        """
        Wait until C{old_generation} has stopped accepting and handed over
        (its status entry: last upgrade ok, draining or later); return the
        successor's pid.
        """
        entry = self.wait_status(
            lambda entries: self._newest(
                entries, lambda e: e.get("generation") == old_generation
                and (e.get("last_upgrade") or {}).get("result") == "ok"
                and e.get("state") in ("draining", "shutting-down", "exited")),
            f"generation {old_generation} handed over", timeout)
        child = entry["last_upgrade"]["child_pid"]
        self.pids.add(child)
        return child

    def wait_exit_line(self, pid, timeout=DEFAULT_TIMEOUT):
        """
        Wait until C{pid} has drained and is exiting (state C{exited});
        return its status entry (whose C{drain} is the drain's report).
        """
        return self.wait_entry(pid, lambda e: e.get("state") == "exited", "state exited",
                               timeout)

    def wait_state(self, pid, *states, timeout=DEFAULT_TIMEOUT):
        """
        Wait until C{pid}'s state is one of C{states}; return its entry.
        """
        return self.wait_entry(pid, lambda e: e.get("state") in states,
                               f"state in {states}", timeout)

    def wait_upgrade_outcome(self, pid, changed_from=None, timeout=DEFAULT_TIMEOUT):
        """
        Wait until C{pid} records the outcome of an upgrade (other than
        C{changed_from}, the C{last_upgrade} read before the signal); return
        it: result (ok, failed, timeout), child_pid, error, output_tail.
        """
        return self.wait_entry(
            pid, lambda e: e.get("last_upgrade") and e["last_upgrade"] != changed_from,
            "a new upgrade outcome", timeout)["last_upgrade"]

    def wait_child(self, pid, timeout=DEFAULT_TIMEOUT):
        """
        Wait until C{pid} is upgrading and has spawned its next generation;
        return the child's pid.
        """
        entry = self.wait_entry(pid, lambda e: e.get("state") == "upgrading" and e.get("child"),
                                "a child being started", timeout)
        child = entry["child"]["pid"]
        self.pids.add(child)
        return child

    def wait_inflight(self, pid, count=1, protocol="http", timeout=DEFAULT_TIMEOUT):
        """
        Wait until C{pid}, the generation accepting, has C{count} connections
        inside a transaction (an HTTP request being handled) by its metrics:
        C{graceful_inflight_transactions} on its C{metrics} listener.
        """
        port = listener_ports(self.wait_entry(pid, lambda e: "metrics" in e.get("listeners", {}),
                                              "a metrics listener"))["metrics"]
        deadline = time.monotonic() + timeout
        while True:
            status = json.loads(http_get(port, "/status")[1])
            if status["pid"] != pid:
                raise AssertionError(f"the metrics port is answered by pid {status['pid']}, "
                                     f"not {pid}: wait for requests in flight before upgrading")
            value = metric_value(http_get(port, "/metrics")[1], "graceful_inflight_transactions",
                                 protocol=protocol)
            if value is not None and value >= count:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"pid {pid}: {value} {protocol} transaction(s) in flight, "
                                     f"waited for {count}\n" + self.output())
            time.sleep(0.02)  # scraping another process's metrics

    def wait_all_exited(self, timeout=DEFAULT_TIMEOUT):
        """
        Wait until every generation has exited (our stdout pipe reaches EOF
        only when the last process holding it is gone) and check no PID we
        saw is still alive.
        """
        if self.daemon:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and (
                    self.live_processes(zygotes=True) or any(pid_alive(p) for p in self.pids)):
                time.sleep(0.05)  # no pipe to a daemon: poll its processes
        else:
            with self._cond:
                deadline = time.monotonic() + timeout
                while not self._eof:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise AssertionError("processes still running; output:\n" + self.output())
                    self._cond.wait(remaining)
            self.proc.wait(timeout)
        # A process has closed its stdout a moment before it is gone.
        deadline = time.monotonic() + timeout
        while (self.live_processes(zygotes=True) or any(pid_alive(p) for p in self.pids)) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        alive = sorted(self.live_processes(zygotes=True) | {p for p in self.pids if pid_alive(p)})
        if alive:
            raise AssertionError(f"left behind: {alive}\n" + self.output())
        self._stop_follow = True

    # --- acting -----------------------------------------------------------
    def read_pidfile(self):
        with open(self.pidfile) as f:
            return int(f.read().strip())

    def wait_pidfile(self, expected=None, timeout=DEFAULT_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid = self.read_pidfile()
                if expected is None or pid == expected:
                    return pid
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"pidfile {self.pidfile} never named {expected}; output:\n"
                                     + self.output())
            time.sleep(0.02)  # a file has no event to wait on

    def wait_path(self, path, timeout=DEFAULT_TIMEOUT):
        """
        Wait until C{path} exists (a file the application writes).
        """
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} did not appear within {timeout} s; output:\n"
                                     + self.output())
            time.sleep(0.02)  # a file has no event to wait on

    def wait_gone(self, pid, timeout=DEFAULT_TIMEOUT):
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"pid {pid} still alive after {timeout} s; output:\n"
                                     + self.output())
            time.sleep(0.01)  # no event tells us another process is gone

    # --- state --------------------------------------------------------------
    def live_processes(self, zygotes=False):
        """
        The PIDs of every process of this server that is alive now (found by
        the marker in their environment, not by parentage: an old generation
        may have been re-parented to init); a master's zygote, which serves
        nothing, only with C{zygotes}.
        """
        needle = f"{MARKER_ENV}={self.marker}".encode()
        found = set()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.add(int(name))
            except OSError:
                continue
        if not zygotes:
            found -= self.zygotes()
        return {pid for pid in found if pid_alive(pid)}

    def zygotes(self):
        """
        The zygotes the status file names (a master's, that forks its workers).
        """
        return {entry["zygote"] for entry in self.status().values() if entry.get("zygote")}

    def status(self):
        """
        The status file's entries: pid -> entry.
        """
        doc = read_status(self.pidfile + ".status.json") or {"processes": {}}
        return {int(pid): entry for pid, entry in doc["processes"].items()}

    def wait_settled(self, timeout=DEFAULT_TIMEOUT, changed_from=None, serving=False):
        """
        Wait until no upgrade is in progress or scheduled in any live process
        of this server and each has said what it is doing (and, with
        C{changed_from}, the pidfile names another pid than that; with
        C{serving}, some process serves); return (the pidfile's pid or None,
        live pids, status entries).
        """
        deadline = time.monotonic() + timeout
        while True:
            live = self.live_processes()
            entries = self.status()
            try:
                current = self.read_pidfile()
            except (OSError, ValueError):
                current = None
            unsettled = [
                pid for pid in live
                if pid not in entries or entries[pid].get("state") not in SETTLED_STATES
                or entries[pid].get("scheduled_upgrade")
            ]
            if not unsettled and (current in live or (not live and not serving)) and (
                    changed_from is None or current != changed_from):
                return current, live, entries
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not settled after {timeout} s: live {sorted(live)}, pidfile {current}, "
                    f"unsettled {unsettled}, states "
                    f"{ {p: entries.get(p, {}).get('state') for p in live} }\n" + self.output())
            time.sleep(0.05)  # several processes' state: nothing single to wait on

    def request_upgrade(self, pid, timeout=DEFAULT_TIMEOUT):
        """
        SIGHUP to C{pid}, and wait until it has answered the request (its
        status entry counts requests); return its answer (C{started},
        C{scheduled}, C{refused}), or None if C{pid} exited first.
        """
        before = self.status().get(pid, {}).get("upgrade_requests", 0)
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return None
        deadline = time.monotonic() + timeout
        while True:
            alive = pid_alive(pid)
            # Read after checking it is alive: a process that answered, then
            # exited, wrote its answer first.
            entry = self.status().get(pid, {})
            if entry.get("upgrade_requests", 0) > before:
                return entry["last_request"]["answer"]
            if not alive:
                return None
            if time.monotonic() > deadline:
                raise AssertionError(f"pid {pid} did not answer SIGHUP\n" + self.output())
            time.sleep(0.01)  # the status file is written by another process

    def assert_only_current_accepts(self, port, current, requests=12):
        """
        Fresh connections are all answered by C{current}, and every other
        live process of the server drains (invariant 1); the pidfile names
        C{current} (invariant 2).
        """
        answers = [pid_in(http_get(port)[1]) for _ in range(requests)]
        self.testcase.assertEqual(set(answers), {current}, self.output(30))
        entries = self.status()
        for pid in self.live_processes() - {current}:
            self.testcase.assertIn(entries.get(pid, {}).get("state"),
                                   ("draining", "shutting-down", "exited"),
                                   f"pid {pid} is alive beside current pid {current}")
        self.testcase.assertEqual(self.read_pidfile(), current)

    def assert_all_gone_within(self, seconds, after="SIGTERM"):
        """
        Every process of this server exits within C{seconds} of C{after}
        (invariant 4).
        """
        deadline = time.monotonic() + seconds
        while self.live_processes(zygotes=True):
            if time.monotonic() > deadline:
                raise AssertionError(f"still alive {seconds} s after {after}: "
                                     f"{sorted(self.live_processes(zygotes=True))}\n"
                                     + self.output())
            time.sleep(0.05)

    def signal(self, pid, sig):
        os.kill(pid, sig)

    def kill_all(self):
        # Only processes that carry our marker (a pid we saw may have exited
        # and been reused), and our own child.
        for pid in self.live_processes(zygotes=True) | ({self.proc.pid} if self.proc else set()):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            if self.proc.stdout:
                self.proc.stdout.close()
        self._stop_follow = True


_graceful_options = None


def graceful_options():
    """
    The options `twistd graceful` accepts (read once from its --help).
    """
    global _graceful_options
    if _graceful_options is None:
        out = subprocess.run(
            [sys.executable, TWISTD, "graceful", "--help"], capture_output=True, text=True,
            env=dict(os.environ, PYTHONPATH=REPO), timeout=60,
        ).stdout
        _graceful_options = set(re.findall(r"--([a-z][a-z-]+)=", out))
    return _graceful_options


def with_ephemeral_listeners(args):
    """
    Give every listener of `graceful` that the test did not name an
    ephemeral loopback port, so tests never depend on 8025 or 9090 being free,
    and run without a master unless the test asks for workers.
    """
    if not args or args[0] != "graceful":
        return args
    for option in ("txn-port", "metrics-port"):
        if option in graceful_options() and f"--{option}" not in args:
            args += [f"--{option}", "tcp:0:interface=127.0.0.1"]
    # Tests of the self-replacing process say so; tests of the master and its
    # workers pass --workers.
    if "workers" in graceful_options() and "--workers" not in args:
        args += ["--workers", "0"]
    return args


def http_get(port, path="/", timeout=10.0, host="127.0.0.1", method="GET", body=None,
             headers=None):
    """
    One request on a fresh connection; return (status, body text, headers).
    """
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read().decode("utf-8", "replace")
        return response.status, data, dict(response.getheaders())
    finally:
        conn.close()


def wait_tcp_listening(port, pid, output=lambda: "", timeout=DEFAULT_TIMEOUT, udp=False):
    """
    Wait until C{pid} holds a TCP socket listening on C{port} (read in
    C{/proc/<pid>/net/tcp} and C{tcp6}; connecting to find out could be what
    the test is about, as with socket activation); with C{udp}, a UDP socket
    bound to it (C{udp}, C{udp6}: socket activation of a datagram socket
    starts the server on the first datagram).
    """
    deadline = time.monotonic() + timeout
    tables = ("udp", "udp6") if udp else ("tcp", "tcp6")
    while True:
        listening = set()  # inodes of the sockets listening on the port
        for table in tables:
            try:
                with open(f"/proc/{pid}/net/{table}") as f:
                    rows = f.read().splitlines()[1:]
            except OSError:
                rows = []
            for row in rows:
                fields = row.split()
                if (udp or fields[3] == "0A") and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    listening.add(f"socket:[{fields[9]}]")
        if listening:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                fds = []
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in listening:
                        return
                except OSError:
                    continue
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on port {port} after {timeout} s; output:\n"
                                 + output())
        time.sleep(0.02)  # a socket table has no event to wait on


def listener_ports(entry):
    """
    listener name -> port number (or unix path), from a status entry's
    listener descriptions (C{tcp:127.0.0.1:8080}, C{tcp6:[::1]:8080},
    C{unix:/run/app.sock}).
    """
    ports = {}
    for name, where in entry["listeners"].items():
        if where.startswith("unix:"):
            ports[name] = where[5:]
        else:
            ports[name] = int(where.rsplit(":", 1)[1])
    return ports


def describe_states(entries):
    return {pid: (e.get("generation"), e.get("state")) for pid, e in sorted(entries.items())}


def metric_value(text, name, **labels):
    """
    The value of the sample C{name{labels}} in Prometheus text, or None.
    """
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))).strip(
                ",") == wanted:
            return float(m.group(3))
    return None


def pid_in(body):
    m = re.search(r"pid (\d+)", body)
    return int(m.group(1)) if m else None


def short_temp_dir(testcase):
    """
    A new directory with a short path, removed after the test: AF_UNIX socket
    paths hold at most 107 bytes (docs/design.md, fact 23), and a clone at an ordinary path (say
    /home/<user>/src/...) puts trial's _trial_temp beyond that.
    """
    base = "/tmp" if os.path.isdir("/tmp") else None
    path = tempfile.mkdtemp(prefix="tg-", dir=base)
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TAC = """
from twisted.application import service
from twisted.internet import defer, reactor
from twisted_graceful import GracefulService, GracefulSite, metrics, self_test_request
from twisted_graceful.hello import HelloResource, ServerIdentity

{fault}

application = service.Application("graceful-tac")
graceful = GracefulService(reactor, pidfile={pidfile!r}, ready_timeout={ready_timeout},
                           backoff_base=0.2)
site = GracefulSite(HelloResource(reactor, ServerIdentity(graceful), slow_every=0),
                    drain_tracker=graceful.tracker)
graceful.add_listener("http", "tcp:0:interface=127.0.0.1", site)
{status}
graceful.add_readiness_check(lambda: self_test_request(reactor, site))
{readiness}
graceful.setServiceParent(application)
"""


class TacApp:
    """
    A .tac application using the library, run by `twistd -y`. Each deploy()
    rewrites it, as a deploy of new code would: the next generation runs it.
    """

    def __init__(self, testcase, with_metrics=False, ready_timeout=3):
        self.testcase = testcase
        self.cwd = os.path.abspath(testcase.mktemp())
        os.makedirs(self.cwd)
        self.tac = os.path.join(self.cwd, "app.tac")
        self.pidfile = os.path.join(self.cwd, "twistd.pid")
        self.with_metrics = with_metrics
        self.ready_timeout = ready_timeout

    def deploy(self, fault="", readiness=""):
        """
        @param fault: code that runs first (e.g. a raise: a broken deploy).
        @param readiness: code after the listeners (e.g. a readiness check).
        """
        # The status file (what the tests wait on), with metrics or without.
        status = ('metrics.install(graceful, "tcp:0:interface=127.0.0.1", http_site=site)'
                  if self.with_metrics else
                  "from twisted_graceful.statusfile import StatusFile\nStatusFile(graceful)")
        with open(self.tac, "w") as f:
            f.write(TAC.format(fault=fault, readiness=readiness, pidfile=self.pidfile,
                               ready_timeout=self.ready_timeout, status=status))

    def start(self):
        """
        Deploy the good version and start it; return (server, pid, ports).
        """
        self.deploy()
        server = ServerProcess(self.testcase, ["--python", self.tac], cwd=self.cwd).start()
        pid, ports = server.wait_listening()
        server.wait_ready(1)
        return server, pid, ports


def run_twistd(testcase, *args, env=None, pass_fds=()):
    """
    C{twistd --nodaemon graceful ARGS} in a new directory, to its end;
    return the L{subprocess.CompletedProcess} (text output captured).
    """
    cwd = os.path.abspath(testcase.mktemp())
    os.makedirs(cwd)
    environment = dict(os.environ)
    environment["PYTHONPATH"] = REPO
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, TWISTD, "--nodaemon", "--pidfile", os.path.join(cwd, "t.pid")]
        + with_ephemeral_listeners(["graceful"] + list(args)),
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=60,
        pass_fds=pass_fds,
    )


class ClearErrorMixin:
    """
    For tests of bad input: the command failed, said so in words containing
    each fragment, and printed no traceback.
    """

    def assertClearError(self, result, *fragments):
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        for fragment in fragments:
            self.assertIn(fragment, output)


def unless_required(reason):
    """
    Why a test of a real server (PostgreSQL, HAProxy) cannot run here, or
    L{None}; with C{GRACEFUL_REQUIRE_SERVERS} set (as .ci/run does), a missing
    server is an error instead of a skip.
    """
    if reason and os.environ.get("GRACEFUL_REQUIRE_SERVERS"):
        raise RuntimeError(f"GRACEFUL_REQUIRE_SERVERS is set (as .ci/run does) but {reason}")
    return reason
