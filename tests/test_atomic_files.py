"""
The pidfile and the status file are replaced atomically through a temporary
file that nobody can plant in advance: an unpredictable name, created with
C{O_EXCL|O_NOFOLLOW} in the same directory, its mode set explicitly.
"""

import json
import os
import shutil
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from twisted_graceful import pidfile
from twisted_graceful.pidfile import write_pidfile
from twisted_graceful.statusfile import read_status, update_status_file


class Umask:
    """
    Run with umask C{value} (000: every mode bit the creator asks for).
    """

    def __init__(self, testcase, value):
        old = os.umask(value)
        testcase.addCleanup(os.umask, old)


class AtomicFileTestCase(SynchronousTestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.victim = os.path.join(self.directory, "victim")
        with open(self.victim, "w") as f:
            f.write("precious\n")

    def assertVictimUntouched(self):
        with open(self.victim) as f:
            self.assertEqual(f.read(), "precious\n")

    def mode(self, path):
        return stat.S_IMODE(os.lstat(path).st_mode)


class PidfileTests(AtomicFileTestCase):
    def test_planted_symlink_at_the_old_temporary_name_is_not_followed(self):
        # The old writer used "<pidfile>.<writer pid>.tmp": anyone able to
        # write the directory could point it at another file.
        path = os.path.join(self.directory, "twistd.pid")
        os.symlink(self.victim, f"{path}.{os.getpid()}.tmp")
        write_pidfile(path, 4242)
        self.assertVictimUntouched()
        self.assertFalse(os.path.islink(path))
        with open(path) as f:
            self.assertEqual(f.read(), "4242\n")

    def test_mode_is_0644_whatever_the_umask(self):
        Umask(self, 0o000)
        path = os.path.join(self.directory, "twistd.pid")
        write_pidfile(path, 4242)
        self.assertEqual(self.mode(path), 0o644)

    def test_pidfile_that_is_a_symlink_is_replaced_not_followed(self):
        path = os.path.join(self.directory, "twistd.pid")
        os.symlink(self.victim, path)
        write_pidfile(path, 4242)
        self.assertVictimUntouched()
        self.assertFalse(os.path.islink(path))

    def test_no_temporary_file_left_after_a_failed_write(self):
        path = os.path.join(self.directory, "twistd.pid")

        def broken_replace(src, dst):
            raise OSError(28, "No space left on device")

        self.patch(os, "replace", broken_replace)
        self.assertRaises(OSError, pidfile.atomic_write, path, "4242\n", 0o644)
        self.assertEqual(sorted(os.listdir(self.directory)), ["victim"])


class StatusFileTests(AtomicFileTestCase):
    def setUp(self):
        AtomicFileTestCase.setUp(self)
        self.path = os.path.join(self.directory, "twistd.pid.status.json")

    def test_planted_symlink_at_the_old_temporary_name_is_not_followed(self):
        os.symlink(self.victim, f"{self.path}.{os.getpid()}.tmp")
        update_status_file(self.path, 4242, {"state": "serving"})
        self.assertVictimUntouched()
        self.assertEqual(read_status(self.path)["processes"]["4242"], {"state": "serving"})

    def test_status_file_and_lock_are_0600_whatever_the_umask(self):
        Umask(self, 0o000)
        update_status_file(self.path, 4242, {"state": "serving"})
        self.assertEqual(self.mode(self.path), 0o600)
        self.assertEqual(self.mode(self.path + ".lock"), 0o600)

    def test_lock_that_is_a_symlink_is_refused(self):
        os.symlink(self.victim, self.path + ".lock")
        error = self.assertRaises(OSError, update_status_file, self.path, 4242, {})
        self.assertIn(self.path + ".lock", str(error))
        self.assertVictimUntouched()
        self.assertFalse(os.path.exists(self.path))

    def test_content_is_json(self):
        update_status_file(self.path, 4242, {"state": "serving"})
        with open(self.path) as f:
            self.assertEqual(json.load(f)["processes"], {"4242": {"state": "serving"}})
