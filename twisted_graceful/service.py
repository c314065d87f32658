"""
L{GracefulService}: the machinery any Twisted application uses to upgrade
itself without refusing a connection or cutting a request.

    svc = GracefulService(reactor, pidfile="app.pid")
    svc.add_listener("http", "tcp:8080", site)
    svc.setServiceParent(application)

Every listener is a raw socket (bound, inherited from the previous
generation, or from systemd: L{twisted_graceful.inherit}) served through
C{adoptStreamPort}. SIGHUP spawns the next generation; when it is ready this
one stops accepting, drains and exits. SIGTERM drains and exits. Which state
a generation is in, and what may happen next, is the L{Lifecycle}'s.
"""

import os
import signal
import sys
from collections import OrderedDict
from collections.abc import MutableMapping, Sequence
from typing import Any, Optional

from twisted.application import service
from twisted.application.internet import backoffPolicy
from twisted.internet import defer, task
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from twisted_graceful import lineage as L
from twisted_graceful._twisted import (
    ClosedPort,
    adopt_listening_port,
    append_to_logfiles,
    protect_twistd_pidfile,
    share_accepts,
)
from twisted_graceful.child import ReadyPipe, take_over_stdio
from twisted_graceful.command import resolve_command
from twisted_graceful.drain import DRAIN_MODES, TRANSACTION, DrainTracker
from twisted_graceful.handoff import WORKER, WORKERS_ENV
from twisted_graceful.inherit import Inheritance
from twisted_graceful.interfaces import (
    ILifecycleObserver,
    IReadinessCheck,
    LifecycleObserver,
    ReadinessCheck,
    require_callable,
)
from twisted_graceful.lifecycle import (
    DRAINING,
    EXITED,
    SERVING,
    SHUTTING_DOWN,
    STARTING,
    Lifecycle,
    stop_reactor,
)
from twisted_graceful.listeners import (
    STREAM,
    TLS,
    CertificateError,
    ListenSpec,
    describe_socket,
    parse_listen_description,
)
from twisted_graceful.parent import NextGenerationProcess, spawn_next_generation

# Readiness checks are retried after 0.1 s, 0.2 s, ... up to 2 s apart.
READINESS_RETRY = backoffPolicy(initialDelay=0.1, maxDelay=2.0, factor=2.0, jitter=lambda: 0.0)
EXIT_NOT_READY = 3  # the exit status of a generation that gave up getting ready
EXIT_NOT_TAKING_OVER = 4  # ready, but the lineage record refused it (its parent is gone)
MASTER_WATCH_INTERVAL = 1.0  # seconds between a worker's checks that its master lives


class Listener:
    """
    One named listener: what to serve, where, and the port serving it.
    """

    def __init__(self, name, spec, factory, option, certificate=None):
        self.name = name
        self.spec = spec
        self.factory = factory  # for TLS, the plain factory: wrapped when adopted
        self.option = option
        self.certificate = certificate  # TLS: the LoadedCertificate this generation serves
        self.port = None

    def describe(self):
        try:
            where = describe_socket(self.port.socket)
        except (AttributeError, OSError):
            return self.spec.description
        if self.spec.role == TLS:
            where = "ssl:" + where.partition(":")[2]
        return where

    def served_factory(self):
        """
        What the port serves: the factory, over TLS for a TLS listener.
        """
        if self.spec.role == TLS:
            # Imported here: a server without a TLS listener never needs it.
            from twisted_graceful.tls import load_certificate, tls_factory

            if self.certificate is None:
                self.certificate = load_certificate(self.spec, self.option)
            return tls_factory(self.certificate, self.factory)
        return self.factory


class ListeningPorts:
    """
    The listeners of one generation, switched together: paused (the
    sockets stay open, nothing is accepted), resumed, or closed.
    """

    def __init__(self):
        self.listeners = OrderedDict()

    def pause(self):
        for listener in self.listeners.values():
            if listener.port is not None:
                listener.port.stopReading()

    def resume(self):
        for listener in self.listeners.values():
            if listener.port is not None:
                listener.port.startReading()

    def close(self):
        """
        Close our copies of the listening sockets: never C{shutdown()}, which
        would stop them for the next generation too.
        """
        stopped = []
        for listener in self.listeners.values():
            if listener.port is not None and not isinstance(listener.port, ClosedPort):
                stopped.append(defer.maybeDeferred(listener.port.stopListening))
                listener.port = ClosedPort(listener.port)
        return defer.DeferredList(stopped)

    def descriptions(self):
        return OrderedDict((name, listener.describe()) for name, listener in self.listeners.items())


# What a master sends its workers when its shutdown delay starts: a real-time
# signal nobody sends by accident (a terminal sends SIGWINCH to the whole
# process group, SIGUSR1 is twistd's log rotation, SIGUSR2 re-executes a
# master); SIGUSR2 where there are no real-time signals.
SHUTTING_DOWN_SIGNAL = (signal.SIGRTMIN + 1) if hasattr(signal, "SIGRTMIN") else signal.SIGUSR2


class _Pending:
    """
    Stands for a shutdown delay that another process (the master) runs.
    """

    def active(self):
        return False


class GracefulService(service.MultiService):
    """
    Owns the listeners, the upgrade (SIGHUP) and the drain (after a handover,
    or on SIGTERM). Add your own services as children: they start before this
    generation reports ready and stop after it has drained.

    @ivar lifecycle: the L{Lifecycle}: this generation's state.
    @ivar tracker: the L{DrainTracker} every protocol registers with.
    """

    log = Logger()

    def __init__(self, reactor: Any = None, *, pidfile: Optional[str] = None,
                 ready_timeout: float = 30.0, drain_timeout: float = 60.0,
                 abort_grace: float = 5.0, idle_grace: float = 1.0, drain_mode: str = TRANSACTION,
                 command: Optional[tuple[str, Sequence[str]]] = None,
                 environ: Optional[MutableMapping[str, str]] = None,
                 inheritance: Optional[Inheritance] = None, reuse_port: bool = False,
                 backoff_base: float = 1.0, backoff_max: float = 60.0,
                 install_signal_handlers: bool = True, relay_output: bool = True,
                 shutdown_delay: float = 0.0) -> None:
        service.MultiService.__init__(self)
        append_to_logfiles()  # before twistd opens its log file
        if reactor is None:
            from twisted.internet import reactor
        if drain_mode not in DRAIN_MODES:
            raise ValueError(f"drain mode must be one of {', '.join(DRAIN_MODES)}")
        self.reactor = reactor
        self.pidfile = os.path.abspath(pidfile) if pidfile else None
        self.ready_timeout = ready_timeout
        self.abort_grace = abort_grace
        self.command = command
        self.environ = os.environ if environ is None else environ
        self.inheritance = inheritance
        self.reuse_port = reuse_port
        self.install_signal_handlers = install_signal_handlers
        self.relay_output = relay_output
        self.cwd = os.getcwd()
        self.ports = ListeningPorts()
        self.readiness_checks: list[ReadinessCheck] = []
        self.tracker = DrainTracker(reactor, idle_grace=idle_grace)
        self.lineage = None
        self.lifecycle = Lifecycle(
            reactor, lineage=None, ports=self.ports, tracker=self.tracker,
            spawn=self._spawn_next, ready_timeout=ready_timeout, drain_timeout=drain_timeout,
            abort_grace=abort_grace, drain_mode=drain_mode, backoff_base=backoff_base,
            backoff_max=backoff_max, exit=stop_reactor(reactor))
        self._previous_sighup = None
        self._ready_pipe = None
        # On a real stop, /healthz says 503 this long before the drain starts
        # (while we go on accepting), so load balancers take us out first.
        self.shutdown_delay = shutdown_delay
        self._delaying_shutdown = None  # the IDelayedCall while it runs

    # --- configuration ----------------------------------------------------
    @property
    def listeners(self) -> "OrderedDict[str, Listener]":
        return self.ports.listeners

    @property
    def generation(self) -> int:
        return self.lifecycle.generation

    @property
    def state(self) -> str:
        return self.lifecycle.state

    @property
    def draining(self) -> bool:
        """
        True once this generation is on its way out: draining, or inside its
        shutdown delay (still serving, but /healthz says 503).
        """
        return (self.lifecycle.state in (DRAINING, SHUTTING_DOWN, EXITED)
                or self._delaying_shutdown is not None)

    def add_listener(self, name: str, description: str, factory: IProtocolFactory,
                     option: Optional[str] = None, role: str = STREAM,
                     certificate: Optional[Any] = None) -> ListenSpec:
        """
        Serve C{factory} on C{description} (a port number or endpoint-style
        string), handed to every later generation under C{name}.

        @param role: L{STREAM}; L{DATAGRAM} (C{udp:}; C{factory} is a
            C{DatagramProtocol}); or L{TLS} (C{ssl:}, Twisted's keywords;
            C{factory} is served over TLS with the certificate loaded when
            this generation starts, or C{certificate}, a
            L{twisted_graceful.tls.LoadedCertificate}).
        """
        option = option or f"listener {name!r}"
        if name in self.listeners:
            raise ValueError(f"listener {name!r} is added twice")
        spec = parse_listen_description(description, option, role)
        self.listeners[name] = Listener(name, spec, factory, option, certificate)
        return spec

    @property
    def certificates(self):
        """
        listener name -> what its certificate is, for every TLS listener
        whose certificate is loaded.
        """
        return {name: listener.certificate.as_dict()
                for name, listener in self.listeners.items() if listener.certificate is not None}

    def add_observer(self, observer: LifecycleObserver) -> None:
        """
        C{observer(event, **details)} (an L{ILifecycleObserver}) hears what
        this generation goes through: the events of L{twisted_graceful.lifecycle}.
        """
        self.lifecycle.observers.append(require_callable(observer, ILifecycleObserver))

    def add_readiness_check(self, check: ReadinessCheck) -> None:
        """
        C{check()} (an L{IReadinessCheck}) returns a Deferred (or a value);
        this generation reports ready only once every check has succeeded. A
        failing check is retried with backoff until the ready timeout.
        """
        self.readiness_checks.append(require_callable(check, IReadinessCheck))

    def when_ready(self) -> "defer.Deferred[GracefulService]":
        """
        A Deferred that fires with this service once it serves.
        """
        d: defer.Deferred[GracefulService] = defer.Deferred()
        if self.lifecycle.state not in (STARTING,):
            d.callback(self)
            return d

        def serving(event, **details):
            if event == "serving" and not d.called:
                d.callback(self)

        self.add_observer(serving)
        return d

    # --- start ------------------------------------------------------------
    def acquire(self):
        if self.inheritance is None:
            self.inheritance = Inheritance.acquire(
                OrderedDict((n, listener.spec) for n, listener in self.listeners.items()),
                self.environ, self.reuse_port,
                OrderedDict((n, listener.option) for n, listener in self.listeners.items()),
            )
        inh = self.inheritance
        self.lifecycle.generation = inh.generation
        if inh.pidfile:
            self.pidfile = inh.pidfile
        if self.is_worker:
            # A master's worker: the master keeps the record of who serves,
            # and upgrades the workers.
            self.lifecycle.role = WORKER
        elif self.lineage is None:
            if inh.lineage_fd is not None:
                self.lineage = L.Lineage(inh.lineage_fd, self.pidfile)
            else:
                self.lineage = L.Lineage.create(self.pidfile)
            self.lifecycle.lineage = self.lineage
        return inh

    def _sibling_workers(self):
        """
        Does our master run other workers beside us (C{GRACEFUL_WORKERS})?
        """
        text = self.environ.get(WORKERS_ENV, "1")
        return text.isdigit() and int(text) > 1

    @property
    def is_worker(self) -> bool:
        return self.inheritance is not None and self.inheritance.role == WORKER

    def privilegedStartService(self):
        self.acquire()
        # twistd has written the pidfile by now: a SIGHUP must not kill us
        # (its default action) before startService.
        self._install_sighup()
        service.MultiService.privilegedStartService(self)

    def _install_sighup(self):
        if self.install_signal_handlers and self._previous_sighup is None:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
            if self.is_worker:
                signal.signal(SHUTTING_DOWN_SIGNAL, self._master_shutting_down)

    def _master_shutting_down(self, signum, frame):
        self.reactor.callFromThread(self.master_shutting_down)

    def master_shutting_down(self):
        """
        A worker's master is in its --shutdown-delay: answer 503 on /healthz
        from now on and go on serving; the master's SIGTERM starts the drain.
        """
        if self._delaying_shutdown is None:
            self._delaying_shutdown = _Pending()
            self.log.info("pid {pid} generation {gen}: the master is shutting down: /healthz "
                          "answers 503; still serving until it says drain",
                          pid=os.getpid(), gen=self.generation)

    def startService(self):
        inh = self.acquire()
        self.started_at = self.reactor.seconds()
        service.MultiService.startService(self)
        protect_twistd_pidfile()
        self._install_sighup()
        try:
            factories = {name: listener.served_factory()
                         for name, listener in self.listeners.items()}
        except CertificateError as e:
            self._give_up(EXIT_NOT_READY, f"{e}; not starting")
        for listener in self.listeners.values():
            # Not accepting yet: the previous generation serves this queue
            # alone until we know we can serve it too.
            listener.port = adopt_listening_port(
                self.reactor, inh.sockets[listener.name], factories[listener.name])
            if self.is_worker and self._sibling_workers():
                # Workers share each listening socket: share its connections.
                share_accepts(listener.port)
        self.log.info(
            "pid {pid} generation {gen}: {how} {listeners}",
            pid=os.getpid(), gen=self.generation,
            how="inherited" if inh.source == "inherited" else "listening on",
            listeners=", ".join(f"{n}={d}" for n, d in self.ports.descriptions().items()),
        )
        self._become_ready().addErrback(self._log_startup_failure)

    def _sighup(self, signum, frame):
        self.reactor.callFromThread(self.upgrade, "SIGHUP")

    @defer.inlineCallbacks
    def _become_ready(self):
        # Our own deadline is the one our parent waits for; what we give our
        # child is our own --ready-timeout.
        timeout = self.inheritance.ready_timeout or self.ready_timeout
        deadline = self.reactor.seconds() + timeout * 0.9
        hard_deadline = self.reactor.seconds() + timeout
        attempt = 0
        while True:
            try:
                for check in self.readiness_checks:
                    # A check that never answers must not keep us starting
                    # for ever (holding the sockets, with nobody to stop us
                    # if our parent is gone): it fails once the whole ready
                    # timeout is over (a parent that lives stops us first).
                    remaining = max(hard_deadline - self.reactor.seconds(), 0.001)
                    yield defer.maybeDeferred(check).addTimeout(remaining, self.reactor)
                break
            except Exception as e:
                delay = READINESS_RETRY(attempt)
                attempt += 1
                if deadline - self.reactor.seconds() <= delay:
                    self._give_up(EXIT_NOT_READY, f"not ready after {attempt} attempt(s), "
                                                  f"giving up: {e}")
                self.log.warn(
                    "pid {pid} generation {gen}: readiness check failed (attempt {n}): {err}; "
                    "retrying in {delay:.1f} s",
                    pid=os.getpid(), gen=self.generation, n=attempt, err=e, delay=delay,
                )
                yield task.deferLater(self.reactor, delay, lambda: None)
        if not self.running or self.lifecycle.state != STARTING:
            return
        inh = self.inheritance
        if self.is_worker:
            self._watch_master()
        elif inh.source == "inherited":
            refusal = self.lineage.take_over(inh.parent_pid, os.getpid(), self.generation)
            if refusal is not None:
                self._give_up(EXIT_NOT_TAKING_OVER, f"ready, but not taking over: {refusal}; "
                                                    f"exiting without having served")
        else:
            self.lineage.begin(os.getpid(), self.generation)
        self.ports.resume()
        source = inh.source
        if inh.ready_fd is not None:
            take_over_stdio(inh.stdio_fds)
            inh.stdio_fds = None
            self.log.info(
                "pid {pid} generation {gen}: ready after {ms:.0f} ms; telling pid {parent}",
                pid=os.getpid(), gen=self.generation,
                ms=(self.reactor.seconds() - self.started_at) * 1000, parent=inh.parent_pid,
            )
            try:
                pipe = ReadyPipe(inh.ready_fd)
                pipe.signal_ready(keep_open=self.is_worker)
                if self.is_worker:
                    self._ready_pipe = pipe  # for STOPPED, when told to drain
            except OSError as e:
                source = "orphaned"
                self.log.critical(
                    "pid {pid} generation {gen}: the previous generation (pid {parent}) is "
                    "gone ({err}); serving on our own{pidfile}",
                    pid=os.getpid(), gen=self.generation, parent=inh.parent_pid, err=e,
                    pidfile=f" ({self.pidfile} names us)" if self.pidfile else "")
            inh.ready_fd = None
        else:
            self.log.info("pid {pid} generation {gen}: serving", pid=os.getpid(),
                          gen=self.generation)
        if self.is_worker:
            source = WORKER
        self.lifecycle.ready(source, parent_pid=inh.parent_pid,
                             listeners=self.ports.descriptions())

    def _watch_master(self):
        """
        No worker outlives its master: once our parent is gone (we were
        re-parented), stop accepting and drain.
        """
        master = self.inheritance.parent_pid

        def check():
            if os.getppid() != master and self.lifecycle.state not in (SHUTTING_DOWN, EXITED):
                self.log.critical(
                    "pid {pid} generation {gen}: the master (pid {master}) is gone; draining "
                    "and exiting", pid=os.getpid(), gen=self.generation, master=master)
                self._master_watch.stop()
                self.lifecycle.exit_now()

        self._master_watch = task.LoopingCall(check)
        self._master_watch.clock = self.reactor
        self._master_watch.start(MASTER_WATCH_INTERVAL, now=True)

    def _give_up(self, status, why):
        """
        This generation will not serve: say why where the parent reads it
        (our stderr is its pipe until we are ready) and exit at once.
        """
        self.log.critical("pid {pid} generation {gen}: {why}", pid=os.getpid(),
                          gen=self.generation, why=why)
        sys.stderr.write(f"twisted-graceful: {why}\n")
        sys.stderr.flush()
        os._exit(status)

    def _log_startup_failure(self, failure):
        self.log.failure("pid {pid} generation {gen}: could not become ready", failure,
                         pid=os.getpid(), gen=self.generation)

    # --- upgrade ----------------------------------------------------------
    def upgrade(self, reason: str = "upgrade requested") -> str:
        """
        Start the next generation (what SIGHUP does).

        @return: C{"started"}, C{"scheduled"} or C{"refused"}.
        """
        if self.inheritance is not None and self.is_worker:
            return self.lifecycle.refuse_upgrade(
                reason, f"this is a worker of the master pid {self.inheritance.parent_pid}: "
                        f"signal the master (the pidfile names it)")
        if self._delaying_shutdown is not None:
            return self.lifecycle.refuse_upgrade(reason, "shutting down (in its --shutdown-delay)")
        return self.lifecycle.request_upgrade(reason)

    def _next_command(self):
        return resolve_command(self.command, self.cwd)

    def _spawn_next(self, lifecycle):
        executable, args = self._next_command()
        proto = NextGenerationProcess(lifecycle, relay=self.relay_output, reactor=self.reactor,
                                      kill_grace=self.abort_grace)
        spawn_next_generation(
            self.reactor, proto, executable, args,
            OrderedDict((n, listener.port.fileno()) for n, listener in self.listeners.items()),
            self.lineage.fileno(), self.environ, self.generation + 1, self.pidfile,
            self.ready_timeout, self.cwd,
        )
        return proto

    # --- stop -------------------------------------------------------------
    def stopService(self):
        if self.install_signal_handlers:
            # The reactor is stopping already: its own handlers would raise.
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._signal_while_draining)

        def stop_now(_=None):
            d = self.lifecycle.stop()
            if self._ready_pipe is not None:
                # Our listening ports are closed: the master may tell the world
                # that the new workers alone accept.
                self._ready_pipe.signal_stopped()
                self._ready_pipe = None
            return d

        # A master's worker never waits here: its master had the delay (and
        # SIGTERMs a worker of an older set at once after an upgrade). During
        # an upgrade, stopping at once also stops the unready next generation.
        if self.shutdown_delay > 0 and self.lifecycle.state == SERVING and not self.is_worker:
            d = self._delay_shutdown()
            d.addCallback(stop_now)
        else:
            d = stop_now()
        d.addCallback(lambda _: service.MultiService.stopService(self))
        d.addBoth(self._release_pidfile)
        return d

    def _delay_shutdown(self):
        """
        A real stop (SIGTERM, SIGINT; never an upgrade): /healthz answers 503
        from now on, while the listeners go on accepting and serving for
        C{shutdown_delay} seconds; then the drain starts as usual.
        """
        d = defer.Deferred()

        def over():
            self._delaying_shutdown = None
            self.log.info("pid {pid} generation {gen}: shutdown delay of {s:g} s over; draining",
                          pid=os.getpid(), gen=self.generation, s=self.shutdown_delay)
            d.callback(None)

        self._delaying_shutdown = self.reactor.callLater(self.shutdown_delay, over)
        self.log.info(
            "pid {pid} generation {gen}: shutting down: /healthz answers 503; still accepting "
            "and serving for {s:g} s (--shutdown-delay) before draining",
            pid=os.getpid(), gen=self.generation, s=self.shutdown_delay)
        return d

    def _signal_while_draining(self, signum, frame):
        self.reactor.callFromThread(self._already_draining, signal.Signals(signum).name)

    def _already_draining(self, name):
        delay = self._delaying_shutdown
        if delay is not None and delay.active():
            # Asked twice: the operator does not want to wait.
            self.log.warn("pid {pid} generation {gen}: {name} during the shutdown delay: "
                          "draining now", pid=os.getpid(), gen=self.generation, name=name)
            delay.reset(0)
            return
        self.log.warn(
            "pid {pid} generation {gen}: {name} ignored: already draining {n} connection(s); "
            "the drain ends by --drain-timeout ({t} s) plus --abort-grace ({g} s) at the latest",
            pid=os.getpid(), gen=self.generation, name=name, n=len(self.tracker),
            t=self.lifecycle.drain_timeout, g=self.abort_grace,
        )

    def _release_pidfile(self, result):
        # A generation twistd started itself leaves that to twistd (whose
        # removePID is made to check whose PID the file holds).
        inh = self.inheritance
        if self.lineage is not None and inh is not None and inh.source == "inherited":
            self.lineage.release_pidfile(os.getpid())
        return result
