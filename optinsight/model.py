"""InsightModel: a keras.Model whose train step feeds a DynamicsTracker.

`insight_train_step` is Keras's own TensorFlow train step plus two things: the
weights are read before the optimizer update, and after it the tracker records
the step from the unscaled gradients the optimizer applied. The callback installs
it on any Keras model; `InsightModel` uses it whenever a tracker is attached.
"""

import keras
import tensorflow as tf
from keras.src import tree
from keras.src.losses import loss as loss_module


def applied_gradients(optimizer, gradients):
    """The gradients as the optimizer sees them, loss scaling removed."""
    scale = getattr(optimizer, "dynamic_scale", None)  # keras LossScaleOptimizer
    if scale is None:
        return gradients
    return [None if g is None else g / tf.cast(scale, g.dtype) for g in gradients]


def insight_train_step(model, data, tracker):
    """One training step of `model` on `data`, recorded by `tracker`.

    Returns the metrics dict of Keras's `train_step` (what `fit` shows).
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
        if model._call_has_training_arg:
            y_pred = model(x, training=True)
        else:
            y_pred = model(x)
        loss = model._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
        unscaled_loss = loss_module.unscale_loss_for_distribution(loss)
        model._loss_tracker.update_state(
            unscaled_loss,
            sample_weight=tf.shape(next(i for i in tree.flatten(x) if i is not None))[0],
        )
        if model.optimizer is not None:
            loss = model.optimizer.scale_loss(loss)
    variables = model.trainable_weights
    gradients = tape.gradient(loss, variables)
    weights_before = tracker.read_weights()
    model.optimizer.apply_gradients(zip(gradients, variables))
    tracker.update(applied_gradients(model.optimizer, gradients), weights_before,
                   unscaled_loss)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


@keras.saving.register_keras_serializable(package="optinsight")
class InsightModel(keras.Model):
    """A keras.Model (functional or subclassed) that records optimization dynamics.

    Use it exactly like keras.Model; with an `OptimizationInsightCallback` in
    `fit`, every batch is recorded from inside the compiled train step. Without
    one it trains like a plain keras.Model.
    """

    def attach_tracker(self, tracker):
        """Record steps with `tracker` (None detaches); rebuilds the train function."""
        object.__setattr__(self, "_insight_tracker", tracker)
        self.train_function = None

    def train_step(self, data):
        tracker = getattr(self, "_insight_tracker", None)
        if tracker is None:
            return super().train_step(data)
        return insight_train_step(self, data, tracker)
