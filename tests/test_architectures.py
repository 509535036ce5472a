"""Real architectures with the callback at its defaults: keras.applications ResNet50,
MobileNetV2 and EfficientNetB0 (weights=None, 32x32 inputs) and a small Transformer
encoder (Embedding with sparse gradients, MultiHeadAttention, LayerNormalization,
Dropout). A few steps each: every metric finite after the first step, one per-variable
row per trainable variable named by its path, and training itself unchanged (weights
and BatchNorm moving statistics as after a plain fit on the same batches)."""

import keras
import numpy as np
import pytest

import optinsight as oi

STEPS, BATCH = 3, 4


def transformer(vocabulary=50, length=12, width=16):
    tokens = keras.Input((length,), dtype="int32")
    h = keras.layers.Embedding(vocabulary, width)(tokens)
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(h, h)
    h = keras.layers.LayerNormalization()(h + keras.layers.Dropout(0.1)(attention))
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(width)(
        keras.layers.Dense(32, activation="gelu")(h)))
    out = keras.layers.Dense(10, activation="softmax")(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(tokens, out)


BUILDERS = {
    "ResNet50": lambda: keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3),
                                                    classes=10),
    "MobileNetV2": lambda: keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3),
                                                          classes=10),
    "EfficientNetB0": lambda: keras.applications.EfficientNetB0(
        weights=None, input_shape=(32, 32, 3), classes=10),
    "transformer": transformer,
}


def data(name):
    rng = np.random.default_rng(0)
    n = STEPS * BATCH
    if name == "transformer":
        x = rng.integers(0, 30, (n, 12)).astype("int32")  # ids 30..49 never used
    else:
        x = rng.random((n, 32, 32, 3), dtype=np.float32)
    return x, keras.utils.to_categorical(rng.integers(0, 10, n), 10)


def fit(model, x, y, callbacks=()):
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=list(callbacks))
    return model


@pytest.mark.parametrize("name", list(BUILDERS))
def test_real_architecture(tmp_path, name):
    x, y = data(name)
    models = []
    for callbacks in ((), [oi.OptimizationInsightCallback(tmp_path)]):
        keras.utils.set_random_seed(0)  # same weights, same dropout masks
        models.append(fit(BUILDERS[name](), x, y, callbacks))
    plain, instrumented = models

    run = oi.read_log(tmp_path)
    paths = [v.path for v in instrumented.trainable_variables]
    assert run.variables == paths
    assert run.steps["step"].tolist() == list(range(1, STEPS + 1))
    assert np.isfinite(run.steps.iloc[1:].drop(columns=["epoch", "batch"]).to_numpy(float)).all()
    for key in ("grad_norm", "update_ratio", "no_zero_e5_grad_retained",
                "fraction_grad_flipped_e7_09avg", "w_diff_0_0_e5_max"):
        frame = run.key(key)
        assert frame["step"].tolist() == list(range(1, STEPS + 1))
        assert np.isfinite(frame.iloc[1:].to_numpy(float)).all(), key
    assert (run.key("grad_norm").iloc[:, 1:] > 0).to_numpy().any()
    if name == "transformer":  # rows 30..49 of the embedding never get a gradient
        embedding = next(p for p in paths if "embedding" in p)
        assert (run.layer(embedding)["no_zero_e7_grad2"] >= 20 * 16).all()
    # Training is the plain fit's: weights and BatchNorm moving statistics.
    for a, b in zip(plain.weights, instrumented.weights):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6,
                                   err_msg=a.path)
