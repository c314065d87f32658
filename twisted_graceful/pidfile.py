"""
The pidfile follows the live generation (docs/design.md, fact 5).

It is written atomically (C{os.replace}) by the old generation once the new
one is ready, before the old one exits; a generation removes it at exit only
if it still names that generation's own PID.
"""

import os
import tempfile


def pid_alive(pid):
    """
    Is C{pid} a running process? A zombie (exited, not yet reaped) is not.
    """
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        pass
    return True


def read_pid(path):
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def atomic_write(path, data, mode, sync=True):
    """
    Replace C{path} with C{data} (text) atomically: a reader sees the old
    content or the new, never half of it.

    The temporary file (docs/design.md, fact 26) is made by C{tempfile.mkstemp}
    in the same directory:
    an unpredictable name, created with C{O_CREAT|O_EXCL|O_NOFOLLOW}, so a
    symlink planted in advance is never followed. Its mode is set to C{mode}
    explicitly (the umask is not trusted), it is flushed to disk (unless
    C{sync} is false: for content rewritten every second, where a crash may
    lose the last version), then renamed over C{path} (which replaces a
    symlink at C{path}, never its target).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            fd = None
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_pidfile(path, pid):
    atomic_write(path, f"{pid}\n", 0o644)


def remove_pidfile_if_own(path, pid=None):
    """
    Remove C{path} if it names C{pid} (this process by default).
    @return: whether it was removed.
    """
    pid = os.getpid() if pid is None else pid
    if not path or read_pid(path) != pid:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
