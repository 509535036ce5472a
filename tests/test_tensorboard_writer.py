"""The TensorBoard writer: scalars of many steps in one call, read back; opened safely
by two threads at once (the callback's writer thread and the training thread)."""

import math
import threading

import numpy as np
from tbparse import SummaryReader

from optinsight.logs.tensorboard import TB_BUCKETS, TensorBoardWriter, merged_buckets


def test_scalars_of_many_steps_read_back(tmp_path):
    writer = TensorBoardWriter(str(tmp_path))
    writer.scalars_at([({"a": 1.5, "b": None}, 3), ({"a": math.nan, "b": 2.0}, 4)])
    writer.scalars({"a": -1.0}, 7)
    writer.close()
    scalars = SummaryReader(str(tmp_path)).scalars
    got = sorted(zip(scalars.tag, scalars.step, scalars.value))
    assert got == [("a", 3, 1.5), ("a", 7, -1.0), ("b", 4, 2.0)]  # None, NaN left out


def open_from_two_threads(writer):
    """An image from one thread and scalars from another, started together, on a
    writer neither has opened; the exceptions they raised."""
    start, errors = threading.Barrier(2), []

    def use(write):
        start.wait()
        try:
            write()
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors.append(e)

    threads = [threading.Thread(target=use, args=(write,)) for write in (
        lambda: writer.image("h", np.zeros((2, 2, 3), np.uint8), 1),
        lambda: writer.scalars({"s": 1.0}, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    return errors


def test_first_use_from_two_threads_at_once(tmp_path):
    for attempt in range(6):  # whichever thread wins, the other sees a whole writer
        assert open_from_two_threads(TensorBoardWriter(str(tmp_path / str(attempt)))) == []


def test_histograms_merge_adjacent_bins_exactly(tmp_path):
    """1,000 recorded bins reach TensorBoard as at most TB_BUCKETS buckets whose counts
    are those of numpy's histogram over the same edges."""
    values = np.random.default_rng(0).normal(size=5000)
    lo, hi = values.min(), values.max()
    counts, edges = np.histogram(values, bins=1000, range=(lo, hi))
    buckets = merged_buckets(counts, lo, hi)
    assert len(buckets) <= TB_BUCKETS and buckets[:, 2].sum() == 5000
    np.testing.assert_array_equal(
        buckets[:, 2], np.histogram(values, bins=np.append(buckets[:, 0], hi))[0])
    np.testing.assert_allclose(buckets[1:, 0], buckets[:-1, 1])
    writer = TensorBoardWriter(str(tmp_path))
    writer.histograms([({"g/a": (counts, lo, hi), "g/b": (np.arange(4), 0.0, 1.0)}, 5),
                       ({"g/b": (np.arange(4)[::-1], 0.0, 1.0)}, 6)])  # steps of a burst
    writer.close()
    tensors = SummaryReader(str(tmp_path), pivot=False).tensors
    got = {(tag, step): np.asarray(v)
           for tag, step, v in zip(tensors.tag, tensors.step, tensors.value)}
    assert sorted(got) == [("g/a", 5), ("g/b", 5), ("g/b", 6)]
    np.testing.assert_allclose(got["g/a", 5], buckets)
    np.testing.assert_allclose(got["g/b", 5][:, 2], [0, 1, 2, 3])
    np.testing.assert_allclose(got["g/b", 6][:, 2], [3, 2, 1, 0])
