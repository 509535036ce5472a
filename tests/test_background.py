"""The writer thread: order, bounded lag, errors handed back to the caller."""

import threading
import time

import pytest

from optinsight.logs.background import BackgroundWriter


def test_runs_in_order_off_the_calling_thread():
    seen, threads = [], set()
    writer = BackgroundWriter(max_pending=2)
    for i in range(50):
        writer.submit(lambda i=i: (seen.append(i), threads.add(threading.get_ident())))
    writer.flush()
    assert seen == list(range(50))
    assert threads and threading.get_ident() not in threads
    writer.close()


def test_submit_blocks_when_the_queue_is_full():
    release = threading.Event()
    writer = BackgroundWriter(max_pending=1)
    writer.submit(release.wait)   # taken by the thread, which now waits
    writer.submit(lambda: None)   # fills the queue
    start = time.perf_counter()
    threading.Timer(0.3, release.set).start()
    writer.submit(lambda: None)   # must wait for room
    assert time.perf_counter() - start >= 0.25
    writer.close()


def test_an_error_is_raised_in_the_caller():
    writer = BackgroundWriter()
    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.flush()
    writer.submit(lambda: None)  # usable again afterwards
    writer.close()
