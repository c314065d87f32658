"""
Instructions per request in the process that answers it, counted by
callgrind as C{bench.reload}'s instructions per request are, but for a worker
of a master too, for a new connection per request, for transaction-protocol
connections, and for a bare C{twistd web} serving the same resource:

    python -m bench.worker_instructions --workers 1 --requests 2000 [--code DIR]
    python -m bench.worker_instructions --mode fresh --server bare --requests 1000
    python -m bench.worker_instructions --mode txn --requests 1000 --annotate 25
    python -m bench.worker_instructions --mode fresh --server bare -- --logfile FILE

The server starts uninstrumented under C{valgrind --tool=callgrind
--trace-children=yes} (so that the worker it spawns runs under callgrind too);
once it answers, instrumentation is switched on in the process that answered
(the worker, or the process itself with C{--workers 0} or C{--server bare}),
C{--requests} are sent (C{keepalive}: on one connection; C{fresh}: each on a
new connection with C{Connection: close}; C{txn}: a transaction-protocol
connection each, banner, C{GET}, C{QUIT}), and its counts are dumped.
Only that dump is counted, not the file callgrind writes at exit (the
process's shutdown). C{--annotate N} adds the N functions with the most
instructions (inclusive, from C{callgrind_annotate}), to see where a
difference goes; C{--keep DIR} keeps the dump for C{callgrind_annotate}. C{--code} runs
another checkout (e.g. C{git archive main | tar -x -C DIR}) to compare two
versions.
"""

import argparse
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from bench.reload import REPO, TWISTD

MODES = ("keepalive", "fresh", "txn")
SERVERS = ("graceful", "bare")


def get(sock, reader, close=False):
    sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n" + (b"Connection: close\r\n" if close
                                                         else b"") + b"\r\n")
    length = 0
    while True:
        line = reader.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return reader.read(length)


def fresh_get(port, timeout):
    """
    One GET on a new connection, closed by the server after its response.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        body = get(sock, reader, close=True)
        reader.read()  # until the server closes
    return body


def txn_session(port, timeout):
    """
    One transaction-protocol connection: banner, a read, QUIT.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        banner = reader.readline()
        sock.sendall(b"GET bench\r\nQUIT\r\n")
        reader.readline()
        reader.readline()
        reader.read()
    return banner


def first_answer(port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
                if b"hello world" in get(sock, sock.makefile("rb")):
                    return
        except OSError:
            pass
        time.sleep(0.5)  # the port is not answering yet (valgrind is slow)
    raise SystemExit(f"port {port} never answered")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(server, cwd, port, txn_port, workers, timeout, extra=()):
    twistd = [sys.executable, TWISTD, "--nodaemon", "--pidfile",
              os.path.join(cwd, "twistd.pid")]
    if server == "bare":
        return twistd + ["web", "--listen", f"tcp:{port}:interface=127.0.0.1", "--class",
                         "bench.reload.BareHello", *extra]
    return twistd + [
        "graceful", "--port", f"tcp:{port}:interface=127.0.0.1",
        "--txn-port", f"tcp:{txn_port}:interface=127.0.0.1", "--metrics-port",
        "tcp:0:interface=127.0.0.1", "--slow-every", "0", "--db",
        os.path.join(cwd, "db.sqlite3"), "--workers", str(workers), "--ready-timeout",
        str(timeout), *extra]


def top_functions(files, count):
    """
    The C{count} functions with the most inclusive instructions, from
    C{callgrind_annotate --inclusive=yes}: [(instructions, function)].
    """
    annotate = shutil.which("callgrind_annotate")
    if not annotate or not files or not count:
        return []
    out = subprocess.run([annotate, "--inclusive=yes", "--threshold=100", *files],
                         capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*)$", line)
        if m and ":" in m.group(2) and not line.lstrip().startswith("Ir"):
            rows.append((int(m.group(1).replace(",", "")), m.group(2).strip()))
        if len(rows) >= count + 1:
            break
    return rows[1:count + 1] if rows and "PROGRAM TOTALS" in out else rows[:count]


def measure(code, workers, requests, mode="keepalive", server="graceful", annotate=0,
            timeout=900, extra=(), keep=None):
    cwd = tempfile.mkdtemp(prefix="worker-instructions-")
    port, txn_port = _free_port(), _free_port()
    # valgrind's control pipes (and the server's temporary files) go in cwd.
    env = dict(os.environ, PYTHONPATH=code, TMPDIR=cwd)
    command = [
        "valgrind", "--tool=callgrind", "--trace-children=yes", "--instr-atstart=no",
        f"--callgrind-out-file={os.path.join(cwd, 'callgrind.%p')}",
        *server_command(server, cwd, port, txn_port, workers, timeout, extra)]
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first_answer(port, timeout)
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            reader = sock.makefile("rb")
            answering = int(get(sock, reader).split(b"pid ")[1].split()[0])
            if mode == "keepalive":
                subprocess.run(["callgrind_control", "-i", "on", str(answering)], env=env,
                               capture_output=True, check=True)
                for _ in range(requests):
                    get(sock, reader)
        if mode != "keepalive":
            # One of each first, uncounted: the first time a code path runs costs more.
            once = fresh_get if mode == "fresh" else txn_session
            once(port if mode == "fresh" else txn_port, timeout)
            subprocess.run(["callgrind_control", "-i", "on", str(answering)], env=env,
                           capture_output=True, check=True)
            for _ in range(requests):
                once(port if mode == "fresh" else txn_port, timeout)
        subprocess.run(["callgrind_control", "-d", str(answering)], env=env,
                       capture_output=True, check=True)
    finally:
        proc.terminate()
        try:
            proc.wait(300)
        except subprocess.TimeoutExpired:
            proc.kill()
    counts = {}
    # The dump's file (callgrind.PID.1), not the one callgrind writes at exit
    # (callgrind.PID): that one holds what the process did after the last
    # request, its shutdown once terminated, which is not a request's cost
    # (it was counted until 2026-12-04: 5,000 instructions per request for
    # bare twistd web, 22,000 for graceful, over 300 requests).
    files = [name for name in glob.glob(os.path.join(cwd, f"callgrind.{answering}.*"))
             if os.path.getsize(name)]
    for name in files:
        with open(name) as f:
            counts[name] = sum(int(line.split()[1]) for line in f
                               if line.startswith("summary:"))
    total = sum(counts.values())
    result = {"code": code, "server": server, "mode": mode, "workers": workers,
              "requests": requests,
              "instructions_per_request": total / requests if total else None}
    if annotate:
        result["top_functions"] = [
            {"per_request": round(n / requests), "function": name}
            # callgrind_annotate (3.19) reads one file; the rest would be
            # taken for source files.
            for n, name in top_functions(sorted(files, key=counts.get)[-1:], annotate)]
    if keep:
        os.makedirs(keep, exist_ok=True)
        for name in files:
            shutil.copy(name, keep)
        result["kept"] = sorted(os.path.join(keep, os.path.basename(n)) for n in files)
    shutil.rmtree(cwd, ignore_errors=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.worker_instructions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--mode", choices=MODES, default="keepalive")
    p.add_argument("--server", choices=SERVERS, default="graceful")
    p.add_argument("--annotate", type=int, default=0, metavar="N",
                   help="also list the N functions with the most instructions")
    p.add_argument("--keep", metavar="DIR",
                   help="copy the counted process's callgrind files into DIR (for "
                        "callgrind_annotate)")
    p.add_argument("--code", default=REPO, help="the checkout to run (default: this one)")
    p.add_argument("extra", nargs="*",
                   help="more options of the server (after --): graceful's, or twistd web's "
                        "with --server bare (e.g. -- --logfile FILE)")
    opts = p.parse_args(argv)
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise SystemExit("needs valgrind (callgrind_control)")
    if opts.server == "bare" and opts.mode == "txn":
        raise SystemExit("--mode txn needs --server graceful (twistd web has no txn protocol)")
    print(json.dumps(measure(os.path.abspath(opts.code), opts.workers, opts.requests,
                             opts.mode, opts.server, opts.annotate, extra=opts.extra,
                             keep=opts.keep),
                     indent=1))


if __name__ == "__main__":
    main()
