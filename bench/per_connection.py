"""
Throughput of graceful against a bare C{twistd web} serving the same
resource, with keep-alive and with a new connection per request
(C{Connection: close}), by wrk in interleaved rounds (one server at a time;
the median of the per-round ratios), for each C{--access-log} choice:

    python -m bench.per_connection --rounds 5 --seconds 8 --connections 32
    python -m bench.per_connection ... --baseline DIR   # and DIR's graceful, same rounds

Each graceful is C{--workers 1} (the default: a master and one worker);
the bare C{twistd web} writes its access log through twisted.logger, as it
does by default (to /dev/null here, as graceful's C{-}); with C{file} among
the choices, a second bare C{twistd web --logfile FILE} writes it to a file
as graceful's C{--access-log FILE} does, and the report has the ratio of
those two too. Instruction counts,
which do not depend on the machine's load, come from
C{bench.worker_instructions --mode fresh|keepalive}. Loopback only; every
run is bounded by C{--seconds}.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from bench.reload import REPO, TWISTD

ACCESS_LOGS = ("none", "file", "-")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            return s.recv(100).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def answering_pid(port):
    """
    The PID in C{GET /}'s answer: the process that serves (graceful's one
    worker, or bare twistd web itself).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        data = b""
        while len(data) < 65536:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    m = re.search(rb"pid (\d+)", data)
    return int(m.group(1)) if m else None


def cpu_seconds(pid):
    """
    User and system CPU seconds of C{pid} so far (L{None} without /proc).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(name, cwd, access_log=None, code=REPO):
    port = free_port()
    twistd = [sys.executable, TWISTD, "--nodaemon", "--pidfile", os.path.join(cwd, name + ".pid")]
    if name.startswith("bare"):
        args = ["web", "--listen", f"tcp:{port}:interface=127.0.0.1", "--class",
                "bench.reload.BareHello"]
        if name == "bare-file":  # twistd web's own CLF file, graceful's --access-log FILE's peer
            args += ["--logfile", os.path.join(cwd, name + ".access.log")]
    else:
        log = os.path.join(cwd, name + ".access.log") if access_log == "file" else access_log
        args = ["graceful", "--port", f"tcp:{port}:interface=127.0.0.1", "--txn-port",
                "tcp:0:interface=127.0.0.1", "--metrics-port", "tcp:0:interface=127.0.0.1",
                "--slow-every", "0", "--db", os.path.join(cwd, name + ".sqlite3"),
                "--workers", "1", "--access-log", log]
    proc = subprocess.Popen(twistd + args, cwd=cwd, env=dict(os.environ, PYTHONPATH=code),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not answers(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{name} never answered on port {port}")
        time.sleep(0.05)  # nothing to wait on but the port
    return proc, port, answering_pid(port)


def wrk(port, seconds, connections, close, pid=None):
    """
    Requests per second, and the CPU seconds the serving process spent per
    request meanwhile (less sensitive to other processes on the machine than
    the rate: they take turns on a core, not instructions from a request).
    """
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    if close:
        command += ["-H", "Connection: close"]
    before = cpu_seconds(pid)
    out = subprocess.run(command + [f"http://127.0.0.1:{port}/"], capture_output=True,
                         text=True, timeout=seconds + 30).stdout
    after = cpu_seconds(pid)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    done = re.search(r"(\d+) requests in", out)
    per_request = ((after - before) / int(done.group(1))
                   if done and int(done.group(1)) and before is not None and after is not None
                   else None)
    return (float(m.group(1)) if m else None), per_request


def run(opts):
    cwd = tempfile.mkdtemp(prefix="per-connection-")
    servers = {}
    try:
        servers["bare"] = start("bare", cwd)
        if "file" in opts.access_logs:
            servers["bare-file"] = start("bare-file", cwd)
        for choice in opts.access_logs:
            servers[f"graceful-{choice}"] = start(f"graceful-{choice}", cwd, choice)
        if opts.baseline:
            # The same graceful from another checkout, in the same rounds.
            servers["baseline-file"] = start("baseline-file", cwd, "file",
                                             os.path.abspath(opts.baseline))
        result = {"rounds": opts.rounds, "seconds": opts.seconds,
                  "connections": opts.connections, "modes": {}}
        for mode, close in (("keepalive", False), ("close", True)):
            rps = {name: [] for name in servers}
            cpu = {name: [] for name in servers}
            for round_number in range(opts.rounds):
                # The order reversed every other round: a load that drifts
                # during a round favours no server every time.
                order = list(servers.items())
                for name, (_, port, pid) in order[::-1] if round_number % 2 else order:
                    rate, per_request = wrk(port, opts.seconds, opts.connections, close, pid)
                    rps[name].append(rate)
                    cpu[name].append(per_request)
            ratios = {name: [g / b for g, b in zip(values, rps["bare"]) if g and b]
                      for name, values in rps.items() if name != "bare"}
            if "bare-file" in rps:
                # On equal terms: both write their access log to a file.
                ratios["graceful-file / bare-file"] = [
                    g / b for g, b in zip(rps["graceful-file"], rps["bare-file"]) if g and b]
            if "baseline-file" in rps:
                for name in ("baseline-file", "graceful-file"):
                    other = "bare-file" if name == "baseline-file" else "baseline-file"
                    if name in rps and other in rps:
                        ratios[f"{name} / {other}"] = [
                            g / b for g, b in zip(rps[name], rps[other]) if g and b]
            cpu_ratios = {}
            if "bare-file" in cpu and "graceful-file" in cpu:
                # CPU per request, bare over graceful (above 1: graceful spends less).
                cpu_ratios["bare-file / graceful-file"] = [
                    b / g for b, g in zip(cpu["bare-file"], cpu["graceful-file"]) if g and b]
            if "baseline-file" in cpu and "graceful-file" in cpu:
                cpu_ratios["baseline-file / graceful-file"] = [
                    b / g for b, g in zip(cpu["baseline-file"], cpu["graceful-file"]) if g and b]
            if "baseline-file" in cpu and "bare-file" in cpu:
                cpu_ratios["bare-file / baseline-file"] = [
                    b / g for b, g in zip(cpu["bare-file"], cpu["baseline-file"]) if g and b]
            result["modes"][mode] = {
                "cpu_us_per_request_median": {
                    n: round(statistics.median(v) * 1e6, 1) for n, v in cpu.items() if all(v)},
                "cpu_ratio_median": {n: statistics.median(r) for n, r in cpu_ratios.items()
                                     if r},
                "cpu_ratios": cpu_ratios,
                "req_per_s_median": {n: statistics.median(v) for n, v in rps.items()
                                     if all(v)},
                "ratio_to_bare_median": {n: statistics.median(r) for n, r in ratios.items()
                                         if r},
                "ratios": ratios}
        return result
    finally:
        for proc, _, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _, _ in servers.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(cwd, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.per_connection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--access-logs", default="none,file",
                   help="graceful's --access-log choices to run, of none,file,-")
    p.add_argument("--baseline", metavar="DIR",
                   help="also graceful --access-log FILE from the checkout DIR (e.g. git "
                        "archive main | tar -x -C DIR), in the same rounds")
    opts = p.parse_args(argv)
    opts.access_logs = [a for a in opts.access_logs.split(",") if a]
    bad = [a for a in opts.access_logs if a not in ACCESS_LOGS]
    if bad:
        raise SystemExit(f"--access-logs: unknown {', '.join(bad)} (of {', '.join(ACCESS_LOGS)})")
    if not shutil.which("wrk"):
        raise SystemExit("needs wrk (apt-get install wrk)")
    print(json.dumps(run(opts), indent=1))


if __name__ == "__main__":
    main()
