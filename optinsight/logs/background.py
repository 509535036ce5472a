"""A writer thread: per-step log writing overlapped with the next training step.

Work is done in submission order on one daemon thread. The queue holds at most
`max_pending` items, so logs trail training by at most that many hand-overs, and memory
stays bounded. An exception in the thread is raised again in the caller at its next
`submit` or `flush`.
"""

import queue
import threading


class BackgroundWriter:
    """Runs submitted callables in order on one thread."""

    def __init__(self, max_pending=2):
        self._queue = queue.Queue(maxsize=max_pending)
        self._error = None
        self._thread = threading.Thread(target=self._run, name="optinsight-writer",
                                        daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    fn, args = item
                    fn(*args)
            except BaseException as e:  # handed to the caller, see _raise
                self._error = e
            finally:
                self._queue.task_done()

    def _raise(self):
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, fn, *args):
        """Run fn(*args) on the writer thread (blocks while the queue is full)."""
        self._raise()
        self._queue.put((fn, args))

    def flush(self):
        """Wait until everything submitted is done."""
        self._queue.join()
        self._raise()

    def close(self):
        """Finish the queued work and stop the thread."""
        self._queue.put(None)
        self._thread.join()
        self._raise()
