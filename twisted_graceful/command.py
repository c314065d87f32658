"""
The command line of the next generation (docs/design.md, facts 4 and 5).

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
            if arg == subcommand and (i == 0 or not _takes_next(args[i - 1])):
                return args[:i], args[i:]
    return list(args), []


# twistd options that take a separate value (so a token after them is a value).
# (--spew, --euid and --originalname are flags: the token after them is not theirs.)
_VALUE_OPTIONS_ALL = {
    "--logfile", "-l", "--pidfile", "--rundir", "-d", "--python", "-y", "--file", "-f",
    "--source", "-s", "--uid", "-u", "--gid", "-g", "--umask", "--chroot", "--reactor",
    "-r", "--logger", "--prefix", "--profiler", "--profile", "-p",
}
# Short options of twistd that take a value: in a cluster (-nl FILE, -unobody)
# everything after one of them is its value, not more flags.
_SHORT_VALUE_LETTERS = set("ldyfsugrp")


def _short_cluster(arg):
    """
    Split a short-option cluster such as C{-no} or C{-nlFILE} into
    (flag letters, value option letter or None, attached value).
    Return None if C{arg} is not a short-option cluster.
    """
    if not arg.startswith("-") or arg.startswith("--") or len(arg) < 2:
        return None
    flags = []
    for i, letter in enumerate(arg[1:], 1):
        if letter in _SHORT_VALUE_LETTERS:
            return flags, letter, arg[i + 1:]
        flags.append(letter)
    return flags, None, ""


def _takes_next(arg):
    """
    Is the token after C{arg} the value of a twistd option (C{-u nobody})?
    """
    if arg in _VALUE_OPTIONS_ALL:
        return True
    cluster = _short_cluster(arg)
    return cluster is not None and cluster[1] is not None and not cluster[2]


def _strip_own_options(options):
    out, value_of = [], None  # value_of: "keep"/"drop" the next token
    for arg in options:
        if value_of is not None:
            if value_of == "keep":
                out.append(arg)  # the value of a kept option (-u nobody)
            value_of = None
            continue
        if arg in _OWN_FLAGS:
            continue
        if arg in _OWN_VALUE_OPTIONS:
            value_of = "drop"
            continue
        if any(arg.startswith(o + "=") for o in _OWN_VALUE_OPTIONS if o.startswith("--")):
            continue
        cluster = _short_cluster(arg)
        if cluster is not None:
            flags, letter, value = cluster
            flags = [f for f in flags if f != "n"]
            if letter in ("l", "d"):
                # Our --logfile/--rundir replace it: drop it and its value.
                if not value:
                    value_of = "drop"
                letter, value = None, ""
            elif letter is not None and not value:
                value_of = "keep"
            arg = "-" + "".join(flags) + (letter or "") + value
            if arg == "-":
                continue
        elif arg in _VALUE_OPTIONS_ALL:
            value_of = "keep"
        out.append(arg)
    return out


def next_generation_command(twistd_config, argv=None, cwd=None, executable=None, pidfile=""):
    """
    Build C{(executable, args)} for the next generation of a twistd process.

    @param twistd_config: twistd's parsed options (C{ServerOptions}, the
        C{parent} of a plugin's options) or a dict with C{nodaemon},
        C{logfile}, C{subCommand}.
    @param pidfile: the next process's C{--pidfile} (none by default: a next
        generation or a worker starts while this process lives; a master
        re-executing itself keeps its own).
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
    extra = ["--nodaemon", "--pidfile=" + (pidfile or "")]
    logfile = twistd_config.get("logfile") or ""
    nodaemon = bool(twistd_config.get("nodaemon"))
    if logfile and logfile != "-":
        extra.append("--logfile=" + os.path.join(cwd, logfile))
    elif not nodaemon:
        # A daemon logs to twistd.log in its run directory by default; the next
        # generation runs in the foreground, so tell it where the log is.
        extra.append("--logfile=" + os.path.join(cwd, "twistd.log"))
    # twistd changes to its run directory after reading the command line: the
    # next generation starts in cwd and must end up where this one runs.
    rundir = twistd_config.get("rundir") or "."
    extra.append("--rundir=" + os.path.normpath(os.path.join(cwd, rundir)))
    return executable, [executable, program] + options + extra + rest


def twistd_config_from_argv(argv):
    """
    What L{next_generation_command} needs to know, read off a twistd command
    line without a subcommand (C{twistd -y app.tac}). Plugins should pass
    their options' C{parent} (twistd's own parsed options) instead.
    """
    config = {"nodaemon": False, "logfile": None, "rundir": ".", "subCommand": None}
    keys = {"--logfile": "logfile", "-l": "logfile", "--rundir": "rundir", "-d": "rundir"}
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        following = args[i + 1] if i + 1 < len(args) else None
        i += 1
        if arg == "--":
            break
        if arg == "--nodaemon":
            config["nodaemon"] = True
        elif arg in keys:
            if following is not None:
                config[keys[arg]] = following
                i += 1
        elif "=" in arg and arg.split("=", 1)[0] in ("--logfile", "--rundir"):
            name, _, value = arg.partition("=")
            config[keys[name]] = value
        elif arg in _VALUE_OPTIONS_ALL:
            i += 1  # another option's value
        else:
            cluster = _short_cluster(arg)
            if cluster is None:
                continue
            flags, letter, value = cluster
            if "n" in flags:
                config["nodaemon"] = True
            if letter is not None:
                if not value:
                    value = following
                    i += 1
                if letter in ("l", "d") and value is not None:
                    config[keys["-" + letter]] = value
    return config


def resolve_command(command, cwd):
    """
    C{(executable, args)} for a process that runs our own code again (the
    next generation, or a worker): C{command} as given (a tuple, or a
    callable returning one), else our own twistd command line.
    """
    if command is not None:
        return command() if callable(command) else command
    return next_generation_command(twistd_config_from_argv(sys.argv), sys.argv, cwd)
