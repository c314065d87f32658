"""
Unit tests of L{twisted_graceful.command}: the next generation's command line.
"""

import os
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from twisted_graceful.command import (
    next_generation_command,
    split_twistd_argv,
    twistd_config_from_argv,
)

CWD = "/srv/app"
PY = "/usr/bin/python3"
PROG = "/usr/bin/twistd"


def _daemon(**extra):
    config = {"nodaemon": False, "logfile": None, "subCommand": "graceful"}
    config.update(extra)
    return config


def _foreground(**extra):
    return _daemon(**{"nodaemon": True, "logfile": "-", **extra})


class NextGenerationCommandTests(SynchronousTestCase):
    """
    L{next_generation_command} re-runs the same twistd command line in the
    foreground, without twistd's pidfile, logging where this generation logs.
    """

    def command(self, config, argv, cwd=CWD):
        return next_generation_command(config, argv=argv, cwd=cwd, executable=PY)

    def args(self, config, argv, cwd=CWD):
        return self.command(config, argv, cwd)[1]

    def test_executableFirst(self):
        executable, args = self.command(_foreground(), [PROG, "-n", "graceful"])
        self.assertEqual(executable, PY)
        self.assertEqual(args[:2], [PY, PROG])

    def test_defaultsToSysExecutable(self):
        import sys

        executable, args = next_generation_command(_foreground(), argv=[PROG, "graceful"], cwd=CWD)
        self.assertEqual(executable, sys.executable)
        self.assertEqual(args[0], sys.executable)

    def test_foregroundCommand(self):
        args = self.args(_foreground(), [PROG, "-n", "graceful", "--port", "8080"])
        self.assertEqual(
            args,
            [PY, PROG, "--nodaemon", "--pidfile=", "--rundir=" + CWD, "graceful", "--port", "8080"],
        )

    def test_addsNodaemonAndEmptyPidfile(self):
        args = self.args(_daemon(), [PROG, "graceful"])
        self.assertIn("--nodaemon", args)
        self.assertIn("--pidfile=", args)

    def test_addedOptionsComeBeforeSubcommand(self):
        args = self.args(_daemon(), [PROG, "graceful", "--port", "8080"])
        self.assertEqual(args[-3:], ["graceful", "--port", "8080"])
        self.assertLess(args.index("--pidfile="), args.index("graceful"))

    def test_addsRundirCwd(self):
        self.assertIn("--rundir=" + CWD, self.args(_foreground(), [PROG, "graceful"]))

    def test_stripsShortNodaemon(self):
        args = self.args(_foreground(), [PROG, "-n", "graceful"])
        self.assertEqual(args.count("--nodaemon"), 1)
        self.assertNotIn("-n", args)

    def test_stripsLongNodaemon(self):
        args = self.args(_foreground(), [PROG, "--nodaemon", "graceful"])
        self.assertEqual(args.count("--nodaemon"), 1)

    def test_stripsNFromCombinedShortFlags(self):
        args = self.args(_foreground(), [PROG, "-no", "graceful"])
        self.assertIn("-o", args)
        self.assertNotIn("-no", args)

    def test_stripsPidfileWithSeparateValue(self):
        args = self.args(_daemon(), [PROG, "--pidfile", "twistd.pid", "graceful"])
        self.assertNotIn("twistd.pid", args)
        self.assertEqual([a for a in args if a.startswith("--pidfile")], ["--pidfile="])

    def test_stripsPidfileWithEquals(self):
        args = self.args(_daemon(), [PROG, "--pidfile=/run/app.pid", "graceful"])
        self.assertEqual([a for a in args if "pidfile" in a], ["--pidfile="])

    def test_stripsLongLogfile(self):
        args = self.args(_daemon(logfile="app.log"), [PROG, "--logfile", "app.log", "graceful"])
        self.assertNotIn("app.log", args)
        self.assertNotIn("--logfile", args)

    def test_stripsLogfileWithEquals(self):
        args = self.args(_daemon(logfile="app.log"), [PROG, "--logfile=app.log", "graceful"])
        self.assertNotIn("--logfile=app.log", args)

    def test_stripsShortLogfile(self):
        args = self.args(_daemon(logfile="app.log"), [PROG, "-l", "app.log", "graceful"])
        self.assertNotIn("-l", args)
        self.assertNotIn("app.log", args)

    def test_stripsShortLogfileWithAttachedValue(self):
        args = self.args(_daemon(logfile="app.log"), [PROG, "-lapp.log", "graceful"])
        self.assertNotIn("-lapp.log", args)

    def test_stripsLogfileFromCluster(self):
        args = self.args(_foreground(logfile="app.log"), [PROG, "-nl", "app.log", "graceful"])
        self.assertEqual(
            args[2:],
            ["--nodaemon", "--pidfile=", "--logfile=" + CWD + "/app.log", "--rundir=" + CWD,
             "graceful"],
        )

    def test_stripsRundir(self):
        args = self.args(_daemon(rundir="/var/lib/app"), [PROG, "--rundir", "/var/lib/app", "graceful"])
        self.assertNotIn("--rundir", args)
        self.assertEqual([a for a in args if "rundir" in a], ["--rundir=/var/lib/app"])

    def test_stripsShortRundir(self):
        args = self.args(_daemon(rundir="/var/lib/app"), [PROG, "-d", "/var/lib/app", "graceful"])
        self.assertNotIn("-d", args)
        self.assertNotIn("/var/lib/app", args)

    def test_rundirKeptWhereThisGenerationRuns(self):
        """
        twistd changes to --rundir after reading its command line; the next
        generation starts in the original directory and must change to the
        same run directory.
        """
        args = self.args(_daemon(rundir="data"), [PROG, "-d", "data", "graceful"])
        self.assertIn("--rundir=" + CWD + "/data", args)

    def test_rundirDotIsCwd(self):
        self.assertIn("--rundir=" + CWD, self.args(_daemon(rundir="."), [PROG, "graceful"]))

    def test_subcommandOptionsUntouched(self):
        argv = [PROG, "-n", "graceful", "--port", "8080", "-p", "9", "-n", "-l", "x", "-d", "y"]
        args = self.args(_foreground(), argv)
        self.assertEqual(
            args[args.index("graceful"):],
            ["graceful", "--port", "8080", "-p", "9", "-n", "-l", "x", "-d", "y"],
        )

    def test_subcommandPidfileOptionUntouched(self):
        argv = [PROG, "graceful", "--pidfile", "mine"]
        self.assertEqual(self.args(_daemon(), argv)[-3:], ["graceful", "--pidfile", "mine"])

    def test_otherTwistdOptionsKept(self):
        argv = [PROG, "-n", "--reactor", "epoll", "-u", "nobody", "--umask=022", "graceful"]
        args = self.args(_foreground(), argv)
        self.assertEqual(
            args[2:8], ["--reactor", "epoll", "-u", "nobody", "--umask=022", "--nodaemon"]
        )

    def test_subcommandNameAsOptionValueIsNotSubcommand(self):
        argv = [PROG, "--logfile", "graceful", "graceful", "--port", "1"]
        args = self.args(_daemon(logfile="graceful"), argv)
        self.assertEqual(args[-3:], ["graceful", "--port", "1"])
        self.assertEqual(args.count("graceful"), 1)

    def test_flagBeforeSubcommandDoesNotHideIt(self):
        """
        --spew, --euid and --originalname are flags: the subcommand after them
        is still the subcommand, so our options go before it.
        """
        for flag in ("--spew", "--euid", "--originalname"):
            args = self.args(_foreground(), [PROG, flag, "graceful", "--port", "1"])
            self.assertEqual(args[-3:], ["graceful", "--port", "1"], flag)
            self.assertIn(flag, args[:args.index("graceful")])

    def test_attachedShortValueContainingNKept(self):
        args = self.args(_foreground(), [PROG, "-unobody", "graceful"])
        self.assertIn("-unobody", args)

    def test_clusterEndingInValueOptionKeepsItsValue(self):
        args = self.args(_foreground(), [PROG, "-nu", "nobody", "graceful"])
        self.assertEqual(args[2:4], ["-u", "nobody"])
        self.assertEqual(args[-1], "graceful")

    def test_daemonWithoutLogfileLogsToTwistdLogInCwd(self):
        args = self.args(_daemon(), [PROG, "graceful"])
        self.assertIn("--logfile=" + CWD + "/twistd.log", args)

    def test_foregroundToStdoutGetsNoLogfile(self):
        args = self.args(_foreground(), [PROG, "-n", "graceful"])
        self.assertFalse([a for a in args if a.startswith("--logfile")])

    def test_foregroundWithoutLogfileGetsNoLogfile(self):
        args = self.args(_daemon(nodaemon=True), [PROG, "-n", "graceful"])
        self.assertFalse([a for a in args if a.startswith("--logfile")])

    def test_relativeLogfileMadeAbsolute(self):
        args = self.args(_daemon(logfile="logs/app.log"), [PROG, "-l", "logs/app.log", "graceful"])
        self.assertIn("--logfile=" + CWD + "/logs/app.log", args)

    def test_absoluteLogfileKept(self):
        args = self.args(_daemon(logfile="/var/log/app.log"), [PROG, "graceful"])
        self.assertIn("--logfile=/var/log/app.log", args)

    def test_noSubcommandEverythingIsTwistdOptions(self):
        argv = [PROG, "-n", "-y", "app.tac", "--pidfile", "x.pid"]
        args = self.args({"nodaemon": True, "logfile": None}, argv)
        self.assertEqual(
            args, [PY, PROG, "-y", "app.tac", "--nodaemon", "--pidfile=", "--rundir=" + CWD]
        )

    def test_serverOptionsLikeConfig(self):
        """
        twistd's parsed options (a dict with a C{subCommand} attribute) work
        as well as a plain dict.
        """

        class Config(dict):
            subCommand = "graceful"

        args = self.args(Config(nodaemon=True, logfile="-"), [PROG, "-n", "graceful", "-p", "1"])
        self.assertEqual(args[-3:], ["graceful", "-p", "1"])
        self.assertEqual(args[2], "--nodaemon")


class ResolveProgramTests(SynchronousTestCase):
    """
    argv[0] is resolved to an absolute path, against the original directory.
    """

    def program(self, argv0, cwd=CWD):
        return next_generation_command(_foreground(), argv=[argv0], cwd=cwd, executable=PY)[1][1]

    def test_absoluteKept(self):
        self.assertEqual(self.program("/opt/bin/twistd"), "/opt/bin/twistd")

    def test_relativeWithSlashJoinedToCwd(self):
        self.assertEqual(self.program("bin/twistd"), CWD + "/bin/twistd")

    def test_dotSlashNormalised(self):
        self.assertEqual(self.program("./venv/../bin/twistd"), CWD + "/bin/twistd")

    def test_bareNameLookedUpOnPath(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(_rmtree, directory)
        path = os.path.join(directory, "my-twistd")
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
        self.patch(os, "environ", dict(os.environ, PATH="/nonexistent" + os.pathsep + directory))
        self.assertEqual(self.program("my-twistd"), path)

    def test_bareNameNotOnPathKept(self):
        self.patch(os, "environ", dict(os.environ, PATH="/nonexistent"))
        self.assertEqual(self.program("no-such-program-here"), "no-such-program-here")


class SplitTwistdArgvTests(SynchronousTestCase):
    def test_splitsAtSubcommand(self):
        self.assertEqual(
            split_twistd_argv(["-n", "graceful", "--port", "1"], "graceful"),
            (["-n"], ["graceful", "--port", "1"]),
        )

    def test_noSubcommand(self):
        self.assertEqual(split_twistd_argv(["-n", "-y", "a.tac"], None), (["-n", "-y", "a.tac"], []))

    def test_subcommandMissingFromArgv(self):
        self.assertEqual(split_twistd_argv(["-n"], "graceful"), (["-n"], []))


class TwistdConfigFromArgvTests(SynchronousTestCase):
    """
    L{twistd_config_from_argv} reads what it needs off a C{twistd -y} command
    line.
    """

    def config(self, *args):
        return twistd_config_from_argv(["twistd", *args])

    def test_defaults(self):
        self.assertEqual(
            self.config("-y", "app.tac"),
            {"nodaemon": False, "logfile": None, "rundir": ".", "subCommand": None},
        )

    def test_shortNodaemon(self):
        self.assertTrue(self.config("-n", "-y", "app.tac")["nodaemon"])

    def test_longNodaemon(self):
        self.assertTrue(self.config("--nodaemon", "-y", "app.tac")["nodaemon"])

    def test_combinedShortFlags(self):
        self.assertTrue(self.config("-no", "-y", "app.tac")["nodaemon"])

    def test_combinedWithValueOption(self):
        config = self.config("-ny", "app.tac")
        self.assertTrue(config["nodaemon"])

    def test_nInValueIsNotNodaemon(self):
        self.assertFalse(self.config("-u", "-n")["nodaemon"])

    def test_nInAttachedValueIsNotNodaemon(self):
        self.assertFalse(self.config("-unobody", "-y", "app.tac")["nodaemon"])

    def test_logfileSeparateValue(self):
        self.assertEqual(self.config("--logfile", "app.log")["logfile"], "app.log")

    def test_logfileEquals(self):
        self.assertEqual(self.config("--logfile=app.log")["logfile"], "app.log")

    def test_shortLogfile(self):
        self.assertEqual(self.config("-l", "app.log")["logfile"], "app.log")

    def test_shortLogfileAttached(self):
        self.assertEqual(self.config("-lapp.log")["logfile"], "app.log")

    def test_logfileInCluster(self):
        config = self.config("-nl", "app.log")
        self.assertEqual((config["nodaemon"], config["logfile"]), (True, "app.log"))

    def test_logfileStdout(self):
        self.assertEqual(self.config("-n", "-l", "-")["logfile"], "-")

    def test_rundir(self):
        self.assertEqual(self.config("--rundir", "data")["rundir"], "data")
        self.assertEqual(self.config("--rundir=data")["rundir"], "data")
        self.assertEqual(self.config("-d", "data")["rundir"], "data")

    def test_valueOfOtherOptionIgnored(self):
        self.assertEqual(self.config("--pidfile", "-n")["nodaemon"], False)


class ServerOptionsTests(SynchronousTestCase):
    """
    The next generation's command line is one twistd accepts, with the
    meaning we want.
    """

    def test_parsesWithTwistdServerOptions(self):
        from twisted.scripts.twistd import ServerOptions

        argv = [PROG, "-no", "--pidfile", "app.pid", "-l", "logs/app.log", "-y", "app.tac"]
        config = twistd_config_from_argv(argv)
        _, args = next_generation_command(config, argv=argv, cwd=CWD, executable=PY)
        options = ServerOptions()
        options.parseOptions(args[2:])
        self.assertTrue(options["nodaemon"])
        self.assertTrue(options["no_save"])
        self.assertEqual(options["pidfile"], "")
        self.assertEqual(options["logfile"], CWD + "/logs/app.log")
        self.assertEqual(options["rundir"], CWD)
        self.assertEqual(options["python"], "app.tac")


def _rmtree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)
