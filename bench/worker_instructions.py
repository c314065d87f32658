"""
Instructions per keep-alive GET / in the process that answers it, counted by
callgrind as C{bench.reload}'s instructions per request are, but for a worker
of a master too:

    python -m bench.worker_instructions --workers 1 --requests 2000 [--code DIR]

The server starts uninstrumented under C{valgrind --tool=callgrind
--trace-children=yes} (so that the worker it spawns runs under callgrind too);
once it answers, instrumentation is switched on in the process that answered
(the worker, or the process itself with C{--workers 0}), C{--requests} are
sent on one connection, and its counts are dumped. C{--code} runs another
checkout (e.g. C{git archive main | tar -x -C DIR}) to compare two versions.
"""

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from bench.reload import REPO, TWISTD


def get(sock, reader):
    sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    length = 0
    while True:
        line = reader.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return reader.read(length)


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


def measure(code, workers, requests, timeout=900):
    cwd = tempfile.mkdtemp(prefix="worker-instructions-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # valgrind's control pipes (and the server's temporary files) go in cwd.
    env = dict(os.environ, PYTHONPATH=code, TMPDIR=cwd)
    command = [
        "valgrind", "--tool=callgrind", "--trace-children=yes", "--instr-atstart=no",
        f"--callgrind-out-file={os.path.join(cwd, 'callgrind.%p')}",
        os.path.realpath(sys.executable), TWISTD, "--nodaemon", "--pidfile",
        os.path.join(cwd, "twistd.pid"), "graceful", "--port", f"tcp:{port}:interface=127.0.0.1",
        "--txn-port", "tcp:0:interface=127.0.0.1", "--metrics-port",
        "tcp:0:interface=127.0.0.1", "--slow-every", "0", "--db",
        os.path.join(cwd, "db.sqlite3"), "--workers", str(workers), "--ready-timeout",
        str(timeout)]
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first_answer(port, timeout)
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            reader = sock.makefile("rb")
            answering = int(get(sock, reader).split(b"pid ")[1].split()[0])
            subprocess.run(["callgrind_control", "-i", "on", str(answering)], env=env,
                           capture_output=True, check=True)
            for _ in range(requests):
                get(sock, reader)
            subprocess.run(["callgrind_control", "-d", str(answering)], env=env,
                           capture_output=True, check=True)
    finally:
        proc.terminate()
        try:
            proc.wait(300)
        except subprocess.TimeoutExpired:
            proc.kill()
    total = 0
    for name in glob.glob(os.path.join(cwd, f"callgrind.{answering}*")):
        with open(name) as f:
            total += sum(int(line.split()[1]) for line in f if line.startswith("summary:"))
    shutil.rmtree(cwd, ignore_errors=True)
    return {"code": code, "workers": workers, "requests": requests,
            "instructions_per_request": total / requests if total else None}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.worker_instructions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--code", default=REPO, help="the checkout to run (default: this one)")
    opts = p.parse_args(argv)
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise SystemExit("needs valgrind (callgrind_control)")
    print(json.dumps(measure(os.path.abspath(opts.code), opts.workers, opts.requests)))


if __name__ == "__main__":
    main()
