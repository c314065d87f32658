"""
The command line of the next generation (PITFALLS 4 and 5).

The next process runs the same interpreter and the same twistd command line,
except that it never daemonizes (its PID must stay the one we wait for), never
goes through twistd's pidfile logic (the old generation's pidfile names a live
process), and keeps logging where the current generation logs.
"""

import os
import sys

# twistd options handled here: they take a value, or are flags we drop.
_OWN_VALUE_OPTIONS = {"--pidfile", "--logfile", "-l", "--rundir", "-d"}
_OWN_FLAGS = {"--nodaemon", "-n"}


def _resolve_program(argv0, cwd):
    if os.path.isabs(argv0):
        return argv0
    if os.sep in argv0:
        return os.path.normpath(os.path.join(cwd, argv0))
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(directory or cwd, argv0)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return argv0


def split_twistd_argv(args, subcommand):
    """
    Split twistd's arguments into (twistd options, subcommand and its options).
    Without a subcommand (C{-y app.tac}), everything is a twistd option.
    """
    if subcommand:
        for i, arg in enumerate(args):
            if arg == subcommand and (i == 0 or args[i - 1] not in _VALUE_OPTIONS_ALL):
                return args[:i], args[i:]
    return list(args), []


# twistd options that take a separate value (so a token after them is a value).
_VALUE_OPTIONS_ALL = {
    "--logfile", "-l", "--pidfile", "--rundir", "-d", "--python", "-y", "--file", "-f",
    "--source", "-s", "--uid", "-u", "--gid", "-g", "--umask", "--chroot", "--reactor",
    "-r", "--logger", "--prefix", "--profiler", "--profile", "-p", "--spew", "--euid",
    "--originalname",
}


def _strip_own_options(options):
    out, skip = [], False
    for arg in options:
        if skip:
            skip = False
            continue
        if arg in _OWN_FLAGS:
            continue
        if arg in _OWN_VALUE_OPTIONS:
            skip = True
            continue
        if any(arg.startswith(o + "=") for o in _OWN_VALUE_OPTIONS if o.startswith("--")):
            continue
        if arg.startswith("-l") and len(arg) > 2 and not arg.startswith("--"):
            continue  # -lfile
        if arg.startswith("-d") and len(arg) > 2 and not arg.startswith("--"):
            continue
        if arg.startswith("-") and not arg.startswith("--") and "n" in arg[1:] and arg[1:].isalpha():
            arg = "-" + arg[1:].replace("n", "")  # -no -> -o
            if arg == "-":
                continue
        out.append(arg)
    return out


def next_generation_command(twistd_config, argv=None, cwd=None, executable=None):
    """
    Build C{(executable, args)} for the next generation of a twistd process.

    @param twistd_config: twistd's parsed options (C{ServerOptions}, the
        C{parent} of a plugin's options) or a dict with C{nodaemon},
        C{logfile}, C{subCommand}.
    """
    argv = list(sys.argv if argv is None else argv)
    cwd = cwd or os.getcwd()
    executable = executable or sys.executable
    program = _resolve_program(argv[0], cwd)
    subcommand = getattr(twistd_config, "subCommand", None) or (
        twistd_config.get("subCommand") if isinstance(twistd_config, dict) else None
    )
    options, rest = split_twistd_argv(argv[1:], subcommand)
    options = _strip_own_options(options)
    extra = ["--nodaemon", "--pidfile="]
    logfile = twistd_config.get("logfile") or ""
    nodaemon = bool(twistd_config.get("nodaemon"))
    if logfile and logfile != "-":
        extra.append("--logfile=" + os.path.join(cwd, logfile))
    elif not nodaemon:
        # A daemon logs to twistd.log in its run directory by default; the next
        # generation runs in the foreground, so tell it where the log is.
        extra.append("--logfile=" + os.path.join(cwd, "twistd.log"))
    extra.append("--rundir=" + cwd)
    return executable, [executable, program] + options + extra + rest


def twistd_config_from_argv(argv):
    """
    What L{next_generation_command} needs to know, read off a twistd command
    line without a subcommand (C{twistd -y app.tac}). Plugins should pass
    their options' C{parent} (twistd's own parsed options) instead.
    """
    config = {"nodaemon": False, "logfile": None, "subCommand": None}
    args = list(argv[1:])
    for i, arg in enumerate(args):
        if arg in ("-n", "--nodaemon") or (
            arg.startswith("-") and not arg.startswith("--") and arg[1:].isalpha() and "n" in arg[1:]
            and (i == 0 or args[i - 1] not in _VALUE_OPTIONS_ALL)
        ):
            config["nodaemon"] = True
        elif arg in ("--logfile", "-l") and i + 1 < len(args):
            config["logfile"] = args[i + 1]
        elif arg.startswith("--logfile="):
            config["logfile"] = arg.split("=", 1)[1]
    return config
