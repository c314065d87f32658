"""
The master and its workers, measured (issue: master and workers).

    python -m bench.workers --upgrades 100 --kills 20 --rounds 5 [--json FILE]
    python -m bench.workers --only throughput,interpreters --python /usr/bin/python3 \
        --python /path/to/pypy-venv/bin/python --warmup 10

  With --python (repeatable) each interpreter runs twistd (the twistd script
  beside it, this repository on its PYTHONPATH): the throughput rounds
  interleave every interpreter's variants, each ratio against the first
  interpreter's `--workers 1`, and `interpreters` measures the start times
  for each (--start-rounds, --start-workers).
  --warmup runs wrk on each variant first, unmeasured (PyPy's JIT).

  1. throughput: `--workers 2` against `--workers 1`, keep-alive and
     `Connection: close`, wrk with one thread, in interleaved rounds (medians
     and their ratio), with the CPU seconds the server and wrk used;
  2. upgrades: N SIGHUPs to the master of `--workers 2` under the reload
     benchmark's mixed load (keep-alive, fresh, POST, transactions), every
     failure counted and every acknowledged commit and POST checked;
  3. kill -9: K times a random worker under the same load, each replaced
     (one that has served longer than the master's crash window, so that
     each kill is one death and not a crash loop, which backs off);
  4. start (`--only start [--peers]`): a fresh start's time to its first
     answer, and SIGHUP's to the first answer from a new worker and to every
     new worker having answered, for --workers 1 and 2; with --peers the same
     for gunicorn (its USR2), in the same interleaved rounds (bench/peers.py);
     RSS of the master and of each worker (under load).

Every load loop is bounded in time and count, and only 127.0.0.1 is used.
"""

import argparse
import asyncio
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from twisted_graceful.master import STABLE_SECONDS
from twisted_graceful.statusfile import read_status

from bench.peers import Gunicorn, cpu_seconds, ensure_gunicorn, until_new_pids
from bench.reload import (
    REPO,
    TWISTD,
    Recorder,
    check_commits,
    check_posts,
    free_port,
    http_client,
    run_and_report,
    txn_client,
)

WORKER_COUNTS = (1, 2)

def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def twistd_beside(python):
    """
    The twistd script installed with the interpreter C{python} (a
    virtualenv's bin/python: its bin/twistd).
    """
    path = os.path.join(os.path.dirname(os.path.abspath(python)), "twistd")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: install Twisted with {python} (pip install -e .)")
    return path


def interpreter_label(python):
    """
    C{cpython-3.11.2+twisted-26.10.0}, C{pypy-3.9.16+twisted-25.5.0}: what
    C{python} is, and the Twisted it runs.
    """
    out = subprocess.run(
        [python, "-c", "import sys, platform, twisted; print(sys.implementation.name, "
                       "platform.python_version(), twisted.__version__)"],
        capture_output=True, text=True, check=True, timeout=60).stdout.split()
    return f"{out[0]}-{out[1]}+twisted-{out[2]}"


class Cluster:
    """
    `twistd graceful --workers N`, followed through its status file.
    """

    def __init__(self, workers, workdir, extra=(), env=None, port=0, repo=REPO,
                 python=None):
        self.workers = workers
        self.repo = repo
        self.env = env or {}
        self.cwd = tempfile.mkdtemp(dir=workdir, prefix=f"workers{workers}-")
        self.pidfile = os.path.join(self.cwd, "twistd.pid")
        self.db = os.path.join(self.cwd, "bench.sqlite3")
        python = python or sys.executable
        twistd = TWISTD if python == sys.executable else twistd_beside(python)
        self.args = [python, twistd, "--nodaemon", "--pidfile", self.pidfile,
                     "graceful", "--port", f"tcp:{port}:interface=127.0.0.1",
                     "--txn-port", "tcp:0:interface=127.0.0.1",
                     "--metrics-port", "tcp:0:interface=127.0.0.1", "--db", self.db,
                     "--slow-every", "0", "--workers", str(workers), *extra]
        self.proc = None

    async def start(self):
        self.started = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, cwd=self.cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=self.repo, **self.env), start_new_session=True)
        self.master = self.proc.pid
        entry = await self.wait(1)
        worker = entry["workers"][0]["pid"]
        listeners = (await self._entry_of(worker, "listeners"))["listeners"]
        self.ports = {n: int(w.rsplit(":", 1)[1]) for n, w in listeners.items()}
        return self

    def entries(self):
        doc = read_status(self.pidfile + ".status.json") or {"processes": {}}
        return {int(p): e for p, e in doc["processes"].items()}

    async def _entry_of(self, pid, key, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.entries().get(pid)
            if entry and entry.get(key):
                return entry
            await asyncio.sleep(0.02)  # the status file is written by other processes
        raise RuntimeError(f"pid {pid} never wrote {key}")

    async def wait(self, generation, timeout=120):
        """
        The master serves with every worker of C{generation} ready.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.entries().get(self.master) or {}
            serving = [w for w in entry.get("workers") or []
                       if w["generation"] == generation and w["state"] == "serving"]
            if entry.get("state") == "serving" and entry.get("generation") == generation \
                    and len(serving) == self.workers:
                return entry
            await asyncio.sleep(0.02)  # the status file is written by another process
        raise RuntimeError(f"workers generation {generation} never served")

    async def zygote_ready(self, timeout=60):
        """
        Wait until the master's zygote has imported what it preloads (a
        master of a checkout without one: at once). An operator's SIGHUP
        comes long after a start; the benchmark's must not race the zygote.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.entries().get(self.master) or {}
            if "zygote" not in entry or entry.get("zygote_ready"):
                return entry.get("zygote")
            await asyncio.sleep(0.02)  # the status file is written by another process
        raise RuntimeError("the zygote was never ready")

    async def stable_workers(self, timeout=120):
        """
        The serving workers that have run for longer than the master's crash
        window: a kill -9 of one is one death, not a crash loop (whose
        replacements the master delays on purpose).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entries = self.entries()
            workers = (entries.get(self.master) or {}).get("workers") or []
            stable = [w["pid"] for w in workers if w["state"] == "serving"
                      and time.time() - (entries.get(w["pid"]) or {}).get("started_at", time.time())
                      > STABLE_SECONDS + 1]
            if stable:
                return stable
            await asyncio.sleep(0.1)  # the workers age
        raise RuntimeError(f"no worker served for {STABLE_SECONDS} s")

    def pids(self):
        entry = self.entries().get(self.master) or {}
        return [self.master] + [w["pid"] for w in entry.get("workers") or []]

    async def stop(self):
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 90)
        except asyncio.TimeoutError:
            os.killpg(self.proc.pid, signal.SIGKILL)


async def answered(port, wanted, timeout, pause, what):
    """
    When a fresh connection's C{GET /} is first answered with a response
    for which C{wanted(response)} is true; polled every C{pause} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            response = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            if wanted(response):
                return time.monotonic()
        except (OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(pause)
    raise RuntimeError(what)


async def first_answer(port, timeout=120):
    return await answered(port, lambda r: r.startswith(b"HTTP/1.1 200"), timeout, 0.005,
                          "no answer")


async def wrk(port, seconds, connections, close):
    """
    One wrk thread (the load generator needs a core too: see the report).
    """
    args = ["-t1", f"-c{connections}", f"-d{seconds}s"]
    if close:
        args += ["-H", "Connection: close"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = await asyncio.create_subprocess_exec(
        shutil.which("wrk"), *args, f"http://127.0.0.1:{port}/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(rb"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(rb"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    return {
        "rps": float(m.group(1)) if m else None,
        "wrk_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "socket_errors": sum(map(int, errors.groups())) if errors else 0,
    }


def _spin(seconds):
    """
    Count loop iterations for C{seconds} of wall time (the machine's
    ceiling: what two busy processes get against one).
    """
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(10000):
            n += 1
    return n


async def machine_ceiling(seconds):
    """
    Iterations of a pure-CPU loop in 2 processes at once against 1: how much
    of a second core this machine really gives now (a shared VM gives less
    than 2), measured in the same run as the servers.
    """
    loop = asyncio.get_running_loop()
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(2) as pool:
        await loop.run_in_executor(pool, _spin, 0.1)  # both processes started
        one = await loop.run_in_executor(pool, _spin, seconds)
        two = await asyncio.gather(*(loop.run_in_executor(pool, _spin, seconds)
                                     for _ in range(2)))
    return sum(two) / one


# (name, workers, environment): the baseline and the server as shipped.
VARIANTS = [("workers1", 1, {}), ("workers2", 2, {})]


def variants_of(opts):
    """
    (name, workers, environment, interpreter) for each interpreter of
    C{--python}: with one (the default), the names of L{VARIANTS}.
    """
    pythons = opts.python or [sys.executable]
    if len(pythons) == 1:
        return [(name, n, env, pythons[0]) for name, n, env in VARIANTS]
    return [(f"{interpreter_label(python)}/{name}", n, env, python)
            for python in pythons for name, n, env in VARIANTS]


async def throughput(opts, workdir):
    if not shutil.which("wrk"):
        return {"skipped": "wrk is not installed (apt-get install wrk)"}
    variants = variants_of(opts)
    clusters = {}
    try:
        for name, n, env, python in variants:
            clusters[name] = await Cluster(n, workdir, env=env, python=python).start()
        results = {(name, close): [] for name, _, _, _ in variants for close in (False, True)}
        for name, _, _, _ in variants:
            for close in (False, True):
                if opts.warmup:  # unmeasured: PyPy's JIT compiles the hot paths
                    await wrk(clusters[name].ports["http"], opts.warmup, opts.connections, close)
        ceilings = []
        for _ in range(opts.rounds):
            ceilings.append(await machine_ceiling(min(opts.seconds, 3)))
            for close in (False, True):
                for name, _, _, _ in variants:
                    cluster = clusters[name]
                    pids = cluster.pids()
                    cpu0 = {pid: cpu_seconds([pid]) for pid in pids}
                    r = await wrk(cluster.ports["http"], opts.seconds, opts.connections, close)
                    used = {pid: cpu_seconds([pid]) - cpu0[pid] for pid in pids}
                    r["server_cpu_s"] = sum(used.values())
                    # How evenly the workers shared the load: the least busy
                    # worker's CPU over the busiest's (1 = even).
                    workers = [used[pid] for pid in pids if pid != cluster.master]
                    r["balance"] = min(workers) / max(workers) if max(workers) > 0 else None
                    results[(name, close)].append(r)
    finally:
        for cluster in clusters.values():
            await cluster.stop()
    out = {"command": f"wrk -t1 -c{opts.connections} -d{opts.seconds}s [-H 'Connection: close'] "
                      f"http://127.0.0.1:PORT/ ({opts.rounds} interleaved rounds, medians)",
           "machine_ceiling": statistics.median(ceilings),
           "machine_ceiling_range": [min(ceilings), max(ceilings)],
           "variants": [name for name, _, _, _ in variants]}
    for close in (False, True):
        med = {}
        for name, _, _, _ in variants:
            rs = results[(name, close)]
            rps = statistics.median(r["rps"] for r in rs)
            server = statistics.median(r["server_cpu_s"] for r in rs)
            med[name] = {
                "rps": rps, "range": [min(r["rps"] for r in rs), max(r["rps"] for r in rs)],
                "server_cpu_s": server,
                "wrk_cpu_s": statistics.median(r["wrk_cpu_s"] for r in rs),
                # Server CPU per request: the same in both layouts means the
                # workers scale and only the cores bound the throughput.
                "server_cpu_us_per_request": 1e6 * server / (rps * opts.seconds),
                "socket_errors": sum(r["socket_errors"] for r in rs),
                "worker_balance": statistics.median(r["balance"] or 0 for r in rs),
            }
        base = med[variants[0][0]]  # the first interpreter's --workers 1
        for r in med.values():
            r["ratio"] = r["rps"] / base["rps"]
            r["cpu_per_request_ratio"] = (r["server_cpu_us_per_request"]
                                          / base["server_cpu_us_per_request"])
        # What any server could reach here (docs/benchmarks.md): the
        # machine's ceiling in cores, shared by the server's and wrk's CPU per
        # request as measured with one worker (wrk on the other core), against
        # one worker's throughput. Sharing the cores usually costs more per
        # request, so this is an estimate from above, not a guarantee.
        wrk_per_request = base["wrk_cpu_s"] / (base["rps"] * opts.seconds)
        server_per_request = base["server_cpu_us_per_request"] / 1e6
        out.setdefault("bound", {})["close" if close else "keepalive"] = {
            "ratio": out["machine_ceiling"] / ((server_per_request + wrk_per_request)
                                               * base["rps"]),
            "server_cpu_us_per_request": 1e6 * server_per_request,
            "wrk_cpu_us_per_request": 1e6 * wrk_per_request}
        out["close" if close else "keepalive"] = med
    return out


async def under_load(opts, workdir):
    """
    Upgrades, then kill -9 of random workers, under the mixed load.
    """
    cluster = await Cluster(2, workdir, ["--drain-timeout", "10"],
                            python=(opts.python or [None])[0]).start()
    rec, stop = Recorder(), asyncio.Event()
    acked_txn, unacked_txn, acked_post = set(), set(), {}
    tasks = []
    for mode in ("keepalive", "fresh", "post"):
        for i in range(opts.clients):
            tasks.append(http_client(cluster.ports["http"], rec, stop, mode, f"{mode}{i}",
                                     acked=acked_post if mode == "post" else None,
                                     retry=True))
    for i in range(opts.clients):
        tasks.append(txn_client(cluster.ports["txn"], rec, stop, i, acked_txn, unacked_txn,
                                retry=True))
    load = asyncio.gather(*tasks)
    result = {"upgrades": [], "kills": []}
    try:
        await asyncio.sleep(1.0)  # steady load before the first upgrade
        generation = 1
        for _ in range(opts.upgrades):
            before, retried = len(rec.failures), len(rec.retries)
            t0 = time.monotonic()
            os.kill(cluster.master, signal.SIGHUP)
            entry = await cluster.wait(generation + 1)
            generation += 1
            result["upgrades"].append({
                "signal_to_all_ready_s": entry["last_upgrade"]["duration_seconds"],
                "waited_s": time.monotonic() - t0, "failures": len(rec.failures) - before,
                # An upgrade must cut nothing: a request sent again counts.
                "cut_and_retried": len(rec.retries) - retried})
            await asyncio.sleep(opts.interval)  # the spacing between upgrades
        for _ in range(opts.kills):
            victim = random.choice(await cluster.stable_workers())
            before, retried = len(rec.failures), len(rec.retries)
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while True:
                entry = cluster.entries()[cluster.master]
                serving = [w["pid"] for w in entry["workers"] if w["state"] == "serving"]
                if len(serving) == 2 and victim not in serving:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {victim} was not replaced")
                await asyncio.sleep(0.02)  # the status file is written by another process
            await asyncio.sleep(opts.interval)  # the spacing between kills
            result["kills"].append({"victim": victim,
                                    "failures": len(rec.failures) - before,
                                    "cut_and_retried": len(rec.retries) - retried})
        rss = {pid: rss_kib(pid) for pid in cluster.pids()}
        result["rss_kib"] = {"master": rss.pop(cluster.master),
                             "workers": list(rss.values())}
    finally:
        stop.set()
        await asyncio.wait_for(load, 60)
        await cluster.stop()
    failures = {}
    for kind, _, outcome, _ in rec.failures:
        failures[f"{kind}:{outcome}"] = failures.get(f"{kind}:{outcome}", 0) + 1
    done = {}
    for kind, _, _, outcome in rec.requests:
        if outcome == "ok":
            done[kind] = done.get(kind, 0) + 1
    result["txn_check"] = check_commits(cluster.db, acked_txn, unacked_txn, rec)
    result["post_check"] = check_posts(cluster.db, acked_post, rec)
    result["done"] = done
    result["failures"] = failures
    result["failures_during_upgrades"] = sum(u["failures"] + u["cut_and_retried"]
                                             for u in result["upgrades"])
    result["failures_during_kills"] = sum(k["failures"] for k in result["kills"])
    result["cut_and_retried_during_kills"] = sum(k["cut_and_retried"] for k in result["kills"])
    retried = {}
    for kind, _, outcome, _ in rec.retries:
        retried[f"{kind}:{outcome}"] = retried.get(f"{kind}:{outcome}", 0) + 1
    result["retried"] = retried
    result["failure_examples"] = [f"{k}: {o}: {d}" for k, _, o, d in rec.failures[:5]]
    return result


def compile_bytecode(*paths):
    """
    Write every .pyc before anything is timed: a first run's bytecode
    compilation is not what a start costs.
    """
    subprocess.run([sys.executable, "-m", "compileall", "-q", *paths], timeout=900,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def our_paths():
    import sysconfig

    return [os.path.join(REPO, "twisted_graceful"), os.path.join(REPO, "twisted"),
            sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]


async def our_start(workers, workdir, upgrades, repo=REPO):
    """
    `twistd graceful --workers N`: a fresh start's time to its first answer,
    then C{upgrades} SIGHUPs, each timed to the first answer from a new
    worker and to every new worker having answered.
    """
    port = free_port()
    cluster = Cluster(workers, workdir, port=port, repo=repo)
    t0 = time.monotonic()
    starting = asyncio.ensure_future(cluster.start())
    try:
        first = await first_answer(port) - t0
        await starting
        sighups = []
        for generation in range(2, 2 + upgrades):
            await cluster.zygote_ready()
            old = set(cluster.pids())
            t1 = time.monotonic()
            os.kill(cluster.master, signal.SIGHUP)
            new_first, new_every, seen = await until_new_pids(port, old, workers, t1)
            cpu = cpu_seconds(seen)  # the new workers' starts (the master's part is small)
            entry = await cluster.wait(generation)
            sighups.append({"first": new_first, "every": new_every, "cpu": cpu,
                            "all_ready": entry["last_upgrade"]["duration_seconds"]})
    finally:
        if not starting.done():
            starting.cancel()
        await cluster.stop()
    return {"fresh": first, "upgrades": sighups}


async def gunicorn_start(script, workers, workdir, upgrades):
    """
    The same for gunicorn: a fresh start, then C{upgrades} USR2s.
    """
    port = free_port()
    server = Gunicorn(script, workers, tempfile.mkdtemp(dir=workdir, prefix="gunicorn-"), port)
    t0 = time.monotonic()
    server.start()
    try:
        first = await first_answer(port) - t0
        await until_new_pids(port, {server.master}, workers, t0)  # every worker serves
        usr2 = []
        for _ in range(upgrades):
            new_first, new_every, cpu = await server.upgrade()
            usr2.append({"first": new_first, "every": new_every, "cpu": cpu})
    finally:
        await server.stop()
    return {"fresh": first, "upgrades": usr2}


async def answered_by(port, generation, timeout=120):
    """
    When a fresh connection's C{GET /} is first answered by C{generation}
    (the hello page names it).
    """
    wanted = f"(generation {generation})".encode()
    return await answered(port, lambda r: wanted in r, timeout, 0.002,
                          f"generation {generation} never answered")


# The same-run ratios of start_times against each peer: (our measure's name,
# the peer's, the figure); the baseline's signal is SIGHUP, gunicorn's USR2.
PEER_RATIOS = {
    "baseline": [("sighup_every", "sighup_every", "signal_to_every_new_answered_s"),
                 ("upgrade_cpu", "upgrade_cpu", "upgrade_cpu_s"),
                 ("fresh", "fresh", "fresh_first_answer_s")],
    "gunicorn": [("sighup_first", "usr2_first", "signal_to_first_new_answer_s"),
                 ("sighup_every", "usr2_every", "signal_to_every_new_answered_s"),
                 ("upgrade_cpu", "upgrade_cpu", "upgrade_cpu_s"),
                 ("fresh", "fresh", "fresh_first_answer_s")],
}


async def start_times(opts, workdir):
    """
    A fresh start's time to its first answer, and a signal's time to the new
    workers answering, ours (SIGHUP) and, with --peers, gunicorn's (USR2),
    for 1 and 2 workers, in interleaved rounds.
    """
    compile_bytecode(*our_paths())
    out = {"rounds": opts.rounds, "upgrades_per_round": opts.start_upgrades}
    variants = [("ours", None)]
    if opts.baseline:
        # The same server from another checkout (e.g. `git archive` of the
        # commit before a change), in the same rounds.
        compile_bytecode(os.path.join(opts.baseline, "twisted_graceful"),
                         os.path.join(opts.baseline, "twisted"))
        out["baseline_repo"] = opts.baseline
        variants.append(("baseline", os.path.abspath(opts.baseline)))
    if opts.peers:
        script, version = ensure_gunicorn()
        out["gunicorn_version"] = version
        variants.append(("gunicorn", script))
    results = {(name, n): [] for name, _ in variants for n in WORKER_COUNTS}
    for r in range(opts.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for n in WORKER_COUNTS:
            for name, script in order:
                if name == "ours":
                    results[(name, n)].append(
                        await our_start(n, workdir, opts.start_upgrades))
                elif name == "baseline":
                    results[(name, n)].append(
                        await our_start(n, workdir, opts.start_upgrades, repo=script))
                else:
                    results[(name, n)].append(
                        await gunicorn_start(script, n, workdir, opts.start_upgrades))
    med = statistics.median
    for (name, n), runs in results.items():
        ups = [u for run in runs for u in run["upgrades"]]
        entry = out.setdefault(name, {})[f"w{n}"] = {
            "fresh_first_answer_s": med(run["fresh"] for run in runs),
            "signal_to_first_new_answer_s": med(u["first"] for u in ups),
            "signal_to_every_new_answered_s": med(u["every"] for u in ups),
            "upgrade_cpu_s": med(u["cpu"] for u in ups),
            "samples": {"fresh": len(runs), "upgrades": len(ups)},
        }
        if name in ("ours", "baseline"):
            entry["signal_to_all_ready_s"] = med(u["all_ready"] for u in ups)
    for n in WORKER_COUNTS:
        ours = out["ours"][f"w{n}"]
        ratios = out.setdefault("ratios", {})[f"w{n}"] = {
            "ours_sighup_every / ours_fresh": (ours["signal_to_every_new_answered_s"]
                                               / ours["fresh_first_answer_s"])}
        for peer, rows in PEER_RATIOS.items():
            if peer in out:
                theirs = out[peer][f"w{n}"]
                for ours_name, their_name, key in rows:
                    ratios[f"ours_{ours_name} / {peer}_{their_name}"] = ours[key] / theirs[key]
    return out


async def interpreter_start_times(opts, workdir):
    """
    A fresh start's time to its first answer, against signal-to-all-ready
    and signal-to-the-new-generation's-first-answer, for each interpreter
    (C{--python}), the interpreters interleaved.
    """
    pythons = opts.python or [sys.executable]
    labels = {python: interpreter_label(python) for python in pythons}
    times = {python: {"fresh": [], "ready": [], "answer": []} for python in pythons}
    for _ in range(opts.start_rounds):
        for python in pythons:
            t = times[python]
            cluster = Cluster(opts.start_workers, workdir, python=python)
            t0 = time.monotonic()
            await cluster.start()
            # start() returns once every worker serves; the first answer came before.
            t["fresh"].append(time.monotonic() - t0)
            try:
                for generation in (2, 3):
                    await asyncio.sleep(0.5)  # the previous upgrade's old generation is gone
                    await cluster.zygote_ready()
                    t0 = time.monotonic()
                    os.kill(cluster.master, signal.SIGHUP)
                    t["answer"].append(await answered_by(cluster.ports["http"], generation) - t0)
                    entry = await cluster.wait(generation)
                    t["ready"].append(entry["last_upgrade"]["duration_seconds"])
            finally:
                await cluster.stop()
    out = {"workers": opts.start_workers, "rounds": opts.start_rounds, "by_interpreter": {}}
    for python in pythons:
        t = times[python]
        out["by_interpreter"][labels[python]] = {
            "fresh_start_all_ready_s": statistics.median(t["fresh"]),
            "signal_to_all_ready_s": statistics.median(t["ready"]),
            "signal_to_all_ready_range_s": [min(t["ready"]), max(t["ready"])],
            "signal_to_new_generation_answer_s": statistics.median(t["answer"]),
            "signal_to_new_generation_answer_range_s": [min(t["answer"]), max(t["answer"])]}
    first = out["by_interpreter"][labels[pythons[0]]]
    out.update(first)  # the first interpreter's, as before --python
    return out


async def main_async(opts):
    workdir = tempfile.mkdtemp(prefix="bench-workers-")
    try:
        report = {"machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()}}
        parts = opts.only.split(",") if opts.only else ["throughput", "load", "start"]
        if "throughput" in parts:
            report["throughput"] = await throughput(opts, workdir)
        if "load" in parts:
            report["under_load"] = await under_load(opts, workdir)
        if "start" in parts:
            report["start"] = await start_times(opts, workdir)
        if "interpreters" in parts:
            report["interpreters"] = await interpreter_start_times(opts, workdir)
        report["machine"]["load_average_after"] = os.getloadavg()
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_report(report):
    m = report["machine"]
    print(f"## machine: {m['cpus']} CPUs, load average {m['load_average'][0]:.1f} before, "
          f"{m['load_average_after'][0]:.1f} after")
    t = report.get("throughput", {"skipped": "not run"})
    print("## throughput, --workers 2 / --workers 1")
    if "skipped" in t:
        print(t["skipped"])
    else:
        print(t["command"])
        print(f"  machine ceiling (a CPU loop in 2 processes / 1): {t['machine_ceiling']:.2f} "
              f"(range {t['machine_ceiling_range'][0]:.2f}-{t['machine_ceiling_range'][1]:.2f})")
        for mode in ("keepalive", "close"):
            for name in t["variants"]:
                r = t[mode][name]
                print(f"  {mode:9} {name:22} {r['rps']:7.0f} req/s (ratio {r['ratio']:.2f}); "
                      f"server {r['server_cpu_s']:.1f} CPU s, "
                      f"{r['server_cpu_us_per_request']:.0f} us/request "
                      f"({r['cpu_per_request_ratio']:.2f}), balance {r['worker_balance']:.2f}; "
                      f"wrk {r['wrk_cpu_s']:.1f} CPU s; "
                      f"socket errors {r['socket_errors']}")
            b = t["bound"][mode]
            print(f"  {mode:9} reachable here: about {b['ratio']:.2f} (the machine's ceiling "
                  f"shared by one worker's {b['server_cpu_us_per_request']:.0f} us and wrk's "
                  f"{b['wrk_cpu_us_per_request']:.0f} us of CPU per request, if sharing the "
                  f"cores cost nothing)")
    u = report.get("under_load")
    if u is not None:
        print_load(u)
    s = report.get("start")
    if s is not None:
        print_start(s)
    s = report.get("interpreters")
    if s is not None:
        print(f"## start by interpreter (--workers {s['workers']}, {s['rounds']} rounds of a "
              f"fresh start and 2 SIGHUPs, medians)")
        for label, r in s["by_interpreter"].items():
            print(f"  {label}: fresh start to all ready {r['fresh_start_all_ready_s']:.2f} s; "
                  f"signal to all new workers ready {r['signal_to_all_ready_s']:.2f} s "
                  f"(ratio {r['signal_to_all_ready_s'] / r['fresh_start_all_ready_s']:.2f}); "
                  f"signal to the new generation's first answer "
                  f"{r['signal_to_new_generation_answer_s']:.2f} s (range "
                  f"{r['signal_to_new_generation_answer_range_s'][0]:.2f}-"
                  f"{r['signal_to_new_generation_answer_range_s'][1]:.2f})")


def print_start(s):
    print(f"## start and upgrade ({s['rounds']} interleaved rounds, "
          f"{s['upgrades_per_round']} upgrades each; medians, ms)"
          + (f"; gunicorn {s['gunicorn_version']}" if "gunicorn" in s else ""))
    print("| server | workers | fresh start to first answer | signal to first new answer "
          "| signal to every new worker answered | signal to all ready (master) "
          "| CPU of the new set |")
    print("|---|---|---|---|---|---|---|")
    for name in ("ours", "baseline", "gunicorn"):
        for n in WORKER_COUNTS:
            r = s.get(name, {}).get(f"w{n}")
            if r is None:
                continue
            ready = r.get("signal_to_all_ready_s")
            print(f"| {name} | {n} | {r['fresh_first_answer_s'] * 1000:.0f} | "
                  f"{r['signal_to_first_new_answer_s'] * 1000:.0f} | "
                  f"{r['signal_to_every_new_answered_s'] * 1000:.0f} | "
                  f"{'' if ready is None else f'{ready * 1000:.0f}'} | "
                  f"{r['upgrade_cpu_s'] * 1000:.0f} |")
    for n in WORKER_COUNTS:
        for what, ratio in s["ratios"][f"w{n}"].items():
            print(f"  workers {n}: {what} = {ratio:.2f}")


def print_load(u):
    print("## under load (--workers 2)")
    print(f"  {len(u['upgrades'])} upgrades: {u['failures_during_upgrades']} failures "
          f"(a request cut and sent again counts); {len(u['kills'])} kill -9: "
          f"{u['failures_during_kills']} failures after retries, "
          f"{u['cut_and_retried_during_kills']} requests cut and sent again {u['retried']}")
    print(f"  done {u['done']}; failures {u['failures']}")
    print(f"  transactions {u['txn_check']}; posts {u['post_check']}")
    print(f"  rss KiB {u['rss_kib']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.workers")
    p.add_argument("--upgrades", type=int, default=100)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--only", help="comma-separated: throughput, load, start, interpreters "
                                  "(default: throughput, load, start)")
    p.add_argument("--start-upgrades", type=int, default=3,
                   help="start: signals per server and round (default 3)")
    p.add_argument("--baseline", metavar="CHECKOUT",
                   help="start: measure this checkout of twisted-graceful too (its "
                        "twisted_graceful and twisted/plugins), e.g. the commit before a change")
    p.add_argument("--peers", action="store_true",
                   help="start: measure gunicorn too (installs it with pip into "
                        "~/.cache/twisted-graceful-bench/venv on first use)")
    p.add_argument("--python", action="append",
                   help="an interpreter to run twistd with (repeatable; default: this one)")
    p.add_argument("--warmup", type=int, default=0,
                   help="seconds of unmeasured wrk on each variant before the rounds")
    p.add_argument("--start-rounds", type=int, default=3)
    p.add_argument("--start-workers", type=int, default=2)
    p.add_argument("--json")
    return p.parse_args(argv)


def main(argv=None):
    report = run_and_report(parse_args, main_async, print_report, argv)
    u = report.get("under_load")
    ok = u is None or (u["failures_during_upgrades"] == 0 and u["failures_during_kills"] == 0
                       and u["txn_check"]["lost"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
