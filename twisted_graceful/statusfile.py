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

from twisted.internet import task
from twisted.logger import Logger

from twisted_graceful.pidfile import atomic_write, pid_alive
from twisted_graceful.timeline import UpgradeTimeline

STATUS_SUFFIX = ".status.json"
KEEP_ENTRIES = 8
# How often a serving process rewrites its entry when its open connections,
# transactions or requests served changed (what the status page and top show).
LIVE_REFRESH_SECONDS = 1.0
# The metrics listener's own connections (a scrape, the status page polling)
# are not the traffic an operator watches drain.
UNCOUNTED_PROTOCOLS = ("metrics",)


def status_path(pidfile):
    """
    Where the status file of the server whose pidfile is C{pidfile} lives.
    """
    return pidfile + STATUS_SUFFIX


def read_status(path, alive=None):
    """
    The status file's content (C{{"processes": {"<pid>": entry}}}), or
    C{None} if it is missing or unreadable. Written with C{os.replace}, it is
    never seen half-written.

    @param alive: a liveness check (C{pid_alive}). With it, the entry of a
        process that is gone without a last word (C{kill -9}, a crash) reads
        C{"state": "gone"}, the state it last wrote kept as
        C{"recorded_state"}; without it, the file is read as written.
    """
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("processes"), dict):
        return None
    if alive is not None:
        for pid, entry in doc["processes"].items():
            if isinstance(entry, dict) and entry.get("state") not in ("exited", "gone") \
                    and pid.isdigit() and not alive(int(pid)):
                entry["recorded_state"] = entry.get("state")
                entry["state"] = "gone"
    return doc


def update_status_file(path, pid, entry, keep=KEEP_ENTRIES, sync=True):
    """
    Put C{entry} under C{pid} in the status file. Every generation writes its
    own entry (the old one its last upgrade and drain, the new one its
    serving state) under an exclusive lock, so neither overwrites the other;
    the oldest entries of processes that are gone are dropped.

    @param sync: flush it to disk first (an event); not for a refresh of the
        live counts, rewritten every second (no fsync in the reactor's
        thread each second).
    """
    # The lock file is never followed through a symlink, and only we read it.
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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
        text = json.dumps({"version": 1, "processes": processes}, indent=1, sort_keys=True)
        atomic_write(path, text + "\n", 0o600, sync=sync)
    finally:
        os.close(lock)


class ProcessStatus:
    """
    What one generation says about itself: the content of C{GET /status} and
    of its entry in the status file, built from the events of the
    L{GracefulService} alone (their payloads are complete).
    """

    def __init__(self, graceful, clock=time.time):
        self.graceful = graceful
        self.clock = clock
        self.started_at = clock()
        self.pid = None
        self.generation = None
        self.state = "starting"
        self.serving_since = None
        self.source = None
        self.parent_pid = None
        self.listeners = {}
        self.child = None
        self.scheduled_upgrade = None
        self.upgrade_requests = 0
        self.last_request = None
        self.last_upgrade = None
        self.took_back_from = None
        self.drain = None
        self.role = None
        self.workers = None
        self.zygote = None
        self.zygote_ready = False
        self.execs = None
        self.last_reexec = None
        self.timeline = UpgradeTimeline(clock)
        # protocol -> requests (or transactions) finished; kept by whoever
        # counts them (L{twisted_graceful.metrics.GracefulMetrics}).
        self.served = {}
        graceful.add_observer(self._event)
        graceful.add_observer(self.timeline)

    def _event(self, event, pid=None, generation=None, state=None, role=None, workers=None,
               execs=None, **details):
        self.pid, self.generation, self.state, self.role = pid, generation, state, role
        if workers is not None:
            self.workers = workers
        if "zygote" in details:
            self.zygote = details["zygote"]
            self.zygote_ready = bool(details.get("zygote_ready"))
        if execs is not None:
            self.execs = execs
        if event == "serving":
            self.serving_since = self.clock()
            self.source = details.get("source")
            if details.get("parent_pid") is not None:
                self.parent_pid = details["parent_pid"]
            self.listeners.update(details.get("listeners") or {})
        elif event == "upgrade-requested":
            self.upgrade_requests += 1
            self.last_request = {"reason": details.get("reason"), "answer": details.get("answer"),
                                 "why": details.get("why"), "at": self.clock()}
        elif event == "reexec-refused":
            self.last_reexec = {"answer": "refused", "reason": details.get("reason"),
                                "why": details.get("why"), "at": self.clock()}
        elif event == "upgrade-scheduled":
            self.scheduled_upgrade = {"at": self.clock() + details["delay"],
                                      "reason": details.get("reason")}
        elif event == "upgrade-unscheduled":
            self.scheduled_upgrade = None
        elif event == "upgrade-started":
            self.scheduled_upgrade = None
            self.child = {"pid": details["child_pid"], "since": self.clock()}
        elif event in ("upgrade-ok", "upgrade-failed"):
            self.child = None
            self.last_upgrade = details["outcome"].as_dict()
        elif event == "successor-exited" and details.get("result") == "took-back":
            self.took_back_from = {"pid": details["successor_pid"], "how": details["how"],
                                   "at": self.clock()}
        elif event == "drained" and details.get("report") is not None:
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

    def as_dict(self):
        return {
            "pid": self.pid or os.getpid(),
            "role": self.role,
            "workers": self.workers,
            "zygote": self.zygote,
            "zygote_ready": self.zygote_ready,
            "execs": self.execs,
            "last_reexec": self.last_reexec,
            "generation": self.generation or self.graceful.generation,
            "state": self.state,
            "started_at": self.started_at,
            "serving_since": self.serving_since,
            "source": self.source,
            "parent_pid": self.parent_pid,
            "pidfile": self.graceful.pidfile,
            "listeners": dict(self.listeners),
            # TLS listeners: the certificate this process serves (loaded at its start).
            "certificates": dict(getattr(self.graceful, "certificates", None) or {}),
            "child": None if self.child is None else dict(self.child),
            "scheduled_upgrade": self.scheduled_upgrade,
            "upgrade_requests": self.upgrade_requests,
            "last_request": self.last_request,
            "last_upgrade": self.last_upgrade,
            "took_back_from": self.took_back_from,
            "drain": self.drain,
            "upgrades": self.timeline.as_list(),
            "live": self.live(),
            "updated_at": self.clock(),
        }

    def live(self):
        """
        Open connections, connections inside a transaction (a request being
        handled, a transaction between BEGIN and its reply) and requests
        finished, over the protocols clients use (not C{metrics}).
        """
        tracker = getattr(self.graceful, "tracker", None)
        counts = tracker.counts() if tracker is not None else {}
        counted = [c for p, c in counts.items() if p not in UNCOUNTED_PROTOCOLS]
        return {
            "connections": sum(total for total, _ in counted),
            "transactions": sum(inside for _, inside in counted),
            "requests": sum(n for p, n in self.served.items() if p not in UNCOUNTED_PROTOCOLS),
        }


class StatusFile:
    """
    Keep this generation's entry of C{<pidfile>.status.json} up to date: on
    every event of the L{GracefulService} (serving, upgrade started, failed or
    ok, handed over, shutting down, drained). Nothing is written when the
    service has no pidfile.
    """

    log = Logger()

    def __init__(self, graceful, status=None, path=None, refresh=LIVE_REFRESH_SECONDS):
        self.graceful = graceful
        self.status = status or ProcessStatus(graceful)
        self._path = path
        self._written_live = None
        self._refresh = None
        if refresh and getattr(graceful, "tracker", None) is not None:
            # A process that serves: its connections drain between events.
            self._refresh = task.LoopingCall(self.refresh)
            self._refresh.clock = graceful.reactor
            self._refresh_every = refresh
        graceful.add_observer(self._event)

    @property
    def path(self):
        if self._path is not None:
            return self._path
        # The pidfile is known once the service acquired its inheritance.
        return status_path(self.graceful.pidfile) if self.graceful.pidfile else None

    def _event(self, event, **details):
        self.write()
        loop = self._refresh
        if loop is None:
            return
        if event == "serving" and not loop.running:
            loop.start(self._refresh_every, now=False)
        elif event == "drained" and loop.running:
            loop.stop()

    def refresh(self):
        """
        Rewrite the entry if the live counts changed since the last write.
        """
        try:
            if self.status.live() != self._written_live:
                self.write(sync=False)
        except Exception:
            self.log.failure("refreshing the status file")  # the next second tries again

    def write(self, sync=True):
        path = self.path
        if path is None:
            return
        try:
            entry = self.status.as_dict()
            self._written_live = entry["live"]
            update_status_file(path, os.getpid(), entry, sync=sync)
        except OSError as e:
            self.log.warn("could not write the status file {path}: {err}", path=path, err=e)


def server_view(pidfile, alive=pid_alive):
    """
    Every live process of the server, as the status file knows it (a master
    and its workers, or the generations of a self-replacing server): pid ->
    role, generation, state.
    """
    doc = read_status(status_path(pidfile)) if pidfile else None
    view = {}
    for pid, entry in sorted(((doc or {}).get("processes") or {}).items()):
        if pid.isdigit() and alive(int(pid)):
            view[pid] = {key: entry.get(key) for key in ("role", "generation", "state")}
    return view


def __getattr__(name):
    # StatusResource lives with the other resources of the metrics listener
    # (twisted_graceful.statuspage): a master writes the status file but
    # serves nothing, and does not import twisted.web.
    if name == "StatusResource":
        from twisted_graceful.statuspage import StatusResource

        return StatusResource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
