"""`InstrumentTracker`: Cockpit's instruments on the training batch of each step where
they are due, computed inside the compiled train step (docs/logs.md,
instruments.jsonl; `optinsight.instruments` gives the formulas).

At a due step t, after the optimizer's update, the tracker takes the batch's
per-example gradients at w_t (`per_example`): for a model of Dense and Conv2D layers
without batch normalisation, from the step's own forward and backward pass (the train
step records those layers' inputs and output gradients; the TIC's backward passes
start from its outputs, on its tape), else from a pass of its own (training=False)
with the weights put back to w_t for the while, then restored. Only
scalars are kept: the sums the instruments need, the per-example slopes along the
step's update d_t = w_{t+1} − w_t (Alpha's start) and along the previous due step's
update (Alpha's end, at step t + 1, which is computed for it), and ‖w_t − w_0‖ per
variable. They go to a ring buffer that the host reads in bursts with the dynamics
rows.

State: Alpha keeps the last update d_t (P floats), distance the initial weights w_0
(P floats); the per-example gradients exist only inside the step (`per_example`).
"""

import contextlib

import numpy as np
import tensorflow as tf

from optinsight import native
from optinsight.batch_statistics import (
    CURVATURE_SUMS,
    SUMS,
    batch_sums,
    loss_moments,
    projection_moments,
)
from optinsight.dynamics import write_slot
from optinsight.instruments import CURVATURE
from optinsight.metrics import GRAD_HIST_2D_BINS, GRAD_HIST_2D_RANGE
from optinsight.per_example import (
    flatten,
    from_training_pass,
    ggn_diagonal_sum,
    losses_and_gradients,
    routed_pools,
    training_pass_layers,
)

#: Columns of Alpha's slopes: at the start of the due step's update, at its end.
ALPHA_COLUMNS = ("step_length_sq", "start_slope", "start_slope_variance", "has_end",
                 "end_slope", "end_slope_variance")


class InstrumentTracker(tf.Module):
    """Records the instruments `names` (of `metrics.INSTRUMENTS`) of `variables` of `model` every
    `every` steps into a ring buffer of `buffer_size` steps; kernel: as
    `DynamicsTracker`'s, for the TIC's convolution sums."""

    def __init__(self, model, variables, names, every, buffer_size, strategy=None,
                 loss_scaled=False, kernel="auto"):
        super().__init__(name="instrument_tracker")
        self.model, self.tracked_variables = model, tuple(variables)
        self.names, self.every = tuple(names), int(every)
        self.alpha, self.distance = "alpha" in names, "distance" in names
        self.histogram = "grad_hist_2d" in names
        self.curvature = bool(set(CURVATURE) & set(names))
        self._native = native.choose(kernel)
        self._xla = kernel == "xla"
        self.per_example = any(n != "distance" for n in names)
        self._training_layers = None if not self.per_example or loss_scaled \
            else training_pass_layers(model, variables)
        if self._training_layers and self.curvature:  # one backward pass per logit
            self._training_layers += routed_pools(model)
        self.columns = (("due",) + (SUMS if self.per_example else ())
                        + (CURVATURE_SUMS if self.curvature else ())
                        + (ALPHA_COLUMNS if self.alpha else ()))
        self._strategy = strategy
        n_params = sum(int(np.prod(v.shape)) for v in variables)
        self.direction = self._state("direction", [n_params if self.alpha else 0])
        self.initial = self._state("initial", [n_params if self.distance else 0])
        self.initial.assign(flatten(self.tracked_variables) if self.distance
                            else tf.zeros([0]))
        self._make_buffer(buffer_size)

    def _state(self, name, shape, dtype=tf.float32):
        strategy = self._strategy
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            return tf.Variable(tf.zeros(shape, dtype), trainable=False, name=name)

    def _make_buffer(self, rows):
        self.buffer_size = int(rows)
        self.values = self._state("values", [rows, len(self.columns)], tf.float64)
        self.distances = self._state(
            "distances", [rows, len(self.tracked_variables) if self.distance else 0],
            tf.float64)
        self.row_step = self._state("row_step", [rows], tf.int64)
        cells = int(np.prod(GRAD_HIST_2D_BINS)) if self.histogram else 0
        self.histograms = self._state("histograms", [rows, cells], tf.int32)

    def ensure_buffer(self, rows):
        """At least `rows` steps in the ring buffer (call when everything was read)."""
        if rows > self.buffer_size:
            self._make_buffer(rows)

    # ----------------------------------------------------------- in the step
    def training_pass_layers(self):
        """The layers the train step records for `record`'s `training_pass`, or None
        when the per-example gradients need a pass of their own (a variable outside
        Dense and Conv2D, batch normalisation, a loss scale); with the TIC, the
        `routed_pools` too, whose many backward passes are cheaper."""
        return self._training_layers

    def record(self, step, weights_before, x, y, training_pass=None):
        """Record step `step` (int64 tensor) if due, or if it ends a due step's update
        (Alpha). Call in the train step after the optimizer's update; weights_before:
        the variables' values before it (float32, one per variable); training_pass:
        (records, output gradients, model outputs, tape) of the step's own pass around
        `recording(training_pass_layers())`, the gradients of the unscaled batch-mean
        loss; the tape, persistent, is needed for the TIC only."""
        due = tf.equal(tf.math.floormod(step, self.every), 0)
        ends = tf.constant(False)
        if self.alpha:
            ends = tf.logical_and(tf.equal(tf.math.floormod(step - 1, self.every), 0),
                                  step > 1)
        width = len(self.columns)

        cells = int(np.prod(GRAD_HIST_2D_BINS)) if self.histogram else 0

        def measure():
            values = {"due": tf.cast(due, tf.float64)}
            counts = tf.zeros([cells], tf.int32)
            distances = tf.zeros([0], tf.float64)
            if self.distance:
                distances = tf.stack([
                    tf.reduce_sum(tf.square(tf.cast(tf.reshape(w, [-1]), tf.float64)
                                            - tf.cast(w0, tf.float64)))
                    for w, w0 in zip(weights_before, self._split(self.initial))])
            if self.per_example:
                values.update(self._per_example(
                    weights_before, x, y, due, ends, training_pass))
                if self.histogram:
                    counts = tf.reshape(values.pop("grad_hist_2d"), [-1])
            return tf.stack([values[c] for c in self.columns]), distances, counts

        def skip():
            return (tf.zeros([width], tf.float64),
                    tf.zeros([len(self.tracked_variables) if self.distance else 0],
                             tf.float64), tf.zeros([cells], tf.int32))

        recorded = tf.logical_or(due, ends)
        row_values, row_distances, row_counts = tf.cond(recorded, measure, skip)
        slot = tf.cast(tf.math.floormod(step - 1, self.buffer_size), tf.int32)
        writes = [(self.values, row_values),
                  (self.row_step, tf.where(recorded, step, tf.constant(0, tf.int64)))]
        if self.distance:
            writes.append((self.distances, row_distances))
        if self.histogram:
            writes.append((self.histograms, row_counts))
        for buffer, value in writes:
            write_slot(buffer, slot, value)

    def _split(self, flat):
        sizes = [int(np.prod(v.shape)) for v in self.tracked_variables]
        return tf.split(flat, sizes) if sizes else []

    def _per_example(self, weights_before, x, y, due, ends, training_pass):
        """The per-example columns at w_t: from the step's own training pass when given
        (`training_pass_layers`), else from a pass of their own with the weights put
        back to w_t for the while. A step that only ends Alpha's fit takes the loss
        and the slopes only (no materialised per-example gradient)."""
        variables = self.tracked_variables
        after = [tf.identity(tf.convert_to_tensor(v)) for v in variables]
        back = []  # the assignments putting w_t back (ops; Keras before 3.4 gives none)
        if training_pass is not None:
            records, deltas, outputs = training_pass[:3]
            tape = training_pass[3] if len(training_pass) > 3 else None
            if self.curvature and tape is None:
                raise ValueError("the TIC from the training pass needs its tape: pass "
                                 "training_pass=(records, output gradients, outputs, tape), "
                                 "the tape persistent")
            losses, gradients = from_training_pass(self.model, variables, self._training_layers,
                                                   records, deltas, y, outputs, self._native)
        else:
            # Keras before 3.4 returns no op from assign: the step's automatic control
            # dependencies order the reads after it all the same
            back = [op for op in (v.assign(tf.cast(w, v.dtype))
                                  for v, w in zip(variables, weights_before)) if op is not None]
            with tf.control_dependencies(back):
                losses, gradients = losses_and_gradients(self.model, variables, x, y,
                                                         self._native)

        update = [tf.reshape(tf.cast(a, tf.float32) - w, [-1])
                  for a, w in zip(after, weights_before)]
        previous = self._split(self.direction) if self.alpha else None

        def statistics():
            with tf.control_dependencies(back):
                curvature = ggn_diagonal_sum(
                    self.model, variables, x, y,
                    None if training_pass is None else (records, tape, outputs),
                    self._native, self._xla) \
                    if self.curvature else None
            # a due step ends the previous one's update only when every step is due
            ending = [previous] if self.every == 1 else []
            moments = gradients.moments([update, *ending] if self.alpha else [])
            out = batch_sums(losses, moments, curvature)
            if self.histogram:
                out["grad_hist_2d"] = gradients.histogram2d(
                    weights_before, GRAD_HIST_2D_BINS, GRAD_HIST_2D_RANGE)
            dots = moments.dots  # along the update, and the previous one's when ending
            if len(dots) == 1:
                dots.append(tf.zeros_like(dots[0]))
            return out, dots

        def losses_only():  # the step after a due step: Alpha's end slope
            out = {k: tf.zeros([], tf.float64) for k in self.columns if k in SUMS
                   or k in CURVATURE_SUMS}
            out.update(loss_moments(losses))
            if self.histogram:
                out["grad_hist_2d"] = tf.zeros(GRAD_HIST_2D_BINS, tf.int32)
            return out, [tf.zeros_like(losses, tf.float64), gradients.dots(previous)]

        if self.alpha:
            values, (start_dots, end_dots) = tf.cond(due, statistics, losses_only)
            start, start_var = projection_moments(start_dots, update)
            end, end_var = projection_moments(end_dots, previous)
            values.update({
                "step_length_sq": tf.add_n([tf.reduce_sum(tf.square(tf.cast(u, tf.float64)))
                                            for u in update]),
                "start_slope": start, "start_slope_variance": start_var,
                "has_end": tf.cast(ends, tf.float64), "end_slope": end,
                "end_slope_variance": end_var})
        else:
            values = statistics()[0]
        with tf.control_dependencies(list(values.values())):
            restored = [] if training_pass is not None else [
                v.assign(a) for v, a in zip(variables, after)]
            if self.alpha:
                restored.append(self.direction.assign(tf.concat(update, 0)))
        with tf.control_dependencies([op for op in restored if op is not None]):
            return {k: tf.identity(v) for k, v in values.items()}

    # ------------------------------------------------------------- the host
    def read_rows(self, after_step):
        """Steps recorded after `after_step`, in order: [(step, {column: value},
        distances float64 [n_vars] (‖w_t − w_0‖) or None, GradHist2d counts int
        GRAD_HIST_2D_BINS or None)]."""
        steps = self.row_step.numpy()
        order = [i for i in np.argsort(steps) if steps[i] > after_step]
        if not order:
            return []
        values, distances = self.values.numpy(), self.distances.numpy()
        histograms = self.histograms.numpy()
        return [(int(steps[i]), dict(zip(self.columns, values[i].tolist())),
                 np.sqrt(distances[i]) if self.distance else None,
                 histograms[i].reshape(GRAD_HIST_2D_BINS) if self.histogram else None)
                for i in order]

    def state_dict(self):
        """What resume needs: the last update (Alpha) and the initial weights."""
        return {"instrument_direction": self.direction.numpy(),
                "instrument_initial": self.initial.numpy()}

    def load_state(self, state):
        """Restore `state_dict()` output (call after the weights are restored). A
        checkpoint without it (recorded without these instruments) counts distance
        from the restored weights."""
        for key, variable in (("instrument_direction", self.direction),
                              ("instrument_initial", self.initial)):
            if key in state and state[key].shape == variable.shape:
                variable.assign(state[key])
            elif key == "instrument_initial" and self.distance:
                variable.assign(flatten(self.tracked_variables))
