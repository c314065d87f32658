"""
Scale-out benchmark: two hosts (127.0.0.2 and 127.0.0.3) running
C{twistd graceful} on one PostgreSQL database, behind HAProxy configured from
contrib/haproxy/haproxy.cfg (its timings as shipped: checks every 1 s, fall 2,
rise 2, check timeout 1 s). Under HTTP and transaction load through HAProxy,
each host is upgraded in place N times (SIGHUP), then taken out (SIGTERM) and
put back (started again) N times, in several variants:

  - delay:           --shutdown-delay 5, HAProxy as shipped (retries 3, redispatch)
  - nodelay:         --shutdown-delay 0, HAProxy as shipped
  - delay-noretry:   --shutdown-delay 5, HAProxy with retries 0 (like a load
                     balancer that never retries, e.g. a Kubernetes Service)
  - nodelay-noretry: --shutdown-delay 0, retries 0

Every failure a client sees is counted by kind; HAProxy's own counters say
how many connections it found refused (econ) and retried or redispatched.
The transactions and POSTs are checked exactly-once in PostgreSQL.

    python -m bench.scaleout --cycles 5 --json scaleout.json
    python -m bench.scaleout --cycles 5 --workers 0     # hosts without a master
    python -m bench.scaleout --cycles 1 --variants delay,nodelay   # a quick look

Needs PostgreSQL's server binaries and haproxy (apt-get install postgresql
haproxy). Loopback only; every loop is bounded in time and count.
"""

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time

from bench.reload import (
    FAILURE_KINDS,
    Recorder,
    Server,
    check_commits,
    check_posts,
    http_client,
    run_and_report,
    txn_client,
)
from tests import lb, pg
from tests.test_scale_out_e2e import HOSTS, common_free_port

VARIANTS = {
    "delay": {"shutdown_delay": 5.0, "retries": 3},
    "nodelay": {"shutdown_delay": 0.0, "retries": 3},
    "delay-noretry": {"shutdown_delay": 5.0, "retries": 0},
    "nodelay-noretry": {"shutdown_delay": 0.0, "retries": 0},
}


class BenchHost:
    """
    One host: a master with C{workers} workers, or (0) the self-replacing
    process; C{pid} is the process to signal.
    """

    def __init__(self, name, address, http_port, txn_port, db, shutdown_delay, workdir,
                 workers=1):
        self.name = name
        self.workers = workers
        self.cwd = tempfile.mkdtemp(dir=workdir, prefix=name + "-")
        self.args = ["graceful", "--port", f"tcp:{http_port}:interface={address}",
                     "--txn-port", f"tcp:{txn_port}:interface={address}",
                     "--metrics-port", f"tcp:0:interface={address}", "--db", db,
                     "--slow-every", "0", "--shutdown-delay", f"{shutdown_delay:g}",
                     "--workers", str(workers)]
        self.server = None
        self.pid = None
        self.generation = 1
        self.servers = []

    async def start(self):
        self.server = await Server(self.args, self.cwd, name=self.name).start()
        self.servers.append(self.server)
        if self.workers:
            _, _, m = await self.server.wait_for(r"master pid (\d+): listening on", 60)
            self.pid = int(m.group(1))
            await self.server.wait_for(rf"master pid {self.pid}: workers generation 1 serve", 60)
        else:
            self.pid, _ = await self.server.ports()
            await self.server.wait_for(r"generation 1: serving", 60)
        self.generation = 1

    async def upgrade(self):
        mark = len(self.server.lines)
        t0 = time.monotonic()
        os.kill(self.pid, signal.SIGHUP)
        if self.workers:
            _, t_ready, _ = await self.server.wait_for(
                rf"master pid {self.pid}: workers generation {self.generation + 1} are ready "
                rf"after", 120, mark)
        else:
            _, t_ready, m = await self.server.wait_for(
                rf"generation {self.generation + 1} \(pid (\d+)\) is ready after", 120, mark)
            self.pid = int(m.group(1))
        self.generation += 1
        return t_ready - t0

    async def stop_and_wait(self):
        os.kill(self.pid, signal.SIGTERM)
        await asyncio.wait_for(self.server._reader, 120)  # EOF: every generation exited
        await self.server.proc.wait()
        return time.monotonic()

    async def kill(self):
        for server in self.servers:
            await server.stop()


async def wait_status(proxy, host, wanted, timeout=60.0):
    deadline = time.monotonic() + timeout
    while proxy.status(host) != (wanted, wanted):
        if time.monotonic() > deadline:
            raise RuntimeError(f"haproxy: {host} never {wanted}")
        await asyncio.sleep(0.02)  # HAProxy's checks have no event to wait on
    return time.monotonic()


async def run_variant(name, opts, database, workdir):
    config = VARIANTS[name]
    db = database.new_database()
    addresses = list(HOSTS.values())
    http_port, txn_port = common_free_port(addresses), common_free_port(addresses)
    hosts = [BenchHost(h, a, http_port, txn_port, db, config["shutdown_delay"], workdir,
                       workers=opts.workers)
             for h, a in HOSTS.items()]
    proxy = lb.HAProxy(HOSTS, http_port, txn_port, retries=config["retries"])
    result = {"variant": name, "shutdown_delay": config["shutdown_delay"],
              "haproxy_retries": config["retries"], "upgrades": [], "cycles": []}
    try:
        for host in hosts:
            await host.start()
        proxy.start()
        for host in hosts:
            await wait_status(proxy, host.name, "UP")
        rec, stop = Recorder(), asyncio.Event()
        acked_txn, unacked_txn, acked_post = set(), set(), {}
        tasks = []
        for i in range(opts.clients):
            for mode in ("keepalive", "fresh", "post"):
                tasks.append(http_client(proxy.http_port, rec, stop, mode, f"{mode}{i}",
                                         acked=acked_post if mode == "post" else None))
            tasks.append(txn_client(proxy.txn_port, rec, stop, i, acked_txn, unacked_txn))
        load = asyncio.gather(*tasks)
        await asyncio.sleep(opts.warmup)  # steady traffic first
        for _ in range(opts.cycles):
            for host in hosts:
                result["upgrades"].append(await host.upgrade())
                await asyncio.sleep(opts.interval)  # the spacing between actions
        for _ in range(opts.cycles):
            for host in hosts:
                t0 = time.monotonic()
                stopping = asyncio.ensure_future(host.stop_and_wait())
                t_down = await wait_status(proxy, host.name, "DOWN")
                t_exit = await stopping
                await host.start()
                t_started = time.monotonic()
                t_up = await wait_status(proxy, host.name, "UP")
                result["cycles"].append({"host": host.name, "sigterm_to_lb_down": t_down - t0,
                                         "sigterm_to_exit": t_exit - t0,
                                         "restart": t_started - t_exit,
                                         "out_of_rotation": t_up - t_down})
                await asyncio.sleep(opts.interval)
        stop.set()
        await asyncio.wait_for(load, 120)
        result["haproxy"] = proxy.counters()
        result["txn_check"] = check_commits(db, acked_txn, unacked_txn, rec)
        result["post_check"] = check_posts(db, acked_post, rec)
        result["recorder"] = rec
        return result
    finally:
        proxy.stop()
        for host in hosts:
            await host.kill()


def summarize(result):
    rec = result.pop("recorder")
    done = {}
    for kind, _, _, outcome in rec.requests:
        if outcome == "ok":
            done[kind] = done.get(kind, 0) + 1
    failures = {k: 0 for k in FAILURE_KINDS}
    for _, _, outcome, _ in rec.failures:
        failures[outcome] = failures.get(outcome, 0) + 1
    cycles = result.pop("cycles")
    upgrades = result.pop("upgrades")

    def median(values):
        values = sorted(values)
        return values[len(values) // 2] if values else None

    result.update({
        "done": done,
        "done_total": sum(done.values()),
        "failures": failures,
        "failed_total": sum(failures.values()),
        "failure_examples": [f"{k}: {o}: {d}" for k, _, o, d in rec.failures[:5]],
        "upgrades": len(upgrades),
        "signal_to_ready_median_s": median(upgrades),
        "take_outs": len(cycles),
        "sigterm_to_lb_down_median_s": median([c["sigterm_to_lb_down"] for c in cycles]),
        "sigterm_to_exit_median_s": median([c["sigterm_to_exit"] for c in cycles]),
        "out_of_rotation_median_s": median([c["out_of_rotation"] for c in cycles]),
    })
    return result


def print_report(report, out=sys.stdout):
    w = out.write
    w(f"\n== scale-out benchmark ({report['config']}) ==\n\n")
    w("| variant | --shutdown-delay | HAProxy retries | upgrades | take-outs | done | "
      "failed | refused | reset | timeout | bad status | lost commit | duplicate | "
      "HAProxy econ / retried / redispatched / 5xx | SIGTERM→LB down / →exit (median s) |\n")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in report["variants"]:
        f, h = r["failures"], r["haproxy"]
        w(f"| {r['variant']} | {r['shutdown_delay']:g} s | {r['haproxy_retries']} | "
          f"{r['upgrades']} | {r['take_outs']} | {r['done_total']} | {r['failed_total']} | "
          f"{f['refused']} | {f['reset']} | {f['timeout']} | {f['bad_status']} | "
          f"{f['lost_commit']} | {f['duplicate']} | {h['econ']} / {h['wretr']} / "
          f"{h['wredis']} / {h['hrsp_5xx']} | {r['sigterm_to_lb_down_median_s']:.2f} / "
          f"{r['sigterm_to_exit_median_s']:.2f} |\n")
    for r in report["variants"]:
        w(f"\n{r['variant']}: done {r['done']}\n  transactions: {r['txn_check']}\n"
          f"  POSTs: {r['post_check']}\n")
        for example in r["failure_examples"]:
            w(f"  e.g. {example}\n")


async def main_async(opts):
    for reason in (pg.unavailable(), lb.unavailable()):
        if reason:
            raise SystemExit(f"bench.scaleout: {reason}")
    workdir = tempfile.mkdtemp(prefix="graceful-scaleout-")
    database = pg.PostgresServer().init().start()
    report = {"config": f"{opts.cycles} upgrades and {opts.cycles} take-outs per host, "
                        f"--workers {opts.workers}, "
                        f"{opts.clients} clients per load mode, {os.cpu_count()} cores, python "
                        f"{sys.version.split()[0]}",
              "variants": []}
    try:
        deadline = time.monotonic() + opts.max_seconds
        for name in opts.variants.split(","):
            result = await asyncio.wait_for(run_variant(name, opts, database, workdir),
                                            max(1, deadline - time.monotonic()))
            report["variants"].append(summarize(result))
    finally:
        database.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=5,
                   help="in-place upgrades, then take-out/put-back cycles, per host")
    p.add_argument("--variants", default="delay,nodelay,delay-noretry,nodelay-noretry")
    p.add_argument("--clients", type=int, default=2, help="clients per load mode")
    p.add_argument("--workers", type=int, default=1,
                   help="--workers of each host (1, the server's default: a master and one "
                        "worker; 0: the self-replacing process)")
    p.add_argument("--interval", type=float, default=1.5, help="seconds between actions")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--max-seconds", type=float, default=1800, help="bound on the whole run")
    p.add_argument("--json", help="write the report as JSON to this file")
    opts = p.parse_args(argv)
    unknown = set(opts.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants: {', '.join(sorted(unknown))}")
    return opts


def main(argv=None):
    report = run_and_report(parse_args, main_async, print_report, argv)
    with_delay = [r for r in report["variants"] if r["shutdown_delay"] > 0]
    return 0 if all(r["failed_total"] == 0 for r in with_delay) else 1


if __name__ == "__main__":
    sys.exit(main())
