"""The diagnosis names the cause a run really has (issue 27): each case is a real short
training run with the problem, or a healthy one that must raise no error."""

import keras
import numpy as np
import tensorflow as tf
from conftest import tiny_data, tiny_relu_model

import optinsight as oi


def _blobs(n=512, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 20)).astype("float32")
    y = keras.utils.to_categorical((x[:, 0] > 0).astype(int) + (x[:, 1] > 0), 3)
    return x, y


def _mlp(depth, activation):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((20,))]
                            + [keras.layers.Dense(32, activation=activation)
                               for _ in range(depth)]
                            + [keras.layers.Dense(3, activation="softmax")])


def _diagnosed(model, log_dir, x, y, epochs=3, batch_size=32):
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[
        oi.OptimizationInsightCallback(log_dir, diagnosis=False, histogram_freq=0)])
    return oi.diagnose(log_dir)


def test_vanishing_gradients_through_sigmoids_are_not_dead_relus(tmp_path):
    """A 12-layer sigmoid MLP whose first-layer gradients vanish: the first finding is
    vanishing_gradients with advice for saturating activations; nothing speaks of
    ReLUs that never fire (the first findings were dead_layer and dead_units)."""
    model = _mlp(12, "sigmoid")
    model.compile(keras.optimizers.SGD(0.05), "categorical_crossentropy")
    findings = _diagnosed(model, tmp_path, *_blobs())
    assert findings[0].code == "vanishing_gradients" and findings[0].severity == "error"
    assert findings[0].layer == model.layers[0].kernel.path
    assert "sigmoid" in findings[0].evidence and "ReLU-family" in findings[0].advice
    assert not [f for f in findings if f.code in ("dead_layer", "dead_units")]
    assert not [f for f in findings if "ReLU" in f.advice and "never" in f.advice]
    assert oi.read_log(tmp_path).summary["meta"]["activations"][
        model.layers[0].kernel.path] == "sigmoid"


def test_mixed_precision_loss_scale_skips_are_not_errors(tmp_path):
    """A healthy mixed_float16 regression whose dynamic loss scale skips its first
    overflowing steps, by design: no nonfinite error (every such run had one)."""
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(32, "relu"),
                                  keras.layers.Dense(1, dtype="float32")])
    finally:
        keras.config.set_dtype_policy("float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = np.random.default_rng(0).normal(size=(256, 6)).astype("float32") * 30
    y = (x.sum(1, keepdims=True) * 10).astype("float32")
    findings = _diagnosed(model, tmp_path, x, y, epochs=4, batch_size=8)
    steps = oi.read_log(tmp_path).steps
    loss = steps["train_loss"]
    assert loss.iloc[-32:].median() < 0.1 * loss.iloc[:8].median()  # it learns
    assert steps["skipped"].sum() > 0 and steps["nonfinite_grads"].sum() > 0
    assert not [f for f in findings if f.severity == "error"], findings


def test_a_custom_loop_without_the_loss_has_no_nonfinite_finding(tmp_path):
    """`loss=` is optional in rec.apply_gradients: a null train_loss is 'not recorded',
    not NaN (it gave ERROR nonfinite [None] at every epoch end)."""
    x, y = tiny_data(n=64)
    model, optimizer = tiny_relu_model(), keras.optimizers.SGD(0.1)
    loss_fn = keras.losses.CategoricalCrossentropy()
    rec = oi.InsightRecorder(tmp_path, model, optimizer, histogram_freq=0)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        rec.apply_gradients(zip(grads, model.trainable_variables))

    with rec:
        for epoch in range(2):
            for i in range(0, 64, 16):
                train_step(x[i:i + 16], y[i:i + 16])
                rec.batch_end()
            rec.epoch_end(epoch)
    assert oi.read_log(tmp_path).steps["train_loss"].isna().all()
    assert not [f for f in oi.diagnose(tmp_path) if f.code == "nonfinite"]
