"""Cockpit's single-batch instruments (issue 30), each against a brute-force
computation: per-example gradients one example at a time with tf.GradientTape, and the
statistics of each definition written out with numpy (sample variances, projections)."""

import keras
import numpy as np
import pytest
from conftest import loop_gradients

from optinsight import instruments


def by_definition(gradients, loss, lr):
    """Each instrument as its paper states it."""
    b = len(gradients)
    g = gradients.mean(axis=0)
    projections = gradients @ g
    orthogonal = gradients - np.outer(projections / (g @ g), g)
    return {
        "mean_gsnr": np.mean(g**2 / (gradients.var(axis=0) + 1e-5)),
        "norm_test": np.sqrt(np.sum(np.square(gradients - g)) / (b - 1) / b) / np.linalg.norm(g),
        "inner_test": np.sqrt(projections.var(ddof=1) / b) / (g @ g),
        "ortho_test": np.sqrt(np.sum(np.square(orthogonal)) / (b - 1) / b)
        / np.linalg.norm(g),
        "cabs": lr * np.trace(np.cov(gradients.T)) * (b - 1) / (b * loss),
        "early_stopping": 1 - b * np.mean(g**2 / gradients.var(axis=0, ddof=1)),
    }


def model_of(kind):
    """A small model of each layer type the architectures test uses."""
    keras.utils.set_random_seed(0)
    if kind == "mlp":
        layers = [keras.Input((6,)), keras.layers.Dense(8, activation="tanh")]
    elif kind == "cnn":
        layers = [keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, activation="relu"),
                  keras.layers.DepthwiseConv2D(3), keras.layers.BatchNormalization(),
                  keras.layers.Flatten()]
    else:  # a small transformer block on token ids
        tokens = keras.Input((5,), dtype="int32")
        h = keras.layers.Embedding(11, 8)(tokens)
        # no biases: the key bias has a gradient of exactly zero in theory (softmax
        # ignores it), round-off in practice, and early_stopping divides by its variance
        attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, use_bias=False)
        h = keras.layers.LayerNormalization()(h + attention(h, h))
        h = keras.layers.GlobalAveragePooling1D()(h)
        return keras.Model(tokens, keras.layers.Dense(3, activation="softmax")(h))
    return keras.Sequential(layers + [keras.layers.Dense(3, activation="softmax")])


def batch_of(model, rng, n):
    if model.input_shape[1:] == (5,):
        return rng.integers(0, 11, size=(n, 5)).astype("int32")
    return rng.normal(size=(n, *model.input_shape[1:])).astype("float32")


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_every_instrument_equals_its_definition(kind):
    """Dense, Conv2D, DepthwiseConv2D, BatchNormalization, Embedding,
    MultiHeadAttention and LayerNormalization, to 1e-5 relative."""
    rng = np.random.default_rng(1)
    model = model_of(kind)
    x = batch_of(model, rng, 16)
    y = keras.utils.to_categorical(rng.integers(0, 3, 16), 3)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="categorical_crossentropy")
    gradients = loop_gradients(model, x, y)
    loss = float(model.compute_loss(x=x, y=y, y_pred=model(x, training=False)))
    expected = by_definition(gradients, loss, 0.05)
    got = instruments.compute(model, x, y)
    assert set(got) == set(instruments.NAMES) == set(expected)
    for name in instruments.NAMES:
        assert got[name] == pytest.approx(expected[name], rel=1e-5), name
    assert instruments.compute(model, x, y, names=["norm_test"]) == {
        "norm_test": got["norm_test"]}


def test_cabs_and_early_stopping_are_for_plain_sgd_only():
    rng = np.random.default_rng(2)
    model = model_of("mlp")
    x = batch_of(model, rng, 8)
    y = keras.utils.to_categorical(rng.integers(0, 3, 8), 3)
    for optimizer in (keras.optimizers.Adam(1e-3), keras.optimizers.SGD(0.1, momentum=0.9)):
        model.compile(optimizer=optimizer, loss="categorical_crossentropy")
        got = instruments.compute(model, x, y)
        assert got["cabs"] is None and got["early_stopping"] is None
        assert np.isfinite(got["norm_test"])
    with pytest.raises(ValueError, match="unknown instrument 'alpha'"):
        instruments.compute(model, x, y, names=["alpha"])
