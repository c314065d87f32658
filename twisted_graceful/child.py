"""
The child's side of the handshake: tell the parent "ready" on the inherited
pipe (once it has taken over in the lineage record), and take over the
parent's stdout/stderr once it does.
"""

import os
import sys

from twisted_graceful.handoff import close_quietly, format_ready_message, format_stopped_message


class ReadyPipe:
    """
    The write end of the ready pipe (fd 4 in the child).
    """

    def __init__(self, fd):
        self.fd = fd

    def signal_ready(self, pid=None, keep_open=False):
        """
        C{READY <pid>}; a worker keeps the pipe open to say L{signal_stopped}
        later.
        """
        pid = os.getpid() if pid is None else pid
        try:
            os.write(self.fd, format_ready_message(pid))
        except BaseException:
            self.close()
            raise
        if not keep_open:
            self.close()

    def signal_stopped(self, pid=None):
        """
        C{STOPPED <pid>}: this worker no longer accepts (it drains). A master
        that is gone is not an error.
        """
        if self.fd is None:
            return
        pid = os.getpid() if pid is None else pid
        try:
            os.write(self.fd, format_stopped_message(pid))
        except OSError:
            pass
        finally:
            self.close()

    def close(self):
        if self.fd is not None:
            close_quietly(self.fd)
            self.fd = None


def take_over_stdio(stdio_fds):
    """
    Until it is ready, the child's stdout and stderr are pipes the parent
    reads (and keeps the tail of, to explain a failure). Once ready, point
    them at the parent's own stdout and stderr: the parent is about to exit.
    """
    if not stdio_fds:
        return
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass
    out_fd, err_fd = stdio_fds
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in (out_fd, err_fd):
        if fd not in (1, 2):
            try:
                os.close(fd)
            except OSError:
                pass
