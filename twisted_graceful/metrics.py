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
"""

import os
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.twisted import MetricsResource
from twisted.logger import Logger
from twisted.web import resource

from twisted_graceful._twisted import GenericHTTPChannelProtocol
from twisted_graceful.http import DrainableHTTPChannel, GracefulSite
from twisted_graceful.lifecycle import STATES
from twisted_graceful.statusfile import (
    ProcessStatus,
    StatusFile,
    StatusResource,
    read_status,
    status_path,
)

RELOADS_ENV = "GRACEFUL_RELOADS"
RELOAD_RESULTS = ("ok", "failed", "timeout")
TXN_RESULTS = ("committed", "aborted", "error")
HTTP_RESULTS = ("1xx", "2xx", "3xx", "4xx", "5xx")
UPGRADE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DRAIN_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GracefulMetrics:
    """
    The Prometheus metrics of one generation, in a registry of its own.
    """

    def __init__(self, graceful, registry=None, status=None, environ=None):
        self.graceful = graceful
        self.registry = registry if registry is not None else CollectorRegistry()
        self.status = status or ProcessStatus(graceful)
        self.environ = graceful.environ if environ is None else environ
        self._protocols = set()
        self._reload_counts = dict.fromkeys(RELOAD_RESULTS, 0)
        self._snapshot = None
        self._imported_drain = False
        self._imported_upgrade = False
        self._lock = threading.Lock()
        r = self.registry
        r.register(_BeforeScrape(self))  # first: what it imports shows in this scrape
        self.generation = Gauge(
            "graceful_generation", "Generation of this process (1: started by hand; each "
            "successful upgrade adds 1). Counters reset when it changes.", registry=r)
        self.generation.set_function(lambda: self._live()["generation"])
        self.reloads = Counter(
            "graceful_reloads", "Upgrades (SIGHUP) by result: ok, failed (the child exited or "
            "could not start), timeout (not ready in time). Carried over from generation to "
            "generation.", ["result"], registry=r)
        self.upgrade_duration = Histogram(
            "graceful_upgrade_duration_seconds", "Successful upgrades: from the signal to the "
            "next generation being ready (observed by the old generation; its successor "
            "imports the one that started it from the status file)", buckets=UPGRADE_BUCKETS,
            registry=r)
        self.drain_duration = Histogram(
            "graceful_drain_duration_seconds", "Drains: from the moment a generation stopped "
            "accepting to its last connection closed (the previous generation's drain is "
            "counted by its successor)", buckets=DRAIN_BUCKETS, registry=r)
        # (protocol, result) -> count, written in the reactor thread only; a
        # collector copies it at scrape time. Cheaper per request than a
        # prometheus Counter (no lock, no label lookup).
        self.request_counts = {}
        r.register(_RequestsCollector(self))
        self.cut = Counter(
            "graceful_connections_cut", "Connections aborted at the hard drain deadline",
            registry=r)
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)
        ProcessCollector(registry=r)
        r.register(_LiveCollector(self))
        graceful.add_observer(self._event)

    # --- wiring -------------------------------------------------------------
    def observe_http_site(self, site, protocol="http"):
        """
        Count the requests C{site} finishes, by status class.
        """
        self._protocols.add(protocol)
        counts = self.request_counts
        keys = {}
        for result in HTTP_RESULTS:
            keys[int(result[0])] = key = (protocol, result)
            counts[key] = 0
        original = site.log

        def log(request):
            try:
                status_class = int(request.code) // 100
                key = keys.get(status_class) or (protocol, f"{status_class}xx")
                counts[key] = counts.get(key, 0) + 1
            finally:
                original(request)

        site.log = log
        return site

    def observe_txn_factory(self, factory, protocol="txn"):
        """
        Count the transactions of a L{TxnFactory} by result.
        """
        self._protocols.add(protocol)
        counts = self.request_counts
        for result in TXN_RESULTS:
            counts[(protocol, result)] = 0

        def observe(result):
            key = (protocol, result)
            counts[key] = counts.get(key, 0) + 1

        factory.transaction_observer = observe
        return factory

    def resource(self):
        """
        C{/metrics} (Prometheus text) and C{/status} (JSON).
        """
        root = _Root()
        root.putChild(b"metrics", _Snapshotting(self, MetricsResource(self.registry)))
        root.putChild(b"status", StatusResource(self.status))
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
        if self._imported_drain:
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
        L{MetricsResource} then renders in a thread of the pool.
        """
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
        if name in RELOAD_RESULTS and value.isdigit():
            counts[name] = int(value)
    return counts


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
        family = CounterMetricFamily(
            "graceful_requests", "Finished HTTP requests by status class and transactions "
            "by result (committed, aborted, error)", labels=["protocol", "result"])
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
        opened = GaugeMetricFamily(
            "graceful_open_connections", "Open connections per protocol", labels=["protocol"])
        busy = GaugeMetricFamily(
            "graceful_inflight_transactions", "Connections inside a transaction (an HTTP "
            "request being handled, a transaction between BEGIN and its COMMIT reply)",
            labels=["protocol"])
        for protocol in live["protocols"]:
            total, inside = live["counts"].get(protocol, (0, 0))
            opened.add_metric([protocol], total)
            busy.add_metric([protocol], inside)
        state = GaugeMetricFamily(
            "graceful_state", "1 for the state this process is in", labels=["state"])
        for name in STATES:
            state.add_metric([name], 1 if name == live["state"] else 0)
        return [opened, busy, state]


class _Root(resource.Resource):
    def getChild(self, path, request):
        if path == b"":
            return self
        return resource.NoResource()

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"twisted-graceful: /metrics (Prometheus), /status (JSON)\n"


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


def install(graceful, description, option="--metrics-port", http_site=None, txn_factory=None,
            status_file=True, registry=None):
    """
    Everything at once: metrics and C{/status} on a listener named
    C{metrics}, and the status file. Returns the L{GracefulMetrics}.
    """
    status = ProcessStatus(graceful)
    if status_file:
        StatusFile(graceful, status)
    metrics = GracefulMetrics(graceful, registry=registry, status=status)
    if http_site is not None:
        metrics.observe_http_site(http_site)
    if txn_factory is not None:
        metrics.observe_txn_factory(txn_factory)
    graceful.add_listener("metrics", description, metrics.site(), option=option)
    return metrics


__all__ = [
    "GracefulMetrics", "MetricsSite", "ProcessStatus", "StatusFile", "StatusResource",
    "install", "read_status", "status_path", "update_status_file", "RELOADS_ENV",
]
