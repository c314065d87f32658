"""
sd_notify(3) without a dependency: one datagram to C{$NOTIFY_SOCKET}, and an
observer of L{GracefulService} that tells systemd what each generation does.

    graceful = GracefulService(reactor, ...)
    install_sd_notify(graceful)     # does nothing when NOTIFY_SOCKET is unset

What systemd hears (docs/design.md, fact 14):

  - the first generation (or any one not started by our own handoff), once
    ready: C{READY=1}, C{STATUS=serving as PID p (generation g)};
  - on SIGHUP, once the next generation is spawned: C{RELOADING=1},
    C{MONOTONIC_USEC=...}, C{STATUS=upgrading to PID c (generation g+1)};
  - when it is ready, from the I{old} main process, after the pidfile names
    the child, in one datagram: C{MAINPID=c}, C{READY=1}, C{STATUS=...};
    the child itself never sends C{READY=1}: it is announced by its parent;
  - a failed upgrade: C{READY=1} (the reload is over) and a C{STATUS=} saying
    it failed and who keeps serving;
  - a real shutdown (never a handoff): C{STOPPING=1};
  - while draining, C{STATUS=} with the number of connections left (at most
    once a second, only when it changed).

C{NOTIFY_SOCKET} stays in the environment: every later generation needs it.
"""

import os
import socket
import time
from collections.abc import Mapping
from typing import Any, Optional

from twisted.logger import Logger
from zope.interface import implementer

from twisted_graceful.interfaces import ILifecycleObserver

NOTIFY_SOCKET = "NOTIFY_SOCKET"

log = Logger()


def notify_address(environ=None):
    """
    The address C{$NOTIFY_SOCKET} names (an abstract socket when it starts
    with C{@}), or L{None} when unset or unusable.
    """
    environ = os.environ if environ is None else environ
    path = environ.get(NOTIFY_SOCKET, "")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None  # vsock:... and relative paths are not supported


def sd_notify(message, environ=None):
    """
    Send C{message} (C{"READY=1\\nSTATUS=..."}) to C{$NOTIFY_SOCKET}.

    @return: True if it was sent, False if there is nowhere to send it or
        sending failed (logged; never raised: systemd going away must not stop
        the server).
    """
    environ = os.environ if environ is None else environ
    address = notify_address(environ)
    if address is None:
        if environ.get(NOTIFY_SOCKET):
            log.warn("NOTIFY_SOCKET={value!r} is not supported (only /path and @abstract); "
                     "not notifying", value=environ.get(NOTIFY_SOCKET))
        return False
    if isinstance(message, str):
        message = message.encode("utf-8")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.sendto(message, address)
    except OSError as e:
        log.warn("sd_notify to {address!r} failed: {error}", address=environ.get(NOTIFY_SOCKET),
                 error=e)
        return False
    finally:
        sock.close()
    return True


def monotonic_usec():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _connections(n):
    return f"{n} connection{'' if n == 1 else 's'}"


def _worker_status(master, generation, workers):
    pids = ", ".join(str(w["pid"]) for w in workers
                     if w.get("generation") == generation and w.get("state") == "serving")
    return _status(f"master PID {master}: workers generation {generation} serve (PIDs {pids})")


def _status(text):
    # One line: a newline would start a new (bogus) assignment.
    return "STATUS=" + " ".join(str(text).split())


@implementer(ILifecycleObserver)
class SdNotifier:
    """
    Observer of a L{GracefulService} (see L{GracefulService.add_observer})
    that sends what systemd needs to follow the service across upgrades.
    """

    def __init__(self, graceful, send=None, pid=None, status_interval=1.0):
        self.graceful = graceful
        self._send = send or sd_notify
        self._pid = pid
        self.status_interval = status_interval
        self.draining_for = None  # child PID after a handover, "shutdown" on a real stop
        self._reported = None
        self._pending = None

    @property
    def pid(self):
        return os.getpid() if self._pid is None else self._pid

    def send(self, *lines):
        return self._send("\n".join(lines))

    def __call__(self, event, **details):
        handler = getattr(self, "on_" + event.replace("-", "_"), None)
        if handler is not None:
            handler(**details)

    def on_serving(self, generation, source="bound", role=None, workers=(), **_):
        if role == "master":
            self.send("READY=1", _worker_status(self.pid, generation, workers))
            return
        if source == "inherited":
            # Started by our own handoff: the previous generation announces
            # us with MAINPID= and READY=1 once it has handed over.
            return
        self._stop_following()
        status = _status(f"serving as PID {self.pid} (generation {generation})")
        if source in ("orphaned", "took-back"):
            # The previous generation died before it could announce us, or
            # the one we handed over to died: we are the main process again.
            self.send(f"MAINPID={self.pid}", "READY=1", status)
        else:
            self.send("READY=1", status)

    def on_upgrade_started(self, child_pid, generation, role=None, **_):
        if role == "master":
            self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}",
                      _status(f"upgrading the workers to generation {generation + 1}; "
                              f"generation {generation} serves meanwhile"))
            return
        self.send(
            "RELOADING=1",
            f"MONOTONIC_USEC={monotonic_usec()}",
            _status(f"upgrading to PID {child_pid} (generation {generation + 1}); "
                    f"PID {self.pid} (generation {generation}) serves meanwhile"),
        )

    def on_upgrade_failed(self, outcome, generation, role=None, **_):
        serving = (f"workers generation {generation} keep serving" if role == "master" else
                   f"still serving as PID {self.pid} (generation {generation})")
        self.send("READY=1", _status(f"upgrade failed: {outcome.error}; {serving}"))

    def on_upgrade_ok(self, generation, role=None, workers=(), **_):
        if role != "master":
            return  # the handover announces the new main process (on_handed_over)
        self.send("READY=1", _worker_status(self.pid, generation, workers))

    def on_handed_over(self, child_pid, generation, **_):
        # The pidfile names the child already (it wrote it when it took over).
        self.draining_for = child_pid
        self._follow()
        self.send(f"MAINPID={child_pid}", "READY=1", self._draining_status(self._reported))

    def on_shutting_down(self, was_current=True, role=None, workers=(), **_):
        if not was_current:
            return  # an old generation, draining already: systemd follows its successor
        if role == "master":
            self.draining_for = "shutdown"
            self.send("STOPPING=1", _status(f"shutting down: master PID {self.pid} waits for "
                                            f"{len(workers)} worker(s) to drain"))
            return
        self.draining_for = "shutdown"
        self._follow()
        self.send("STOPPING=1", self._draining_status(self._reported))

    def on_drained(self, report=None, **_):
        self._cancel_pending()
        if self.draining_for == "shutdown":
            self.send(_status(f"PID {self.pid} drained; exiting"))
        elif self.draining_for is not None and self._reported:
            # Do not leave "draining N connections" behind; otherwise say
            # nothing: the new generation's status is the one that matters.
            self.send(self._draining_status(0))

    def _follow(self):
        self._reported = len(self.graceful.tracker)
        self.graceful.tracker.add_change_callback(self._connections_changed)

    def _stop_following(self):
        self.draining_for = None
        self._cancel_pending()
        self.graceful.tracker.remove_change_callback(self._connections_changed)

    def _draining_status(self, count):
        if self.draining_for == "shutdown":
            return _status(f"shutting down: PID {self.pid} draining {_connections(count)}")
        return _status(
            f"serving as PID {self.draining_for} (generation {self.graceful.generation + 1}); "
            f"PID {self.pid} (generation {self.graceful.generation}) draining "
            f"{_connections(count)}"
        )

    def _connections_changed(self, tracker):
        if self._pending is None or not self._pending.active():
            self._pending = self.graceful.reactor.callLater(self.status_interval, self._flush)

    def _flush(self):
        self._pending = None
        count = len(self.graceful.tracker)
        if count != self._reported and count:
            self._reported = count
            self.send(self._draining_status(count))

    def _cancel_pending(self):
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None


def install_sd_notify(graceful: Any,
                      environ: Optional[Mapping[str, str]] = None) -> Optional["SdNotifier"]:
    """
    Tell systemd about C{graceful}'s life (ready, reloading, new main PID,
    stopping) when C{$NOTIFY_SOCKET} is set; do nothing otherwise.

    @return: the L{SdNotifier} installed, or L{None}.
    """
    environ = os.environ if environ is None else environ
    if not environ.get(NOTIFY_SOCKET):
        return None
    notifier = SdNotifier(graceful, send=lambda message: sd_notify(message, environ))
    graceful.add_observer(notifier)
    return notifier
