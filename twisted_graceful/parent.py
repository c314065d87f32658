"""
The parent's side of the handshake: spawn the next generation with the
listeners and the ready pipe in C{childFDs}, relay its output, and report
whether it became ready (PITFALLS 3).
"""

import collections
import os
import signal

from twisted.internet import defer, error, protocol

from twisted_graceful import handoff
from twisted_graceful.child import parse_ready_message

OUTPUT_TAIL_LINES = 15


class NextGenerationProcess(protocol.ProcessProtocol):
    """
    Watches one child from spawn to ready (or failure).

    @ivar on_ready: called with the child's PID when it reports ready.
    @ivar on_failed: called with a sentence saying how it failed.
    """

    def __init__(self, on_ready, on_failed, relay=True, reactor=None, kill_grace=5.0):
        self.reactor = reactor
        self.kill_grace = kill_grace
        self.ended = defer.Deferred()
        self._kill_timer = None
        self.on_exit_after_ready = None  # called with (pid, how) if it dies after ready
        self.on_ready = on_ready
        self.on_failed = on_failed
        self.relay = relay
        self._ready_buffer = b""
        self._partial = {1: b"", 2: b""}
        self.tail = collections.deque(maxlen=OUTPUT_TAIL_LINES)
        self.ready = False
        self.finished = False
        self.exit_description = None
        self._failure_reported = False

    pid = None

    def makeConnection(self, transport):
        # The transport forgets its pid once the process is reaped; we do not.
        self.pid = getattr(transport, "pid", None)
        protocol.ProcessProtocol.makeConnection(self, transport)

    def childDataReceived(self, fd, data):
        if fd == handoff.READY_FD:
            self._ready_data(data)
        elif fd in (1, 2):
            if self.relay:
                try:
                    os.write(fd, data)
                except OSError:
                    pass
            lines = (self._partial[fd] + data).split(b"\n")
            self._partial[fd] = lines.pop()[-4096:]
            for line in lines:
                if line.strip():
                    self.tail.append(line.decode("utf-8", "replace")[:500])

    def _ready_data(self, data):
        if self.ready or self._failure_reported:
            return
        self._ready_buffer += data
        try:
            pid = parse_ready_message(self._ready_buffer)
        except ValueError:
            self.fail(f"wrote {self._ready_buffer[:80]!r} on the ready pipe instead of 'READY <pid>'")
            self.kill()
            return
        if pid is None:
            return
        if pid != self.pid:
            self.fail(f"reported ready for pid {pid}, which is not its own")
            self.kill()
            return
        self.ready = True
        self.on_ready(self.pid)

    def childConnectionLost(self, fd):
        if fd in (1, 2) and self._partial[fd].strip():
            self.tail.append(self._partial[fd].decode("utf-8", "replace")[:500])
            self._partial[fd] = b""

    def processEnded(self, reason):
        self.finished = True
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        value = reason.value
        if isinstance(value, error.ProcessTerminated) and value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = f"signal {value.signal}"
            self.exit_description = f"was killed by {name}"
        else:
            code = getattr(value, "exitCode", 0)
            self.exit_description = f"exited with status {code}"
        if not self.ready:
            self.fail(self.exit_description)
        elif self.on_exit_after_ready is not None:
            self.on_exit_after_ready(self.pid, self.exit_description)
        self.ended.callback(self.exit_description)

    def fail(self, how):
        if self._failure_reported or self.ready:
            return
        self._failure_reported = True
        self.on_failed(how)

    def kill(self):
        """
        Stop an unready child: SIGTERM (if it started accepting in the instant
        before we gave up on it, it drains like any generation), SIGKILL if it
        is still there C{kill_grace} seconds later.
        """
        if self.finished:
            return
        self._signal("TERM")
        if self.reactor is not None and self._kill_timer is None:
            self._kill_timer = self.reactor.callLater(self.kill_grace, self._signal, "KILL")
        elif self.reactor is None:
            self._signal("KILL")

    def _signal(self, name):
        if self.finished:
            return
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def output_tail(self):
        return list(self.tail)


def spawn_next_generation(reactor, process_protocol, executable, args, listeners, env,
                          generation, pidfile, ready_timeout, cwd):
    """
    Start the next generation. The first listener goes to fd 3, the ready pipe
    to fd 4, further listeners to fd 5 on, then our own stdout and stderr,
    which the child takes over once it is ready.

    @param listeners: ordered listener name -> fd in this process.
    """
    child_fds = {0: 0, 1: "r", 2: "r", handoff.READY_FD: "r"}
    names = {}
    next_fd = handoff.NEXT_LISTENER_FD
    for i, (name, fd) in enumerate(listeners.items()):
        if i == 0:
            target = handoff.FIRST_LISTENER_FD
        else:
            target = next_fd
            next_fd += 1
        child_fds[target] = fd
        names[name] = target
    stdout_target, stderr_target = next_fd, next_fd + 1
    child_fds[stdout_target] = 1
    child_fds[stderr_target] = 2

    environment = {k: v for k, v in env.items() if k not in handoff.HANDOFF_VARIABLES}
    environment.update(
        {
            handoff.LISTENERS_ENV: handoff.format_listener_map(names),
            handoff.READY_FD_ENV: str(handoff.READY_FD),
            handoff.GENERATION_ENV: str(generation),
            handoff.PARENT_PID_ENV: str(os.getpid()),
            handoff.PIDFILE_ENV: pidfile or "",
            handoff.STDIO_FDS_ENV: f"{stdout_target},{stderr_target}",
            handoff.READY_TIMEOUT_ENV: str(ready_timeout),
        }
    )
    return reactor.spawnProcess(
        process_protocol, executable, args, env=environment, path=cwd, childFDs=child_fds
    )
