"""
The status file: C{<pidfile>.status.json}, one entry per generation, which
C{python -m twisted_graceful status} and C{reload} read, and C{GET /status}.

Nothing here imports prometheus_client: the command-line tools read the
status file without loading the metrics machinery.
"""

import fcntl
import json
import os
import time

from twisted.logger import Logger
from twisted.web import resource

from twisted_graceful.listeners import describe_socket
from twisted_graceful.pidfile import pid_alive

STATUS_SUFFIX = ".status.json"
KEEP_ENTRIES = 8


def status_path(pidfile):
    """
    Where the status file of the server whose pidfile is C{pidfile} lives.
    """
    return pidfile + STATUS_SUFFIX


def read_status(path):
    """
    The status file's content (C{{"processes": {"<pid>": entry}}}), or
    C{None} if it is missing or unreadable. Written with C{os.replace}, it is
    never seen half-written.
    """
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("processes"), dict):
        return None
    return doc


def update_status_file(path, pid, entry, keep=KEEP_ENTRIES):
    """
    Put C{entry} under C{pid} in the status file. Every generation writes its
    own entry (the old one its last upgrade and drain, the new one its
    serving state) under an exclusive lock, so neither overwrites the other;
    the oldest entries of processes that are gone are dropped.
    """
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = read_status(path) or {"processes": {}}
        processes = doc["processes"]
        processes[str(pid)] = entry
        if len(processes) > keep:
            gone = sorted(
                (p for p in processes if p != str(pid) and not pid_alive(int(p))),
                key=lambda p: processes[p].get("updated_at") or 0,
            )
            for p in gone[: len(processes) - keep]:
                del processes[p]
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"version": 1, "processes": processes}, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        os.close(lock)


class ProcessStatus:
    """
    What one generation says about itself: the content of C{GET /status} and
    of its entry in the status file. Built by observing the L{GracefulService}.
    """

    def __init__(self, graceful, clock=time.time):
        self.graceful = graceful
        self.clock = clock
        self.started_at = clock()
        self.serving_since = None
        self.child_since = None
        self.handed_over_to = None
        self.drain = None
        self.exited = False
        self.listeners = {}
        graceful.add_observer(self._event)

    def _event(self, event, **details):
        if event == "serving":
            self.serving_since = self.clock()
            for name, listener in self.graceful.listeners.items():
                try:
                    self.listeners[name] = describe_socket(listener.port.socket)
                except (AttributeError, OSError):
                    pass
        elif event == "upgrade-started":
            self.child_since = self.clock()
        elif event == "handed-over":
            self.handed_over_to = details.get("child_pid")
        elif event == "drained":
            report = details["report"]
            self.drain = {
                "duration_seconds": report.duration,
                "connections_at_start": report.at_start,
                "busy_at_start": report.busy_at_start,
                "closed_by_server": report.closed_by_server,
                "closed_by_client": report.closed_by_client,
                "cut": len(report.cut),
                "finished_at": self.clock(),
            }
            self.exited = True

    @property
    def state(self):
        return "exited" if self.exited else self.graceful.state

    def as_dict(self):
        graceful = self.graceful
        upgrader = graceful.upgrader
        state = self.state
        child = upgrader.child if state == "upgrading" else None
        inheritance = graceful.inheritance
        inherited = inheritance is not None and inheritance.source == "inherited"
        outcome = upgrader.last_outcome
        return {
            "pid": os.getpid(),
            "generation": graceful.generation,
            "state": state,
            "started_at": self.started_at,
            "serving_since": self.serving_since,
            "parent_pid": inheritance.parent_pid if inherited else None,
            "pidfile": graceful.pidfile,
            "listeners": dict(self.listeners),
            "child": None if child is None else {
                "pid": getattr(child, "pid", None), "since": self.child_since},
            "last_upgrade": None if outcome is None else outcome.as_dict(),
            "handed_over_to": self.handed_over_to,
            "drain": self.drain,
            "updated_at": self.clock(),
        }


class StatusFile:
    """
    Keep this generation's entry of C{<pidfile>.status.json} up to date: on
    every event of the L{GracefulService} (serving, upgrade started, failed or
    ok, handed over, shutting down, drained). Nothing is written when the
    service has no pidfile.
    """

    log = Logger()

    def __init__(self, graceful, status=None, path=None):
        self.graceful = graceful
        self.status = status or ProcessStatus(graceful)
        self._path = path
        graceful.add_observer(self._event)

    @property
    def path(self):
        if self._path is not None:
            return self._path
        # The pidfile is known once the service acquired its inheritance.
        return status_path(self.graceful.pidfile) if self.graceful.pidfile else None

    def _event(self, event, **details):
        self.write()

    def write(self):
        path = self.path
        if path is None:
            return
        try:
            update_status_file(path, os.getpid(), self.status.as_dict())
        except OSError as e:
            self.log.warn("could not write the status file {path}: {err}", path=path, err=e)


class StatusResource(resource.Resource):
    """
    C{GET /status}: this process's L{ProcessStatus} as JSON.
    """

    isLeaf = True

    def __init__(self, status):
        resource.Resource.__init__(self)
        self.status = status

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.status.as_dict(), indent=1, sort_keys=True).encode() + b"\n"

    render_HEAD = render_GET
