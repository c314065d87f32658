"""
The master's share of the metrics (docs/design.md, "Start-up cost"): what
a master of C{--workers N} writes into the directory its workers' C{/metrics}
sum. A master serves nothing, so this module imports prometheus_client's
values and multiprocess files but neither twisted.web nor
C{prometheus_client.twisted} (which imports C{twisted.web.wsgi} and a
thread pool); L{twisted_graceful.metrics} imports every name from here.
"""

import atexit
import os
import shutil
import tempfile

from prometheus_client import Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import mark_process_dead
from twisted.logger import Logger

from twisted_graceful.lifecycle import STARTING, STATES

RELOAD_RESULTS = ("ok", "failed", "timeout")
UPGRADE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# prometheus_client's multiprocess mode: the directory every process of one
# server writes its metrics into (an ordinary variable of the environment).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MULTIPROC_PREFIX = "twisted-graceful-metrics-"

# Under a master the metrics mean the whole server:
HELP_SHARED_RELOADS = ("Upgrades of the workers (SIGHUP to the master) by result: ok, failed "
                       "(a new worker exited or could not start), timeout (not all ready in "
                       "time)")
HELP_SHARED_UPGRADE = "Successful upgrades: from the signal to every new worker being ready"
HELP_SHARED_GENERATION = ("Generation of the workers that serve (1: the first set; each "
                          "successful upgrade adds 1)")
HELP_SHARED_STATE = "1 for the state the master is in"
HELP_RESTARTS = ("Workers that exited unexpectedly (serving, or starting in place of one that "
                 "did) and were replaced")


def use_multiprocess(directory, environ=None):
    """
    This process writes its prometheus_client values into C{directory}:
    what prometheus_client chooses by itself when C{PROMETHEUS_MULTIPROC_DIR}
    is set before it is imported (a worker, started with it), and what a
    master, which imported it before making the directory, asks for here.
    Metrics made earlier keep their values in memory.
    """
    environ = os.environ if environ is None else environ
    environ[MULTIPROC_ENV] = directory
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


def master_directory(master):
    """
    The master's directory: a new private one; after a re-exec (SIGUSR2,
    same PID, same workers), the one our previous image made, so that its
    workers and its own counts stay in the view.
    """
    inherited = master.environ.get(MULTIPROC_ENV)
    if (master.execs and inherited and os.path.basename(inherited).startswith(MULTIPROC_PREFIX)
            and os.path.isdir(inherited) and os.stat(inherited).st_uid == os.getuid()):
        return inherited
    return tempfile.mkdtemp(prefix=MULTIPROC_PREFIX)


class MasterMetrics:
    """
    The master's share of the workers' C{/metrics}: it has no metrics
    listener, so it writes what only it knows into the directory the
    workers share, as one more process: upgrades by result and their
    duration, workers replaced, the generation that serves and its own state.
    It gives the directory to every worker (in their environment) and, when
    a worker exits, removes its share of the gauges of live processes.

    @param master: a L{twisted_graceful.master.MasterService}.
    """

    log = Logger()

    def __init__(self, master, directory):
        self.master = master
        self.directory = directory
        master.environ[MULTIPROC_ENV] = directory  # every worker's environment
        self._metrics = None
        master.add_observer(self._event)
        master.master.exit_hooks.append(self.process_ended)

    def _made(self):
        # Made at the first event, in the process that runs the reactor (not
        # in the one twistd forks it from when it daemonizes).
        if self._metrics is None:
            m = self._metrics = {}
            m["reloads"] = Counter("graceful_reloads", HELP_SHARED_RELOADS, ["result"],
                                   registry=None)
            for result in RELOAD_RESULTS:
                m["reloads"].labels(result)
            m["upgrade"] = Histogram("graceful_upgrade_duration_seconds", HELP_SHARED_UPGRADE,
                                     buckets=UPGRADE_BUCKETS, registry=None)
            m["restarts"] = Counter("graceful_worker_restarts", HELP_RESTARTS, registry=None)
            # Only the master writes these: "mostrecent" serves the value it
            # set last, as one series without a pid label (summing or taking
            # the largest would be the same with one writer, but says less).
            m["generation"] = Gauge("graceful_generation", HELP_SHARED_GENERATION,
                                    registry=None, multiprocess_mode="mostrecent")
            m["state"] = Gauge("graceful_state", HELP_SHARED_STATE, ["state"], registry=None,
                               multiprocess_mode="mostrecent")
        return self._metrics

    def _event(self, event, generation=None, state=None, **details):
        m = self._made()
        if event in ("upgrade-ok", "upgrade-failed") and state != STARTING:
            # (The first set failing is not an upgrade: the master exits.)
            outcome = details["outcome"]
            result = outcome.result if outcome.result in RELOAD_RESULTS else "failed"
            m["reloads"].labels(result).inc()
            if result == "ok" and outcome.duration is not None:
                m["upgrade"].observe(outcome.duration)
        elif event == "worker-exited" and not details.get("expected"):
            m["restarts"].inc()
        if generation is not None:
            m["generation"].set(generation)
        if state is not None:
            for name in STATES:
                m["state"].labels(name).set(1 if name == state else 0)

    def process_ended(self, pid):
        """
        A worker exited: its open connections and transactions in flight are
        no longer the server's. Its counters stay in the sum.
        """
        if not pid:
            return
        try:
            mark_process_dead(pid, self.directory)
        except OSError as e:
            self.log.warn("metrics: could not remove the live gauges of pid {pid}: {err}",
                          pid=pid, err=e)

    def close(self):
        """
        Remove the directory (the master is exiting; every worker is gone).
        """
        shutil.rmtree(self.directory, ignore_errors=True)


def install_master(master):
    """
    In the master: make (or keep, after a re-exec) the directory, write this
    process's own values there, hand it to every worker, and remove it when
    the master exits. Returns the L{MasterMetrics}.
    """
    directory = master_directory(master)
    use_multiprocess(directory)
    shared = MasterMetrics(master, directory)
    # A re-exec replaces the process image without either of these: the next
    # image keeps the directory.
    master.reactor.addSystemEventTrigger("after", "shutdown", shared.close)
    atexit.register(shared.close)
    return shared
