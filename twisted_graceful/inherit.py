"""
What a generation starts with: its listening sockets, bound here, taken
from systemd (socket activation), or inherited from the previous generation
together with the handshake fds and the lineage record.
"""

import os
from collections import OrderedDict

from twisted_graceful import handoff, systemd
from twisted_graceful.listeners import ListenerError, address_mismatch, bind_listener


class Inheritance:
    """
    What this generation starts with: its listening sockets (bound here or
    inherited) and, if a previous generation started it, the handshake fds.
    """

    def __init__(self, sockets, generation=1, ready_fd=None, stdio_fds=None, pidfile=None,
                 ready_timeout=None, parent_pid=None, source="bound", lineage_fd=None,
                 role=None):
        self.sockets = sockets
        self.lineage_fd = lineage_fd
        self.role = role  # how a previous process started us: successor, worker, or None
        self.workers = []  # (pid, generation) a re-executed master adopts
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
        if handoff.is_master_reexec(environ):
            return cls._master_reexec(specs, environ)
        if handoff.is_handoff(environ):
            wanted = OrderedDict((name, spec.expects) for name, spec in specs.items())
            role = handoff.inherit_role(environ)
            generation = handoff.inherit_generation(environ, role)
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
                parent_pid = handoff.inherit_parent_pid(environ)
                # A worker's master keeps the record of who serves; a
                # successor takes over through the lineage record.
                lineage_fd = (handoff.inherit_lineage_fd(environ) if role == handoff.SUCCESSOR
                              else None)
            except BaseException:
                for sock in sockets.values():
                    sock.close()
                raise
            result = cls(
                sockets, generation, ready_fd, stdio,
                pidfile=environ.get(handoff.PIDFILE_ENV) or None,
                ready_timeout=timeout,
                parent_pid=parent_pid,
                source="inherited",
                lineage_fd=lineage_fd,
                role=role,
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

    @classmethod
    def _master_reexec(cls, specs, environ):
        """
        A master that re-executed itself (SIGUSR2) keeps its sockets and its
        workers.
        """
        wanted = OrderedDict((name, spec.expects) for name, spec in specs.items())
        sockets = handoff.inherit_master_listeners(environ, wanted)
        try:
            workers = handoff.inherit_master_workers(environ)
            generation = handoff.inherit_generation(environ, handoff.WORKER)
        except BaseException:
            for sock in sockets.values():
                sock.close()
            raise
        handoff.forget_master_handoff(environ)
        result = cls(OrderedDict((name, sockets[name]) for name in specs), generation,
                     source="re-exec")
        result.workers = workers
        return result
