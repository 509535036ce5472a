"""TensorFlow's start-up lines hidden: CUDA probing on a machine without a GPU, CPU
feature and oneDNN notices. TensorFlow's C++ runtime writes them straight to file
descriptor 2 while it loads and starts, so that descriptor is pointed at /dev/null
for that time; Python's own errors are raised as usual, after it is restored."""

import contextlib
import os
import sys


@contextlib.contextmanager
def start_up_lines_hidden(hidden=True):
    """While the block runs, anything written to file descriptor 2 is dropped (when
    `hidden`)."""
    if not hidden:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
