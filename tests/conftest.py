"""Shared test set-up: quiet TensorFlow, deterministic seeds, tiny models and data."""

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


@contextlib.contextmanager
def float64():
    """New layers and compiled losses in float64 inside, float32 after: floatx and the
    dtype policy, which Keras otherwise takes from floatx once, at its first layer, and
    keeps (a float64 first test would leave every later model in float64)."""
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")


def tiny_relu_model(model_class=keras.Model, inputs=6, hidden=8, classes=3):
    """Dense-ReLU-Dense-softmax with units that start dead (exact-zero gradients)."""
    keras.utils.set_random_seed(1)
    x_in = keras.Input((inputs,))
    h = keras.layers.Dense(hidden, activation="relu", name="hidden",
                           bias_initializer=keras.initializers.Constant(
                               [-5.0, -5.0] + [0.1] * (hidden - 2)))(x_in)
    out = keras.layers.Dense(classes, activation="softmax", name="out")(h)
    return model_class(inputs=x_in, outputs=out)


def tiny_data(n=96, inputs=6, classes=3, seed=0, block=12):
    """Features with two near-zero columns, so kernel gradients land in the zero band
    with changing signs (flips), a third column near zero only in every other block
    of `block` rows (gradients enter and leave the band), and one-hot labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, inputs)).astype("float32")
    x[:, 0] *= 1e-7
    x[:, 1] *= 3e-6
    x[(np.arange(n) // block) % 2 == 0, 2] *= 1e-8
    y = keras.utils.to_categorical(rng.integers(0, classes, n), classes)
    return x, y.astype("float32")


def step_records(log_dir):
    """Each step's metrics as {"step", "epoch", "batch", "model": {key: v}, "layers":
    {variable: {key: v}}} (counts int, nulls None), read back through `read_log`."""
    import optinsight as oi
    from optinsight.metrics import count_keys

    run = oi.read_log(log_dir)
    meta = run.summary["meta"]
    counts = count_keys(meta["thresholds"], meta["ema_decay"])

    def plain(row):
        return {k: None if v != v else (int(v) if k in counts else float(v))
                for k, v in row.items() if k not in ("step", "epoch", "batch")}

    layers = {name: run.layer(name).to_dict("records") for name in run.variables}
    records = []
    for i, row in enumerate(run.steps.to_dict("records")):
        records.append({
            "step": int(row["step"]), "epoch": int(row["epoch"]), "batch": int(row["batch"]),
            "model": plain(row),
            "layers": {name: plain(rows[i]) for name, rows in layers.items()}})
        assert all(rows[i]["step"] == row["step"] for rows in layers.values())
    return records


def mixed_precision_regression(optimizer, n=256):
    """A small mixed_float16 regression on unscaled targets (about 700), whose dynamic
    loss scale overflows and skips its first steps: (compiled model, x, y)."""
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(32, "relu"),
                                  keras.layers.Dense(1, dtype="float32")])
    finally:
        keras.config.set_dtype_policy("float32")
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(0).normal(size=(n, 6)).astype("float32") * 30
    return model, x, (x.sum(1, keepdims=True) * 10).astype("float32")


def loop_gradients(model, x, y):
    """Per-example gradients of the compiled loss, one example at a time with
    tf.GradientTape (training=False): float64 [n, n_params] (sparse ones densified)."""
    import tensorflow as tf

    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x[i:i + 1], y=y[i:i + 1],
                                      y_pred=model(x[i:i + 1], training=False))
        grads = tape.gradient(loss, model.trainable_variables)  # Embedding: sparse rows
        rows.append(np.concatenate([np.ravel(tf.convert_to_tensor(g)) for g in grads])
                    .astype(np.float64))
    return np.array(rows)
