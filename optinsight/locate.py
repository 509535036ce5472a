"""Where NaN/Inf first appears in the forward pass: at the first step whose loss is
not finite, the step's batch is replayed through the model's layers, inside
the compiled step and before the optimizer applies anything (so with the weights that
produced it), and the first layer whose output holds NaN/Inf is kept. A healthy step
only evaluates the condition.

Needs a functional or Sequential model (one with symbolic inputs); for others nothing
is located and the diagnosis falls back on the gradients.
"""

import keras
import tensorflow as tf

#: The forward pass of the bad step was finite: the NaN/Inf arose in the loss or the
#: backward pass.
FORWARD_FINITE = -1


def _layers(model):
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None, None
    layers = [layer for layer in getattr(model, "layers", ())
              if not isinstance(layer, keras.layers.InputLayer)]
    if not inputs or not layers:
        return None, None
    try:
        return layers, keras.Model(inputs, [layer.output for layer in layers])
    except (AttributeError, ValueError):  # a layer used twice has no single output
        return None, None


class NonfiniteLocator:
    """The first layer whose output is NaN/Inf at the first bad step of a run.

    Args:
        model: the keras.Model being trained.
        state: a factory `state(name, shape, dtype)` of non-trainable variables (the
            tracker's, mirrored under a strategy).
    """

    def __init__(self, model, state):
        self.layers, self._extractor = _layers(model)
        # [step, layer index + 1 or FORWARD_FINITE]; step 0: nothing located yet.
        self.origin = state("nonfinite_origin", [2], tf.int64)

    def in_step(self, inputs, loss, skipped, step):
        """Inside the train step, before the optimizer applies the step: if this is the
        run's first step with a non-finite loss (a loss-scale skip aside: its loss is
        finite), replay `inputs` layer by layer and keep the first non-finite output.
        A healthy step tests one scalar."""
        if self._extractor is None or inputs is None or loss is None:
            return
        finite = tf.reduce_all(tf.math.is_finite(tf.cast(loss, tf.float32)))
        first = tf.logical_and(tf.logical_not(tf.logical_or(finite, skipped)),
                               tf.equal(self.origin[0], 0))
        located = tf.cond(first, lambda: self._first_nonfinite(inputs),
                          lambda: tf.constant(0, tf.int64))
        self.origin.assign(tf.where(first, tf.stack([tf.cast(step, tf.int64), located]),
                                    self.origin))

    def _first_nonfinite(self, inputs):
        outputs = self._extractor(inputs, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        finite = tf.stack([tf.reduce_all([tf.reduce_all(tf.math.is_finite(
            tf.cast(t, tf.float32))) for t in tf.nest.flatten(out)]) for out in outputs])
        index = tf.argmin(tf.cast(finite, tf.int64), output_type=tf.int64)
        return tf.where(tf.reduce_all(finite), tf.constant(FORWARD_FINITE, tf.int64),
                        index + 1)

    def read(self):
        """None before any bad step, else {"step", "layer"}: the layer's name, or None
        when the forward pass was finite (the loss or the backward pass made it)."""
        if self._extractor is None:
            return None
        step, code = (int(v) for v in self.origin.numpy())
        if step == 0:
            return None
        return {"step": step, "layer": self.layers[code - 1].name if code > 0 else None}
