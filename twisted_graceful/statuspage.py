"""
The status page: C{GET /} on the metrics listener, one HTML page (inline
CSS and script, nothing fetched from elsewhere, no build step) that polls
C{GET /overview} (the L{twisted_graceful.overview} view as JSON) every
second and redraws the processes and the last upgrades, so that a person
can watch the old generation's connections drain while the new one takes
the traffic.

The page is the same from every process of the server: whichever worker
answers, it reads the server's status file.
"""

import json

from twisted.web import resource

from twisted_graceful.overview import server_overview
from twisted_graceful.pidfile import pid_alive
from twisted_graceful.statusfile import read_status, server_view, status_path

POLL_MILLISECONDS = 1000


class OverviewResource(resource.Resource):
    """
    C{GET /overview}: the server's processes and last upgrades, as JSON.
    """

    isLeaf = True

    def __init__(self, status, alive=pid_alive):
        resource.Resource.__init__(self)
        self.status = status
        self.alive = alive

    def view(self):
        pidfile = self.status.graceful.pidfile
        doc = read_status(status_path(pidfile)) if pidfile else None
        if doc is None:
            # No pidfile (or no status file yet): this process alone.
            entry = self.status.as_dict()
            doc = {"processes": {str(entry["pid"]): entry}}
        view = server_overview(doc, alive=self.alive)
        view["answered_by"] = self.status.as_dict()["pid"]
        view["pidfile"] = pidfile
        return view

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.view(), sort_keys=True).encode() + b"\n"


class StatusPage(resource.Resource):
    """
    C{GET /}: the page itself (static: the script fills it in).
    """

    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        # Nothing from elsewhere, ever: the page is read on a server's loopback.
        request.setHeader(b"content-security-policy",
                          b"default-src 'none'; connect-src 'self'; "
                          b"style-src 'unsafe-inline'; script-src 'unsafe-inline'")
        return PAGE.replace("@POLL@", str(POLL_MILLISECONDS)).encode("utf-8")


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>twisted-graceful status</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5em; color: #111; background: #fff; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
  #updated { color: #444; margin: 0 0 1em; overflow-wrap: anywhere; }
  table { border-collapse: collapse; min-width: 40em; }
  caption { text-align: left; color: #444; padding-bottom: .3em; }
  th, td { padding: .3em .8em; border-bottom: 1px solid #ccc; text-align: right; }
  th { background: #f2f2f2; }
  th:nth-child(-n+4), td:nth-child(-n+4) { text-align: left; }
  .state { font-weight: 600; padding: .1em .5em; border-radius: .3em; border: 1px solid; }
  .state-serving { background: #e3f5e1; border-color: #2e7d32; }
  .state-starting, .state-upgrading { background: #e3eefc; border-color: #1565c0; }
  .state-draining { background: #fff3d6; border-color: #b26a00; }
  .state-exiting { background: #eee; border-color: #555; }
  ol { padding-left: 1.2em; }
  li { margin-bottom: .8em; }
  .failed { color: #a00000; }
  .stages { color: #333; }
  pre { background: #f6f6f6; padding: .4em; margin: .3em 0; white-space: pre-wrap; }
</style>
</head>
<body>
<h1>twisted-graceful</h1>
<p id="updated" aria-live="polite">Loading&hellip;</p>
<noscript><p>This page needs JavaScript to update; the same data is at
<a href="overview">/overview</a> (JSON) and <a href="status">/status</a>.</p></noscript>
<table id="processes">
  <caption>Processes of this server, newest generation first</caption>
  <thead><tr>
    <th scope="col">PID</th><th scope="col">Role</th><th scope="col">Generation</th>
    <th scope="col">State</th><th scope="col">Open connections</th>
    <th scope="col">In a transaction</th><th scope="col">Requests served</th>
    <th scope="col">Uptime</th>
  </tr></thead>
  <tbody></tbody>
</table>
<h2>Last upgrades</h2>
<ol id="upgrades"></ol>
<script>
"use strict";
const POLL = @POLL@;
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString([], {hour12: false}); }
function duration(s) {
  if (s === null || s === undefined) return "\\u2013";
  s = Math.floor(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor(s % 3600 / 60) + " min";
}
function count(v) { return v === null || v === undefined ? "\\u2013" : String(v); }
const STAGES = [["signal_at", "signal"], ["spawned_at", "spawned"], ["ready_at", "ready"],
  ["handed_over_at", "handed over"], ["drained_at", "drained"], ["exited_at", "exited"]];
function stages(u) {
  const out = [];
  for (const [key, name] of STAGES) {
    const after = t => key === "signal_at" ? "" : " (+" + (t - u.signal_at).toFixed(1) + " s)";
    let shown = u[key] ? name : null, t = u[key];
    if (key === "ready_at" && u.result && u.result !== "ok" && u.result !== "taken back") {
      shown = u.result === "timeout" ? "timed out" : u.result;
      t = u.ready_at || u.exited_at || u.spawned_at;
    } else if (key === "exited_at" && u.result === "taken back") {
      shown = "taken back";
    }
    if (shown) out.push(shown + " " + clock(t) + after(t));
  }
  return out.join(" \\u2192 ");
}
function drawProcesses(rows) {
  const body = document.querySelector("#processes tbody");
  body.replaceChildren();
  for (const r of rows) {
    const tr = el("tr");
    tr.dataset.pid = r.pid;
    tr.appendChild(el("td", String(r.pid)));
    tr.appendChild(el("td", r.role));
    tr.appendChild(el("td", count(r.generation)));
    const state = el("td");
    state.appendChild(el("span", r.state, "state state-" + r.state));
    tr.appendChild(state);
    tr.appendChild(el("td", count(r.connections)));
    tr.appendChild(el("td", count(r.transactions)));
    tr.appendChild(el("td", count(r.requests)));
    tr.appendChild(el("td", duration(r.uptime_seconds)));
    body.appendChild(tr);
  }
  if (!rows.length) {
    const tr = el("tr"), td = el("td", "No process of this server is alive.");
    td.colSpan = 8;
    tr.appendChild(td);
    body.appendChild(tr);
  }
}
function drawUpgrades(upgrades) {
  const list = document.getElementById("upgrades");
  list.replaceChildren();
  if (!upgrades.length) list.appendChild(el("li", "None yet: kill -HUP the PID in the pidfile."));
  for (const u of upgrades) {
    const li = el("li");
    const result = u.result || "in progress";
    const head = (u.reason || "upgrade") + ": generation " + count(u.from_generation) +
      " (pid " + u.pid + ") \\u2192 pid " + ((u.child_pids || []).join(", ") || "?") + ": " +
      result + (u.result === "ok" && u.duration_seconds !== null ?
                " in " + u.duration_seconds.toFixed(2) + " s" : "");
    li.appendChild(el("div", head, u.result && u.result !== "ok" ? "failed" : ""));
    li.appendChild(el("div", stages(u), "stages"));
    if (u.result && u.result !== "ok" && u.error) {
      li.appendChild(el("div", "Why: " + u.error, "failed"));
      if ((u.output_tail || []).length) li.appendChild(el("pre", u.output_tail.join("\\n")));
    }
    list.appendChild(li);
  }
}
async function poll() {
  const updated = document.getElementById("updated");
  try {
    const response = await fetch("overview", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    const view = await response.json();
    drawProcesses(view.processes);
    drawUpgrades(view.upgrades);
    updated.textContent = (view.pidfile ? view.pidfile + ": " : "") + view.processes.length +
      " process(es), updated " + clock(view.at) + " (answered by pid " + view.answered_by + ")";
  } catch (e) {
    updated.textContent = "Cannot reach the server (" + e.message + "); retrying every second.";
  }
  setTimeout(poll, POLL);
}
poll();
</script>
</body>
</html>
"""


class StatusResource(resource.Resource):
    """
    C{GET /status}: this process's L{ProcessStatus} as JSON, and under
    C{server} every live process of the server (a worker answers for the
    master and the other workers too).
    """

    isLeaf = True

    def __init__(self, status):
        resource.Resource.__init__(self)
        self.status = status

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        doc = self.status.as_dict()
        doc["server"] = server_view(self.status.graceful.pidfile)
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    render_HEAD = render_GET
