"""
Other servers measured beside ours, on the same machine in the same run
(`python -m bench.workers --only start --peers`): gunicorn, serving a
hello-world WSGI app that says its PID, like ours.

gunicorn is installed (only when --peers is given, never by the test suite)
into the benchmark's own virtualenv under ~/.cache/twisted-graceful-bench/,
with pip, and its bytecode compiled there before anything is timed.

gunicorn's upgrade is USR2: the master forks and re-executes itself (a new
master, with the code now on disk, that inherits the listening socket) and
the new master forks its workers, while the old master and its workers go
on serving (and, its workers waking first, take every connection); the
operator then sends WINCH and QUIT to the old master. Here the old master
gets TERM (its graceful stop) as soon as the new master has written its
pidfile, which it does before forking its workers. What is timed is the
signal to the first answer from a new worker PID, and to every new worker
having answered.
"""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

VENV = os.path.join(os.path.expanduser("~"), ".cache", "twisted-graceful-bench", "venv")
GUNICORN_REQUIREMENT = "gunicorn"

HELLO_APP = '''\
import os


def app(environ, start_response):
    body = f"hello world from pid {os.getpid()}\\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''

PID = re.compile(rb"pid (\d+)")


def venv_python():
    return os.path.join(VENV, "bin", "python")


def ensure_gunicorn():
    """
    The benchmark's virtualenv with gunicorn, made on first use; returns the
    path of its gunicorn script and its version.
    """
    gunicorn = os.path.join(VENV, "bin", "gunicorn")
    if not os.path.exists(gunicorn):
        os.makedirs(os.path.dirname(VENV), exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True, timeout=300)
        subprocess.run([venv_python(), "-m", "pip", "install", "-q", GUNICORN_REQUIREMENT],
                       check=True, timeout=600)
    # First-run .pyc writing is not what we measure.
    subprocess.run([venv_python(), "-m", "compileall", "-q", VENV], timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    version = subprocess.run([venv_python(), "-c", "import gunicorn; print(gunicorn.__version__)"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    return gunicorn, version


HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    """
    User and system CPU seconds of C{pids} (from /proc).
    """
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / HZ
        except (OSError, IndexError, ValueError):
            pass
    return total


def children(pid):
    """
    The PIDs whose parent is C{pid} (from /proc).
    """
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(name))
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def answer_pid(port):
    """
    One GET / on a new connection: the PID that answered, or None.
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(4096), 10)
    except (OSError, asyncio.TimeoutError):
        return None
    finally:
        writer.close()
    if not data.startswith(b"HTTP/1.1 200"):
        return None
    m = PID.search(data)
    return int(m.group(1)) if m else None


async def until_new_pids(port, old, n, t0, timeout=60, poll=0.002):
    """
    Poll C{port} with new connections until C{n} PIDs not in C{old} have
    answered: (seconds from C{t0} to the first, to the C{n}th, the PIDs).
    """
    seen, first = set(), None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = await answer_pid(port)
        if pid is not None and pid not in old:
            if first is None:
                first = time.monotonic() - t0
            seen.add(pid)
            if len(seen) >= n:
                return first, time.monotonic() - t0, seen
        await asyncio.sleep(poll)  # bounded by the deadline
    raise RuntimeError(f"{n} new worker(s) never answered on port {port} (saw {sorted(seen)})")


class Gunicorn:
    """
    `gunicorn -w N -b 127.0.0.1:PORT hello:app` in a directory of its own.
    """

    def __init__(self, script, workers, workdir, port):
        self.script = script
        self.workers = workers
        self.port = port
        self.cwd = workdir
        with open(os.path.join(self.cwd, "hello.py"), "w") as f:
            f.write(HELLO_APP)
        self.pidfile = os.path.join(self.cwd, "gunicorn.pid")
        self.args = [self.script, "-w", str(workers), "-b", f"127.0.0.1:{port}",
                     "--pid", self.pidfile, "--log-level", "warning", "hello:app"]
        self.proc = None
        self.master = None

    def start(self):
        self.log = os.path.join(self.cwd, "gunicorn.log")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
        self.master = self.proc.pid
        return self.master

    def worker_pids(self):
        return set(children(self.master))

    def _pidfile_pid(self, path):
        try:
            with open(path) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    async def upgrade(self):
        """
        USR2; once the new master has written its pidfile (before it forks
        its workers), TERM to the old master (the operator's WINCH/QUIT: its
        workers would otherwise go on taking every connection); returns
        (to the first answer from a new worker, to every new worker's, the
        CPU seconds the new master and workers used until then).
        """
        old_master, old = self.master, self.worker_pids() | {self.master}
        t0 = time.monotonic()
        os.kill(old_master, signal.SIGUSR2)
        deadline = t0 + 60
        new_master = 0
        while time.monotonic() < deadline:
            # A master started by USR2 writes PIDFILE.2 while its parent lives.
            new_master = self._pidfile_pid(self.pidfile + ".2")
            if new_master and new_master != old_master and alive(new_master):
                break
            await asyncio.sleep(0.002)  # the new master writes its pidfile
        else:
            with open(self.log, errors="replace") as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"gunicorn: no new master after USR2; its log ends: {tail}")
        os.kill(old_master, signal.SIGTERM)
        first, every, seen = await until_new_pids(self.port, old, self.workers, t0)
        # The CPU the new set cost: the new master's start and its workers'.
        cpu = cpu_seconds([new_master, *seen])
        if old_master == self.proc.pid:
            await asyncio.get_running_loop().run_in_executor(None, self.proc.wait, 60)
        else:
            await wait_gone(old_master)
        self.master = new_master
        # (Not timed.) The new master takes the old one's place once it sees
        # it gone (its main loop wakes about once a second): it renames its
        # pidfile back, and only then accepts the next USR2.
        deadline = time.monotonic() + 30
        while self._pidfile_pid(self.pidfile) != new_master or os.path.exists(
                self.pidfile + ".2"):
            if time.monotonic() > deadline:
                raise RuntimeError("gunicorn: the new master never took the old one's place")
            await asyncio.sleep(0.02)  # its loop wakes up about once a second
        return first, every, cpu

    async def stop(self):
        if self.master is None:
            return
        try:
            os.kill(self.master, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if self.master == self.proc.pid:
            await asyncio.get_running_loop().run_in_executor(None, self.proc.wait, 60)
        else:
            await wait_gone(self.master)
        self.master = None


async def wait_gone(pid, timeout=60):
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return
        await asyncio.sleep(0.02)  # not our child: nothing to wait() on
