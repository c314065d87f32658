"""
The handoff's wire format, built and parsed here: what a generation hands
to the next one (docs/design.md, "The handoff").

C{childFDs} of the next generation:

    0             our stdin
    1, 2          pipes we read (its output, relayed and kept for a failure
                  report) until it is ready
    3             the first listener
    4             the write end of the ready pipe: C{READY <pid>\n} (a worker
                keeps it open and writes C{STOPPED <pid>\n} once it no longer
                accepts)
    5, 6, ...     further listeners, in the order they were added
    then          the lineage record, our own stdout, our own stderr

and its environment: ours, plus the variables below, which name every fd
so that the child finds each listener by name, not by position.
"""

import os
import re
import socket
import stat

from twisted_graceful.listeners import ListenerError, check_listening_socket, fd_limit, shorten

LISTENERS_ENV = "GRACEFUL_LISTENERS"  # "http=3,txn=5": listener name = fd
READY_FD_ENV = "GRACEFUL_READY_FD"  # the write end of the ready pipe
GENERATION_ENV = "GRACEFUL_GENERATION"  # this process's generation number
PARENT_PID_ENV = "GRACEFUL_PARENT_PID"  # the generation that spawned us
PIDFILE_ENV = "GRACEFUL_PIDFILE"  # where the live generation's PID goes
STDIO_FDS_ENV = "GRACEFUL_STDIO_FDS"  # the parent's own stdout,stderr
READY_TIMEOUT_ENV = "GRACEFUL_READY_TIMEOUT"  # seconds the parent waits for us
LINEAGE_FD_ENV = "GRACEFUL_LINEAGE_FD"  # the record of which generation is current
ROLE_ENV = "GRACEFUL_ROLE"  # "successor" (the next generation) or "worker" (of a master)
# A master re-executing itself (SIGUSR2) hands these to its new image:
MASTER_LISTENERS_ENV = "GRACEFUL_MASTER_LISTENERS"  # "http=7,txn=8": its listening sockets
MASTER_WORKERS_ENV = "GRACEFUL_MASTER_WORKERS"  # "pid:generation,...": the serving workers
MASTER_EXECS_ENV = "GRACEFUL_MASTER_EXECS"  # how many times the master re-executed itself
MASTER_VARIABLES = (MASTER_LISTENERS_ENV, MASTER_WORKERS_ENV)
WORKERS_ENV = "GRACEFUL_WORKERS"  # how many workers a master runs (in each worker's environment)
SUCCESSOR = "successor"
WORKER = "worker"
ROLES = (SUCCESSOR, WORKER)

HANDOFF_VARIABLES = (
    LISTENERS_ENV,
    READY_FD_ENV,
    GENERATION_ENV,
    PARENT_PID_ENV,
    PIDFILE_ENV,
    STDIO_FDS_ENV,
    READY_TIMEOUT_ENV,
    LINEAGE_FD_ENV,
    ROLE_ENV,
)

FIRST_LISTENER_FD = 3
READY_FD = 4
NEXT_LISTENER_FD = 5

READY_MESSAGE = b"READY %d\n"
STOPPED_MESSAGE = b"STOPPED %d\n"  # a worker, told to drain, no longer accepts

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


class HandoffError(ListenerError):
    """
    What the previous generation handed us is missing or malformed.
    """


def is_handoff(environ):
    """
    Was this process started by a previous generation?
    """
    return LISTENERS_ENV in environ or READY_FD_ENV in environ


def _fd_number(variable, text, value=None):
    # value: the variable's whole value, when text is only part of it
    value = text if value is None else value
    try:
        fd = int(text)  # ValueError past 4300 digits
    except (TypeError, ValueError):
        fd = None
    if fd is None or fd < 0:
        raise HandoffError(f"{variable}={shorten(value)}: {shorten(text, 30)} is not a file "
                           f"descriptor number")
    limit = fd_limit()
    if fd >= limit:
        raise HandoffError(f"{variable}={shorten(value)}: fd {shorten(fd, 30)} is beyond "
                           f"this process's limit of {limit} open files (RLIMIT_NOFILE)")
    if fd < 3:
        raise HandoffError(f"{variable}={shorten(value)}: fd {fd} is stdin/stdout/stderr, not a "
                           f"handoff fd")
    return fd


def parse_listener_map(text, variable=LISTENERS_ENV):
    """
    Parse C{name=fd,name=fd} into an ordered dict, raising L{HandoffError}
    naming the variable.
    """
    result = {}
    if not text or not text.strip():
        raise HandoffError(f"{variable} is empty: the previous generation passed no listeners")
    if len(text) > 4096:
        raise HandoffError(f"{variable}={shorten(text)}: too long to be a list of name=fd items")
    for item in text.split(","):
        name, sep, fd_text = item.strip().partition("=")
        if not sep or not _NAME.match(name):
            raise HandoffError(
                f"{variable}={shorten(text)}: {shorten(item, 40)} is not of the form name=fd"
            )
        if name in result:
            raise HandoffError(f"{variable}={shorten(text)}: listener {name!r} is named twice")
        fd = _fd_number(variable, fd_text, text)
        if fd in result.values():
            raise HandoffError(f"{variable}={shorten(text)}: fd {fd} is given to two listeners")
        result[name] = fd
    return result


def format_listener_map(mapping):
    return ",".join(f"{name}={fd}" for name, fd in mapping.items())


def next_generation_handoff(listeners, lineage_fd, environ, generation, parent_pid, pidfile,
                            ready_timeout, role=SUCCESSOR):
    """
    The C{childFDs} and environment that start the next generation (or a
    worker of a master: C{role} L{WORKER}, no lineage record).

    @param listeners: ordered listener name -> fd in this process.
    @return: C{(child_fds, environment)} for C{reactor.spawnProcess}.
    """
    child_fds = {0: 0, 1: "r", 2: "r", READY_FD: "r"}
    names = {}
    next_fd = NEXT_LISTENER_FD
    for i, (name, fd) in enumerate(listeners.items()):
        if i == 0:
            target = FIRST_LISTENER_FD
        else:
            target = next_fd
            next_fd += 1
        child_fds[target] = fd
        names[name] = target
    lineage_target = None
    if lineage_fd is not None:
        lineage_target, next_fd = next_fd, next_fd + 1
        child_fds[lineage_target] = lineage_fd
    stdout_target, stderr_target = next_fd, next_fd + 1
    child_fds[stdout_target] = 1
    child_fds[stderr_target] = 2
    environment = {k: v for k, v in environ.items() if k not in HANDOFF_VARIABLES}
    environment.update(
        {
            LISTENERS_ENV: format_listener_map(names),
            READY_FD_ENV: str(READY_FD),
            GENERATION_ENV: str(generation),
            PARENT_PID_ENV: str(parent_pid),
            PIDFILE_ENV: pidfile or "",
            STDIO_FDS_ENV: f"{stdout_target},{stderr_target}",
            READY_TIMEOUT_ENV: str(ready_timeout),
            ROLE_ENV: role,
        }
    )
    if lineage_target is not None:
        environment[LINEAGE_FD_ENV] = str(lineage_target)
    return child_fds, environment


def master_reexec_environment(listeners, workers, generation, execs, environ):
    """
    The environment of a master's new image: ours, plus its listening
    sockets (kept open across C{execve}) and the workers it adopts.

    @param listeners: listener name -> fd (made inheritable by the caller).
    @param workers: (pid, generation, draining) of each worker.
    """
    environment = {k: v for k, v in environ.items()
                   if k not in HANDOFF_VARIABLES + MASTER_VARIABLES}
    environment[MASTER_LISTENERS_ENV] = format_listener_map(listeners)
    environment[MASTER_WORKERS_ENV] = ",".join(
        f"{pid}:{gen}" + (":draining" if draining else "") for pid, gen, draining in workers)
    environment[MASTER_EXECS_ENV] = str(execs)
    environment[GENERATION_ENV] = str(generation)
    return environment


def is_master_reexec(environ):
    return MASTER_LISTENERS_ENV in environ


def inherit_master_workers(environ):
    """
    The workers a re-executed master adopts: [(pid, generation, draining)].
    """
    text = environ.get(MASTER_WORKERS_ENV, "")
    workers = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if (len(parts) not in (2, 3) or not parts[0].isdigit() or not parts[1].isdigit()
                or len(parts[0]) > 10 or len(parts[1]) > 10  # int() of thousands of digits raises
                or int(parts[0]) < 2 or parts[2:] not in ([], ["draining"])):
            raise HandoffError(f"{MASTER_WORKERS_ENV}={shorten(text)}: {shorten(item, 40)} is "
                               f"not pid:generation[:draining]")
        workers.append((int(parts[0]), int(parts[1]), len(parts) == 3))
    return workers


def inherit_master_listeners(environ, wanted):
    """
    A re-executed master's own listening sockets, by name.
    """
    return inherit_listeners(environ, wanted, variable=MASTER_LISTENERS_ENV)


def forget_master_handoff(environ):
    for name in MASTER_VARIABLES + (GENERATION_ENV,):
        environ.pop(name, None)


def format_ready_message(pid):
    return READY_MESSAGE % (pid,)


def format_stopped_message(pid):
    return STOPPED_MESSAGE % (pid,)


def parse_stopped_message(line):
    """
    The PID in a C{STOPPED <pid>} line, or L{None} if C{line} is not one.
    """
    if not line.startswith(b"STOPPED "):
        return None
    try:
        return int(line[8:].strip())
    except ValueError:
        return None


def parse_ready_message(data):
    """
    Return the PID in a ready message, or L{None} if C{data} is not one (yet).
    @raise ValueError: C{data} is not a ready message and cannot become one.
    """
    if b"\n" not in data:
        if len(data) > 64 or not b"READY ".startswith(data[:6]):
            raise ValueError(data)
        return None
    line = data.split(b"\n", 1)[0]
    if not line.startswith(b"READY "):
        raise ValueError(data)
    try:
        return int(line[6:])
    except ValueError:
        raise ValueError(data)


def inherit_listeners(environ, wanted, variable=LISTENERS_ENV):
    """
    Take over the listeners named in C{environ}.

    @param wanted: listener name -> expected address family (or L{None}), or
        (family, socket type) for a listener that is not a stream socket.
    @return: listener name -> socket (each a dup; the inherited fds are closed).
    @raise HandoffError: naming the variable, for anything missing or malformed.
    """
    mapping = parse_listener_map(environ.get(variable, ""), variable)
    missing = [name for name in wanted if name not in mapping]
    if missing:
        raise HandoffError(
            f"{variable}={environ.get(variable)!r} has no listener named "
            f"{', '.join(repr(m) for m in missing)}; the previous generation was started "
            f"with different listener options"
        )
    unexpected = [name for name in mapping if name not in wanted]
    if unexpected:
        raise HandoffError(
            f"{variable}={environ.get(variable)!r} passes "
            f"{', '.join(repr(u) for u in unexpected)}, which this generation has no "
            f"option for; start it with the same listener options as the previous one"
        )
    sockets = {}
    try:
        for name, fd in mapping.items():
            try:
                expected = wanted[name]
                family, socktype = (expected if isinstance(expected, tuple)
                                    else (expected, socket.SOCK_STREAM))
                sockets[name] = check_listening_socket(fd, family, socktype)
            except ListenerError as e:
                raise HandoffError(f"{variable}: listener {name!r}: {e}")
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    for fd in mapping.values():
        close_quietly(fd)
    return sockets


def inherit_ready_fd(environ):
    """
    Return the write end of the ready pipe named by C{GRACEFUL_READY_FD}.
    """
    text = environ.get(READY_FD_ENV)
    if text is None:
        raise HandoffError(f"{READY_FD_ENV} is missing: the previous generation gave no ready pipe")
    fd = _fd_number(READY_FD_ENV, text)
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise HandoffError(f"{READY_FD_ENV}={text!r}: fd {fd} is not open ({e.strerror})")
    if not stat.S_ISFIFO(st.st_mode):
        raise HandoffError(f"{READY_FD_ENV}={text!r}: fd {fd} is not a pipe")
    return fd


def inherit_lineage_fd(environ):
    """
    The lineage record named by C{GRACEFUL_LINEAGE_FD}.
    """
    from twisted_graceful.lineage import Lineage

    text = environ.get(LINEAGE_FD_ENV)
    if text is None:
        raise HandoffError(f"{LINEAGE_FD_ENV} is missing: the previous generation gave no "
                           f"lineage record (is it an older version of twisted-graceful?)")
    fd = _fd_number(LINEAGE_FD_ENV, text)
    try:
        Lineage.check(fd)
    except ValueError as e:
        raise HandoffError(f"{LINEAGE_FD_ENV}={text!r}: {e}")
    return fd


def inherit_parent_pid(environ):
    text = environ.get(PARENT_PID_ENV)
    if text is None:
        raise HandoffError(f"{PARENT_PID_ENV} is missing: the previous generation did not say "
                           f"who it is")
    if not text.isdigit() or len(text) > 10 or not 0 < int(text) < 2 ** 31:
        raise HandoffError(f"{PARENT_PID_ENV}={shorten(text)}: not a process ID")
    return int(text)


def inherit_role(environ):
    text = environ.get(ROLE_ENV, SUCCESSOR)
    if text not in ROLES:
        raise HandoffError(f"{ROLE_ENV}={text!r}: not one of {', '.join(ROLES)}")
    return text


def inherit_generation(environ, role=SUCCESSOR):
    """
    A successor's generation is 2 or more; a worker's (its worker set's) 1 or
    more.
    """
    lowest = 2 if role == SUCCESSOR else 1
    text = environ.get(GENERATION_ENV)
    if text is None:
        return 1
    try:
        generation = int(text)
        if not lowest <= generation < 2 ** 31:
            raise ValueError(generation)
    except ValueError:
        raise HandoffError(f"{GENERATION_ENV}={shorten(text)}: not a generation number "
                           f"({lowest} or more)")
    return generation


def inherit_stdio_fds(environ):
    """
    The parent's own stdout and stderr, to take over once we are ready (until
    then our output goes through the parent, which keeps it for its report).
    """
    text = environ.get(STDIO_FDS_ENV)
    if not text:
        return None
    parts = text.split(",")
    if len(parts) != 2:
        raise HandoffError(f"{STDIO_FDS_ENV}={shorten(text)}: expected two fds: stdout,stderr")
    fds = tuple(_fd_number(STDIO_FDS_ENV, p, text) for p in parts)
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError as e:
            raise HandoffError(f"{STDIO_FDS_ENV}={text!r}: fd {fd} is not open ({e.strerror})")
    return fds


def inherit_ready_timeout(environ, default=30.0):
    text = environ.get(READY_TIMEOUT_ENV)
    if text is None:
        return default
    try:
        value = float(text)
        if not 0 < value < float("inf"):
            raise ValueError(value)
    except ValueError:
        raise HandoffError(f"{READY_TIMEOUT_ENV}={shorten(text)}: not a positive number of "
                           f"seconds")
    return value


def forget_handoff(environ):
    """
    Remove the handoff variables so nothing else this process starts sees them.
    """
    for name in HANDOFF_VARIABLES:
        environ.pop(name, None)


def close_quietly(fd):
    """
    Close C{fd}; an fd already closed is not an error.
    """
    try:
        os.close(fd)
    except OSError:
        pass
