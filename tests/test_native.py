"""Building and choosing the fused statistics kernel (its numbers are checked against
numpy in test_dynamics.py, once per kernel)."""

import functools
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
    for op in ("insight_step_statistics", "insight_histograms", "insight_patch_square_sums",
               "insight_patch_gradients"):
        assert hasattr(module, op)


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


@pytest.mark.parametrize("batch,size,inputs,outputs,kernel,strides,dilations", [
    (5, (9, 8), 1, 8, (3, 3), (1, 1), (1, 1)),  # in registers, positions side by side
    (3, (8, 9), 12, 8, (2, 2), (1, 2), (1, 1)),  # in registers, 8 + 4 channels side by side
    (3, (9, 9), 3, 16, (2, 3), (2, 1), (1, 2)),  # in registers, strided, dilated
    (4, (7, 9), 2, 5, (3, 3), (1, 2), (1, 1)),  # outputs not a multiple of 8: product
    (2, (6, 6), 40, 64, (3, 3), (1, 1), (1, 1)),  # a large kernel: product
    (2, (5, 5), 3, 8, (1, 1), (2, 2), (1, 1))])
def test_patch_gradients_and_square_sums_match_numpy(batch, size, inputs, outputs, kernel,
                                                     strides, dilations):
    """InsightPatchGradients (every run of kernel offsets) and InsightPatchSquareSums
    against each example's kernel gradient written out in float64:
    g_n[i, j, c, o] = Σ_{a, b} x[n, a·sh + i·dh, b·sw + j·dw, c] d[n, a, b, o] (the
    square sums: summed squared over the examples), on both of their paths, with input
    rows and columns left over by the strides."""
    rng = np.random.default_rng(3)
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    rows = (size[0] - (kh - 1) * dh - 1) // sh + 1
    columns = (size[1] - (kw - 1) * dw - 1) // sw + 1
    x = rng.normal(size=(batch, *size, inputs)).astype("float32")
    d = rng.normal(size=(batch, rows, columns, outputs)).astype("float32")
    expected = np.zeros((batch, kh, kw, inputs, outputs))
    for n in range(batch):
        for i in range(kh):
            for j in range(kw):
                under = x[n, i * dh:i * dh + (rows - 1) * sh + 1:sh,
                          j * dw:j * dw + (columns - 1) * sw + 1:sw].astype(np.float64)
                expected[n, i, j] = np.einsum("abc,abo->co", under, d[n].astype(np.float64))
    ops = native.load()
    got = ops.insight_patch_square_sums(x, d, kernel, strides, dilations)
    np.testing.assert_allclose(got.numpy(), (expected**2).sum(0).ravel(), rtol=1e-5)
    offsets = expected.reshape(batch, kh * kw, -1)
    for first in range(kh * kw):
        for count in range(1, kh * kw - first + 1):
            got = ops.insight_patch_gradients(x, d, kernel, strides, dilations, first=first,
                                              count=count)
            np.testing.assert_allclose(
                got.numpy(), offsets[:, first:first + count].reshape(batch, -1),
                rtol=1e-5, atol=1e-5)
    for op in (ops.insight_patch_square_sums,
               functools.partial(ops.insight_patch_gradients, first=0, count=1)):
        with pytest.raises(tf.errors.InvalidArgumentError, match="reach past the inputs"):
            op(x[:, :-1], d, kernel, strides, (dilations[0] + 1, dilations[1]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="offsets past the kernel's"):
        ops.insight_patch_gradients(x, d, kernel, strides, dilations, first=kh * kw - 1,
                                    count=2)
