"""
C{twistd graceful}: the options and the wiring of the demo server.
"""

import os
import sys

from twisted.python import usage

# Only what the options and a master need is imported here; what serves is
# imported by makeService in the process that serves (docs/design.md,
# "Start-up cost"): a master never imports twisted.web, a server without
# --tls-port never imports twisted_graceful.tls.
from twisted_graceful import logs
from twisted_graceful._twisted import exit_on_usage_error, reactor_without_tls
from twisted_graceful.access_log import check_access_log
from twisted_graceful.command import next_generation_command
from twisted_graceful.drain import DRAIN_MODES
from twisted_graceful.handoff import WORKER, HandoffError
from twisted_graceful.inherit import Inheritance
from twisted_graceful.listeners import DATAGRAM, STREAM, TLS, ListenerError, parse_listen_description
from twisted_graceful.notify import install_sd_notify
from twisted_graceful.startup import StartupError, exit_with
from twisted_graceful.store import is_postgres, open_problem, psycopg_unusable, redact


def _positive(name, cast=float, allow_zero=False):
    def check(value):
        try:
            number = cast(value)
        except (TypeError, ValueError):
            raise usage.UsageError(f"--{name} must be a number, not {value!r}")
        if number < 0 or (number == 0 and not allow_zero):
            raise usage.UsageError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, not {value!r}")
        return number

    return check


def check_postgres_url(url):
    """
    A usage error for a PostgreSQL URL that cannot work (the server being
    unreachable is found later, by the readiness check).
    """
    from urllib.parse import urlsplit

    shown = redact(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError as e:
        raise usage.UsageError(f"--db {shown}: {e}")
    if not parts.hostname and "host=" not in parts.query:
        raise usage.UsageError(f"--db {shown}: no host (postgresql://user@host:port/dbname)")
    if not parts.path.strip("/"):
        raise usage.UsageError(f"--db {shown}: no database name (postgresql://user@host:port/dbname)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise usage.UsageError(f"--db {shown}: PostgreSQL needs the psycopg driver "
                               f"(pip install 'psycopg[binary]')")
    unusable = psycopg_unusable()
    if unusable:
        raise usage.UsageError(f"--db {shown}: {unusable}")


class Options(usage.Options):
    preflight = False  # True: parsing for `python -m twisted_graceful preflight`, binding nothing
    synopsis = "[options]"
    longdesc = (
        "Serve HTTP (hello world with its PID) and upgrade without dropping a "
        "connection: kill -HUP the process named in the pidfile to start the next "
        "generation, kill -TERM to drain and exit."
    )
    optParameters = [
        ["port", "p", "8080", "HTTP listener: a port number or tcp:PORT[:interface=ADDR], "
         "tcp6:PORT, unix:PATH"],
        ["ready-timeout", None, 30.0, "Seconds the next generation has to become ready",
         _positive("ready-timeout")],
        ["drain-timeout", None, 60.0, "Seconds to let connections finish before closing them",
         _positive("drain-timeout", allow_zero=True)],
        ["abort-grace", None, 5.0, "Seconds after --drain-timeout before what remains is cut",
         _positive("abort-grace", allow_zero=True)],
        ["shutdown-delay", None, 0.0, "Seconds to go on accepting and serving after "
         "SIGTERM/SIGINT, with /healthz answering 503, before draining (longer than the load "
         "balancer's health-check interval x fall; upgrades by SIGHUP do not wait)",
         _positive("shutdown-delay", allow_zero=True)],
        ["idle-grace", None, 1.0, "Seconds an idle keep-alive connection may still send one "
         "request once draining starts", _positive("idle-grace", allow_zero=True)],
        ["drain", None, "transaction", "Drain level: transaction (close each connection at "
         "its next transaction boundary) or connection (let clients close)"],
        ["slow-every", None, 0, "Every Nth GET / is slow, for a demo of draining (0: never)",
         _positive("slow-every", int, allow_zero=True)],
        ["slow-seconds", None, 10.0, "How long a slow request takes",
         _positive("slow-seconds", allow_zero=True)],
        ["txn-port", None, "tcp:8025:interface=127.0.0.1", "Transaction protocol listener "
         "(same forms as --port; loopback only by default: it accepts writes from anyone who "
         "can reach it)"],
        ["db", None, "graceful.sqlite3", "The key/value store, shared by every generation: a "
         "SQLite file, or postgresql://user[:password]@host:port/dbname for one PostgreSQL "
         "database shared by several hosts"],
        ["max-line", None, 8192, "Longest transaction protocol line, in bytes",
         _positive("max-line", int)],
        ["max-commands", None, 1000, "Most commands in one transaction",
         _positive("max-commands", int)],
        ["max-body", None, 64 * 1024, "Largest HTTP request body, in bytes (413 beyond, "
         "refused before it is read)", _positive("max-body", int)],
        ["header-timeout", None, 10.0, "Seconds an HTTP request's head (request line and "
         "headers) may take to arrive (408 beyond)", _positive("header-timeout")],
        ["idle-timeout", None, 300.0, "Seconds before an idle transaction protocol connection "
         "is closed (0: never)", _positive("idle-timeout", allow_zero=True)],
        ["metrics-port", None, "tcp:9090:interface=127.0.0.1", "Prometheus /metrics and JSON "
         "/status listener (same forms as --port)"],
        ["udp-port", None, "", "UDP listener (off by default): udp:PORT[:interface=ADDR]"
         "[:rcvbuf=BYTES] or systemd:NAME; answers PING <token>"],
        ["tls-port", None, "", "HTTPS listener (off by default): "
         "ssl:PORT:privateKey=KEY.pem:certKey=CERT.pem[:interface=ADDR]"],
        ["workers", "w", "1", "Worker processes: N (>= 1) under a master that owns the ports "
         "and never leaves, auto (one per CPU), or 0 (no master: the process replaces itself "
         "on each upgrade)"],
        ["access-log", None, "none", "HTTP access log: a file (combined log format, "
         "buffered, rotated with twistd.log), - (standard output) or none (the metrics count "
         "requests either way)"],
        ["log-format", None, "text", "Log format: text, or json (twisted.logger JSON, one event "
         "per line; same as twistd --logger twisted_graceful.logs.json_observer)"],
    ]
    optFlags = [
        ["allow-remote-writes", None, "Accept POST /kv from clients that are not on this host "
         "(by default only loopback and UNIX-socket clients may write over HTTP)"],
        ["reuse-port", None, "Set SO_REUSEPORT on sockets this process binds (for comparison "
         "benchmarks; not needed for upgrades)"],
        ["no-zygote", None, "Start every worker as a new interpreter, instead of forking it "
         "from the master's zygote (a process that has imported the libraries already)"],
    ]

    def parseOptions(self, options=None):
        """
        Under twistd, a start-up error that is not a usage mistake is said in
        one line, without twistd's usage text (L{twisted_graceful.startup});
        a usage mistake gets twistd's usage text, and exit status 1 on every
        supported Twisted (before 26.10 twistd printed it and exited 0).
        """
        try:
            usage.Options.parseOptions(self, options)
        except StartupError as e:
            if self.parent is None:
                raise
            exit_with(e)
        except usage.UsageError as e:
            exit_on_usage_error(self, e)  # exits 1 under twistd < 26.10, which would exit 0
            raise

    def listener_options(self):
        """
        listener name -> (option, description).
        """
        return {"http": ("--port", self["port"]), "txn": ("--txn-port", self["txn-port"]),
                "metrics": ("--metrics-port", self["metrics-port"]),
                **self.optional_listeners()}

    def optional_listeners(self):
        """
        The listeners that are off unless asked for: name -> (option,
        description).
        """
        return {name: (option, self[option[2:]]) for name, (option, _) in OPTIONAL.items()
                if str(self[option[2:]] or "").strip()}

    def postOptions(self):
        if is_postgres(self["db"]):
            check_postgres_url(self["db"])
        else:
            self["db"] = os.path.abspath(self["db"])
            if not os.path.isdir(os.path.dirname(self["db"])):
                raise StartupError(f"--db {self['db']}: the directory does not exist; create it "
                                   f"or choose another --db")
            # A database this user cannot open or write is said at once,
            # naming the path and the reason (not after the readiness checks
            # gave up).
            problem = open_problem(self["db"])
            if problem is not None:
                raise StartupError(f"--db {problem}")
        if self["log-format"] not in logs.LOG_FORMATS:
            raise usage.UsageError(
                f"--log-format must be one of {', '.join(logs.LOG_FORMATS)}, "
                f"not {self['log-format']!r}"
            )
        if self["log-format"] == "json" and self.parent is not None:
            if self.parent.get("logger"):
                raise usage.UsageError(
                    "--log-format json and twistd's --logger both choose the log observer; "
                    "pass only one"
                )
            # twistd reads its (already parsed) options after ours: it makes its
            # observer with this factory, and every generation re-runs the same
            # command line.
            logs.configure(self.parent.get("logfile"), self.parent.get("nodaemon"))
            self.parent["logger"] = "twisted_graceful.logs.json_observer"
        problem = check_access_log(self["access-log"])
        if problem is not None:
            raise usage.UsageError(problem)
        if self["access-log"] not in ("none", "-"):
            self["access-log"] = os.path.abspath(self["access-log"])  # generations share it
        if self["drain"] not in DRAIN_MODES:
            raise usage.UsageError(
                f"--drain must be one of {', '.join(DRAIN_MODES)}, not {self['drain']!r}"
            )
        self["workers"] = parse_workers(self["workers"])
        specs, options = {}, {}
        try:
            for name, (option, description) in self.listener_options().items():
                role = OPTIONAL.get(name, (option, STREAM))[1]
                specs[name] = parse_listen_description(description, option, role)
                options[name] = option
        except ListenerError as e:
            raise usage.UsageError(str(e))  # a description that cannot be parsed
        self.specs = specs
        if not any(spec.role == TLS for spec in specs.values()):
            reactor_without_tls()  # no TLS here: not pyOpenSSL either (fact 43)
        try:
            if getattr(self, "preflight", False):
                self.certificates = load_certificates(specs, options)
                return  # a check of the options and the code: bind nothing
            # Bind (or inherit) now, before twistd daemonizes: a port in use or
            # garbage from the previous generation is one line, not a traceback.
            self.inheritance = Inheritance.acquire(specs, os.environ, self["reuse-port"], options)
            # Each generation (and worker) loads its certificates now: one that
            # cannot be used stops it before it serves. A master re-executing
            # itself serves no TLS and must not die of a bad file.
            self.certificates = ({} if self.inheritance.source == "re-exec" else
                                 load_certificates(specs, options))
        except HandoffError as e:
            raise StartupError(f"{e} (the GRACEFUL_* variables are set by a running server for "
                               f"the process it starts; unset them to start a new server)")
        except ListenerError as e:
            raise StartupError(str(e))
        self.cwd = os.getcwd()


# name -> (option, role) of the listeners that are off by default.
OPTIONAL = {"udp": ("--udp-port", DATAGRAM), "https": ("--tls-port", TLS)}


def load_certificates(specs, options):
    """
    listener name -> L{LoadedCertificate}, for every TLS listener.
    """
    if not any(spec.role == TLS for spec in specs.values()):
        return {}
    from twisted_graceful.tls import load_certificate

    return {name: load_certificate(spec, options[name]) for name, spec in specs.items()
            if spec.role == TLS}


def parse_workers(text):
    """
    C{--workers}: a number >= 0, or C{auto} (one per CPU).
    """
    if str(text).strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        workers = int(text)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--workers must be a number of processes or auto, not {text!r}")
    if not 0 <= workers <= 1024:
        raise usage.UsageError(f"--workers must be between 0 and 1024, not {workers}")
    return workers


def is_master(options):
    """
    This process is a master: --workers >= 1, and not itself a worker.
    """
    return options["workers"] >= 1 and options.inheritance.role != WORKER


def makeService(options):
    from twisted.internet import reactor

    twistd_config = options.parent if options.parent is not None else {"nodaemon": True}
    pidfile = twistd_config.get("pidfile") if hasattr(twistd_config, "get") else None

    def command():
        return next_generation_command(twistd_config, cwd=options.cwd)

    if is_master(options):
        return make_master(options, reactor, pidfile, command, twistd_config)
    return make_server(options, reactor, pidfile, command)


def make_server(options, reactor, pidfile, command):
    """
    A process that serves: a worker of a master, or a server alone
    (C{--workers 0}).
    """
    from twisted_graceful import metrics
    from twisted_graceful.access_log import log_when_serving, open_access_log
    from twisted_graceful.datagram import PingProtocol, self_test_ping
    from twisted_graceful.hello import HelloResource, ServerIdentity
    from twisted_graceful.http import GracefulSite, HTTPSelfTest
    from twisted_graceful.service import GracefulService
    from twisted_graceful.store import Store
    from twisted_graceful.txn import TxnFactory

    graceful = GracefulService(
        reactor,
        pidfile=pidfile,
        ready_timeout=options["ready-timeout"],
        drain_timeout=options["drain-timeout"],
        abort_grace=options["abort-grace"],
        idle_grace=options["idle-grace"],
        drain_mode=options["drain"],
        command=command,
        inheritance=options.inheritance,
        shutdown_delay=options["shutdown-delay"],
    )
    identity = ServerIdentity(graceful)
    # A child of the GracefulService: it stops only once every connection drained.
    store = Store(options["db"], reactor, generation=lambda: graceful.generation)
    store.setServiceParent(graceful)
    root = HelloResource(reactor, identity, options["slow-every"], options["slow-seconds"],
                         store=store, allow_remote_writes=options["allow-remote-writes"],
                         max_line=options["max-line"])
    site = GracefulSite(root, drain_tracker=graceful.tracker, max_body=options["max-body"],
                        header_timeout=options["header-timeout"], access_log=None)
    access_log = open_access_log(options["access-log"], reactor, rotate=not graceful.is_worker)
    if access_log is not None:
        log_when_serving(graceful, site, access_log)
    site.displayTracebacks = False
    graceful.add_listener("http", options["port"], site, option="--port")
    graceful.add_readiness_check(HTTPSelfTest(reactor, site))
    txn = TxnFactory(
        store, identity, reactor, drain_tracker=graceful.tracker,
        max_line=options["max-line"], max_commands=options["max-commands"],
        idle_timeout=options["idle-timeout"],
    )
    graceful.add_listener("txn", options["txn-port"], txn, option="--txn-port")
    https_site = udp = None
    if "https" in options.specs:
        # The same resource over TLS, with the certificate this generation loaded.
        https_site = GracefulSite(root, drain_tracker=graceful.tracker,
                                  max_body=options["max-body"],
                                  header_timeout=options["header-timeout"], protocol_name="https")
        https_site.displayTracebacks = False
        certificate = options.certificates["https"]
        graceful.add_listener("https", options["tls-port"], https_site, option="--tls-port",
                              role=TLS, certificate=certificate)
    if "udp" in options.specs:
        udp = PingProtocol(identity)
        graceful.add_listener("udp", options["udp-port"], udp, option="--udp-port",
                              role=DATAGRAM)
        graceful.add_readiness_check(lambda: self_test_ping(udp))
    # A worker of a master shares its metrics with every process of the server;
    # --workers 0 keeps a registry of its own (and carries its reload counts).
    metrics.install(graceful, options["metrics-port"], http_site=site, txn_factory=txn,
                    shared_dir=metrics.worker_directory(graceful), https_site=https_site,
                    datagram_protocol=udp)
    graceful.add_readiness_check(store.check)
    if not graceful.is_worker:
        install_sd_notify(graceful)  # nothing unless $NOTIFY_SOCKET is set
    return graceful


def make_master(options, reactor, pidfile, command, twistd_config):
    """
    The master: the listeners' sockets and the workers, nothing served here.
    """
    from twisted_graceful.master import MasterService
    from twisted_graceful.master_metrics import install_master
    from twisted_graceful.statusfile import StatusFile

    absolute_pidfile = os.path.join(options.cwd, pidfile) if pidfile else ""

    def reexec_command():
        return next_generation_command(twistd_config, cwd=options.cwd, pidfile=absolute_pidfile)

    def preflight_command():
        _, args = next_generation_command(twistd_config, cwd=options.cwd)
        graceful_args = args[args.index(twistd_config.subCommand) + 1:] if getattr(
            twistd_config, "subCommand", None) in args else []
        return sys.executable, [sys.executable, "-m", "twisted_graceful", "preflight", "--",
                                *graceful_args]

    inh = options.inheritance
    master = MasterService(
        reactor, inh.sockets, workers=options["workers"], pidfile=pidfile,
        ready_timeout=options["ready-timeout"], drain_timeout=options["drain-timeout"],
        abort_grace=options["abort-grace"], command=command, reexec_command=reexec_command,
        preflight_command=preflight_command, adopted=inh.workers, generation=inh.generation,
        shutdown_delay=options["shutdown-delay"], zygote=not options["no-zygote"],
        zygote_tls=bool(options["tls-port"]),
    )
    install_master(master)  # the directory the workers' /metrics sum
    StatusFile(master)
    install_sd_notify(master)
    return master
