"""
Workers forked from a process that has imported the libraries already
(docs/design.md, fact 46).

A new worker used to be a new interpreter running twistd: about 200 ms of
CPU, most of it importing Twisted, before it could serve, once per worker.
The master now keeps a I{zygote}: a child that started the same
interpreter with the same program, imported the libraries a worker
imports (Twisted, twisted.web, prometheus_client, sqlite3; not this
project's own modules, nor the application's), and waits. For a worker,
the master hands it the worker's file descriptors (C{SCM_RIGHTS}), its
command line, environment and directory; the zygote forks twice, so that
the worker is re-parented to the master (a child subreaper), and the
worker runs the program as C{python PROGRAM ARGS} would, importing this
project's code and the application's from the disk as it is now.

What a fork cannot give is fresh copies of what the zygote imported. So
the zygote refuses, and the master starts the worker as a new interpreter
as before, when any file it imported or mapped (its libraries, the
interpreter), a C{.pth} file or the program has changed since, or when the command line or the
interpreter's environment is not the one it was started for. A refused
zygote is replaced once the upgrade is over.

The master's side is L{Zygote} and L{ForkedProcess} (a Twisted
C{Process} whose C{_fork} asks the zygote); the zygote's is L{main}.
"""

import errno
import gc
import io
import json
import os
import signal
import socket
import sys

# The zygote's control socket, in the zygote.
CONTROL_FD = 3
# Longest request or reply (a command line and an environment).
MAX_MESSAGE = 1 << 20
# Most file descriptors one worker is handed.
MAX_FDS = 64
# How long the master waits for a fork (a fork of a process of some tens of
# MB takes milliseconds; a zygote that takes longer is stopped).
FORK_TIMEOUT = 5.0

# What a worker of `twistd graceful` imports and does not change with a
# deploy of this project or of an application: the libraries. A name that
# does not import is skipped. Nothing that installs a reactor (such as
# prometheus_client.twisted): each worker installs its own.
PRELOAD = (
    "twisted.scripts.twistd",
    "twisted.scripts._twistd_unix",
    "twisted.application.app",
    "twisted.application.internet",
    "twisted.application.service",
    "twisted.internet.epollreactor",
    "twisted.internet.pollreactor",
    "twisted.internet.tcp",
    "twisted.internet.udp",
    "twisted.internet.unix",
    "twisted.internet.endpoints",
    "twisted.internet.task",
    "twisted.internet.threads",
    "twisted.internet.process",
    "twisted.enterprise.adbapi",
    "twisted.logger",
    "twisted.plugin",
    "twisted.protocols.basic",
    "twisted.protocols.policies",
    "twisted.python.logfile",
    "twisted.python.threadpool",
    "twisted.web.http",
    "twisted.web.resource",
    "twisted.web.server",
    "twisted.web.static",
    "twisted.web.wsgi",
    "prometheus_client",
    "prometheus_client.core",
    "prometheus_client.multiprocess",
    "sqlite3",
    # What Twisted's own plugins (imported by twistd's plugin lookup in
    # every worker) import.
    "argparse",
    "difflib",
    "pkgutil",
    "unittest",
    "twisted.cred.strcred",
    "twisted.trial.itrial",
    "twisted.words.iwords",
)
PRELOAD_TLS = (
    "OpenSSL.SSL",
    "twisted.internet.ssl",
    "twisted.internet._sslverify",
    "twisted.protocols.tls",
)
# Imported again in every worker, never kept from the zygote: this project
# (what a deploy changes), Twisted's plugin package (its path is computed
# from sys.path at import), the interpreter's start-up hooks.
FRESH_PACKAGES = ("twisted_graceful", "twisted.plugins")
STARTUP_HOOKS = ("sitecustomize", "usercustomize")
# Environment variables the interpreter reads before any of our code runs.
INTERPRETER_ENV_PREFIXES = ("PYTHON",)
INTERPRETER_ENV = ("LANG", "LC_ALL", "LC_CTYPE")


class ZygoteUnavailable(Exception):
    """
    The zygote cannot fork this worker; start it as a new interpreter.
    """


# --- what both sides agree on -----------------------------------------------
def interpreter_environment(environ):
    """
    The part of C{environ} an interpreter reads at its start.
    """
    return {k: v for k, v in environ.items()
            if k.startswith(INTERPRETER_ENV_PREFIXES) or k in INTERPRETER_ENV}


def program_of(executable, args):
    """
    The script C{args} runs (C{[executable, PROGRAM, ...]}), or None when the
    command is not one a zygote of C{executable} can run (interpreter options
    such as C{-m}, another interpreter).
    """
    if len(args) < 2 or args[0] != executable or args[1].startswith("-"):
        return None
    return args[1]


def zygote_command(executable, program, tls):
    """
    C{(executable, args)} that start a zygote for workers run as
    C{executable program ...}.
    """
    return executable, [executable, "-m", "twisted_graceful.zygote", program] + (
        ["--tls"] if tls else [])


# --- the zygote ------------------------------------------------------------
def _file_key(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _pth_files():
    import site

    dirs = list(getattr(site, "getsitepackages", lambda: [])())
    user = getattr(site, "getusersitepackages", lambda: None)()
    if user:
        dirs.append(user)
    found = []
    for directory in dirs:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        found.extend(os.path.join(directory, n) for n in names if n.endswith(".pth"))
    return found


def snapshot(modules=None, extra=()):
    """
    What the imported code is made of, to compare later: file -> identity
    (device, inode, size, mtime, ctime) of every imported module's file,
    every C{.pth} file, and C{extra}.
    """
    modules = sys.modules if modules is None else modules
    paths = set(extra)
    for module in list(modules.values()):
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None) or getattr(module, "__file__", None)
        if isinstance(origin, str) and os.path.isabs(origin):
            paths.add(origin)
    paths.update(_pth_files())
    paths.update(_mapped_files())
    return {path: _file_key(path) for path in paths}


def _mapped_files():
    """
    The files mapped into this process: the interpreter, its shared library,
    extension modules and the libraries they link (libssl, libsqlite3).
    """
    found = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    path = fields[5].rstrip("\n")
                    if not path.endswith(" (deleted)"):
                        found.add(path)
    except OSError:
        pass
    return found


def changed_since(before):
    """
    The first file of a L{snapshot} that is not what it was, or None.
    """
    for path, key in before.items():
        if _file_key(path) != key:
            return path
    for path in _pth_files():
        if path not in before:
            return path
    return None


def threads():
    """
    Threads of this process (the kernel's count, which sees threads Python
    did not start too).
    """
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def why_unusable(modules=None):
    """
    Why this process must not fork workers, or None.
    """
    if "twisted.internet.reactor" in (sys.modules if modules is None else modules):
        # Its epoll descriptor and waker would be shared by every worker.
        return "a preloaded module installed a reactor"
    count = threads()
    if count > 1:
        # A fork copies the locks other threads hold, not the threads.
        return (f"it runs {count} threads (started by a start-up hook such as sitecustomize "
                f"or a .pth file?)")
    return None


def _preload(names):
    for name in names:
        try:
            __import__(name)
        except Exception:  # optional (another platform's reactor, no pyOpenSSL)
            pass


class ZygoteServer:
    """
    The zygote's loop: one request at a time on the control socket.
    """

    def __init__(self, sock, executable, program, environ):
        self.sock = sock
        self.executable = executable
        self.program = program
        self.interpreter_env = interpreter_environment(environ)
        self.files = snapshot(extra=(executable, program))

    def why_not(self, request):
        if request.get("executable") != self.executable:
            return f"the interpreter is {request.get('executable')}, not {self.executable}"
        args = request.get("args") or []
        if program_of(self.executable, args) != self.program:
            return f"the command line runs {args[1:2]}, not {self.program}"
        env = request.get("env") or {}
        if interpreter_environment(env) != self.interpreter_env:
            return "the interpreter's environment (PYTHON*, LANG, LC_*) changed"
        changed = changed_since(self.files)
        if changed is not None:
            return f"{changed} changed since the zygote imported it"
        return why_unusable()

    def serve(self):
        while True:
            try:
                message, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
            except InterruptedError:
                continue
            if not message:
                return 0  # the master is gone
            try:
                request = json.loads(message)
            except ValueError as e:
                reply = {"refused": f"bad request: {e}"}
            else:
                try:
                    reply = self.handle(request, fds)
                except Exception as e:
                    reply = {"refused": f"the zygote could not fork: {type(e).__name__}: {e}"}
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.sock.sendall(json.dumps(reply).encode())

    def handle(self, request, fds):
        if len(fds) != len(request["fds"]) + 1:
            return {"refused": f"{len(fds)} descriptors for {len(request['fds'])} + 1"}
        why = self.why_not(request)
        if why is not None:
            return {"refused": why, "stale": True}
        return {"pid": self.fork(request, fds)}

    def fork(self, request, fds):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        r, w = os.pipe()
        enabled = gc.isenabled()
        gc.disable()
        try:
            middle = os.fork()
            if middle == 0:
                code = 1
                try:
                    os.close(r)
                    worker = os.fork()
                    if worker == 0:
                        os.close(w)
                        become_worker(request, fds, self.sock)  # does not return
                    os.write(w, str(worker).encode())
                    code = 0
                finally:
                    os._exit(code)
        finally:
            if enabled:
                gc.enable()
        os.close(w)
        data = b""
        while True:
            chunk = os.read(r, 64)
            if not chunk:
                break
            data += chunk
        os.close(r)
        os.waitpid(middle, 0)  # once it is reaped, the worker is the master's child
        if not data:
            raise RuntimeError("the intermediate process died before it forked")
        return int(data)


def _place_fds(targets, fds):
    """
    Put C{fds[i]} at C{targets[i]} (and C{fds[-1]}, the go pipe, above them
    all); close everything else. Returns the go pipe's descriptor.
    """
    top = max(list(targets) + [2]) + 1
    floor = max([top] + list(fds)) + 1
    moved = [_dup_above(fd, floor) for fd in fds]
    for target, fd in zip(targets, moved):
        os.dup2(fd, target)  # inheritable, as after an exec
    go = os.dup2(moved[-1], top, inheritable=False)
    keep = set(targets) | {go}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    return go


def _dup_above(fd, floor):
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD, floor)


def _fresh_stdio():
    """
    C{sys.stdin}, C{stdout}, C{stderr} on the worker's descriptors, buffered
    as a new interpreter would buffer them there.
    """
    # -u or PYTHONUNBUFFERED (the same for the zygote and its workers)
    unbuffered = bool(getattr(sys.stdout, "write_through", False))
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        old = getattr(sys, name)
        try:
            os.fstat(fd)
        except OSError:
            setattr(sys, name, None)
            setattr(sys, "__" + name + "__", None)
            continue
        encoding = getattr(old, "encoding", None) or "utf-8"
        errors = "backslashreplace" if fd == 2 else (getattr(old, "errors", None) or "strict")
        raw = io.FileIO(fd, mode, closefd=False)
        if mode == "r":
            stream = io.TextIOWrapper(io.BufferedReader(raw), encoding=encoding, errors=errors)
        else:
            line = fd == 2 or raw.isatty()
            buffered = raw if unbuffered else io.BufferedWriter(raw)  # -u: no binary buffer
            stream = io.TextIOWrapper(buffered, encoding=encoding, errors=errors,
                                      line_buffering=line and not unbuffered,
                                      write_through=unbuffered)
        setattr(sys, name, stream)
        setattr(sys, "__" + name + "__", stream)


def become_worker(request, fds, control):
    """
    In the forked worker: wait for the master's go, take the worker's
    descriptors, directory, environment and command line, import fresh what
    must be fresh, and run the program as the interpreter would have.
    Never returns.
    """
    code = 1
    try:
        control.close()
        gc.enable()  # disabled around the fork; what the zygote froze stays frozen
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a new interpreter's
        go = _place_fds(request["fds"], fds)
        if os.read(go, 1) != b"G":
            os._exit(1)  # the master gave up on this fork
        os.close(go)
        _fresh_stdio()
        if request.get("path"):
            os.chdir(request["path"])
        os.environ.clear()
        os.environ.update(request["env"])
        program = request["args"][1]
        sys.argv = list(request["args"][1:])
        for name in list(sys.modules):
            if name in STARTUP_HOOKS or any(name == p or name.startswith(p + ".")
                                            for p in FRESH_PACKAGES):
                del sys.modules[name]
        _run_startup_hooks()
        code = _run_program(program)
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException as e:
        try:
            sys.excepthook(type(e), e, e.__traceback__)  # as the interpreter reports it
        except BaseException:
            pass
        if isinstance(e, KeyboardInterrupt):
            _shutdown()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)  # dies by SIGINT, as the interpreter does
    finally:
        _shutdown()
        os._exit(code)


def _run_startup_hooks():
    import importlib

    for name in STARTUP_HOOKS:
        try:
            importlib.import_module(name)
        except ImportError as e:
            if getattr(e, "name", None) != name:
                print(f"Error in {name}; set PYTHONVERBOSE for traceback:\n"
                      f"{type(e).__name__}: {e}", file=sys.stderr)
        except Exception as e:
            print(f"Error in {name}; set PYTHONVERBOSE for traceback:\n"
                  f"{type(e).__name__}: {e}", file=sys.stderr)


def _run_program(program):
    import runpy

    try:
        runpy.run_path(program, run_name="__main__")
    except SystemExit as e:
        return _exit_code(e.code)
    return 0


def _exit_code(value):
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def _shutdown():
    """
    What the interpreter does at exit: wait for non-daemon threads, run
    C{atexit}, flush.
    """
    import atexit
    import threading

    try:
        threading._shutdown()
    except Exception:
        pass
    try:
        atexit._run_exitfuncs()
    except Exception:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def main(argv=None):
    """
    The zygote: C{python -m twisted_graceful.zygote PROGRAM [--tls]}, its
    control socket on fd 3.
    """
    argv = sys.argv[1:] if argv is None else argv
    program, tls = argv[0], "--tls" in argv[1:]
    if not getattr(sys.flags, "safe_path", False):  # -P, PYTHONSAFEPATH: nothing was added
        sys.path[0] = os.path.dirname(os.path.realpath(program))  # as for `python PROGRAM`
    sock = socket.socket(fileno=CONTROL_FD)
    # Ctrl-C reaches the whole process group: the zygote leaves when the
    # master closes its socket, not before (its workers get SIGINT back).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not tls:
        sys.modules["OpenSSL"] = None  # as a worker without a TLS listener (fact 43)
    _preload(PRELOAD + (PRELOAD_TLS if tls else ()))
    unusable = why_unusable()
    if unusable is not None:
        sock.sendall(json.dumps({"unusable": unusable}).encode())
        os._exit(2)
    server = ZygoteServer(sock, sys.executable, program, os.environ)
    gc.collect()
    if hasattr(gc, "freeze"):
        gc.freeze()  # what every worker shares stays shared
    sock.sendall(json.dumps({"ready": os.getpid(), "modules": len(sys.modules)}).encode())
    try:
        code = server.serve()
    except OSError as e:
        code = 0 if e.errno in (errno.EPIPE, errno.ECONNRESET) else 1
    sys.stdout.flush()
    os._exit(code)


# --- the master's side -------------------------------------------------------
PR_SET_CHILD_SUBREAPER = 36


def supported():
    """
    Has this interpreter what the master's side needs (Linux, descriptor
    passing; without C{os.waitid} strays are found in /proc)?
    """
    return all(hasattr(socket, name) for name in ("send_fds", "recv_fds")) and (
        sys.platform.startswith("linux"))


def become_subreaper():
    """
    Make this process the parent of every orphaned descendant (Linux
    C{prctl(PR_SET_CHILD_SUBREAPER)}), so that a worker the zygote forked
    twice is our child. Returns whether it is.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_strays(known):
    """
    Reap children that exited and that nobody waits for (descendants
    re-parented to a subreaper); C{known()} is the set of PIDs someone else
    reaps. Returns the PIDs reaped.
    """
    if not hasattr(os, "waitid"):  # PyPy 7.3.11
        return _reap_zombie_children(known)
    reaped = []
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped
        if info is None or info.si_pid in known():
            return reaped
        try:
            os.waitpid(info.si_pid, 0)
        except ChildProcessError:
            return reaped
        reaped.append(info.si_pid)


def process_state(pid):
    """
    C{pid}'s state letter in /proc (C{Z} for a zombie), or None if it has none.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _reap_zombie_children(known):
    """
    L{reap_strays} without C{waitid}: our children (Linux's
    C{/proc/self/task/*/children}) that are zombies and unknown.
    """
    children = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                children.update(int(pid) for pid in f.read().split())
        except (OSError, ValueError):
            continue
    reaped = []
    for pid in sorted(children - set(known())):
        if process_state(pid) == "Z":
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped.append(pid)
            except ChildProcessError:
                pass
    return reaped


class Zygote:
    """
    The master's zygote: started with L{start}, asked for workers with
    L{fork}, replaced when it refuses because the code changed.
    """

    def __init__(self, reactor, executable, program, environ, cwd, tls=False, on_exit=None,
                 on_ready=None):
        self.reactor = reactor
        self.on_exit = on_exit
        self.on_ready = on_ready
        self._reader = None
        self.executable = executable
        self.program = program
        self.environ = dict(environ)
        self.cwd = cwd
        self.tls = tls
        self.sock = None
        self.process = None
        self.pid = None
        self.ready = False
        self.gone = False
        self.why_gone = None
        self.unusable = None  # why it said it cannot fork at all

    def start(self):
        from twisted.internet import protocol

        zygote = self
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

        class Watch(protocol.ProcessProtocol):
            def processEnded(self, reason):
                zygote._gone(f"it exited ({reason.value})")
                zygote.process = None
                if zygote.on_exit is not None:
                    zygote.on_exit(zygote)

        executable, args = zygote_command(self.executable, self.program, self.tls)
        try:
            self.process = self.reactor.spawnProcess(
                Watch(), executable, args, env=self.environ, path=self.cwd,
                childFDs={0: 0, 1: 1, 2: 2, CONTROL_FD: theirs.fileno()})
        finally:
            theirs.close()
        self.sock = ours
        self.pid = self.process.pid
        self._reader = _ReadyReader(self)
        self.reactor.addReader(self._reader)
        return self

    def _stop_reading(self):
        if self._reader is not None:
            self.reactor.removeReader(self._reader)
            self._reader = None

    def _gone(self, why):
        if not self.gone:
            self.gone, self.why_gone = True, why
        self.ready = False
        self._stop_reading()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def stop(self, why="stopped", kill=False):
        """
        Close its socket (it exits); with C{kill}, SIGKILL it too (it did
        not answer).
        """
        self._gone(why)
        if kill and self.process is not None and self.process.pid is not None:
            try:
                self.process.signalProcess("KILL")
            except Exception:
                pass

    def _check_ready(self):
        if self.ready or self.gone:
            return self.ready
        try:
            message = self.sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            self._gone(f"its socket failed ({e})")
            return False
        if not message:
            self._gone("it closed its socket")
            return False
        reply = json.loads(message)
        if "unusable" in reply:
            self.unusable = reply["unusable"]
            self.stop(f"it cannot fork: {reply['unusable']}")
            return False
        self.ready = "ready" in reply
        if self.ready:
            self._stop_reading()  # the socket is the forks' from now on
            if self.on_ready is not None:
                self.on_ready(self)
        return self.ready

    def fork(self, executable, args, environment, path, fdmap):
        """
        A worker with C{fdmap} (child fd -> our fd) running C{args}: its PID,
        our child. Raises L{ZygoteUnavailable}.
        """
        if self.gone:
            raise ZygoteUnavailable(f"the zygote is gone: {self.why_gone}")
        executable, args = _text(executable), [_text(a) for a in args]
        if environment is not None:
            environment = {_text(k): _text(v) for k, v in environment.items()}
        path = _text(path) if path is not None else None
        if not self._check_ready():
            raise ZygoteUnavailable("the zygote is still importing")
        targets = sorted(fdmap)
        go_r, go_w = os.pipe()
        try:
            request = {"executable": executable, "args": list(args),
                       "env": dict(os.environ if environment is None else environment),
                       "path": path, "fds": targets}
            try:
                socket.send_fds(self.sock, [json.dumps(request).encode()],
                                [fdmap[t] for t in targets] + [go_r])
                self.sock.settimeout(FORK_TIMEOUT)
                try:
                    message = self.sock.recv(MAX_MESSAGE)
                finally:
                    self.sock.setblocking(True)
            except OSError as e:
                self.stop(f"its socket failed ({e or 'timed out'})", kill=True)
                raise ZygoteUnavailable(f"the zygote did not answer ({e or 'timed out'})")
            finally:
                os.close(go_r)
            if not message:
                self.stop("it closed its socket")
                raise ZygoteUnavailable("the zygote closed its socket")
            reply = json.loads(message)
            if "pid" not in reply:
                if reply.get("stale"):
                    self.stop(reply["refused"])
                raise ZygoteUnavailable(reply.get("refused", "no pid"))
            pid = int(reply["pid"])
            try:
                reaped, _ = os.waitpid(pid, os.WNOHANG)  # ours, or ChildProcessError
            except ChildProcessError:
                self.stop(f"its worker pid {pid} is not our child")
                raise ZygoteUnavailable(f"the forked worker pid {pid} is not our child")
            if reaped:
                raise ZygoteUnavailable(f"the forked worker pid {pid} died before it started")
            try:
                os.write(go_w, b"G")
            except BrokenPipeError:
                raise ZygoteUnavailable(f"the forked worker pid {pid} died before it started")
            return pid
        finally:
            os.close(go_w)


class _ReadyReader:
    """
    Reads the zygote's READY as soon as it is written (a reactor reader,
    removed once it is).
    """

    def __init__(self, zygote):
        self.zygote = zygote
        self._fileno = zygote.sock.fileno()

    def fileno(self):
        return self._fileno

    def logPrefix(self):
        return "zygote"

    def doRead(self):
        self.zygote._check_ready()

    def connectionLost(self, reason):
        pass


def _text(value):
    return os.fsdecode(value) if isinstance(value, bytes) else value


def forked_process_class():
    """
    L{twisted.internet.process.Process} with its C{_fork} asking a zygote
    (bound on first use: the master imports C{twisted.internet.process}
    only when it spawns).
    """
    global _ForkedProcess
    if _ForkedProcess is None:
        from twisted.internet import process

        class ForkedProcess(process.Process):
            """
            A Twisted process whose fork is the zygote's: everything else
            (pipes, reaping, signals) is Twisted's own.
            """

            zygote = None

            def _fork(self, path, uid, gid, executable, args, environment, **kwargs):
                self.pid = self.zygote.fork(executable, args, environment, path,
                                            kwargs["fdmap"])
                self.status = -1

        _ForkedProcess = ForkedProcess
    return _ForkedProcess


_ForkedProcess = None


def forking_spawner(zygote, reactor):
    """
    A C{spawn} for L{twisted_graceful.parent.spawn_next_generation}: the
    fork is C{zygote}'s; raises L{ZygoteUnavailable} (having started
    nothing) when it cannot.
    """
    cls = forked_process_class()

    def spawn(process_protocol, executable, args, env=None, path=None, childFDs=None):
        process = cls.__new__(cls)
        process.zygote = zygote  # Process.__init__ forks: it must know whose fork
        cls.__init__(process, reactor, executable, args, env, path, process_protocol,
                     childFDs=childFDs)
        return process

    return spawn


if __name__ == "__main__":
    main()
