"""
See and steer a graceful server: Prometheus metrics and C{GET /status} on
their own listener (C{--metrics-port}, handed over like the others), and a
status file next to the pidfile that the C{reload}/C{status} commands read.

    metrics = GracefulMetrics(graceful)
    metrics.observe_http_site(site)          # graceful_requests_total{protocol="http"}
    metrics.observe_txn_factory(txn)         # graceful_requests_total{protocol="txn"}
    graceful.add_listener("metrics", "tcp:9090:interface=127.0.0.1", metrics.site())
    StatusFile(graceful)                     # <pidfile>.status.json

Every process has its own L{CollectorRegistry}, so its counters start at zero
with each generation (each generation is a new process): dashboards should
use C{graceful_generation} (or C{rate()}, which handles resets). Two things
are carried over so that they are not lost with the process that counted
them:

  - C{graceful_reloads_total} goes to the next generation in its environment
    (L{RELOADS_ENV}), plus the reload that started it;
  - the upgrade that started a generation (timed by its parent) and the drain
    of the previous generation (its duration and the connections it cut)
    happen in a process nobody scrapes any more: its successor reads them from
    the status file (so only with a pidfile) and counts them once.

That is the process that serves alone (C{--workers 0}). Under a master
(C{--workers N}), every worker and the master write their metrics into one
directory the master creates (prometheus_client's multiprocess mode,
L{MasterMetrics}), and C{/metrics} of any worker serves the sum over every
process, alive or gone: counters go on across upgrades and worker restarts.

    metrics = GracefulMetrics(graceful, shared_dir=worker_directory(graceful))
    install_master(master_service)           # in the master: the directory
"""

import os
import struct
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.twisted import MetricsResource
from twisted.internet import task
from twisted.logger import Logger
from twisted.web import resource

from twisted_graceful._twisted import GenericHTTPChannelProtocol
from twisted_graceful.http import DrainableHTTPChannel, GracefulSite
from twisted_graceful.lifecycle import STARTING, STATES
from twisted_graceful.master_metrics import (  # noqa: F401 (these were defined here)
    HELP_RESTARTS,
    HELP_SHARED_GENERATION,
    HELP_SHARED_RELOADS,
    HELP_SHARED_STATE,
    HELP_SHARED_UPGRADE,
    MULTIPROC_ENV,
    MULTIPROC_PREFIX,
    RELOAD_RESULTS,
    UPGRADE_BUCKETS,
    MasterMetrics,
    install_master,
    master_directory,
    use_multiprocess,
)
from twisted_graceful.statusfile import (
    ProcessStatus,
    StatusFile,
    read_status,
    status_path,
)
from twisted_graceful.statuspage import OverviewResource, StatusPage, StatusResource

RELOADS_ENV = "GRACEFUL_RELOADS"
TXN_RESULTS = ("committed", "aborted", "error")
HTTP_RESULTS = ("1xx", "2xx", "3xx", "4xx", "5xx")
DRAIN_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# How often a worker writes its open connections and transactions in flight
# (and whenever it answers a scrape).
LIVE_REFRESH_SECONDS = 1.0

# One help text per metric, whichever process writes it.
HELP_REQUESTS = ("Finished HTTP requests by status class and transactions by result "
                 "(committed, aborted, error)")
HELP_RELOADS = ("Upgrades (SIGHUP) by result: ok, failed (the child exited or could not "
                "start), timeout (not ready in time). Carried over from generation to "
                "generation.")
HELP_UPGRADE = ("Successful upgrades: from the signal to the next generation being ready "
                "(observed by the old generation; its successor imports the one that started "
                "it from the status file)")
HELP_DRAIN = ("Drains: from the moment a generation stopped accepting to its last connection "
              "closed (the previous generation's drain is counted by its successor)")
HELP_CUT = "Connections aborted at the hard drain deadline"
HELP_OPEN = "Open connections per protocol"
HELP_INFLIGHT = ("Connections inside a transaction (an HTTP request being handled, a "
                 "transaction between BEGIN and its COMMIT reply)")
HELP_STATE = "1 for the state this process is in"
HELP_GENERATION = ("Generation of this process (1: started by hand; each successful upgrade "
                   "adds 1). Counters reset when it changes.")
# Under a master the same metrics mean the whole server (the master's own in
# twisted_graceful.master_metrics):
HELP_SHARED_DRAIN = ("Drains of workers: from the moment a worker stopped accepting to its last "
                     "connection closed (one per worker)")
HELP_DATAGRAMS = ("Datagrams read on the UDP listener by result: pong (a PING answered), log "
                  "(any other datagram), refused (a malformed PING, or its answer could not "
                  "be sent)")
HELP_CERT_EXPIRY = ("When the certificate a TLS listener serves to new connections expires "
                    "(Unix time; loaded by each generation when it starts)")


class GracefulMetrics:
    """
    The Prometheus metrics of one process: in a registry of its own (the
    process serves alone), or, with C{shared_dir}, written into the
    directory every process of a master's server shares, and served summed
    over all of them.

    @param shared_dir: L{None} for a process that serves alone (C{--workers
        0}, a C{.tac} without a master); for a worker of a master, the
        directory its master made (L{worker_directory}).
    """

    log = Logger()

    def __init__(self, graceful, registry=None, status=None, environ=None, shared_dir=None):
        self.graceful = graceful
        self.registry = registry if registry is not None else CollectorRegistry()
        self.status = status or ProcessStatus(graceful)
        self.environ = graceful.environ if environ is None else environ
        self.shared_dir = shared_dir
        self._protocols = set()
        self._reload_counts = dict.fromkeys(RELOAD_RESULTS, 0)
        self._snapshot = None
        self._imported_drain = False
        self._imported_upgrade = False
        self._lock = threading.Lock()
        self._on_serving = []  # what starts once this process serves
        # (protocol, result) -> count, written in the reactor thread only; a
        # collector copies it at scrape time. Cheaper per request than a
        # prometheus Counter (no lock, no label lookup).
        self.request_counts = {}
        if shared_dir is None:
            self._own_registry(self.registry)
        else:
            self._shared_registry(self.registry, shared_dir)
        graceful.add_observer(self._event)

    def _own_registry(self, r):
        r.register(_BeforeScrape(self))  # first: what it imports shows in this scrape
        self.generation = Gauge("graceful_generation", HELP_GENERATION, registry=r)
        self.generation.set_function(lambda: self._live()["generation"])
        self.reloads = Counter("graceful_reloads", HELP_RELOADS, ["result"], registry=r)
        self.upgrade_duration = Histogram(
            "graceful_upgrade_duration_seconds", HELP_UPGRADE, buckets=UPGRADE_BUCKETS,
            registry=r)
        self.drain_duration = Histogram(
            "graceful_drain_duration_seconds", HELP_DRAIN, buckets=DRAIN_BUCKETS, registry=r)
        r.register(_RequestsCollector(self))
        self.cut = Counter("graceful_connections_cut", HELP_CUT, registry=r)
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)
        ProcessCollector(registry=r)
        r.register(_LiveCollector(self))

    def _shared_registry(self, r, directory):
        """
        A worker of a master: each value is written, as it changes, into this
        process's files in C{directory}; a scrape reads every process's
        files (L{MultiProcessCollector}). No custom collector: its values
        would be this worker's alone. The master writes the upgrades, the
        generation and the state (L{MasterMetrics}).
        """
        use_multiprocess(directory)
        MultiProcessCollector(r, path=directory)
        # Not registered: the registry above reads them from the files.
        self.requests = Counter("graceful_requests", HELP_REQUESTS, ["protocol", "result"],
                                registry=None)
        self.drain_duration = Histogram(
            "graceful_drain_duration_seconds", HELP_SHARED_DRAIN, buckets=DRAIN_BUCKETS,
            registry=None)
        self.cut = Counter("graceful_connections_cut", HELP_CUT, registry=None)
        # Summed over the workers alive: the master removes a worker's share
        # when it exits (mark_process_dead).
        self.open_connections = Gauge("graceful_open_connections", HELP_OPEN, ["protocol"],
                                      registry=None, multiprocess_mode="livesum")
        self.inflight = Gauge("graceful_inflight_transactions", HELP_INFLIGHT, ["protocol"],
                              registry=None, multiprocess_mode="livesum")
        self._written = {}  # (gauge, protocol) -> the value last written
        self._live_loop = None

    # --- wiring -------------------------------------------------------------
    def observe_http_site(self, site, protocol="http"):
        """
        Count the requests C{site} finishes, by status class, from the moment
        this process serves (before that, it accepts nothing: what its site
        answers is its own readiness self-test, not a client's request).
        """
        self._protocols.add(protocol)
        original = site.log
        served = self.status.served  # for the status page and top
        served.setdefault(protocol, 0)
        if self.shared_dir is not None:
            requests = self.requests
            children = {int(result[0]): requests.labels(protocol, result)
                        for result in HTTP_RESULTS}
            # Each count is written into this worker's mmapped file before
            # the response leaves (a worker killed with SIGKILL loses
            # nothing), by the same write Counter.inc makes, without its
            # five Python calls (docs/design.md, fact 47).
            slots = {status_class: slot for status_class, slot in
                     ((c, mmaped_slot(child)) for c, child in children.items())
                     if slot is not None}
            pack = _PACK_COUNT

            def log(request):
                try:
                    status_class = int(request.code) // 100
                    slot = slots.get(status_class)
                    if slot is not None:
                        value, file, position = slot
                        count = value._value + 1.0
                        value._value = count
                        file._m[position:position + 16] = pack(count, 0.0)
                    else:
                        (children.get(status_class) or requests.labels(
                            protocol, f"{status_class}xx")).inc()
                    served[protocol] += 1
                finally:
                    original(request)
        else:
            counts = self.request_counts
            keys = {}
            for result in HTTP_RESULTS:
                keys[int(result[0])] = key = (protocol, result)
                counts[key] = 0

            def log(request):
                try:
                    status_class = int(request.code) // 100
                    key = keys.get(status_class) or (protocol, f"{status_class}xx")
                    counts[key] = counts.get(key, 0) + 1
                    served[protocol] += 1
                finally:
                    original(request)

        def install():
            site.log = log

        self._when_serving(install)
        return site

    def observe_txn_factory(self, factory, protocol="txn"):
        """
        Count the transactions of a L{TxnFactory} by result.
        """
        self._protocols.add(protocol)
        served = self.status.served  # for the status page and top
        served.setdefault(protocol, 0)
        if self.shared_dir is not None:
            requests = self.requests
            children = {result: requests.labels(protocol, result) for result in TXN_RESULTS}

            def observe(result):
                (children.get(result) or requests.labels(protocol, result)).inc()
                served[protocol] += 1
        else:
            counts = self.request_counts
            for result in TXN_RESULTS:
                counts[(protocol, result)] = 0

            def observe(result):
                key = (protocol, result)
                counts[key] = counts.get(key, 0) + 1
                served[protocol] += 1

        factory.transaction_observer = observe
        return factory

    def observe_datagrams(self, ping_protocol, protocol="udp"):
        """
        Count the datagrams a L{twisted_graceful.datagram.PingProtocol} reads,
        by result.
        """
        from twisted_graceful.datagram import RESULTS

        registry = None if self.shared_dir is not None else self.registry
        datagrams = Counter("graceful_datagrams", HELP_DATAGRAMS, ["protocol", "result"],
                            registry=registry)
        children = {result: datagrams.labels(protocol, result) for result in RESULTS}
        ping_protocol.observer = lambda result: children[result].inc()
        return ping_protocol

    def observe_certificates(self):
        """
        The expiry of each TLS listener's certificate, as this process serves
        it (under a master, the worker that started last: the newest set).
        """
        certificates = {name: listener.certificate
                        for name, listener in self.graceful.listeners.items()
                        if getattr(listener.spec, "role", None) == "tls"}
        if not certificates:
            return
        registry = None if self.shared_dir is not None else self.registry
        expiry = Gauge("graceful_tls_certificate_expiry_timestamp_seconds", HELP_CERT_EXPIRY,
                       ["listener"], registry=registry, multiprocess_mode="mostrecent")

        def write():
            for name, listener in self.graceful.listeners.items():
                if listener.certificate is not None:
                    expiry.labels(name).set(listener.certificate.not_after)

        self._when_serving(write)

    def _when_serving(self, start):
        if self.graceful.state == STARTING:
            self._on_serving.append(start)
        else:
            start()

    def resource(self):
        """
        C{/metrics} (Prometheus text), C{/status} (JSON), and the status
        page (C{/}, which polls C{/overview}).
        """
        root = _Root()
        root.putChild(b"metrics", _Snapshotting(self, MetricsResource(self.registry)))
        root.putChild(b"status", StatusResource(self.status))
        root.putChild(b"overview", OverviewResource(self.status))
        return root

    def site(self):
        """
        A site for the metrics listener. Its connections are tracked (and
        drained) like the others, under the protocol name C{metrics}.
        """
        self._protocols.add("metrics")
        return MetricsSite(self.resource(), drain_tracker=self.graceful.tracker)

    # --- events ---------------------------------------------------------------
    def _event(self, event, **details):
        if event == "serving":
            starts, self._on_serving = self._on_serving, []
            for start in starts:
                start()
        if self.shared_dir is not None:
            self._shared_event(event, **details)
        elif event == "serving":
            if details.get("source") in ("inherited", "orphaned"):
                self._carry_over_reloads()
            self._save_reloads()
        elif event in ("upgrade-ok", "upgrade-failed"):
            outcome = details["outcome"]
            result = outcome.result if outcome.result in RELOAD_RESULTS else "failed"
            self._count_reload(result)
            if result == "ok" and outcome.duration is not None:
                self.upgrade_duration.observe(outcome.duration)
            self._save_reloads()
        elif event == "drained":
            report = details["report"]
            self.drain_duration.observe(report.duration)
            self.cut.inc(len(report.cut))

    def _shared_event(self, event, **details):
        """
        A worker of a master: its drain is its own; its upgrades are the
        master's to count (a worker never upgrades), and nothing is carried
        in the environment (the files outlive the process).
        """
        if event == "serving" and self._live_loop is None:
            self._live_loop = task.LoopingCall(self._write_live)
            self._live_loop.clock = self.graceful.reactor
            self._live_loop.start(LIVE_REFRESH_SECONDS, now=False)
        elif event == "drained" and details.get("report") is not None:
            report = details["report"]
            self.drain_duration.observe(report.duration)
            self.cut.inc(len(report.cut))
        self._write_live()
        if event == "drained" and self._live_loop is not None and self._live_loop.running:
            self._live_loop.stop()

    def _write_live(self):
        """
        Write this worker's open connections and transactions in flight
        into its file (only what changed): the gauges the other workers'
        scrapes sum. Runs every L{LIVE_REFRESH_SECONDS}, on every event and
        when this worker answers a scrape.
        """
        try:
            counts = self.graceful.tracker.counts()
            self._protocols.update(counts)  # a protocol seen once stays, at zero
            written = self._written
            for protocol in self._protocols:
                total, inside = counts.get(protocol, (0, 0))
                for gauge, value in ((self.open_connections, total), (self.inflight, inside)):
                    if written.get((gauge, protocol)) != value:
                        gauge.labels(protocol).set(value)
                        written[(gauge, protocol)] = value
        except Exception:
            self.log.failure("writing the live gauges")

    def _carry_over_reloads(self):
        """
        The previous generation's counts (from the environment it spawned us
        with), plus the upgrade that made us.
        """
        carried = _parse_reloads(self.environ.get(RELOADS_ENV, ""))
        for result, count in carried.items():
            self._count_reload(result, count)
        self._count_reload("ok")

    def _count_reload(self, result, count=1):
        self._reload_counts[result] += count
        self.reloads.labels(result).inc(count)

    def _save_reloads(self):
        counts = self._reload_counts
        try:
            self.environ[RELOADS_ENV] = ",".join(f"{r}={n}" for r, n in counts.items())
        except (TypeError, ValueError):
            pass

    def import_previous_drain(self, doc=None):
        """
        Count the previous generation's drain once it is over (it is recorded
        in the status file).
        """
        if self._imported_drain or self.shared_dir is not None:
            return
        parent_pid = self.status.parent_pid
        if self.status.source not in ("inherited", "orphaned") or not parent_pid:
            self._imported_drain = True
            return
        if doc is None:
            path = status_path(self.graceful.pidfile) if self.graceful.pidfile else None
            doc = read_status(path) if path else None
        entry = (doc or {}).get("processes", {}).get(str(parent_pid)) or {}
        upgrade = entry.get("last_upgrade") or {}
        if not self._imported_upgrade and upgrade.get("result") == "ok" \
                and upgrade.get("child_pid") == os.getpid():
            # The upgrade that started us was timed by the parent.
            with self._lock:
                imported, self._imported_upgrade = self._imported_upgrade, True
            if not imported and upgrade.get("duration_seconds") is not None:
                self.upgrade_duration.observe(upgrade["duration_seconds"])
        drain = entry.get("drain")
        if not drain:
            return
        with self._lock:
            if self._imported_drain:
                return
            self._imported_drain = True
        self.drain_duration.observe(drain.get("duration_seconds") or 0.0)
        self.cut.inc(drain.get("cut") or 0)

    # --- scrape time ------------------------------------------------------------
    def snapshot(self):
        """
        Read the live values in the reactor thread, for a scrape that
        L{MetricsResource} then renders in a thread of the pool (a worker of
        a master writes its own share, which the scrape then reads back with
        every other process's).
        """
        if self.shared_dir is not None:
            self._write_live()
            return
        self._snapshot = self._read_live()

    def _live(self):
        if threading.current_thread() is threading.main_thread() or self._snapshot is None:
            return self._read_live()
        return self._snapshot

    def _read_live(self):
        counts = self.graceful.tracker.counts()
        self._protocols.update(counts)  # a protocol seen once stays, at zero
        return {
            "generation": self.graceful.generation,
            "state": self.status.state,
            "counts": counts,
            "protocols": sorted(self._protocols | set(counts)),
        }


def _parse_reloads(text):
    counts = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        # A count, not thousands of digits (int() of those raises).
        if name in RELOAD_RESULTS and value.isdigit() and len(value) <= 18:
            counts[name] = int(value)
    return counts


# A counter's value and its timestamp (always 0.0), as prometheus_client's
# mmap_dict writes them: one slice assignment, never a partial value.
_PACK_COUNT = struct.Struct("dd").pack


def mmaped_slot(child):
    """
    Where C{child}, a multiprocess L{Counter}'s child, keeps its value:
    C{(value, file, position)}, its C{MmapedValue}, its C{MmapedDict} and the
    offset of its value there, so that adding 1 is what C{child.inc()} does
    (the value, then the same 16 bytes of the mmapped file, at once) without
    C{Counter.inc}, the lock, the PID check and C{write_value}: 0.12 us
    instead of 0.78.

    L{None} when C{child} is not a multiprocess value or this
    prometheus_client keeps it otherwise (these are its private names, the
    same from 0.19 to 0.26): the caller then uses C{child.inc()}.

    What it skips: the lock, which orders writes from several threads (here
    every metric is written in the reactor thread; a scrape only reads), and
    the PID check, for a value made before a fork (a worker makes its values
    itself, after the zygote forked it or its interpreter started, so its
    PID never changes under them). The offset of a value never
    moves: the file only grows (C{_m} is read at each write all the same,
    as C{write_value} does: growing the file maps it again).
    """
    value = getattr(child, "_value", None)
    if not getattr(value, "_multiprocess", False):
        return None
    file = getattr(value, "_file", None)
    key = getattr(value, "_key", None)
    positions = getattr(file, "_positions", None)
    if (not isinstance(positions, dict) or key not in positions
            or not isinstance(getattr(value, "_value", None), float)
            or getattr(file, "_m", None) is None):
        return None
    return value, file, positions[key]


class _BeforeScrape:
    """
    Runs first at each scrape: count the previous generation's drain once it
    is recorded.
    """

    log = Logger()

    def __init__(self, metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        try:
            self.metrics.import_previous_drain()
        except Exception:
            self.log.failure("reading the previous generation's drain")
        return []


class _RequestsCollector:
    """
    C{graceful_requests_total}: finished HTTP requests by status class and
    transactions by result, from L{GracefulMetrics.request_counts}.
    """

    def __init__(self, metrics):
        self.metrics = metrics

    def describe(self):
        return [CounterMetricFamily("graceful_requests", "", labels=["protocol", "result"])]

    def collect(self):
        counts = dict(self.metrics.request_counts)  # one copy, atomic under the GIL
        family = CounterMetricFamily("graceful_requests", HELP_REQUESTS,
                                     labels=["protocol", "result"])
        for (protocol, result), value in sorted(counts.items()):
            family.add_metric([protocol, result], value)
        return [family]


class _LiveCollector:
    """
    Gauges computed at scrape time: open connections and connections inside
    a transaction per protocol, and the state.
    """

    def __init__(self, metrics):
        self.metrics = metrics

    def describe(self):
        return [
            GaugeMetricFamily("graceful_open_connections", "", labels=["protocol"]),
            GaugeMetricFamily("graceful_inflight_transactions", "", labels=["protocol"]),
            GaugeMetricFamily("graceful_state", "", labels=["state"]),
        ]

    def collect(self):
        live = self.metrics._live()
        opened = GaugeMetricFamily("graceful_open_connections", HELP_OPEN, labels=["protocol"])
        busy = GaugeMetricFamily("graceful_inflight_transactions", HELP_INFLIGHT,
                                 labels=["protocol"])
        for protocol in live["protocols"]:
            total, inside = live["counts"].get(protocol, (0, 0))
            opened.add_metric([protocol], total)
            busy.add_metric([protocol], inside)
        state = GaugeMetricFamily("graceful_state", HELP_STATE, labels=["state"])
        for name in STATES:
            state.add_metric([name], 1 if name == live["state"] else 0)
        return [opened, busy, state]


class _Root(resource.Resource):
    def getChild(self, path, request):
        if path == b"":
            return self
        return resource.NoResource()

    page = StatusPage()

    def render_GET(self, request):
        return self.page.render_GET(request)


class _Snapshotting(resource.Resource):
    """
    Take the live values in the reactor thread, then let the WSGI
    L{MetricsResource} render in the thread pool.
    """

    isLeaf = True

    def __init__(self, metrics, wrapped):
        resource.Resource.__init__(self)
        self.metrics = metrics
        self.wrapped = wrapped

    def render(self, request):
        self.metrics.snapshot()
        return self.wrapped.render(request)


class _MetricsChannel(DrainableHTTPChannel):
    protocol_name = "metrics"


class MetricsSite(GracefulSite):
    noisy = False

    def protocol(self):
        return GenericHTTPChannelProtocol(_MetricsChannel())

    def log(self, request):
        pass  # a scrape every few seconds is not worth a log line


# --- across processes (a master and its workers) ------------------------------
# The master's side (use_multiprocess, master_directory, MasterMetrics,
# install_master) is in twisted_graceful.master_metrics, imported from here too.

def worker_directory(graceful):
    """
    Where C{graceful} shares its metrics: for a worker of a master, the
    directory its master named in its environment; L{None} (a registry of
    its own, as before) for a process that serves alone (C{--workers 0}),
    whatever its environment says, and for a worker whose master made no
    directory.
    """
    if not graceful.is_worker:
        return None
    directory = graceful.environ.get(MULTIPROC_ENV)
    return directory if directory and os.path.isdir(directory) else None


def install(graceful, description, option="--metrics-port", http_site=None, txn_factory=None,
            status_file=True, registry=None, shared_dir=None, https_site=None,
            datagram_protocol=None):
    """
    Everything at once: metrics and C{/status} on a listener named
    C{metrics}, and the status file. Returns the L{GracefulMetrics}.

    @param shared_dir: see L{GracefulMetrics}.
    @param https_site: the site of a TLS listener (requests counted as
        C{protocol="https"}; its certificate's expiry is a gauge).
    @param datagram_protocol: the UDP listener's L{PingProtocol}.
    """
    status = ProcessStatus(graceful)
    if status_file:
        StatusFile(graceful, status)
    metrics = GracefulMetrics(graceful, registry=registry, status=status, shared_dir=shared_dir)
    if http_site is not None:
        metrics.observe_http_site(http_site)
    if txn_factory is not None:
        metrics.observe_txn_factory(txn_factory)
    if https_site is not None:
        metrics.observe_http_site(https_site, protocol="https")
        metrics.observe_certificates()
    if datagram_protocol is not None:
        metrics.observe_datagrams(datagram_protocol)
    graceful.add_listener("metrics", description, metrics.site(), option=option)
    return metrics


__all__ = [
    "GracefulMetrics", "MasterMetrics", "MetricsSite", "ProcessStatus", "StatusFile",
    "StatusResource", "install", "install_master", "master_directory", "read_status",
    "status_path", "use_multiprocess", "worker_directory", "RELOADS_ENV",
    "MULTIPROC_ENV",
]
