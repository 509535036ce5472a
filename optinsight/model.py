"""InsightModel: a keras.Model whose train step feeds a DynamicsTracker.

`insight_train_step` is Keras's own TensorFlow train step, with the optimizer's
`apply_gradients` replaced by the recorder's (`InsightRecorder.apply_gradients`),
which applies and records the step. The callback installs it on any Keras model;
`InsightModel` uses it whenever a recorder is attached.
"""

import keras
import tensorflow as tf

from optinsight import compat, per_example


def insight_train_step(model, data, recorder):
    """One training step of `model` on `data`, recorded by `recorder` (an
    `InsightRecorder` whose optimizer is the model's).

    Returns the metrics dict of Keras's `train_step` (what `fit` shows).
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    # the instruments' per-example gradients from this pass: some layers' inputs and
    # the gradients of their outputs (without sample weights, which change the loss)
    layers = recorder.training_pass_layers() if sample_weight is None else None
    # persistent: the TIC's backward passes start from this pass's outputs
    with tf.GradientTape(persistent=bool(layers)) as tape, \
            per_example.recording(layers or [], keep_first_pass=True,
                                  xla=recorder.jit_compile) as records:
        if compat.call_has_training_arg(model):
            y_pred = model(x, training=True)
        else:
            y_pred = model(x)
        loss, batch_loss = compat.train_loss(model, x, y, y_pred, sample_weight)
        compat.loss_metric(model).update_state(
            batch_loss,
            sample_weight=tf.shape(next(i for i in tf.nest.flatten(x) if i is not None))[0],
        )
        scaled_loss = model.optimizer.scale_loss(loss)
    variables = model.trainable_weights
    outputs = [z for layer in layers or [] for _, z in records[layer]]
    gradients = tape.gradient(scaled_loss, variables + outputs)
    gradients, deltas = gradients[:len(variables)], gradients[len(variables):]
    training_pass = None
    if layers:
        factor = getattr(model.optimizer, "loss_scale_factor", None) or 1.0
        training_pass = (records, [d / factor for d in deltas], y_pred, tape)
    recorder.apply_gradients(zip(gradients, variables), loss=loss, inputs=x, targets=y,
                             training_pass=training_pass)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


@keras.saving.register_keras_serializable(package="optinsight")
class InsightModel(keras.Model):
    """A keras.Model (functional or subclassed) that records optimization dynamics.

    Use it exactly like keras.Model; with an `OptimizationInsightCallback` in
    `fit`, every batch is recorded from inside the compiled train step. Without
    one it trains like a plain keras.Model.
    """

    def attach_recorder(self, recorder):
        """Record steps with `recorder` (None detaches); rebuilds the train function."""
        object.__setattr__(self, "_insight_recorder", recorder)
        self.train_function = None

    def train_step(self, data):
        recorder = getattr(self, "_insight_recorder", None)
        if recorder is None:
            return super().train_step(data)
        return insight_train_step(self, data, recorder)
