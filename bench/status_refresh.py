"""
What the status page's live counts cost a busy process: one rewrite of the
status file per second (L{twisted_graceful.statusfile.StatusFile.refresh},
without fsync), measured on a status file like a real server's after many
upgrades of two workers: the master's entry with five upgrades in its
timeline and their last lines of output, and the seven workers' entries the
file keeps (two alive, five gone):

    python -m bench.status_refresh [--writes 50]

Instructions per rewrite are counted by callgrind (the same script with 0
and with N rewrites, the difference divided by N), so they do not depend on
the machine's load; the wall time per rewrite (timeit), with and without
fsync, does.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import timeit

from twisted_graceful.statusfile import update_status_file

WORKER_PIDS = tuple(2 ** 22 + n for n in range(7))  # above pid_max: never alive
OUTPUT = "2026-12-04T03:04:36+0000 [twisted_graceful.service.GracefulService#info] pid 4243 " \
         "generation 2: inherited http=tcp:127.0.0.1:8080, txn=tcp:127.0.0.1:8025"


def upgrade_record(n):
    at = 1796350000.0 + n * 60
    return {"reason": "SIGHUP", "from_generation": n, "signal_at": at, "spawned_at": at,
            "ready_at": at + 0.8, "handed_over_at": at + 0.8, "drained_at": at + 3.0,
            "exited_at": at + 3.0, "result": "ok", "error": None,
            "output_tail": [OUTPUT] * 8, "duration_seconds": 0.8, "child_pids": [4250, 4251],
            "retired_pids": []}


def entry(pid, role, generation):
    upgrades = role == "master"  # only the master upgrades; its workers serve
    return {
        "pid": pid, "role": role, "generation": generation, "state": "serving",
        "started_at": 1796350000.0, "serving_since": 1796350000.5, "source": role,
        "parent_pid": 4242, "pidfile": "/srv/app/twistd.pid",
        "listeners": {"http": "tcp:0.0.0.0:8080", "txn": "tcp:127.0.0.1:8025",
                      "metrics": "tcp:127.0.0.1:9090"},
        "child": None, "scheduled_upgrade": None, "upgrade_requests": 5, "last_request": None,
        "last_upgrade": dict(upgrade_record(4), output_tail=[OUTPUT] * 15) if upgrades else None,
        "took_back_from": None, "drain": None, "workers": None, "execs": None,
        "last_reexec": None, "upgrades": [upgrade_record(n) for n in range(5)] if upgrades else [],
        "live": {"connections": 120, "transactions": 7, "requests": 123456},
        "updated_at": 1796350001.0,
    }


def make_status_file(directory):
    path = os.path.join(directory, "twistd.pid.status.json")
    update_status_file(path, 4242, entry(4242, "master", 2))
    for pid in WORKER_PIDS[:-1]:  # with this process's own: the 8 entries the file keeps
        update_status_file(path, pid, entry(pid, "worker", 2))
    return path


def rewrite(path, count, sync=False):
    mine = entry(os.getpid(), "worker", 2)
    for _ in range(count):
        mine["live"]["requests"] += 1
        update_status_file(path, os.getpid(), mine, sync=sync)


def instructions(path, writes):
    """
    Instructions per rewrite, by callgrind: 0 rewrites against C{writes}.
    """
    totals = []
    for count in (0, writes):
        out = os.path.join(os.path.dirname(path), f"callgrind.{count}")
        result = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
             "-m", "bench.status_refresh", "--rewrite", path, "--writes", str(count)],
            capture_output=True, text=True, timeout=600)
        collected = [line for line in result.stderr.splitlines() if "Collected" in line]
        if not collected:
            raise SystemExit(f"callgrind said nothing: {result.stderr[-500:]}")
        totals.append(int(collected[-1].rsplit(":", 1)[1].strip()))
    return (totals[1] - totals[0]) / writes


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.status_refresh")
    parser.add_argument("--writes", type=int, default=50)
    parser.add_argument("--rewrite", help=argparse.SUPPRESS)  # the measured child
    args = parser.parse_args(argv)
    if args.rewrite:
        rewrite(args.rewrite, args.writes)
        return 0
    directory = tempfile.mkdtemp(prefix="tg-bench-")
    try:
        path = make_status_file(directory)
        rewrite(path, 1)
        report = {"status_file_bytes": os.path.getsize(path), "writes": args.writes}
        for sync in (False, True):
            seconds = timeit.timeit(lambda sync=sync: rewrite(path, 1, sync=sync),
                                    number=args.writes)
            report[f"ms_per_write_{'fsync' if sync else 'no_fsync'}"] = round(
                seconds / args.writes * 1000, 3)
        if shutil.which("valgrind"):
            report["instructions_per_write"] = round(instructions(path, args.writes))
        else:
            report["instructions_per_write"] = None  # apt-get install valgrind
        report["at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        print(json.dumps(report))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
