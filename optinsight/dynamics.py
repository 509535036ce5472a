"""In-graph per-batch optimization dynamics (README, "What each metric means").

`DynamicsTracker` owns the device-side state of one training run: the previous
gradient, the moving averages of gradient and weights, and a small ring buffer of
per-step sufficient statistics, all as non-trainable `tf.Variable`s. Inside the
compiled train step, `DynamicsTracker.update` reduces a step's gradients and weights
(O(parameters) work, no host transfer) to a `[n_vars, n_stats]` float64 matrix: on
the CPU with the fused kernel of `optinsight.native` (one pass over the parameters),
elsewhere with `_step_statistics` under XLA (all trainable variables flattened into
one float32 vector). On the host, `metrics.metric_table` turns such matrices into
the named metrics of the README, per variable and for the whole model. Nothing of
size O(parameters) leaves the device per step, and memory is constant in the number
of steps.
"""

import contextlib
import math

import numpy as np
import tensorflow as tf

from optinsight import native
from optinsight.metrics import BAND_STATS, EXTRA_STATS, GLOBAL_STATS, Row


def unit_count(shape):
    """Output units of a variable of `shape`: its last axis for a kernel (rank >= 2),
    each entry of a vector, 1 for a scalar."""
    shape = tuple(int(d) for d in shape)
    return shape[-1] if len(shape) >= 2 else (shape[0] if shape else 1)


def _zero_units(g, shape, threshold):
    """bool [units]: whether every gradient entry of each unit is in the zero band
    (False for a variable without entries)."""
    units = unit_count(shape)
    if int(np.prod(shape)) == 0:
        return tf.zeros([units], tf.bool)
    # max |g| per unit (NaN propagates: a unit with a NaN gradient is not zero)
    return tf.reduce_max(tf.abs(tf.reshape(g, [-1, units])), axis=0) <= threshold


def write_slot(buffer, slot, value):
    """buffer[slot] = value in place (a ring buffer's row: `assign` of a scattered copy
    would copy the whole buffer every step). TensorFlow has no GPU kernel of the in-place
    update for int32: an int32 buffer on a GPU takes the copy."""
    if buffer.dtype == tf.int32 and "GPU" in (buffer.device or "").upper():
        return buffer.assign(tf.tensor_scatter_nd_update(buffer, [[slot]], [value]))
    return buffer.scatter_update(tf.IndexedSlices(
        tf.expand_dims(tf.cast(value, buffer.dtype), 0), tf.reshape(slot, [1])))


def _flatten(tensors):
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)


_LANES = 4  # histogram copies: neighbouring entries count into different bins
_MAX_GROUP_BINS = 1 << 14  # bins per variable of one joint histogram


def _segment_sum(x, bounds):
    """Sums of x[a:b] for each (a, b) in bounds: [n_vars]. Contiguous slices fuse into
    vectorised loops under XLA, where a scatter-based segment sum is serial."""
    return tf.stack([tf.reduce_sum(x[a:b]) for a, b in bounds])


def _segment_max(x, bounds):
    """Maxima of x[a:b] (x >= 0); 0 for an empty slice, as the native kernel gives."""
    return tf.stack([tf.reduce_max(x[a:b]) if b > a else tf.zeros([], x.dtype)
                     for a, b in bounds])


def _levels(x, thresholds):
    """Zero-band level of each entry (int32): the index of the smallest threshold with
    |x| <= threshold, or len(thresholds) when there is none (also for NaN)."""
    a = tf.abs(x)
    return tf.add_n([tf.cast(~(a <= th), tf.int32) for th in thresholds])


def _family_code(prev_g, g, dw, prev_level, level, n_levels):
    """Per entry: (level of g_{t-1}, level of g_t, turn), coded as one int32 < levels²·4.

    turn is 0 when g_{t-1} and g_t do not have opposite signs, else 1, 2 or 3 for
    sign((w_t - w_{t-1})·(g_t - g_{t-1})) = +1 (a minimum), -1 (a maximum) or 0.
    """
    flipped = tf.sign(prev_g) * tf.sign(g) < 0
    turn = tf.sign(dw) * tf.sign(g - prev_g)
    turn = tf.where(flipped, tf.where(turn > 0, 1, tf.where(turn < 0, 2, 3)), 0)
    return (prev_level * n_levels + level) * 4 + turn


def _histograms_of_codes(codes, segments, n_vars):
    """Per-variable counts of each value of each code, from as few scatters as fit.

    Args:
        codes: list of (int32 [n] values, number of values).
        segments: int32 [n], the variable of each entry.
    Returns:
        one int32 [n_vars, number of values] per code. Codes are combined into joint
        histograms of at most _MAX_GROUP_BINS bins per variable (one scatter pass
        each); every entry goes to one of _LANES copies of its bin by position, so a
        long run of one value (a dead layer) does not serialise the increments.
    """
    groups = [[]]
    for code in codes:
        size = _LANES * math.prod(s for _, s in groups[-1]) * code[1]
        if groups[-1] and size > _MAX_GROUP_BINS:
            groups.append([])
        groups[-1].append(code)
    lane = tf.math.floormod(tf.range(tf.shape(segments)[0], dtype=tf.int32), _LANES)
    out = []
    for group in groups:
        sizes = [s for _, s in group]
        joint = group[0][0]
        for values, size in group[1:]:
            joint = joint * size + values
        bins = math.prod(sizes)
        counts = tf.raw_ops.DenseBincount(
            input=(segments * bins + joint) * _LANES + lane, size=n_vars * bins * _LANES,
            weights=tf.zeros([0], tf.int32))
        counts = tf.reshape(tf.reduce_sum(tf.reshape(counts, [n_vars, bins, _LANES]), 2),
                            [n_vars] + sizes)
        for axis in range(len(sizes)):
            others = [a + 1 for a in range(len(sizes)) if a != axis]
            out.append(tf.reduce_sum(counts, others) if others else counts)
    return out


def _band_counts(histogram, n_thresholds):
    """The six count columns of BAND_STATS per threshold from a family's histogram.

    histogram: int32 [n_vars, (T+1)²·4] over `_family_code` values. Returns, per
    threshold k, a list of six float64 [n_vars]: grad1, grad2, retained, flipped,
    min, max (an entry is in the band of threshold k when its level is <= k).
    """
    levels = n_thresholds + 1
    h = tf.cast(tf.reshape(histogram, [-1, levels, levels, 4]), tf.float64)
    prev_level = tf.math.cumsum(tf.reduce_sum(h, [2, 3]), axis=1)
    level = tf.math.cumsum(tf.reduce_sum(h, [1, 3]), axis=1)
    both = tf.math.cumsum(tf.math.cumsum(h, axis=1), axis=2)  # [n_vars, k, k, turn]
    columns = []
    for k in range(n_thresholds):
        retained = both[:, k, k, :]
        columns.append([prev_level[:, k], level[:, k], tf.reduce_sum(retained, 1),
                        tf.reduce_sum(retained[:, 1:], 1), retained[:, 1], retained[:, 2]])
    return columns


def _step_statistics(g, w_prev, w, prev_g, ema_g, ema_w_offset, has_prev, segments, *,
                     bounds, thresholds, ema_decay):
    """One step's statistics matrix [n_vars, n_stats] and the new moving averages.

    The counts come from one joint histogram of per-entry codes (a single pass over
    the parameters); sums and maxima from contiguous per-variable reductions.
    """
    finite_g = tf.math.is_finite(g)
    dw = w - w_prev
    # (prev gradient, gradient, weight change) of each family: raw, then averaged.
    families = [(prev_g, g, dw)]
    new_ema_g, new_ema_w_offset = ema_g, ema_w_offset
    if ema_decay is not None:
        d = ema_decay
        g_finite = tf.where(finite_g, g, tf.where(has_prev, ema_g, 0.0))
        new_ema_g = tf.where(has_prev, d * ema_g + (1.0 - d) * g_finite, g_finite)
        # The weight average is kept as its offset e = ŵ - w, small numbers whose float32
        # rounding is relative to their own size: ŵ_t - ŵ_{t-1} = (1-d)(Δw - e_{t-1})
        # and e_t = d(e_{t-1} - Δw), with e_0 = 0 (ŵ_0 = the weights at train begin).
        old_offset = tf.where(has_prev, ema_w_offset, 0.0)
        families.append((ema_g, new_ema_g, (1.0 - d) * (dw - old_offset)))
        new_ema_w_offset = d * (old_offset - dw)

    def sq_sum(x):
        x = tf.where(tf.math.is_finite(x), x, 0.0)
        return tf.cast(_segment_sum(x * x, bounds), tf.float64)

    n_vars, n_thresholds = len(bounds), len(thresholds)
    n_levels = n_thresholds + 1
    levels = [(_levels(prev, thresholds), _levels(now, thresholds)) for prev, now, _ in families]
    nonfinite, *family_histograms = _histograms_of_codes(
        [(tf.cast(~finite_g, tf.int32), 2)]
        + [(_family_code(*family, *family_levels, n_levels), n_levels ** 2 * 4)
           for family, family_levels in zip(families, levels)],
        segments, n_vars)
    columns = [sq_sum(g), sq_sum(w), sq_sum(w_prev), sq_sum(dw),
               tf.cast(nonfinite[:, 1], tf.float64)]
    for (_, _, change), (prev_level, level), histogram in zip(families, levels,
                                                              family_histograms):
        retained_level = tf.maximum(prev_level, level)
        abs_change = tf.where(tf.math.is_finite(change), tf.abs(change), 0.0)
        for k, counts in enumerate(_band_counts(histogram, n_thresholds)):
            abs_dw = tf.where(retained_level <= k, abs_change, 0.0)
            columns += counts
            columns += [tf.cast(_segment_sum(abs_dw, bounds), tf.float64),
                        tf.cast(_segment_max(abs_dw, bounds), tf.float64)]
    return tf.stack(columns, axis=1), new_ema_g, new_ema_w_offset


def _histograms(values, segments, n_vars, bins):
    """Per-variable histograms of the finite entries of `values` (flat float32).

    Returns counts [n_vars, bins] int32 and ranges [n_vars, 2] (lo, hi) float64:
    bin k holds lo + k*(hi-lo)/bins <= v < lo + (k+1)*(hi-lo)/bins, the last bin
    closed on the right (a constant variable puts everything in bin 0).
    """
    v = tf.cast(values, tf.float64)
    finite = tf.math.is_finite(v)
    lo = tf.math.unsorted_segment_min(tf.where(finite, v, np.inf), segments, n_vars)
    hi = tf.math.unsorted_segment_max(tf.where(finite, v, -np.inf), segments, n_vars)
    # A variable without finite entries (or none at all: the reductions then give the
    # dtype's extremes) gets the range [0, 0].
    has_finite = tf.math.unsorted_segment_max(tf.cast(finite, tf.int32), segments, n_vars) > 0
    lo = tf.where(has_finite, lo, 0.0)
    hi = tf.where(has_finite, hi, 0.0)
    width = tf.where(hi > lo, hi - lo, 1.0)
    position = (tf.where(finite, v, 0.0) - tf.gather(lo, segments)) / tf.gather(width, segments)
    index = tf.clip_by_value(tf.cast(tf.floor(position * bins), tf.int32), 0, bins - 1)
    counts = tf.math.unsorted_segment_sum(
        tf.cast(finite, tf.int32), segments * bins + index, n_vars * bins)
    return tf.reshape(counts, [n_vars, bins]), tf.stack([lo, hi], axis=1)


class DynamicsTracker(tf.Module):
    """Device-side state and per-step statistics for a list of trainable variables.

    Args:
        variables: the model's trainable variables (Keras or tf variables).
        thresholds: increasing positive zero-band thresholds.
        ema_decay: moving-average decay d in [0, 1), or None for no "avg" family.
        histogram_freq: steps between gradient/weight histograms; 0 disables.
        histogram_bins: bins per histogram.
        buffer_size: rows of the statistics ring buffer: at least the steps that
            run between two `read_rows` calls, so that none is overwritten unread
            (`ensure_buffer` grows it, and the histogram ring buffer).
        kernel: "native" (the fused CPU kernel), "xla" (`_step_statistics`, compiled
            with XLA) or "auto": native when it is available and TensorFlow sees no
            GPU, else xla.
        strategy: the tf.distribute strategy the model trains under (None: the
            default). State is then mirrored and written by the first replica, from
            the cross-replica sum of the gradients (what the optimizer applies).
    """

    def __init__(self, variables, thresholds=(1e-7, 1e-5), ema_decay=0.9,
                 histogram_freq=0, histogram_bins=1000, buffer_size=1,
                 kernel="auto", strategy=None):
        super().__init__(name="dynamics_tracker")
        self.names = tuple(getattr(v, "path", None) or v.name for v in variables)
        self.sizes = tuple(int(np.prod(v.shape)) for v in variables)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.histogram_freq = int(histogram_freq)
        self.histogram_bins = int(histogram_bins)
        self.buffer_size = int(buffer_size)
        self.tracked_variables = tuple(variables)
        self._native = native.choose(kernel)
        n_vars, n_params = len(self.sizes), sum(self.sizes)
        self._segments = tf.constant(np.repeat(np.arange(n_vars), self.sizes), tf.int32)
        families = 1 if self.ema_decay is None else 2
        n_stats = (len(GLOBAL_STATS) + families * len(self.thresholds) * len(BAND_STATS)
                   + len(EXTRA_STATS))

        self._strategy = strategy
        state = self._state
        self.prev_grad = state("prev_grad", [n_params])
        self.ema_grad = state("ema_grad", [n_params if self.ema_decay is not None else 0])
        self.ema_weight_offset = state(  # ŵ - w, see _step_statistics
            "ema_weight_offset", [n_params if self.ema_decay is not None else 0])
        self.step = state("step", [], tf.int64)
        self.has_prev = state("has_prev", [], tf.bool)
        self.units = tuple(unit_count(v.shape) for v in variables)
        # Per unit: the step from which its gradient has been all zero (smallest band)
        # at every step, or 0 if it was not at the last step.
        self.zero_since = state("zero_since", [sum(self.units)], tf.int64)
        self._n_stats = n_stats
        self._make_buffer(self.buffer_size)
        bins = max(self.histogram_bins, 1)
        self._make_histogram_buffer(1)

        offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        bounds = tuple(zip(offsets[:-1].tolist(), offsets[1:].tolist()))

        def statistics(g, w_prev, w, prev_g, ema_g, ema_w_offset, has_prev, segments):
            return _step_statistics(
                g, w_prev, w, prev_g, ema_g, ema_w_offset, has_prev, segments,
                bounds=bounds, thresholds=self.thresholds, ema_decay=self.ema_decay)

        def histograms(g, w):
            gc, gr = _histograms(g, self._segments, n_vars, bins)
            wc, wr = _histograms(w, self._segments, n_vars, bins)
            return tf.stack([gc, wc]), tf.stack([gr, wr])

        self._statistics = tf.function(statistics, jit_compile=True)
        self._histograms = tf.function(histograms, jit_compile=True)

    def _state(self, name, shape, dtype=tf.float32):
        """A state variable, mirrored under the strategy, written by the first replica."""
        strategy = self._strategy
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            return tf.Variable(
                tf.zeros(shape, dtype), trainable=False, name=name,
                synchronization=tf.VariableSynchronization.ON_WRITE,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def _make_buffer(self, rows):
        """The statistics ring buffer of `rows` steps (empty)."""
        self.buffer_size = int(rows)
        n_vars = len(self.sizes)
        self.stats = self._state("stats", [rows, n_vars, self._n_stats], tf.float64)
        self.row_step = self._state("row_step", [rows], tf.int64)
        self.row_loss = self._state("row_loss", [rows], tf.float64)
        self.row_skipped = self._state("row_skipped", [rows], tf.float64)
        self.row_has_prev = self._state("row_has_prev", [rows], tf.bool)
        # One call for the row buffers: each separate read costs a dispatch.
        self._snapshot = tf.function(lambda: (
            self.row_step.read_value(), self.row_loss.read_value(),
            self.row_skipped.read_value(), self.row_has_prev.read_value(),
            self.stats.read_value()))

    def _make_histogram_buffer(self, slots):
        """The histogram ring buffer: `slots` histogram steps (empty)."""
        self.histogram_slots = int(slots)
        shape = [slots, 2, len(self.sizes)]
        self.hist_counts = self._state("hist_counts", shape + [max(self.histogram_bins, 1)],
                                       tf.int32)
        self.hist_ranges = self._state("hist_ranges", shape + [2], tf.float64)
        self.hist_step = self._state("hist_step", [slots], tf.int64)

    def ensure_buffer(self, rows, steps_per_read=None):
        """Grow the ring buffers to at least `rows` steps and to the histogram steps of
        `steps_per_read` steps (call when everything has been read; a step function
        traced before then writes the old buffers: trace it again)."""
        if rows > self.buffer_size:
            self._make_buffer(rows)
        if steps_per_read and self.histogram_freq:
            slots = math.ceil(steps_per_read / self.histogram_freq) + 1
            if slots > self.histogram_slots:
                self._make_histogram_buffer(slots)

    def read_weights(self):
        """Current values of the tracked variables: float32 tensors, one per variable."""
        return [tf.cast(tf.convert_to_tensor(v), tf.float32) for v in self.tracked_variables]

    def update(self, grads, weights_before, loss, raw_grads=None, skipped=False):
        """Record one step. Call inside the train step after the optimizer update.

        Args:
            grads: per-variable gradients the optimizer applied (None for unconnected);
                under a strategy, each replica's share (they are summed).
            weights_before: `read_weights()` taken before the optimizer update.
            loss: the batch's scalar loss (under a strategy each replica's share,
                summed).
            raw_grads: the gradients before the optimizer clipped them (None: not
                clipped, the same as `grads`), for raw_grad_norm.
            skipped: bool (tensor): the optimizer applied nothing at this step (a loss
                scale's overflow); the statistics are then those of the discarded
                gradient, and the step's `skipped` is 1.
        """
        def dense(gradients):  # also from IndexedSlices; None as zeros
            return [tf.zeros(v.shape) if gr is None
                    else tf.cast(tf.convert_to_tensor(gr), tf.float32)
                    for gr, v in zip(gradients, self.tracked_variables)]

        grads = dense(grads)
        raw = None if raw_grads is None else dense(raw_grads)
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            # Each replica holds its share of the loss and its gradient; the optimizer
            # applies the sum of the gradients, which is the gradient of the sum.
            grads = replica.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            loss = replica.all_reduce(tf.distribute.ReduceOp.SUM, loss)
            if raw is not None:
                raw = replica.all_reduce(tf.distribute.ReduceOp.SUM, raw)
        weights = self.read_weights()
        has_prev = self.has_prev.read_value()
        if self._native is not None:
            # Updates prev_grad and the moving averages in place (each replica its own
            # copy, from the same all-reduced gradients).
            ema = [] if self.ema_decay is None else [self.ema_decay, 1.0 - self.ema_decay]
            stats = self._native.insight_step_statistics(
                grads, weights_before, weights, self.prev_grad.handle, self.ema_grad.handle,
                self.ema_weight_offset.handle, has_prev, thresholds=self.thresholds, ema=ema)
        else:
            g = _flatten(grads)
            stats, new_ema_g, new_ema_w_offset = self._statistics(
                g, _flatten(weights_before), _flatten(weights), self.prev_grad.read_value(),
                self.ema_grad.read_value(), self.ema_weight_offset.read_value(), has_prev,
                self._segments)
            self.prev_grad.assign(g)
            self.ema_grad.assign(new_ema_g)
            self.ema_weight_offset.assign(new_ema_w_offset)
        # Every write below waits for the statistics, so a step whose batch never
        # arrived (a dataset of unknown length ends inside the compiled step, after the
        # stateful ops that need no data may already have run) changes no state.
        with tf.control_dependencies([stats, loss]):
            self._record(stats, grads, raw, loss, skipped, has_prev, weights)

    def _record(self, stats, grads, raw, loss, skipped, has_prev, weights):
        """The writes of `update`: counters, zero units, ring buffers, histograms."""
        step = self.step.read_value() + 1
        zeros = [_zero_units(g, v.shape, self.thresholds[0])
                 for g, v in zip(grads, self.tracked_variables)]
        zero = tf.concat(zeros, axis=0)
        if raw is None:  # not clipped: the gradient's own squared norm
            raw_sq = stats[:, :1]
        else:
            raw_sq = tf.stack([tf.reduce_sum(tf.square(tf.where(tf.math.is_finite(g), g, 0.0)))
                               for g in raw])[:, None]
        since = self.zero_since.read_value()
        self.zero_since.assign(tf.where(zero, tf.where(since > 0, since, step), 0))
        zero_counts = tf.stack([tf.reduce_sum(tf.cast(z, tf.float64)) for z in zeros])
        stats = tf.concat([stats, tf.cast(raw_sq, tf.float64), zero_counts[:, None]], axis=1)
        self.step.assign(step)
        row = tf.cast(tf.math.floormod(step - 1, self.buffer_size), tf.int32)
        for buffer, value in ((self.stats, stats), (self.row_step, step),
                              (self.row_loss, tf.cast(loss, tf.float64)),
                              (self.row_skipped, tf.cast(skipped, tf.float64)),
                              (self.row_has_prev, has_prev)):
            write_slot(buffer, row, value)
        self.has_prev.assign(True)
        if self.histogram_freq > 0:
            # Computed only on histogram steps, into slot (step / freq) mod slots;
            # assigned outside the branch, since an assignment to mirrored state may
            # not sit inside control flow.
            slot = tf.cast(tf.math.floormod(step // self.histogram_freq,
                                            self.histogram_slots), tf.int32)
            counts, ranges, hist_step = tf.cond(
                tf.equal(tf.math.floormod(step, self.histogram_freq), 0),
                lambda: (*self._histograms_of(grads, weights), step),
                # gather, not slicing: XLA takes a slice's bounds as compile-time
                # constants, which compiled the step anew for every step's slot.
                lambda: tuple(tf.gather(buffer, slot) for buffer in (
                    self.hist_counts, self.hist_ranges, self.hist_step)))
            for buffer, value in ((self.hist_counts, counts), (self.hist_ranges, ranges),
                                  (self.hist_step, hist_step)):
                write_slot(buffer, slot, value)

    def _histograms_of(self, grads, weights):
        """Counts [2, n_vars, bins] int32 and ranges [2, n_vars, 2] float64 (lo, hi) of
        the gradients (0; `prev_grad` holds them after the update) and weights (1), one
        list of float32 tensors each."""
        if self._native is None:
            return self._histograms(self.prev_grad.read_value(), _flatten(weights))
        shape = [2, len(self.sizes)]
        counts, ranges = self._native.insight_histograms(
            [*grads, *weights], bins=max(self.histogram_bins, 1))
        return tf.reshape(counts, shape + [-1]), tf.reshape(ranges, shape + [2])

    def read_rows(self, after_step):
        """Rows recorded after `after_step`: list of `Row`."""
        steps, losses, skipped, has_prev, stats = (t.numpy() for t in self._snapshot())
        order = [i for i in np.argsort(steps) if steps[i] > after_step]
        return [Row(int(steps[i]), float(losses[i]), float(skipped[i]), bool(has_prev[i]),
                    stats[i]) for i in order]

    def read_histograms(self, after_step):
        """Histogram steps after `after_step`, in order: list of (step,
        {"gradients"|"weights": (counts [n_vars, bins], ranges [n_vars, 2])})."""
        steps = self.hist_step.numpy()
        order = [i for i in np.argsort(steps) if steps[i] > after_step]
        if not order:
            return []
        counts, ranges = self.hist_counts.numpy(), self.hist_ranges.numpy()
        return [(int(steps[i]), {"gradients": (counts[i, 0], ranges[i, 0]),
                                 "weights": (counts[i, 1], ranges[i, 1])}) for i in order]

    def last_gradients(self, max_params=None):
        """Last step's gradient per variable, strided to <= max_params entries each:
        {name: (numpy values, stride)}."""
        out = {}
        offset = 0
        for name, size in zip(self.names, self.sizes):
            stride = 1 if not max_params else max(1, math.ceil(size / max_params))
            out[name] = (self.prev_grad[offset:offset + size:stride].numpy(), stride)
            offset += size
        return out

    def read_zero_since(self):
        """{name: int64 [units]} of `zero_since`: per unit, the first step of its
        current run of all-zero gradients, 0 if its last gradient was not all zero."""
        values = self.zero_since.numpy()
        bounds = np.cumsum((0,) + self.units)
        return {name: values[a:b] for name, a, b in zip(self.names, bounds[:-1], bounds[1:])}

    _STATE = ("prev_grad", "ema_grad", "ema_weight_offset", "step", "has_prev", "zero_since")

    def state_dict(self):
        """The state needed to resume: numpy arrays keyed by name."""
        state = {k: getattr(self, k).numpy() for k in self._STATE}
        state["names"] = np.array(self.names)
        state["sizes"] = np.array(self.sizes, np.int64)
        return state

    def load_state(self, state):
        """Restore `state_dict()` output, and the run's variable names with it (Keras
        numbers automatic names per session: a model built again in a notebook has
        other names for the same variables). ValueError if the saved state is of
        variables of other sizes."""
        names = [str(n) for n in state["names"]]
        sizes = [int(n) for n in state["sizes"]] if "sizes" in state else None
        if len(names) != len(self.names) or sizes not in (None, list(self.sizes)) \
                or (sizes is None and names != list(self.names)):
            raise ValueError(
                f"saved insight state is for {len(names)} variables of sizes {sizes} "
                f"({', '.join(names[:3])}, ...), but the model has {len(self.names)} of "
                f"sizes {list(self.sizes)}; resume needs the same model")
        if state["ema_grad"].shape != self.ema_grad.shape:
            raise ValueError("saved insight state has a different ema_decay setting "
                             "(None vs. a value); resume with the same setting")
        for k in self._STATE:
            if k in state:  # checkpoints before zero_since lack it: it starts at 0
                getattr(self, k).assign(state[k])
        self.names = tuple(names)
