"""
The parent's side of the handshake: spawn the next generation with the
listeners, the ready pipe and the lineage record in C{childFDs} (the layout
is L{twisted_graceful.handoff}'s), relay its output, and tell the
L{Lifecycle} whether it became ready, failed, or exited.
"""

import collections
import os
import signal

from twisted.internet import defer, error, protocol

from twisted_graceful import handoff

OUTPUT_TAIL_LINES = 15


class NextGenerationProcess(protocol.ProcessProtocol):
    """
    Watches one child from spawn to exit, and tells C{lifecycle}:
    C{child_ready(self)} when it reports ready, C{child_failed(self, how)}
    when it fails the handshake, C{child_ended(self, how)} when it exits
    (before or after it was ready).
    """

    def __init__(self, lifecycle, relay=True, reactor=None, kill_grace=5.0):
        self.reactor = reactor
        self.kill_grace = kill_grace
        self.ended = defer.Deferred()
        self._kill_timer = None
        self.lifecycle = lifecycle
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
        if self._failure_reported:
            return
        if self.ready:
            self._after_ready(data)
            return
        self._ready_buffer += data
        try:
            pid = handoff.parse_ready_message(self._ready_buffer)
        except ValueError:
            self.fail(f"wrote {self._ready_buffer[:80]!r} on the ready pipe instead of 'READY <pid>'")
            return
        if pid is None:
            return
        if pid != self.pid:
            self.fail(f"reported ready for pid {pid}, which is not its own")
            return
        self.ready = True
        rest = self._ready_buffer.split(b"\n", 1)[1]
        self._ready_buffer = b""
        self.lifecycle.child_ready(self)
        if rest:
            self._after_ready(rest)

    def _after_ready(self, data):
        """
        A worker keeps its ready pipe: C{STOPPED <pid>} once it no longer
        accepts.
        """
        self._ready_buffer = (self._ready_buffer + data)[-256:]
        while b"\n" in self._ready_buffer:
            line, self._ready_buffer = self._ready_buffer.split(b"\n", 1)
            if handoff.parse_stopped_message(line) == self.pid:
                stopped = getattr(self.lifecycle, "child_stopped", None)
                if stopped is not None:
                    stopped(self)

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
        self._failure_reported = True
        self.lifecycle.child_ended(self, self.exit_description)
        self.ended.callback(self.exit_description)

    def fail(self, how):
        if self._failure_reported or self.ready:
            return
        self._failure_reported = True
        self.lifecycle.child_failed(self, how)

    def kill(self):
        """
        Stop an unready child: SIGTERM (if it started accepting in the instant
        before we gave up on it, it drains like any generation), SIGKILL if it
        is still there C{kill_grace} seconds later.
        """
        self.terminate(self.kill_grace)

    def terminate(self, kill_after):
        """
        SIGTERM now (the process drains and exits), SIGKILL if it is still
        there C{kill_after} seconds later.
        """
        if self.finished:
            return
        self._signal("TERM")
        if self.reactor is not None and self._kill_timer is None:
            self._kill_timer = self.reactor.callLater(kill_after, self._signal, "KILL")
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


def spawn_next_generation(reactor, process_protocol, executable, args, listeners, lineage_fd,
                          env, generation, pidfile, ready_timeout, cwd, role=handoff.SUCCESSOR,
                          spawn=None):
    """
    Start the next generation (or a worker) with the handoff of
    L{handoff.next_generation_handoff}.

    @param listeners: ordered listener name -> fd in this process.
    @param spawn: what starts the process, called as C{reactor.spawnProcess}
        is (that by default; a zygote's fork for a worker).
    """
    child_fds, environment = handoff.next_generation_handoff(
        listeners, lineage_fd, env, generation, os.getpid(), pidfile, ready_timeout, role)
    return (spawn or reactor.spawnProcess)(
        process_protocol, executable, args, env=environment, path=cwd, childFDs=child_fds
    )
