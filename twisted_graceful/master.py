"""
The master: one process that owns the listening sockets and the workers,
never serves a connection itself, and never leaves (docs/design.md,
"Master and workers").

    starting --set-ready--> serving --upgrade--> upgrading --set-ready--> serving
                               ^                     |         (the old set drains)
                               +-----set-failed------+   (the new set is stopped)

    starting/serving/upgrading --stop--> shutting-down --drained--> exited

Workers are started like a next generation (L{twisted_graceful.handoff},
role C{worker}): the listeners from fd 3, a ready pipe; they share each
listening socket, so they share its accept queue, and a worker that closes
its copy loses nothing. An upgrade (SIGHUP) is blue-green: a whole new set
of workers with the code now on disk; once every one of them is ready the
old set drains (SIGTERM); if any one fails or is not ready in time, the
whole new set is stopped and the old one keeps serving. A worker of the
serving set that exits is replaced at once; a worker that keeps dying is
replaced after a backoff that grows.
"""

import os
import signal
import sys

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from twisted_graceful import handoff
from twisted_graceful._twisted import protect_twistd_pidfile, watch_adopted_child
from twisted_graceful.command import resolve_command
from twisted_graceful.interfaces import ILifecycleObserver, require_callable
from twisted_graceful.lifecycle import (
    EXITED,
    SERVING,
    SHUTTING_DOWN,
    STARTING,
    UPGRADING,
    StateMachine,
    stop_reactor,
)
from twisted_graceful.listeners import describe_socket
from twisted_graceful.parent import NextGenerationProcess, spawn_next_generation
from twisted_graceful.pidfile import remove_pidfile_if_own

MASTER = "master"
TRANSITIONS = {
    (STARTING, "adopt"): SERVING,
    (STARTING, "set-ready"): SERVING,
    (STARTING, "set-failed"): SHUTTING_DOWN,
    (STARTING, "stop"): SHUTTING_DOWN,
    (SERVING, "upgrade"): UPGRADING,
    (SERVING, "stop"): SHUTTING_DOWN,
    (UPGRADING, "set-ready"): SERVING,
    (UPGRADING, "set-failed"): SERVING,
    (UPGRADING, "stop"): SHUTTING_DOWN,
    (SHUTTING_DOWN, "drained"): EXITED,
}
REFUSALS = {
    (STARTING, "upgrade"): "the first workers are not serving yet",
    (UPGRADING, "upgrade"): (
        "an upgrade to workers generation {next} is already in progress (pids {pids}); the "
        "current workers keep serving until every new one is ready"),
    (SHUTTING_DOWN, "upgrade"): "the server is shutting down",
    (EXITED, "upgrade"): "the server has exited",
    (SHUTTING_DOWN, "stop"): "already shutting down",
    (EXITED, "stop"): "the server has exited already",
}

# A worker that served this long before it died was not crash-looping.
STABLE_SECONDS = 10.0
# How long an upgrade waits for the old workers to say they stopped accepting
# (STOPPED on their ready pipe) before it is declared done anyway.
STOPPED_TIMEOUT = 5.0
EXIT_WORKERS_FAILED = 1


class WorkerSet:
    """
    The workers of one generation.
    """

    def __init__(self, generation, size):
        self.generation = generation
        self.size = size
        self.workers = []  # NextGenerationProcess, each with .ready and .started_at

    def __contains__(self, worker):
        return worker in self.workers

    def ready(self):
        return [w for w in self.workers if w.ready and not w.finished]

    def pids(self):
        return [w.pid for w in self.workers]


class AdoptedWorker:
    """
    A worker our previous image spawned (before SIGUSR2): still our child,
    serving, but the reactor never spawned it. Looks like a
    L{NextGenerationProcess} to the L{Master}.
    """

    def __init__(self, master, pid, generation, reactor, kill_grace):
        self.master = master
        self.pid = pid
        self.generation = generation
        self.reactor = reactor
        self.kill_grace = kill_grace
        self.ready = True
        self.finished = False
        self.says_stopped = False  # its ready pipe went with our previous image
        self.started_at = reactor.seconds() - STABLE_SECONDS  # it served before us
        self.ended = defer.Deferred()
        self._kill_timer = None
        self._stop_watching = watch_adopted_child(pid, self._exited)

    def _exited(self, status):
        if self.finished:
            return
        self.finished = True
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        if os.WIFSIGNALED(status):
            try:
                how = f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
            except ValueError:
                how = f"was killed by signal {os.WTERMSIG(status)}"
        else:
            how = f"exited with status {os.WEXITSTATUS(status)}"
        self.master.child_ended(self, how)
        self.ended.callback(how)

    def _signal(self, signum):
        if self.finished:
            return
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self):
        self.terminate(self.kill_grace)

    def terminate(self, kill_after):
        self._signal(signal.SIGTERM)
        if self._kill_timer is None:
            self._kill_timer = self.reactor.callLater(kill_after, self._signal, signal.SIGKILL)

    def output_tail(self):
        return []


class Master(StateMachine):
    """
    The state machine of the master and the worker sets it runs.

    @param spawn: C{spawn(master, generation)} starts one worker and returns
        its process (L{NextGenerationProcess}); the process reports back
        through L{child_ready}, L{child_failed} and L{child_ended}.
    @param exit: called with an exit status once every worker is gone.
    """

    role = MASTER
    transitions = TRANSITIONS
    refusals = REFUSALS
    initial_state = STARTING

    def __init__(self, reactor, *, workers, spawn, pid=None, ready_timeout=30.0,
                 drain_timeout=60.0, abort_grace=5.0, backoff_base=1.0, backoff_max=60.0,
                 exit=None):
        StateMachine.__init__(self, reactor, generation=1, pid=pid, ready_timeout=ready_timeout,
                              backoff_base=backoff_base, backoff_max=backoff_max)
        self.size = workers
        self._spawn = spawn
        self.drain_timeout = drain_timeout
        self.abort_grace = abort_grace
        self._exit = exit
        self.current = None  # the WorkerSet that serves
        self.next = None  # the WorkerSet being started
        self.retiring = []  # workers of older sets, draining
        self.replacing = []  # replacements for dead workers of the current set, not ready yet
        self.crashes = 0  # workers of the current set that died in a row, quickly
        self.restarts = 0
        self._stopping = set()  # retired workers that have not said STOPPED yet
        self._stopped_call = None
        self.execs = 0  # times the master re-executed itself (SIGUSR2)
        self.exit_hooks = []  # callables(pid) told first of every worker that exits
        self._replace_call = None
        self._stopped = None
        self.exit_status = 0

    def _refusal_details(self):
        return {"next": self.generation + 1,
                "pids": ", ".join(str(p) for p in (self.next.pids() if self.next else []))}

    def _who(self):
        return f"master pid {self.pid}"

    def _who_keeps_serving(self):
        if self.current is None:
            return "No worker serves"
        return (f"Workers generation {self.current.generation} (pids "
                f"{', '.join(str(p) for p in self.current.pids())}) keep serving")

    zygote_pid = None  # the master's zygote, if it has one (MasterService)
    zygote_ready = False  # and whether it has imported what it preloads

    def _tell(self, event, **details):
        details.setdefault("workers", self.describe_workers())
        details.setdefault("zygote", self.zygote_pid)
        details.setdefault("zygote_ready", self.zygote_ready)
        details.setdefault("execs", self.execs)
        StateMachine._tell(self, event, **details)

    def describe_workers(self):
        """
        Every worker alive or starting: pid, generation, state.
        """
        found = []
        sets = [(self.current, "serving"), (self.next, "starting")]
        for worker_set, state in sets:
            if worker_set is None:
                continue
            for worker in worker_set.workers:
                if not worker.finished:
                    found.append({"pid": worker.pid, "generation": worker_set.generation,
                                  "state": state if worker.ready else "starting"})
        for worker in self.replacing:
            if not worker.finished:
                found.append({"pid": worker.pid, "generation": worker.generation,
                              "state": "starting"})
        for worker in self.retiring:
            if not worker.finished:
                found.append({"pid": worker.pid, "generation": worker.generation,
                              "state": "draining"})
        return found

    # --- starting ---------------------------------------------------------
    def start(self):
        """
        Start the first set of workers.
        """
        self.upgrade_started = self.reactor.seconds()
        self.next = self._start_set(1, "start")

    def adopt(self, workers, draining, generation):
        """
        Our previous image re-executed into us: C{workers} (adopted, serving)
        are the current set, C{draining} ones go on draining; an upgrade
        replaces the current set with workers running the code now on disk.
        """
        worker_set = WorkerSet(generation, self.size)
        worker_set.workers = list(workers)
        self.retiring = list(draining)
        self.generation = generation
        self.current = worker_set
        self._move("adopt")
        self.log.info("{who}: re-executed; adopted workers generation {g} (pids {pids})",
                      who=self._who(), g=generation,
                      pids=", ".join(str(w.pid) for w in workers))
        alive = [w for w in workers if not w.finished]
        if len(alive) < self.size:
            for _ in range(self.size - len(alive)):
                self._replace(generation)
        # The upgrade first, then "serving": what the status file says at
        # "serving" must not look settled (serving, no upgrade) when the
        # re-exec's upgrade is about to start.
        self.request_upgrade("re-exec")
        self._tell("serving", source="re-exec", parent_pid=None, listeners={})

    def _start_set(self, generation, reason):
        worker_set = WorkerSet(generation, self.size)
        self.log.info("{who}: {reason}: starting {n} worker(s) of generation {g}",
                      who=self._who(), reason=reason, n=self.size, g=generation)
        for _ in range(self.size):
            worker = self._spawn_worker(generation)
            if worker is None:
                break
            worker_set.workers.append(worker)
        self._timeout_call = self.reactor.callLater(self.ready_timeout, self._set_timed_out,
                                                    worker_set)
        return worker_set

    def _spawn_worker(self, generation):
        try:
            worker = self._spawn(self, generation)
        except Exception as e:
            self.log.error("{who}: could not spawn a worker: {err}", who=self._who(), err=e)
            self.reactor.callLater(0, self._spawn_failed, generation, str(e))
            return None
        worker.generation = generation
        worker.started_at = self.reactor.seconds()
        return worker

    def _spawn_failed(self, generation, error):
        if self.next is not None and self.next.generation == generation:
            self._set_failed(self.next, f"a worker could not be spawned: {error}", [])

    # --- upgrading --------------------------------------------------------
    def _start(self, reason):
        self._move("upgrade")
        self.upgrade_started = self.reactor.seconds()
        self.next = self._start_set(self.generation + 1, reason)
        self._tell("upgrade-started", child_pid=None, reason=reason)

    def child_ready(self, worker):
        if worker in self.replacing:
            self.replacing.remove(worker)
            self.current.workers.append(worker)
            self.log.info("{who}: worker pid {w} (generation {g}) replaced a dead one and serves",
                          who=self._who(), w=worker.pid, g=worker.generation)
            self._tell("worker-ready", worker_pid=worker.pid)
            return
        worker_set = self.next
        if worker_set is None or worker not in worker_set:
            return
        self.log.info("{who}: worker pid {w} (generation {g}) is ready ({n} of {size})",
                      who=self._who(), w=worker.pid, g=worker_set.generation,
                      n=len(worker_set.ready()), size=worker_set.size)
        if len(worker_set.ready()) == worker_set.size:
            self._set_ready(worker_set)

    def _set_ready(self, worker_set):
        self._cancel_timeout()
        old = self.current
        self.current, self.next = worker_set, None
        self.generation = worker_set.generation
        self.crashes = 0
        first = self.state == STARTING
        pids = ", ".join(str(p) for p in worker_set.pids())
        if first:
            self._move("set-ready")
            self.log.info("{who}: workers generation {g} serve (pids {pids})", who=self._who(),
                          g=worker_set.generation, pids=pids)
            self._tell("serving", source="master", parent_pid=None, listeners={})
            return
        self.log.info(
            "{who}: workers generation {g} are ready after {ms:.0f} ms (pids {pids}); the "
            "workers of generation {old} stop accepting and drain", who=self._who(),
            g=worker_set.generation, ms=self._elapsed() * 1000, pids=pids,
            old=old.generation)
        retired = old.workers + self._abandon_replacements()
        self._retire(retired)
        # The upgrade is done (and said so: status, reload, systemd) once
        # every old worker has stopped accepting, not when it was told to.
        self._stopping = {w for w in retired
                          if not w.finished and getattr(w, "says_stopped", True)}
        self._stopped_call = self.reactor.callLater(STOPPED_TIMEOUT, self._upgrade_done)
        self._check_upgrade_done()

    def child_stopped(self, worker):
        """
        A retired worker says it no longer accepts.
        """
        self._stopping.discard(worker)
        self._check_upgrade_done()

    def _check_upgrade_done(self):
        if self.state == UPGRADING and self.next is None and not self._stopping:
            self._upgrade_done()

    def _upgrade_done(self):
        if self.state != UPGRADING or self.next is not None:
            return
        if self._stopped_call is not None and self._stopped_call.active():
            self._stopped_call.cancel()
        self._stopped_call = None
        if self._stopping:
            self.log.warn("{who}: worker(s) pid {pids} did not confirm within {t} s that they "
                          "stopped accepting; the upgrade is done anyway", who=self._who(),
                          t=STOPPED_TIMEOUT, pids=", ".join(str(w.pid) for w in self._stopping))
        self._stopping = set()
        self._move("set-ready")
        output = [line for w in self.current.workers for line in w.output_tail()][-15:]
        self._record_success(None, output)

    def _abandon_replacements(self):
        replacing, self.replacing = self.replacing, []
        return replacing

    def _retire(self, workers):
        for worker in workers:
            if not worker.finished:
                self.retiring.append(worker)
                # It drains (SIGTERM) within --drain-timeout + --abort-grace;
                # SIGKILL only if it is still there well after that.
                worker.terminate(self.drain_timeout + self.abort_grace + 5.0)

    def child_failed(self, worker, how):
        if self.next is not None and worker in self.next:
            self._set_failed(self.next, f"worker pid {worker.pid} {how}", worker.output_tail())
        elif worker in self.replacing:
            worker.kill()

    def _set_timed_out(self, worker_set):
        self._timeout_call = None
        if worker_set is not self.next:
            return
        late = [w.pid for w in worker_set.workers if not w.ready]
        self._set_failed(
            worker_set, f"worker(s) pid {', '.join(str(p) for p in late)} not ready within "
                        f"{self.ready_timeout} s; stopped them", [], result="timeout")

    def _set_failed(self, worker_set, error, output, result="failed"):
        """
        One worker of the new set failed: stop the whole set; the current
        one keeps serving.
        """
        if worker_set is not self.next:
            return
        self.next = None
        for worker in worker_set.workers:
            if not worker.finished:
                worker.kill()
                self.retiring.append(worker)  # followed until it is gone
        if self.state == STARTING:
            self.upgrade_started = self.upgrade_started or self.reactor.seconds()
            self._record_failure(result, None, error, output, what="the worker")
            self.log.critical("{who}: the first workers could not start: {error}; exiting",
                              who=self._who(), error=error)
            self.exit_status = EXIT_WORKERS_FAILED
            self._move("set-failed")
            self._stop_workers()
            self._wait_and_exit()
            return
        self._move("set-failed")
        self._record_failure(result, None, error, output, what="the worker")

    # --- supervision ------------------------------------------------------
    def child_ended(self, worker, how):
        for hook in self.exit_hooks:
            hook(worker.pid)
        if worker in self.retiring:
            self.retiring.remove(worker)
            self._stopping.discard(worker)
            self._tell("worker-exited", worker_pid=worker.pid, how=how, expected=True)
            self._check_upgrade_done()
        elif self.next is not None and worker in self.next:
            self._set_failed(self.next, f"worker pid {worker.pid} {how} before the set was "
                                        f"ready", worker.output_tail())
        elif worker in self.replacing:
            self.replacing.remove(worker)
            self._worker_died(worker, how + " before it was ready")
        elif self.current is not None and worker in self.current:
            self.current.workers.remove(worker)
            self._worker_died(worker, how)
        self._check_drained()

    def _worker_died(self, worker, how):
        if self.state in (SHUTTING_DOWN, EXITED):
            return
        served = self.reactor.seconds() - getattr(worker, "started_at", 0)
        self.crashes = 0 if served >= STABLE_SECONDS else self.crashes + 1
        self.restarts += 1
        delay = 0 if self.crashes <= 1 else self.backoff(self.crashes - 1)
        self.log.critical(
            "{who}: worker pid {w} (generation {g}) {how}; replacing it{when}",
            who=self._who(), w=worker.pid, g=worker.generation, how=how,
            when=f" in {delay:.1f} s (it keeps dying)" if delay else "")
        self._tell("worker-exited", worker_pid=worker.pid, how=how, expected=False,
                   replace_in=delay)
        if delay:
            self._replace_call = self.reactor.callLater(delay, self._replace, worker.generation)
        else:
            self._replace(worker.generation)

    def _replace(self, generation):
        self._replace_call = None
        if self.state in (SHUTTING_DOWN, EXITED) or self.current is None:
            return
        if generation != self.current.generation:
            return  # an upgrade replaced the whole set meanwhile
        missing = self.current.size - len(self.current.ready()) - len(
            [w for w in self.replacing if not w.finished])
        if missing <= 0:
            return
        worker = self._spawn_worker(generation)
        if worker is not None:
            self.replacing.append(worker)
            self._tell("worker-started", worker_pid=worker.pid)

    # --- stopping ---------------------------------------------------------
    def stop(self):
        """
        SIGTERM/SIGINT: every worker drains and exits, then the master.

        @return: a Deferred that fires once every worker is gone.
        """
        refusal = self.refusal("stop")
        if refusal is not None:
            if self.state != EXITED:
                self.log.warn("{who}: stop ignored: {why}", who=self._who(), why=refusal)
            return self._when_stopped()
        self._cancel_scheduled("shutting down")
        self._cancel_timeout()
        if self._stopped_call is not None and self._stopped_call.active():
            self._stopped_call.cancel()
        self._stopping = set()
        self._move("stop")
        self.log.info("{who}: shutting down: every worker drains and exits", who=self._who())
        self._stop_workers()
        self._tell("shutting-down", was_current=True)
        return self._when_stopped()

    def _stop_workers(self):
        if self._replace_call is not None and self._replace_call.active():
            self._replace_call.cancel()
        starting = self.replacing + (self.next.workers if self.next else [])
        for worker in starting:
            worker.kill()
        serving = self.current.workers if self.current else []
        self._retire(serving)
        self.retiring.extend(w for w in starting if not w.finished)
        self.next, self.replacing = None, []
        if self.current is not None:
            self.current.workers = []

    def _when_stopped(self):
        if self._stopped is None:
            self._stopped = defer.Deferred()
            self._check_drained()
        d = defer.Deferred()
        self._stopped.addBoth(lambda r: (d.callback(r), r)[1])
        return d

    def _check_drained(self):
        if self.state != SHUTTING_DOWN:
            return
        if any(not w.finished for w in self.retiring):
            return
        self.retiring = []
        self._move("drained")
        self.log.info("{who}: every worker has exited; exiting", who=self._who())
        self._tell("drained", report=None)
        if self._stopped is not None and not self._stopped.called:
            self._stopped.callback(None)

    def _wait_and_exit(self):
        d = self._when_stopped()
        if self._exit is not None:
            d.addCallback(lambda _: self._exit())


class MasterService(service.Service):
    """
    The master as a twistd service: binds (or inherits from systemd) the
    listeners, keeps the raw sockets without serving them, and runs the
    L{Master}.

    @param listeners: ordered listener name -> the raw listening socket.
    """

    log = Logger()

    def __init__(self, reactor, listeners, *, workers, pidfile=None, ready_timeout=30.0,
                 drain_timeout=60.0, abort_grace=5.0, command=None, environ=None,
                 backoff_base=1.0, backoff_max=60.0, install_signal_handlers=True,
                 relay_output=True, reexec_command=None, preflight_command=None, adopted=(),
                 generation=1, shutdown_delay=0.0, zygote=False, zygote_tls=False):
        self.reactor = reactor
        # Fork workers from a zygote (twisted_graceful.zygote) once it has
        # imported the libraries; each is a new interpreter until then, or
        # when it cannot.
        self.use_zygote = zygote
        self.zygote_tls = zygote_tls
        self.zygote = None
        self._stray_reaper = None
        # On SIGTERM/SIGINT the workers say 503 on /healthz and go on serving
        # this long before they drain (see GracefulService.shutdown_delay).
        self.shutdown_delay = shutdown_delay
        self._delaying_shutdown = None
        self.listeners = listeners
        self.pidfile = os.path.abspath(pidfile) if pidfile else None
        self.ready_timeout = ready_timeout
        self.abort_grace = abort_grace
        self.command = command
        self.environ = os.environ if environ is None else environ
        self.install_signal_handlers = install_signal_handlers
        self.relay_output = relay_output
        self.cwd = os.getcwd()
        self.master = Master(reactor, workers=workers, spawn=self._spawn_worker,
                             ready_timeout=ready_timeout, drain_timeout=drain_timeout,
                             abort_grace=abort_grace, backoff_base=backoff_base,
                             backoff_max=backoff_max, exit=self._exit)
        self._previous_sighup = None
        self.reexec_command = reexec_command
        self.preflight_command = preflight_command
        self.adopted = list(adopted)  # (pid, generation, draining) from our previous image
        self.adopted_generation = generation
        self.execs = int(self.environ.get(handoff.MASTER_EXECS_ENV, "0") or 0)
        self.master.execs = self.execs
        self._reexecuting = False

    # The interface observers and the status file know (see GracefulService).
    @property
    def generation(self):
        return self.master.generation

    @property
    def state(self):
        return self.master.state

    def add_observer(self, observer):
        self.master.observers.append(require_callable(observer, ILifecycleObserver))

    def privilegedStartService(self):
        if self.install_signal_handlers and self._previous_sighup is None:
            self._previous_sighup = signal.signal(
                signal.SIGHUP,
                lambda signum, frame: self.reactor.callFromThread(self.upgrade, "SIGHUP"))
            signal.signal(
                signal.SIGUSR2,
                lambda signum, frame: self.reactor.callFromThread(self.reexec, "SIGUSR2"))
        service.Service.privilegedStartService(self)

    def startService(self):
        service.Service.startService(self)
        protect_twistd_pidfile()
        if self.use_zygote:
            self._start_zygote_support()
        self.log.info("master pid {pid}: listening on {listeners}; {what}",
                      pid=os.getpid(), listeners=", ".join(self.describe_listeners().values()),
                      what=(f"adopting {len(self.adopted)} worker(s)" if self.adopted else
                            f"starting {self.master.size} worker(s)"))
        if self.adopted:
            workers = [(AdoptedWorker(self.master, pid, generation, self.reactor,
                                      self.abort_grace), draining)
                       for pid, generation, draining in self.adopted]
            self.master.adopt([w for w, draining in workers if not draining],
                              [w for w, draining in workers if draining],
                              self.adopted_generation)
        else:
            self.master.start()

    def describe_listeners(self):
        return {name: f"{name}={describe_socket(sock)}" for name, sock in self.listeners.items()}

    def upgrade(self, reason="upgrade requested"):
        if self._delaying_shutdown is not None:
            return self.master.refuse_upgrade(reason, "shutting down (in its --shutdown-delay)")
        return self.master.request_upgrade(reason)

    def _next_command(self):
        return resolve_command(self.command, self.cwd)

    def _spawn_worker(self, master, generation):
        executable, args = self._next_command()
        environ = dict(self.environ)
        environ[handoff.WORKERS_ENV] = str(master.size)  # siblings share accepts
        listeners = {name: sock.fileno() for name, sock in self.listeners.items()}
        zygote = self.zygote
        if zygote is not None and not zygote.gone:
            from twisted_graceful.zygote import ZygoteUnavailable, forking_spawner

            proto = self._worker_protocol(master)
            try:
                spawn_next_generation(
                    self.reactor, proto, executable, args, listeners, None, environ,
                    generation, self.pidfile, self.ready_timeout, self.cwd,
                    role=handoff.WORKER, spawn=forking_spawner(zygote, self.reactor))
                return proto
            except ZygoteUnavailable as e:
                self.log.info("master pid {pid}: a worker of generation {g} starts as a new "
                              "interpreter: {why}", pid=os.getpid(), g=generation, why=e)
                if zygote.gone:
                    self._zygote_changed()
            except Exception:
                # Not a refusal: a fault of ours. No more forks; the worker
                # starts as it did before zygotes.
                self.log.failure("master pid {pid}: the zygote failed; workers start as new "
                                 "interpreters from now on", pid=os.getpid())
                self.use_zygote = False
                self._stop_zygote("it failed", kill=True)
        proto = self._worker_protocol(master)
        spawn_next_generation(
            self.reactor, proto, executable, args, listeners, None, environ, generation,
            self.pidfile, self.ready_timeout, self.cwd, role=handoff.WORKER)
        return proto

    def _worker_protocol(self, master):
        return NextGenerationProcess(master, relay=self.relay_output, reactor=self.reactor,
                                     kill_grace=self.abort_grace)

    # --- the zygote (docs/design.md, fact 46) ------------------------------
    def _start_zygote_support(self):
        from twisted.internet import process, task

        from twisted_graceful.zygote import become_subreaper, reap_strays, supported

        if not supported() or not become_subreaper():
            self.use_zygote = False
            self.log.info("master pid {pid}: workers start as new interpreters (this system "
                          "cannot make the master a child subreaper)", pid=os.getpid())
            return
        # Re-parented descendants nobody waits for (a zygote's fork that the
        # master gave up on, a dead worker's children) are reaped here.
        self._stray_reaper = task.LoopingCall(reap_strays,
                                              lambda: set(process.reapProcessHandlers))
        self._stray_reaper.clock = self.reactor
        self._stray_reaper.start(1.0, now=False)
        self.add_observer(self._zygote_event)

    def _zygote_event(self, event, **details):
        if event in ("serving", "upgrade-ok", "upgrade-failed", "worker-ready"):
            self.reactor.callLater(0, self._ensure_zygote)
        elif event == "shutting-down":
            self._stop_zygote("the master is shutting down")

    def _ensure_zygote(self):
        """
        A zygote for the code on disk now, unless one is there, or the master
        is not serving.
        """
        from twisted_graceful.zygote import Zygote, program_of

        if (not self.use_zygote or not self.running or self.master.state != SERVING
                or (self.zygote is not None and not self.zygote.gone)):
            return
        executable, args = self._next_command()
        program = program_of(executable, args)
        if program is None:
            self.use_zygote = False
            self.log.info("master pid {pid}: workers start as new interpreters (their command "
                          "line is not `{exe} PROGRAM ...`)", pid=os.getpid(), exe=executable)
            return
        try:
            zygote = Zygote(self.reactor, executable, program, self.environ, self.cwd,
                            tls=self.zygote_tls, on_exit=self._zygote_exited,
                            on_ready=self._zygote_ready).start()
        except Exception as e:
            self.log.error("master pid {pid}: could not start a zygote: {err}",
                           pid=os.getpid(), err=e)
            self._set_zygote(None)
            return
        self._set_zygote(zygote)
        self.master._tell("zygote-started", zygote_pid=zygote.pid)

    def _set_zygote(self, zygote):
        """
        The zygote the master has (or None), and what its status says of it.
        """
        self.zygote = zygote
        self.master.zygote_pid = zygote.pid if zygote is not None else None
        self.master.zygote_ready = zygote is not None and zygote.ready

    def _zygote_ready(self, zygote):
        if zygote is self.zygote:
            self._set_zygote(zygote)
            self.master._tell("zygote-ready", zygote_pid=zygote.pid)

    def _zygote_exited(self, zygote):
        # Replaced at the next upgrade's end or worker's start, not at once:
        # a zygote that cannot start (a broken deploy) would loop.
        if zygote.unusable is not None:
            self.use_zygote = False
            self.log.warn("master pid {pid}: workers start as new interpreters from now on: the "
                          "zygote cannot fork ({why})", pid=os.getpid(), why=zygote.unusable)
        if zygote is self.zygote:
            self.log.info("master pid {pid}: zygote pid {z} is gone: {why}", pid=os.getpid(),
                          z=zygote.pid, why=zygote.why_gone)
            self._set_zygote(None)
            self.master._tell("zygote-exited", zygote_pid=zygote.pid)

    def _zygote_changed(self):
        """
        The zygote refused for good (the code changed): it is replaced once
        the master serves again.
        """
        self._set_zygote(None)
        self.reactor.callLater(0, self._ensure_zygote)

    def _stop_zygote(self, why, kill=False):
        if self.zygote is not None:
            # One still importing would not read its socket's end: SIGKILL
            # (it holds nothing); a ready one leaves at the end of its socket.
            self.zygote.stop(why, kill=kill or not self.zygote.ready)
            self._set_zygote(None)

    # --- re-executing the master's own code (SIGUSR2) ------------------------
    def reexec(self, reason="SIGUSR2"):
        """
        Replace the master's own code in place (same PID, same sockets, same
        workers), once the new code passed a preflight in a throwaway
        process; then upgrade the workers.

        @return: a Deferred firing with C{"refused"} (or never: the process
            image is replaced).
        """
        why = None
        if self.reexec_command is None:
            why = "this master cannot re-execute itself (no command line to run)"
        elif self._reexecuting:
            why = "a re-exec is already in progress"
        elif self._delaying_shutdown is not None:
            why = "shutting down (in its --shutdown-delay)"
        elif self.master.state != SERVING:
            why = f"the master is {self.master.state}"
        elif self.master.replacing:
            why = "a dead worker is being replaced; try again once it serves"
        if why is not None:
            return defer.succeed(self._reexec_refused(reason, why))
        self._reexecuting = True
        self.log.info("master pid {pid}: {reason}: checking the new code before re-executing",
                      pid=os.getpid(), reason=reason)
        d = self._preflight()

        def checked(result):
            out, err, code = result
            if code != 0:
                lines = [line for line in (out + err).decode("utf-8", "replace").splitlines()
                         if line.strip()]
                self._reexecuting = False
                return self._reexec_refused(
                    reason, f"the new code failed its preflight (exit status {code}): "
                            f"{lines[-1] if lines else 'no output'}")
            if self.master.state != SERVING:
                self._reexecuting = False
                return self._reexec_refused(reason, f"the master is {self.master.state}")
            self._exec(reason)

        return d.addCallback(checked)

    def _reexec_refused(self, reason, why):
        self.log.warn("master pid {pid}: {reason} ignored: {why}; the master and its workers "
                      "keep running", pid=os.getpid(), reason=reason, why=why)
        self.master._tell("reexec-refused", reason=reason, why=why)
        return "refused"

    def _preflight(self):
        from twisted.internet.utils import getProcessOutputAndValue

        executable, args = self.preflight_command()
        return getProcessOutputAndValue(executable, args[1:], env=dict(self.environ),
                                        path=self.cwd, reactor=self.reactor)

    def _exec(self, reason):
        master = self.master
        workers = [(w.pid, w.generation, False) for w in master.current.workers
                   if not w.finished]
        workers += [(w.pid, w.generation, True) for w in master.retiring if not w.finished]
        fds = {}
        for name, sock in self.listeners.items():
            os.set_inheritable(sock.fileno(), True)
            fds[name] = sock.fileno()
        environment = handoff.master_reexec_environment(
            fds, workers, master.generation, self.execs + 1, self.environ)
        executable, args = self.reexec_command()
        self.log.info("master pid {pid}: {reason}: re-executing {args} (keeping {n} "
                      "listener(s) and {w} worker(s))", pid=os.getpid(), reason=reason,
                      args=" ".join(args), n=len(fds), w=len(workers))
        # twistd refuses to start when its pidfile names a live process: ours.
        if self.pidfile:
            remove_pidfile_if_own(self.pidfile)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os.execve(executable, args, environment)

    def _exit(self):
        stop_reactor(self.reactor)()

    # --- the shutdown delay -------------------------------------------------
    def _delay_shutdown(self):
        """
        Every serving worker answers 503 on /healthz from now on (it gets
        L{twisted_graceful.service.SHUTTING_DOWN_SIGNAL}) and goes on serving; C{shutdown_delay}
        seconds later the workers drain as on any stop. A second SIGTERM or
        SIGINT ends the delay at once.
        """
        d = defer.Deferred()

        def over():
            self._delaying_shutdown = None
            self.log.info("master pid {pid}: shutdown delay of {s:g} s over", pid=os.getpid(),
                          s=self.shutdown_delay)
            d.callback(None)

        if self.install_signal_handlers:
            # The reactor is stopping already: its own handlers would raise.
            # Installed first: once a worker says it heard us, so will we.
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda n, f: self.reactor.callFromThread(
                    self._signal_while_stopping, signal.Signals(n).name))
        self._delaying_shutdown = self.reactor.callLater(self.shutdown_delay, over)
        self.log.info(
            "master pid {pid}: shutting down: the workers' /healthz answers 503; still accepting "
            "and serving for {s:g} s (--shutdown-delay) before they drain",
            pid=os.getpid(), s=self.shutdown_delay)
        self.add_observer(self._worker_ready_while_delaying)
        current = self.master.current.workers if self.master.current else []
        for worker in current + self.master.replacing:
            self._tell_shutting_down(worker.pid)
        return d

    def _tell_shutting_down(self, pid):
        from twisted_graceful.service import SHUTTING_DOWN_SIGNAL

        try:
            os.kill(pid, SHUTTING_DOWN_SIGNAL)
        except OSError:
            pass  # gone already: the master hears of it

    def _worker_ready_while_delaying(self, event, **details):
        # A replacement for a worker that died meanwhile says 503 too.
        if event == "worker-ready" and self._delaying_shutdown is not None:
            self._tell_shutting_down(details["worker_pid"])

    def _signal_while_stopping(self, name):
        delay = self._delaying_shutdown
        if delay is not None and delay.active():
            self.log.warn("master pid {pid}: {name} during the shutdown delay: the workers drain "
                          "now", pid=os.getpid(), name=name)
            delay.reset(0)
        else:
            self.log.warn("master pid {pid}: {name} ignored: the workers are draining already",
                          pid=os.getpid(), name=name)

    def _exit_with(self, status):
        if self.pidfile:
            remove_pidfile_if_own(self.pidfile)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    def stopService(self):
        service.Service.stopService(self)
        self._stop_zygote("the master is stopping")
        if self._stray_reaper is not None and self._stray_reaper.running:
            self._stray_reaper.stop()
        if self.shutdown_delay > 0 and self.master.state == SERVING:
            d = self._delay_shutdown()
            d.addCallback(lambda _: self.master.stop())
        else:
            d = self.master.stop()

        def close(result):
            for sock in self.listeners.values():
                sock.close()
            if self.master.exit_status:
                # twistd exits 0 once the reactor stops; say it failed.
                self.reactor.addSystemEventTrigger(
                    "after", "shutdown", self._exit_with, self.master.exit_status)
            return result

        return d.addBoth(close)
