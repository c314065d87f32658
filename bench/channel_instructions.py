"""
Instructions per request of the HTTP channel alone, in one process: no
sockets, no reactor, no second process (twisted.web's C{StringTransport} and
a L{Clock}), so that graceful's own per-connection work can be compared with
a bare C{twisted.web.server.Site} on equal terms, access log or none.

    python -m bench.channel_instructions                  # every site, both modes
    python -m bench.channel_instructions --site graceful --mode close

Each figure is counted by callgrind twice, for C{--small} and C{--large}
requests, and divided out ((large - small) / (large - small requests)), so
the interpreter's start-up and the imports cancel. The sites:

  - C{bare}: C{Site(resource, logPath=FILE)}, what C{twistd web --logfile FILE} runs;
  - C{bare-nolog}: a C{Site} whose C{log} does nothing;
  - C{graceful}: C{GracefulSite} as C{twistd graceful} builds it (a drain
    tracker, head deadlines, the body limit), C{--access-log none};
  - C{graceful-log}: the same with C{--access-log FILE}.

The resource is the server's own C{HelloResource} in every case. The mode
C{close} opens a connection per request (C{Connection: close}); C{keep}
sends every request on one connection.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

SITES = ("bare-nolog", "bare", "graceful", "graceful-log")
MODES = ("close", "keep")


def build_site(kind, clock, log_path):
    from twisted.web import server

    from twisted_graceful.hello import HelloResource

    from bench.reload import _BareIdentity

    root = HelloResource(clock, _BareIdentity(), slow_every=0)
    if kind == "bare":
        return server.Site(root, logPath=log_path, reactor=clock)
    if kind == "bare-nolog":
        class Unlogged(server.Site):
            def log(self, request):
                pass
        return Unlogged(root, reactor=clock)
    from twisted_graceful.access_log import open_access_log
    from twisted_graceful.drain import DrainTracker
    from twisted_graceful.http import GracefulSite

    access_log = open_access_log(log_path, clock) if kind == "graceful-log" else None
    return GracefulSite(root, drain_tracker=DrainTracker(clock), access_log=access_log,
                        reactor=clock)


def serve(kind, mode, requests):
    """
    Answer C{requests} requests in this process (what callgrind counts).
    """
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    clock = Clock()
    log_path = os.path.join(tempfile.mkdtemp(), "access.log")
    site = build_site(kind, clock, log_path)
    site.startFactory()
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    done = Failure(ConnectionDone())
    if mode == "close":
        request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
        for _ in range(requests):
            channel = site.buildProtocol(address)
            transport = StringTransport(peerAddress=address, hostAddress=address)
            channel.makeConnection(transport)
            channel.dataReceived(request)
            if b"hello world" not in transport.value():
                raise SystemExit(f"{kind}: no answer: {transport.value()[:200]!r}")
            channel.connectionLost(done)
    else:
        request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
        channel = site.buildProtocol(address)
        transport = StringTransport(peerAddress=address, hostAddress=address)
        channel.makeConnection(transport)
        for _ in range(requests):
            channel.dataReceived(request)
        if transport.value().count(b"hello world") != requests:
            raise SystemExit(f"{kind}: {transport.value().count(b'hello world')} answers "
                             f"to {requests} requests")
        channel.connectionLost(done)
    site.stopFactory()
    if kind in ("bare", "graceful-log"):
        with open(log_path, "rb") as f:
            lines = f.read().count(b'"GET / HTTP/1.1" 200')
        if lines != requests:
            raise SystemExit(f"{kind}: {lines} access-log lines for {requests} requests")


def count(kind, mode, requests):
    """
    The instructions callgrind counts for a whole run of C{serve}.
    """
    out = tempfile.mktemp(prefix="callgrind-channel-")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
         "-m", "bench.channel_instructions", "--serve", kind, mode, str(requests)],
        capture_output=True, text=True, cwd=repo,
        env=dict(os.environ, PYTHONPATH=repo))
    try:
        os.unlink(out)
    except OSError:
        pass
    m = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode or not m:
        raise SystemExit(f"{kind} {mode}: callgrind failed:\n{result.stderr[-2000:]}")
    return int(m.group(1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--site", choices=SITES, action="append")
    p.add_argument("--mode", choices=MODES, action="append")
    p.add_argument("--small", type=int, default=200)
    p.add_argument("--large", type=int, default=1200)
    p.add_argument("--serve", nargs=3, metavar=("SITE", "MODE", "REQUESTS"),
                   help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.serve:
        kind, mode, requests = opts.serve
        serve(kind, mode, int(requests))
        return
    if not shutil.which("valgrind"):
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    results = {}
    for mode in opts.mode or MODES:
        for kind in opts.site or SITES:
            per = (count(kind, mode, opts.large) - count(kind, mode, opts.small)) \
                / (opts.large - opts.small)
            results[kind, mode] = per
            print(f"{mode:6} {kind:13} {per:10,.0f} instructions per request", flush=True)
        for kind, base in (("graceful", "bare-nolog"), ("graceful-log", "bare")):
            if (kind, mode) in results and (base, mode) in results:
                print(f"{mode:6} {base} / {kind}: {results[base, mode] / results[kind, mode]:.3f}")


if __name__ == "__main__":
    main()
