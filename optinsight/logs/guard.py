"""Writes that never stop training: a full disk or an I/O error on one file prints one
line naming the file and the error; later writes to that file are skipped, and every
file already written stays readable (JSON Lines and the store keep their complete
records, atomic rewrites their last whole version)."""

import os
import sys


class WriteGuard:
    """Runs a log file's writes, remembering which files have failed.

    Args:
        root: the log dir, to name files in messages.
    """

    def __init__(self, root):
        self.root = root
        self.failed = {}  # file name -> the error that stopped it

    def run(self, name, write, *args):
        """write(*args), unless `name` (a path under root) failed before; an OSError
        is reported once and returns None."""
        if name in self.failed:
            return None
        try:
            return write(*args)
        except OSError as e:
            self.failed[name] = e
            reason = e.strerror or str(e) or type(e).__name__
            print(f"optinsight: cannot write {os.path.join(self.root, name)} ({reason}); "
                  "it is no longer written, training goes on", file=sys.stderr)
            return None
