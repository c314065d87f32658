"""
What a user who installs the wheel gets (run by .ci/run, from the repository):

  1. `python -m build` makes a wheel holding the package, py.typed and the
     twistd plugin (twisted/plugins/graceful_plugin.py);
  2. installed with pip into a fresh virtualenv, and Twisted's plugin cache
     regenerated as the README says, `twistd --help` lists `graceful`,
     and running twistd writes nothing into site-packages (no dropin.cache
     rewritten at run time: an unprivileged user could not);
  3. `pip uninstall` removes the plugin, and once the cache is regenerated
     it has no entry for it (twistd would otherwise list a plugin that is
     gone until the cache is rewritten).

Exits 0 when all holds, 1 with what did not.
"""

import glob
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The README's command for Twisted's plugin cache, after install and uninstall.
REGENERATE = "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"


def run(*command, cwd=None, env=None):
    print("check_wheel: " + " ".join(command), flush=True)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"check_wheel: {command[0]} failed ({result.returncode}):\n"
                         f"{result.stdout}{result.stderr}")
    return result.stdout + result.stderr


def snapshot(directory):
    """
    Every file under C{directory}: path -> (size, mtime).
    """
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            found[path] = (st.st_size, st.st_mtime_ns)
    return found


def main():
    problems = []
    with tempfile.TemporaryDirectory(prefix="tg-wheel-") as tmp:
        dist = os.path.join(tmp, "dist")
        run(sys.executable, "-m", "build", "--wheel", "--outdir", dist, REPO)
        wheels = glob.glob(os.path.join(dist, "*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"check_wheel: expected one wheel in {dist}, found {wheels}")
        names = zipfile.ZipFile(wheels[0]).namelist()
        for wanted in ("twisted/plugins/graceful_plugin.py", "twisted_graceful/py.typed",
                       "twisted_graceful/interfaces.py"):
            if wanted not in names:
                problems.append(f"the wheel has no {wanted}")
        if any(n.endswith("dropin.cache") for n in names):
            problems.append("the wheel ships a dropin.cache (it would replace Twisted's own)")

        venv = os.path.join(tmp, "venv")
        run(sys.executable, "-m", "venv", venv)
        python = os.path.join(venv, "bin", "python")
        run(python, "-m", "pip", "install", "-q", wheels[0])
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        # Not from the repository: the installed copy alone.
        cwd = tmp
        site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                   cwd=cwd, env=env).strip()
        plugins = os.path.join(site, "twisted", "plugins")
        if not os.path.exists(os.path.join(plugins, "graceful_plugin.py")):
            problems.append(f"graceful_plugin.py is not in {plugins}")

        run(python, "-c", REGENERATE, cwd=cwd, env=env)
        before = snapshot(site)
        twistd = os.path.join(venv, "bin", "twistd")
        listing = run(twistd, "--help", cwd=cwd, env=env)
        if not any(line.split()[:1] == ["graceful"] for line in listing.splitlines()):
            problems.append("twistd --help does not list graceful:\n" + listing)
        run(twistd, "graceful", "--help", cwd=cwd, env=env)
        changed = sorted(p for p, s in snapshot(site).items() if before.get(p) != s)
        changed += sorted(set(before) - set(snapshot(site)))
        if changed:
            problems.append(f"running twistd wrote into site-packages: {changed}")

        run(python, "-m", "pip", "uninstall", "-y", "-q", "twisted-graceful")
        left = glob.glob(os.path.join(plugins, "graceful_plugin*")) + glob.glob(
            os.path.join(plugins, "__pycache__", "graceful_plugin*"))
        if left:
            problems.append(f"pip uninstall left {left}")
        run(python, "-c", REGENERATE, cwd=cwd, env=env)
        with open(os.path.join(plugins, "dropin.cache"), "rb") as f:
            entries = pickle.load(f)
        if "graceful_plugin" in entries:
            problems.append("dropin.cache still has graceful_plugin after uninstall")
        listing = run(twistd, "--help", cwd=cwd, env=env)
        if any(line.split()[:1] == ["graceful"] for line in listing.splitlines()):
            problems.append("twistd --help lists graceful after uninstall")

    for problem in problems:
        print(f"check_wheel: FAILED: {problem}")
    if not problems:
        print("check_wheel: the wheel installs the plugin, twistd lists it without writing "
              "into site-packages, and uninstall leaves no plugin entry")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
