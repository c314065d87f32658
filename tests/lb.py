"""
A real HAProxy (Debian package C{haproxy}) in front of test "hosts" on
loopback addresses, configured from C{contrib/haproxy/haproxy.cfg} with
only its addresses and timings rewritten, so the tests run the shipped
configuration. Its state is read from its stats socket (C{show stat}).
"""

import csv
import io
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time

from tests.e2e import REPO, unless_required

CONFIG = os.path.join(REPO, "contrib", "haproxy", "haproxy.cfg")


def unavailable():
    return unless_required(_unavailable())


def _unavailable():
    """
    Why the HAProxy tests cannot run here, or L{None}.
    """
    if shutil.which("haproxy") is None:
        return "haproxy is not installed; apt-get install haproxy (.ci/run does)"
    return None


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _sub(pattern, replacement, text, count=0):
    new, n = re.subn(pattern, replacement, text, count=count, flags=re.M)
    if not n:
        raise AssertionError(f"{CONFIG} no longer has {pattern!r}; update {__file__}")
    return new


def render(hosts, http_port, txn_port, lb_http, lb_txn, stats_socket, inter_ms=1000, fall=2,
           rise=2, check_timeout_ms=1000, retries=3, template=None):
    """
    The shipped configuration for C{hosts} (name -> address; every host
    serves HTTP on C{http_port} and the transaction protocol on
    C{txn_port}), with its frontends on C{lb_http} and C{lb_txn}
    (C{"addr:port"}).
    """
    if template is None:
        with open(CONFIG) as f:
            template = f.read()
    text = _sub(r"^(\s*stats socket )\S+", rf"\g<1>{stats_socket}", template)
    text = _sub(r"^(\s*bind )127\.0\.0\.1:8080\b", rf"\g<1>{lb_http}", text)
    text = _sub(r"^(\s*bind )127\.0\.0\.1:8025\b", rf"\g<1>{lb_txn}", text)
    text = _sub(r"^(\s*timeout check )\S+", rf"\g<1>{check_timeout_ms}ms", text)
    text = _sub(r"^(\s*retries )\d+", rf"\g<1>{retries}", text)
    text = _sub(r"inter \S+ fall \d+ rise \d+", f"inter {inter_ms}ms fall {fall} rise {rise}",
                text)
    text = _sub(r"check port 8080\b", f"check port {http_port}", text)
    http_servers = "".join(f"    server {name} {addr}:{http_port}\n" for name, addr in hosts.items())
    txn_servers = "".join(f"    server {name} {addr}:{txn_port}\n" for name, addr in hosts.items())
    text = _sub(r"(^    server \S+ \S+:8080\n)+", http_servers, text, count=1)
    text = _sub(r"(^    server \S+ \S+:8025\n)+", txn_servers, text, count=1)
    return text


class HAProxy:
    """
    One HAProxy in the foreground (C{-db}), its output kept.
    """

    def __init__(self, hosts, http_port, txn_port, **timing):
        self.dir = tempfile.mkdtemp(prefix="graceful-lb-")
        self.stats_socket = os.path.join(self.dir, "admin.sock")
        self.http_port = free_port()
        self.txn_port = free_port()
        self.hosts = hosts
        self.config = os.path.join(self.dir, "haproxy.cfg")
        with open(self.config, "w") as f:
            f.write(render(hosts, http_port, txn_port, f"127.0.0.1:{self.http_port}",
                           f"127.0.0.1:{self.txn_port}", self.stats_socket, **timing))
        self.proc = None
        self.output = []

    def start(self, timeout=30.0):
        self.proc = subprocess.Popen(
            [shutil.which("haproxy"), "-db", "-f", self.config], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.stats()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("haproxy did not start:\n" + "".join(self.output))
                time.sleep(0.02)  # its stats socket is the only sign it is up

    def _read(self):
        for line in iter(self.proc.stdout.readline, b""):
            self.output.append(line.decode("utf-8", "replace"))

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def command(self, line):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.stats_socket)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode()

    def stats(self):
        """
        (proxy, server) -> the row of C{show stat} as a dict.
        """
        text = self.command("show stat").lstrip("# ")
        return {(row["pxname"], row["svname"]): row for row in csv.DictReader(io.StringIO(text))}

    def status(self, host):
        """
        The check status of C{host} in both backends, e.g. (C{"UP"}, C{"UP"}).
        """
        stats = self.stats()
        return tuple(stats[(backend, host)]["status"].split()[0]
                     for backend in ("graceful_http", "graceful_txn"))

    def wait_status(self, host, wanted, timeout=30.0):
        """
        Wait until HAProxy's checks say C{host} is C{wanted} (UP or DOWN) in
        both backends.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(host)
            if status == (wanted, wanted):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"haproxy: {host} is {status}, waited for {wanted}; "
                                     f"output:\n" + "".join(self.output[-20:]))
            time.sleep(0.05)  # HAProxy has no event to wait on; its checks run every inter

    def counters(self):
        """
        Summed over the backends' servers: connection errors, retries,
        redispatches, responses by class, and per-backend totals.
        """
        stats = self.stats()
        out = {"econ": 0, "eresp": 0, "wretr": 0, "wredis": 0, "hrsp_5xx": 0}
        for (proxy, server), row in stats.items():
            if proxy in ("graceful_http", "graceful_txn") and server == "BACKEND":
                for key in out:
                    out[key] += int(row.get(key) or 0)
        return out
