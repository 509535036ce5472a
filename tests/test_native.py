"""Building and choosing the fused statistics kernel (its numbers are checked against
numpy in test_dynamics.py, once per kernel)."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from optinsight import native
from optinsight.dynamics import DynamicsTracker


def test_kernel_is_built_and_loaded():
    module = native.load()
    assert module is not None
    assert hasattr(module, "insight_step_statistics") and hasattr(module, "insight_histograms")


def test_failed_build_falls_back_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(native, "library_path", lambda: str(tmp_path / "k.so"))
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    native._library.cache_clear()
    try:
        assert native.load() is None
    finally:
        native._library.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("optinsight: fused statistics kernel unavailable, using XLA:")
    assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_switched_off_or_unknown_kernel(monkeypatch):
    variables = [keras.Variable([1.0, 2.0])]
    monkeypatch.setenv("OPTINSIGHT_NATIVE", "0")
    assert DynamicsTracker(variables, kernel="auto")._native is None
    with pytest.raises(RuntimeError, match="native statistics kernel is not available"):
        DynamicsTracker(variables, kernel="native")
    with pytest.raises(ValueError, match="kernel must be 'auto', 'native' or 'xla', got 'gpu'"):
        DynamicsTracker(variables, kernel="gpu")


def test_state_read_before_the_update_keeps_its_value():
    """The kernel updates the previous gradient in place, unless a read of it is still
    alive: that read must keep the old value (copy-on-write, as TensorFlow's own
    in-place variable updates do)."""
    variable = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
    tracker = DynamicsTracker([variable], kernel="native")

    @tf.function
    def step(gradient):
        read_before = tracker.prev_grad.read_value()
        tracker.update([gradient], tracker.read_weights(), tf.constant(0.0))
        return read_before, tracker.prev_grad.read_value()

    first, second = np.full((2, 3), 0.5, np.float32), np.full((2, 3), -2.0, np.float32)
    step(first)
    before, after = step(second)
    np.testing.assert_array_equal(before.numpy(), first.ravel())
    np.testing.assert_array_equal(after.numpy(), second.ravel())


def test_the_kernels_columns_are_the_metric_tables():
    """The fused kernel writes its statistics in the order metrics.py names them: its
    column lists and counts, and the column it adds up as a maximum. (What each column
    holds is checked against brute force through every named metric in
    tests/test_dynamics.py, for this kernel and the XLA one.)"""
    import re

    from optinsight import metrics

    source = open(os.path.join(os.path.dirname(native.__file__), "step_statistics.cc")).read()
    for constant, names in (("kGlobalStats", metrics.GLOBAL_STATS),
                            ("kBandStats", metrics.BAND_STATS)):
        count, listed = re.search(rf"constexpr int {constant} = (\d+);\s*// (.*)",
                                  source).groups()
        assert int(count) == len(names) and [n.strip() for n in listed.split(",")] == list(names)
    maximum = int(re.search(r"constexpr int kWdiffMax = (\d+);", source).group(1))
    assert metrics.MAXIMA == (metrics.BAND_STATS[maximum],) == ("wdiff_max",)
