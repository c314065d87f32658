"""
C{python -m twisted_graceful reload|status|top --pidfile twistd.pid}: steer
and watch a running server from a deploy script or a terminal, without its
metrics port (C{top}: L{twisted_graceful.top}).

C{reload} sends SIGHUP to the process the pidfile names and follows the
status file next to the pidfile (C{<pidfile>.status.json}, where every
generation keeps its own entry) until the attempt ends:

  - the old process records the upgrade's outcome (after the signal): if it
    failed or timed out, say why (the child's last output line) and exit 1;
  - if it succeeded, wait until the pidfile names the new process and the new
    process says it serves, then exit 0;
  - nothing conclusive within C{--timeout} seconds: exit 4.

Exit status: 0 success, 1 the upgrade failed, 2 usage, 3 no running server,
4 timeout.
"""

import argparse
import datetime
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Optional, TextIO

from twisted_graceful.pidfile import pid_alive, read_pid
from twisted_graceful.statusfile import read_status, status_path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_TIMEOUT = 4

POLL_INTERVAL = 0.05


class NotRunning(Exception):
    pass


def running_pid(pidfile, alive=pid_alive):
    """
    The live PID the pidfile names; L{NotRunning} in words otherwise.
    """
    if not os.path.exists(pidfile):
        raise NotRunning(f"{pidfile}: no such pidfile (is the server running, with this "
                         f"--pidfile?)")
    pid = read_pid(pidfile)
    if pid is None:
        raise NotRunning(f"{pidfile}: does not contain a process ID")
    if not alive(pid):
        raise NotRunning(f"{pidfile} names pid {pid}, which is not running (stale pidfile)")
    return pid


def entry_of(doc, pid):
    if not doc or pid is None:
        return None
    return doc.get("processes", {}).get(str(pid))


def _when(timestamp):
    if not timestamp:
        return "?"
    return datetime.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def _seconds(value):
    return "?" if value is None else f"{value:.2f} s"


def child_error(outcome):
    """
    The error of a failed upgrade, and the child's last output line that
    looks like an error (or its last line).
    """
    error = outcome.get("error") or "failed"
    tail = [line.strip() for line in outcome.get("output_tail") or [] if line.strip()]
    pick = None
    for line in reversed(tail):
        if "rror" in line or "xception" in line or "not ready" in line:
            pick = line
            break
    if pick is None and tail:
        pick = tail[-1]
    return error, pick


def describe_upgrade(outcome):
    if not outcome:
        return "no upgrade yet"
    result = outcome.get("result")
    if result == "ok":
        return (f"last upgrade ok at {_when(outcome.get('finished_at'))}: pid "
                f"{outcome.get('child_pid')} ready after {_seconds(outcome.get('duration_seconds'))}")
    error, line = child_error(outcome)
    text = f"last upgrade {result} at {_when(outcome.get('finished_at'))}: {error}"
    return text + (f" ({line})" if line else "")


class Reload:
    """
    One C{reload}: the waiting logic, with the outside world (clock, sleep,
    kill, liveness) injectable for tests.
    """

    def __init__(self, pidfile, timeout=60.0, out=None, clock=time.monotonic, wall=time.time,
                 sleep=time.sleep, kill=os.kill, alive=pid_alive, poll=POLL_INTERVAL):
        self.pidfile = os.path.abspath(pidfile)
        self.status_file = status_path(self.pidfile)
        self.timeout = timeout
        self.out = out or sys.stdout
        self.clock = clock
        self.wall = wall
        self.sleep = sleep
        self.kill = kill
        self.alive = alive
        self.poll = poll

    def say(self, text):
        self.out.write(text + "\n")
        self.out.flush()

    def run(self):
        try:
            old = running_pid(self.pidfile, self.alive)
        except NotRunning as e:
            self.say(f"reload: {e}")
            return EXIT_NOT_RUNNING
        signalled_at = self.wall()
        try:
            self.kill(old, signal.SIGHUP)
        except ProcessLookupError:
            self.say(f"reload: pid {old} exited before it could be signalled")
            return EXIT_NOT_RUNNING
        except PermissionError as e:
            self.say(f"reload: cannot signal pid {old}: {e}")
            return EXIT_NOT_RUNNING
        deadline = self.clock() + self.timeout
        outcome = None
        while True:
            doc = read_status(self.status_file, alive=self.alive)
            if outcome is None:
                last = (entry_of(doc, old) or {}).get("last_upgrade")
                if last and (last.get("finished_at") or 0) >= signalled_at:
                    outcome = last
                    if outcome.get("result") != "ok":
                        error, line = child_error(outcome)
                        self.say(f"reload failed ({outcome.get('result')}): {error}; pid {old} "
                                 f"keeps serving")
                        if line:
                            self.say(f"the new generation said: {line}")
                        return EXIT_FAILED
            if outcome is not None and (entry_of(doc, old) or {}).get("role") == "master":
                entry = entry_of(doc, old)
                workers = [str(w.get("pid")) for w in entry.get("workers") or []
                           if w.get("generation") == entry.get("generation")
                           and w.get("state") == "serving"]
                self.say(f"reloaded: workers generation {entry.get('generation')} (pids "
                         f"{', '.join(workers)}) serve, ready "
                         f"{_seconds(outcome.get('duration_seconds'))} after the signal; the "
                         f"previous workers drain and exit; master pid {old}")
                return EXIT_OK
            if outcome is not None:
                new = outcome.get("child_pid")
                entry = entry_of(doc, new)
                if read_pid(self.pidfile) == new and entry and entry.get("state") in (
                        "serving", "upgrading"):
                    self.say(
                        f"reloaded: pid {new} (generation {entry.get('generation')}) serves, "
                        f"ready {_seconds(outcome.get('duration_seconds'))} after the signal; "
                        f"pid {old} drains and exits")
                    return EXIT_OK
                if new and not self.alive(new):
                    self.say(f"reload failed: pid {new} was ready, then exited")
                    return EXIT_FAILED
            elif not self.alive(old):
                # Its entry may be gone, or it had no time to write it.
                current = read_pid(self.pidfile)
                entry = entry_of(doc, current)
                if current and current != old and entry and entry.get("parent_pid") == old \
                        and entry.get("state") in ("serving", "upgrading"):
                    self.say(f"reloaded: pid {current} (generation {entry.get('generation')}) "
                             f"serves; pid {old} has exited")
                    return EXIT_OK
                self.say(f"reload failed: pid {old} exited and no new generation serves")
                return EXIT_FAILED
            if self.clock() >= deadline:
                return self.timed_out(old, doc)
            self.sleep(self.poll)

    def timed_out(self, old, doc):
        entry = entry_of(doc, old)
        if doc is None:
            detail = f"no status file {self.status_file} (is this a twisted-graceful server?)"
        elif entry is None:
            detail = f"pid {old} has no entry in {self.status_file}"
        elif entry.get("state") == "upgrading" and entry.get("child"):
            child = entry["child"]
            detail = (f"pid {old} is still upgrading: the new generation (pid {child.get('pid')}) "
                      f"is not ready after {self.wall() - (child.get('since') or self.wall()):.1f} s")
        else:
            detail = f"pid {old} is {entry.get('state')}"
        self.say(f"reload timed out after {self.timeout:g} s: {detail}")
        return EXIT_TIMEOUT


def status(pidfile, out=None, as_json=False, alive=pid_alive):
    out = out or sys.stdout
    pidfile = os.path.abspath(pidfile)
    try:
        pid = running_pid(pidfile, alive)
    except NotRunning as e:
        out.write(f"status: {e}\n")
        return EXIT_NOT_RUNNING
    doc = read_status(status_path(pidfile), alive=alive)
    entry = entry_of(doc, pid)
    if as_json:
        out.write(json.dumps(entry or {"pid": pid}, indent=1, sort_keys=True) + "\n")
        return EXIT_OK
    if entry is None:
        out.write(f"pid {pid} is running (no entry in {status_path(pidfile)})\n")
        return EXIT_OK
    if entry.get("role") == "master":
        lines = master_status(pid, entry, alive)
        out.write("\n".join(lines) + "\n")
        out.flush()
        return EXIT_OK
    line = f"pid {pid} generation {entry.get('generation')}: {entry.get('state')}"
    if entry.get("serving_since"):
        line += f" since {_when(entry['serving_since'])}"
    if entry.get("child"):
        line += (f"; upgrading to pid {entry['child'].get('pid')} since "
                 f"{_when(entry['child'].get('since'))}")
    listeners = entry.get("listeners") or {}
    if listeners:
        line += " (" + ", ".join(f"{k}={v}" for k, v in listeners.items()) + ")"
    lines = [line, describe_upgrade(entry.get("last_upgrade"))]
    if not entry.get("last_upgrade") and entry.get("parent_pid"):
        lines[1] = f"took over from pid {entry['parent_pid']}; no upgrade since"
    for name, cert in (entry.get("certificates") or {}).items():
        lines.append(f"{name} certificate: {cert.get('subject')}, expires {cert.get('not_after')}, "
                     f"sha256 {str(cert.get('sha256'))[:16]}... ({cert.get('certificate')})")
    took_back = entry.get("took_back_from")
    if took_back:
        lines.append(f"took the listeners back at {_when(took_back.get('at'))} from pid "
                     f"{took_back.get('pid')}, which {took_back.get('how')}")
    request = entry.get("last_request")
    if request and request.get("answer") != "started":
        lines.append(f"last {request.get('reason')} at {_when(request.get('at'))} "
                     f"{request.get('answer')}: {request.get('why')}")
    for other, other_entry in sorted((doc or {}).get("processes", {}).items()):
        if other != str(pid) and alive(int(other)) and other_entry.get("state") != "exited":
            lines.append(f"also running: pid {other} generation {other_entry.get('generation')} "
                         f"({other_entry.get('state')}; it no longer accepts)")
    out.write("\n".join(lines) + "\n")
    out.flush()
    return EXIT_OK


def master_status(pid, entry, alive=pid_alive):
    """
    A master's status: itself, each worker, the last upgrade.
    """
    outcome = entry.get("last_upgrade")
    since = entry.get("serving_since")
    if outcome and outcome.get("result") == "ok" and outcome.get("finished_at"):
        since = outcome["finished_at"]  # when the current generation took over
    lines = [f"master pid {pid}: {entry.get('state')}, workers generation "
             f"{entry.get('generation')}" + (f" since {_when(since)}" if since else "")]
    for worker in entry.get("workers") or []:
        if alive(worker.get("pid")):
            lines.append(f"  worker pid {worker.get('pid')} generation {worker.get('generation')}"
                         f": {worker.get('state')}")
    zygote = entry.get("zygote")
    if zygote and alive(zygote):
        lines.append(f"  zygote pid {zygote}: "
                     + ("forks the new workers" if entry.get("zygote_ready") else "importing"))
    if outcome and outcome.get("result") == "ok":
        lines.append(f"last upgrade ok at {_when(outcome.get('finished_at'))}: every new worker "
                     f"ready after {_seconds(outcome.get('duration_seconds'))}")
    else:
        lines.append(describe_upgrade(outcome))
    request = entry.get("last_request")
    if request and request.get("answer") != "started":
        lines.append(f"last {request.get('reason')} at {_when(request.get('at'))} "
                     f"{request.get('answer')}: {request.get('why')}")
    return lines


def preflight(graceful_args: Sequence[str], out: Optional[TextIO] = None) -> int:
    """
    Import the code on disk and parse C{graceful_args} as C{twistd graceful}
    would, binding nothing: 0 if it would start, 2 with the reason if not.
    """
    out = out or sys.stdout
    from twisted.python import usage

    from twisted_graceful import tap

    options = tap.Options()
    options.preflight = True
    try:
        options.parseOptions(graceful_args)
    except usage.UsageError as e:
        out.write(f"preflight: {e}\n")
        return EXIT_USAGE
    out.write("preflight: ok\n")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m twisted_graceful",
        description="Steer a running twisted-graceful server.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    reload_parser = commands.add_parser(
        "reload", help="upgrade (SIGHUP) and wait until the new generation serves or the "
                       "attempt failed; exit 0 on success, 1 on failure, 4 on timeout")
    reload_parser.add_argument("--pidfile", default="twistd.pid")
    reload_parser.add_argument("--timeout", type=float, default=60.0,
                               help="seconds to wait (default 60)")
    status_parser = commands.add_parser("status", help="say what the server is doing")
    status_parser.add_argument("--pidfile", default="twistd.pid")
    status_parser.add_argument("--json", action="store_true", help="the whole status entry")
    preflight_parser = commands.add_parser(
        "preflight", help="import the server's code and check `twistd graceful` options "
                          "without binding anything (a master runs it before re-executing)")
    preflight_parser.add_argument("graceful_args", nargs=argparse.REMAINDER)
    top_parser = commands.add_parser(
        "top", help="watch every process and the last upgrades, redrawn every second "
                    "(Ctrl-C to leave)")
    top_parser.add_argument("--pidfile", default="twistd.pid")
    top_parser.add_argument("--interval", type=float, default=1.0,
                            help="seconds between redraws (default 1)")
    top_parser.add_argument("--once", action="store_true",
                            help="print one screen and exit (3 if there is no status file)")
    args = parser.parse_args(argv)
    if args.command == "preflight":
        graceful_args = args.graceful_args
        if graceful_args[:1] == ["--"]:
            graceful_args = graceful_args[1:]
        return preflight(graceful_args)
    if args.command == "top":
        if args.interval <= 0:
            parser.error("--interval must be > 0")
        from twisted_graceful.top import top
        return top(args.pidfile, interval=args.interval, once=args.once)
    if args.command == "reload":
        if args.timeout <= 0:
            parser.error("--timeout must be > 0")
        return Reload(args.pidfile, args.timeout).run()
    return status(args.pidfile, as_json=args.json)
