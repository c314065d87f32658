"""
L{GracefulService}: the machinery any Twisted application uses to upgrade
itself without refusing a connection or cutting a request.

    svc = GracefulService(reactor, pidfile="app.pid")
    svc.add_listener("http", "tcp:8080", site)
    svc.setServiceParent(application)

Every listener is a raw socket (bound, inherited from the previous
generation, or from systemd) served through C{adoptStreamPort}. SIGHUP
spawns the next generation; when it is ready this one stops accepting, hands
the pidfile over, drains and exits. SIGTERM drains and exits.
"""

import functools
import os
import signal
import sys
from collections import OrderedDict

from twisted.application import service
from twisted.internet import defer, error, task
from twisted.internet import unix as unix_transport
from twisted.internet import tcp
from twisted.logger import Logger

from twisted_graceful import handoff, systemd
from twisted_graceful.child import ReadyPipe, take_over_stdio
from twisted_graceful.command import next_generation_command, twistd_config_from_argv
from twisted_graceful.drain import DRAIN_MODES, TRANSACTION, DrainTracker
from twisted_graceful.listeners import (
    ListenerError,
    address_mismatch,
    bind_listener,
    describe_socket,
    parse_listen_description,
)
from twisted_graceful.logfile import append_to_logfiles, stop_rotating
from twisted_graceful.parent import NextGenerationProcess, spawn_next_generation
from twisted_graceful.pidfile import protect_twistd_pidfile, remove_pidfile_if_own, write_pidfile
from twisted_graceful.upgrader import HANDED_OVER, SHUTTING_DOWN, UPGRADING, Upgrader


class Inheritance:
    """
    What this generation starts with: its listening sockets (bound here or
    inherited) and, if a previous generation started it, the handshake fds.
    """

    def __init__(self, sockets, generation=1, ready_fd=None, stdio_fds=None, pidfile=None,
                 ready_timeout=None, parent_pid=None, source="bound"):
        self.sockets = sockets
        self.generation = generation
        self.ready_fd = ready_fd
        self.stdio_fds = stdio_fds
        self.pidfile = pidfile
        self.ready_timeout = ready_timeout
        self.parent_pid = parent_pid
        self.source = source

    @classmethod
    def acquire(cls, specs, environ=None, reuse_port=False, options=None):
        """
        Take the listeners from the previous generation if it started us,
        else bind them.

        @param specs: listener name -> L{ListenSpec}.
        @param options: listener name -> the option that named it (for errors).
        @raise ListenerError: in words naming the option or variable at fault.
        """
        environ = os.environ if environ is None else environ
        options = options or {}
        if handoff.is_handoff(environ):
            wanted = OrderedDict((name, spec.family) for name, spec in specs.items())
            generation = handoff.inherit_generation(environ)
            timeout = handoff.inherit_ready_timeout(environ)
            sockets = handoff.inherit_listeners(environ, wanted)
            for name, spec in specs.items():
                actual = address_mismatch(spec, sockets[name])
                if actual is not None:
                    for sock in sockets.values():
                        sock.close()
                    raise handoff.HandoffError(
                        f"{options.get(name, name)} {spec.description}: the previous generation "
                        f"listens on {actual}; an upgrade cannot move a listener (restart the "
                        f"server to change its address)"
                    )
            try:
                ready_fd = handoff.inherit_ready_fd(environ)
                stdio = handoff.inherit_stdio_fds(environ)
            except BaseException:
                for sock in sockets.values():
                    sock.close()
                raise
            parent = environ.get(handoff.PARENT_PID_ENV, "")
            result = cls(
                sockets, generation, ready_fd, stdio,
                pidfile=environ.get(handoff.PIDFILE_ENV) or None,
                ready_timeout=timeout,
                parent_pid=int(parent) if parent.isdigit() else None,
                source="inherited",
            )
            handoff.forget_handoff(environ)
            return result
        sockets = OrderedDict()
        activated = systemd.is_socket_activated(environ)
        try:
            if activated:
                # systemd's sockets for the systemd:NAME listeners (the
                # variables are removed once adopted); the others are bound.
                sockets.update(systemd.adopt(specs, environ, options))
            for name, spec in specs.items():
                if spec.kind == "systemd":
                    if name in sockets:
                        continue
                    raise ListenerError(
                        f"{options.get(name, '--port')} {spec.description}: this process was "
                        f"not started by systemd socket activation (LISTEN_FDS is not set)"
                    )
                sockets[name] = bind_listener(spec, options.get(name, "--port"), reuse_port)
        except BaseException:
            for sock in sockets.values():
                sock.close()
            raise
        return cls(OrderedDict((name, sockets[name]) for name in specs),
                   source="systemd" if activated else "bound")


class _Listener:
    def __init__(self, name, spec, factory, option):
        self.name = name
        self.spec = spec
        self.factory = factory
        self.option = option
        self.port = None


class GracefulService(service.MultiService):
    """
    Owns the listeners, the upgrade (SIGHUP) and the drain (after a handover,
    or on SIGTERM). Add your own services as children: they start before this
    generation reports ready and stop after it has drained.
    """

    log = Logger()

    def __init__(self, reactor=None, *, pidfile=None, ready_timeout=30.0, drain_timeout=60.0,
                 abort_grace=5.0, idle_grace=1.0, drain_mode=TRANSACTION, command=None,
                 environ=None, inheritance=None, reuse_port=False, backoff_base=1.0,
                 backoff_max=60.0, install_signal_handlers=True, relay_output=True):
        service.MultiService.__init__(self)
        append_to_logfiles()  # before twistd opens its log file
        if reactor is None:
            from twisted.internet import reactor
        if drain_mode not in DRAIN_MODES:
            raise ValueError(f"drain mode must be one of {', '.join(DRAIN_MODES)}")
        self.reactor = reactor
        self.pidfile = os.path.abspath(pidfile) if pidfile else None
        self.ready_timeout = ready_timeout
        self.drain_timeout = drain_timeout
        self.abort_grace = abort_grace
        self.drain_mode = drain_mode
        self.command = command
        self.environ = os.environ if environ is None else environ
        self.inheritance = inheritance
        self.reuse_port = reuse_port
        self.install_signal_handlers = install_signal_handlers
        self.relay_output = relay_output
        self.cwd = os.getcwd()
        self.listeners = OrderedDict()
        self.readiness_checks = []
        self.tracker = DrainTracker(reactor, idle_grace=idle_grace)
        self.observers = []
        self.upgrader = Upgrader(
            reactor, self._start_child, self._hand_over, ready_timeout=ready_timeout,
            backoff_base=backoff_base, backoff_max=backoff_max,
            observers=[self._upgrader_event],
        )
        self.ready = False
        self.orphaned = False
        self._shutting_down = False
        self.started_at = None
        self.drain_report = None
        self._ready_waiters = []
        self._previous_sighup = None

    # --- configuration ----------------------------------------------------
    @property
    def generation(self):
        return self.upgrader.generation

    @property
    def state(self):
        if self.upgrader.state in (HANDED_OVER, SHUTTING_DOWN):
            return "draining"
        if self.upgrader.state == UPGRADING:
            return "upgrading"
        return "serving" if self.ready else "starting"

    def add_listener(self, name, description, factory, option=None):
        """
        Serve C{factory} on C{description} (a port number or endpoint-style
        string), handed to every later generation under C{name}.
        """
        option = option or f"listener {name!r}"
        if name in self.listeners:
            raise ValueError(f"listener {name!r} is added twice")
        spec = parse_listen_description(description, option)
        self.listeners[name] = _Listener(name, spec, factory, option)
        return spec

    def add_observer(self, observer):
        """
        C{observer(event, **details)} hears what this generation goes through:

          - C{serving} (C{generation}, C{inherited}): ready, accepting;
          - C{upgrade-started} (C{child_pid}): the next generation was spawned;
          - C{upgrade-failed} (C{outcome}): it failed; this one keeps serving;
          - C{upgrade-ok} (C{outcome}): it is ready;
          - C{handed-over} (C{child_pid}): we stopped accepting and the
            pidfile names the child; draining follows;
          - C{shutting-down}: a real shutdown (SIGTERM/SIGINT), draining follows;
          - C{drained} (C{report}): no connection left; the process exits.
        """
        self.observers.append(observer)

    def _tell(self, event, **details):
        for observer in list(self.observers):
            try:
                observer(event, **details)
            except Exception:
                self.log.failure("observer of {event!r} failed", event=event)

    def _upgrader_event(self, event, **details):
        if event == "started":
            self._tell("upgrade-started", child_pid=details["pid"])
        elif event == "failed":
            self._tell("upgrade-failed", outcome=details["outcome"])
        elif event == "ready":
            self._tell("upgrade-ok", outcome=details["outcome"])

    def add_readiness_check(self, check):
        """
        C{check()} returns a Deferred (or a value); this generation reports
        ready only once every check has succeeded. A failing check is retried
        with backoff until the ready timeout.
        """
        self.readiness_checks.append(check)

    def when_ready(self):
        d = defer.Deferred()
        if self.ready:
            d.callback(self)
        else:
            self._ready_waiters.append(d)
        return d

    # --- start ------------------------------------------------------------
    def acquire(self):
        if self.inheritance is None:
            self.inheritance = Inheritance.acquire(
                OrderedDict((n, l.spec) for n, l in self.listeners.items()),
                self.environ, self.reuse_port,
                OrderedDict((n, l.option) for n, l in self.listeners.items()),
            )
        inh = self.inheritance
        self.upgrader.generation = inh.generation
        if inh.pidfile:
            self.pidfile = inh.pidfile
        return inh

    def privilegedStartService(self):
        self.acquire()
        # twistd has written the pidfile by now: a SIGHUP must not kill us
        # (its default action) before startService.
        self._install_sighup()
        service.MultiService.privilegedStartService(self)

    def _install_sighup(self):
        if self.install_signal_handlers and self._previous_sighup is None:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)

    def startService(self):
        inh = self.acquire()
        self.started_at = self.reactor.seconds()
        service.MultiService.startService(self)
        protect_twistd_pidfile()
        self._install_sighup()
        for listener in self.listeners.values():
            sock = inh.sockets[listener.name]
            listener.port = self.reactor.adoptStreamPort(sock.fileno(), sock.family, listener.factory)
            # Not ready yet: the previous generation serves this queue alone
            # until we know we can serve it too.
            listener.port.stopReading()
            sock.close()  # adoptStreamPort made its own copy (PITFALLS 2)
            # Never shutdown() a shared socket (adopted TCP ports already skip it;
            # UNIX ones do not), never unlink a path the next generation
            # serves (PITFALLS 1).
            listener.port._shouldShutdown = False
            if sock.family == unix_transport.socket.AF_UNIX:
                listener.port.connectionLost = functools.partial(
                    tcp.Port.connectionLost, listener.port
                )
        self.log.info(
            "pid {pid} generation {gen}: {how} {listeners}",
            pid=os.getpid(), gen=self.generation,
            how="inherited" if inh.source == "inherited" else "listening on",
            listeners=", ".join(
                f"{l.name}={describe_socket(l.port.socket)}" for l in self.listeners.values()
            ),
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
        delay = 0.1
        attempt = 1
        while True:
            try:
                for check in self.readiness_checks:
                    yield defer.maybeDeferred(check)
                break
            except Exception as e:
                remaining = deadline - self.reactor.seconds()
                if remaining <= delay:
                    self.log.critical(
                        "pid {pid} generation {gen}: not ready after {n} attempt(s), giving up: "
                        "{err}", pid=os.getpid(), gen=self.generation, n=attempt, err=e,
                    )
                    sys.stderr.write(f"twisted-graceful: not ready, giving up: {e}\n")
                    sys.stderr.flush()
                    os._exit(3)
                self.log.warn(
                    "pid {pid} generation {gen}: readiness check failed (attempt {n}): {err}; "
                    "retrying in {delay:.1f} s",
                    pid=os.getpid(), gen=self.generation, n=attempt, err=e, delay=delay,
                )
                yield task.deferLater(self.reactor, delay, lambda: None)
                attempt += 1
                delay = min(delay * 2, 2.0)
        if not self.running:
            return
        for listener in self.listeners.values():
            listener.port.startReading()
        self.ready = True
        inh = self.inheritance
        if inh.ready_fd is not None:
            take_over_stdio(inh.stdio_fds)
            inh.stdio_fds = None
            self.log.info(
                "pid {pid} generation {gen}: ready after {ms:.0f} ms; telling pid {parent}",
                pid=os.getpid(), gen=self.generation,
                ms=(self.reactor.seconds() - self.started_at) * 1000, parent=inh.parent_pid,
            )
            try:
                ReadyPipe(inh.ready_fd).signal_ready()
            except OSError as e:
                self._orphaned(e)
            inh.ready_fd = None
        else:
            self.log.info("pid {pid} generation {gen}: serving", pid=os.getpid(),
                          gen=self.generation)
        self._tell("serving", generation=self.generation,
                   inherited=inh.source == "inherited" and not self.orphaned,
                   orphaned=self.orphaned)
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(self)

    def _orphaned(self, error):
        """
        The generation that started us is gone (killed while we were getting
        ready): nobody will hand the pidfile over, so take it ourselves.
        """
        self.orphaned = True
        self.log.critical(
            "pid {pid} generation {gen}: the previous generation (pid {parent}) is gone "
            "({err}); serving on our own{pidfile}",
            pid=os.getpid(), gen=self.generation, parent=self.inheritance.parent_pid,
            err=error, pidfile=f" and writing {self.pidfile}" if self.pidfile else "",
        )
        self._write_pidfile(os.getpid())

    def _write_pidfile(self, pid, then=""):
        """
        Name C{pid} in the pidfile, if there is one; a failure is logged, not
        raised: it must not stop a handover or a takeover half-way.
        """
        if not self.pidfile:
            return
        try:
            write_pidfile(self.pidfile, pid)
        except OSError as e:
            self.log.error(
                "pid {me} generation {gen}: could not write pid {pid} to {path}: {err}{then}",
                me=os.getpid(), gen=self.generation, pid=pid, path=self.pidfile, err=e,
                then=then)

    def _log_startup_failure(self, failure):
        self.log.failure("pid {pid} generation {gen}: could not become ready", failure,
                         pid=os.getpid(), gen=self.generation)

    # --- upgrade ----------------------------------------------------------
    def upgrade(self, reason="upgrade requested"):
        """
        Start the next generation (what SIGHUP does).
        """
        if not self.ready and self.upgrader.state not in (HANDED_OVER, SHUTTING_DOWN):
            self.log.warn(
                "{reason} ignored: pid {pid} generation {gen} is not serving yet",
                reason=reason, pid=os.getpid(), gen=self.generation,
            )
            return "refused"
        return self.upgrader.request_upgrade(reason)

    def _next_command(self):
        if self.command is not None:
            return self.command() if callable(self.command) else self.command
        return next_generation_command(twistd_config_from_argv(sys.argv), sys.argv, self.cwd)

    def _start_child(self, on_ready, on_failed):
        executable, args = self._next_command()
        proto = NextGenerationProcess(on_ready, on_failed, relay=self.relay_output,
                                      reactor=self.reactor, kill_grace=self.abort_grace)
        proto.on_exit_after_ready = self._successor_died
        spawn_next_generation(
            self.reactor, proto, executable, args,
            OrderedDict((n, l.port.fileno()) for n, l in self.listeners.items()),
            self.environ, self.generation + 1, self.pidfile, self.upgrader.ready_timeout,
            self.cwd,
        )
        return proto

    def _hand_over(self, child_pid):
        # Stop accepting, but keep our copies of the sockets until the drain
        # ends: if the new generation dies meanwhile, we take them back.
        self.pause_accepting()
        # The next generation writes to the same log file from now on; only
        # one process may rotate it.
        stop_rotating()
        self._write_pidfile(child_pid, then=f"; the handover goes on (signal pid {child_pid} "
                                           f"directly)")
        self.log.info(
            "pid {pid} generation {gen}: stopped accepting; pid {child} (generation {next}) "
            "serves now{pidfile}; draining",
            pid=os.getpid(), gen=self.generation, child=child_pid, next=self.generation + 1,
            pidfile=f" and {self.pidfile} names it" if self.pidfile else "",
        )
        self.handed_over_to = child_pid
        self._tell("handed-over", child_pid=child_pid)
        self.tracker.drain(self.drain_mode, self.drain_timeout, self.abort_grace).addCallback(
            self._handover_drained)

    def _handover_drained(self, report):
        self.stop_accepting()
        try:
            self.reactor.stop()  # stopService finds the drain done, and we exit
        except error.ReactorNotRunning:
            pass  # a SIGTERM during the drain got there first

    def _successor_died(self, pid, how):
        # We can take over again only while our own handover drain runs: not
        # once it ended (the sockets are closed) nor during a real shutdown.
        if (self.upgrader.state != HANDED_OVER or self._shutting_down
                or not self.tracker.resume()):
            self.log.critical(
                "pid {pid} generation {gen}: pid {child}, which took over from us, {how}; "
                "nothing accepts on the listeners until a new server starts",
                pid=os.getpid(), gen=self.generation, child=pid, how=how)
            return
        self.upgrader.successor_died(pid, how)
        for listener in self.listeners.values():
            listener.port.startReading()
        self._write_pidfile(os.getpid())
        self.handed_over_to = None
        self.log.critical(
            "pid {pid} generation {gen}: pid {child} (generation {next}), which took over from "
            "us, {how}; taking the listeners back and serving again",
            pid=os.getpid(), gen=self.generation, child=pid, next=self.generation + 1, how=how)
        self._tell("serving", generation=self.generation, inherited=False, orphaned=True)

    def pause_accepting(self):
        for listener in self.listeners.values():
            if listener.port is not None:
                listener.port.stopReading()

    def stop_accepting(self):
        """
        Close our copies of the listening sockets: never C{shutdown()}, which
        would stop them for the next generation too (PITFALLS 1, 10).
        """
        stopped = []
        for listener in self.listeners.values():
            if listener.port is not None:
                stopped.append(defer.maybeDeferred(listener.port.stopListening))
                listener.port = _Closed(listener.port)
        return defer.DeferredList(stopped)

    # --- stop -------------------------------------------------------------
    def stopService(self):
        self._shutting_down = True
        # An unready child this shutdown abandons (not the one we handed over to).
        abandoned = self.upgrader.child if self.upgrader.state == UPGRADING else None
        if self.upgrader.state != HANDED_OVER:
            self.upgrader.shutting_down()
            self.log.info(
                "pid {pid} generation {gen}: shutting down; no longer accepting",
                pid=os.getpid(), gen=self.generation,
            )
            self.stop_accepting()
            self._tell("shutting-down")
        if self.install_signal_handlers:
            # The reactor is stopping already: its own handlers would raise.
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._signal_while_draining)
        d = self.tracker.drain(self.drain_mode, self.drain_timeout, self.abort_grace)
        if abandoned is not None and not abandoned.finished:
            # Wait for it too: it gets SIGTERM, then SIGKILL after --abort-grace.
            d = defer.gatherResults([d, abandoned.ended]).addCallback(lambda results: results[0])

        def drained(report):
            self.drain_report = report
            self._tell("drained", report=report)
            self.log.info(
                "pid {pid} generation {gen}: {summary}; exiting",
                pid=os.getpid(), gen=self.generation, summary=report.summary(),
            )
            return service.MultiService.stopService(self)

        d.addCallback(drained)
        d.addBoth(self._release_pidfile)
        return d

    def _signal_while_draining(self, signum, frame):
        self.reactor.callFromThread(self._already_draining, signal.Signals(signum).name)

    def _already_draining(self, name):
        self.log.warn(
            "pid {pid} generation {gen}: {name} ignored: already draining {n} connection(s); "
            "the drain ends by --drain-timeout ({t} s) plus --abort-grace ({g} s) at the latest",
            pid=os.getpid(), gen=self.generation, name=name, n=len(self.tracker),
            t=self.drain_timeout, g=self.abort_grace,
        )

    def _release_pidfile(self, result):
        if self.pidfile and self.inheritance is not None and self.inheritance.source == "inherited":
            remove_pidfile_if_own(self.pidfile)
        return result


class _Closed:
    """
    Stands in for a port this generation no longer accepts on.
    """

    def __init__(self, port):
        self.socket = port.socket

    def fileno(self):
        return -1

    def stopListening(self):
        return None

    def startReading(self):
        pass

    def stopReading(self):
        pass
