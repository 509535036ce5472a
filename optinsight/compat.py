"""The supported TensorFlow and Keras versions, and every use of Keras's private API.

Each private use below is one function, with the versions that need it. The range is
tested at both ends (README, "Supported versions"): `make test` runs the full suite on
the newest versions and a fast subset on the oldest.
"""

import importlib.metadata
import inspect
import json
import os
import sys

#: (oldest supported, first unsupported) per distribution; setup.cfg says the same.
SUPPORTED = {"tensorflow": ((2, 16), (2, 22)), "keras": ((3, 3), (4, 0))}
_DISTRIBUTIONS = {"tensorflow": ("tensorflow", "tensorflow-cpu", "tf-nightly"),
                  "keras": ("keras", "keras-nightly")}


def _version(package):
    for distribution in _DISTRIBUTIONS[package]:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _release(text):
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


def check_versions():
    """ImportError, one line, when TensorFlow or Keras is missing or outside SUPPORTED
    (read from the installed metadata: nothing is imported)."""
    installed = {package: _version(package) for package in SUPPORTED}
    wanted = ", ".join(f"{p} >= {'.'.join(map(str, lo))}, < {'.'.join(map(str, hi))}"
                       for p, (lo, hi) in SUPPORTED.items())
    for package, (lo, hi) in SUPPORTED.items():
        version = installed[package]
        if version is None or not lo <= _release(version) < hi:
            have = ", ".join(f"{p} {v or 'not installed'}" for p, v in installed.items())
            raise ImportError(f"optinsight supports {wanted}; this environment has {have}")


def selected_backend():
    """The Keras backend in use, or the one Keras will load (KERAS_BACKEND, else
    keras.json under KERAS_HOME or ~/.keras, else "tensorflow"), without importing it."""
    if "keras" in sys.modules:
        try:
            return sys.modules["keras"].config.backend()
        except AttributeError:  # keras is being imported
            pass
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    path = os.path.join(os.environ.get("KERAS_HOME") or os.path.expanduser("~/.keras"),
                        "keras.json")
    try:
        with open(path) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def check_backend():
    """ValueError, one line, unless Keras runs (or will run) on TensorFlow: the insight
    train step, the fused kernel and the probes are TensorFlow code."""
    backend = selected_backend()
    if backend != "tensorflow":
        raise ValueError(
            f"optinsight needs Keras's TensorFlow backend, but Keras is set to {backend!r}: "
            "set KERAS_BACKEND=tensorflow (or \"backend\": \"tensorflow\" in "
            "~/.keras/keras.json) before Keras is imported")


def train_loss(model, x, y, y_pred, sample_weight):
    """(the loss to differentiate: this replica's share, the batch loss for `fit`'s
    loss metric), as the installed Keras's own TensorFlow train step computes them."""
    if not hasattr(model, "_compute_loss"):  # Keras 3.3: the public compute_loss
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        return loss, loss
    # Keras >= 3.4: _compute_loss (compute_loss plus the training flag)
    loss = model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                               training=True)
    try:  # Keras >= 3.8 divides the loss by the replicas, and the metric undoes it
        from keras.src.losses.loss import unscale_loss_for_distribution
    except ImportError:  # Keras 3.4-3.7: not divided
        return loss, loss
    return loss, unscale_loss_for_distribution(loss)


def compute_loss(model, x, y, y_pred, training):
    """The compiled loss of a batch (public `compute_loss`; its `training` argument
    exists from Keras 3.4, and 3.3 computes the same without it)."""
    if "training" in inspect.signature(model.compute_loss).parameters:
        return model.compute_loss(x=x, y=y, y_pred=y_pred, training=training)
    return model.compute_loss(x=x, y=y, y_pred=y_pred)


def split_at_logits(output):
    """(z, head), head(z) the model's `output`: z the logits when `output` comes from a
    final softmax or sigmoid, which Keras's cross-entropy losses differentiate instead
    of the output (every Keras 3: `backend.tensorflow.nn._get_logits` takes the op's
    input), else (output, identity). Reads the output's op: in a graph only."""
    import tensorflow as tf

    op_type = getattr(getattr(output, "op", None), "type", None)
    if op_type == "Softmax":
        return output.op.inputs[0], tf.nn.softmax
    if op_type == "Sigmoid":
        return output.op.inputs[0], tf.sigmoid
    return output, tf.identity


def call_has_training_arg(model):
    """Whether model.call takes `training` (every Keras 3: Layer._call_has_training_arg)."""
    return model._call_has_training_arg


def loss_metric(model):
    """The Mean behind `fit`'s "loss" (every Keras 3: Trainer._loss_tracker)."""
    return model._loss_tracker


def clip_gradients(optimizer, gradients):
    """The gradients clipped as `optimizer` clips them (every Keras 3:
    BaseOptimizer._clip_gradients)."""
    return list(optimizer._clip_gradients(gradients))


def optimizer_slot(optimizer, slot, variable):
    """An optimizer's state for `variable`, e.g. slot "velocities" of Adam (every Keras
    3: the optimizer's `_<slot>` list and `_get_variable_index`)."""
    return getattr(optimizer, f"_{slot}")[optimizer._get_variable_index(variable)]


def set_initial_epoch(model, epoch):
    """Make the running `fit` start at `epoch` (every Keras 3: Trainer._initial_epoch,
    as keras.callbacks.BackupAndRestore sets it)."""
    model._initial_epoch = epoch
