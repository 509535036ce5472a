"""Cockpit's instruments recorded in `fit` (issue 30): each recorded value against a
brute-force computation at the weights of its step, on the batch of its step."""

import json
import os

import keras
import numpy as np
import pytest
from conftest import loop_gradients

import optinsight as oi
from optinsight import instruments


class WeightsBeforeEachStep(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []  # the model's weights before step t (t = 1, 2, ...) at t - 1

    def on_train_batch_begin(self, batch, logs=None):
        self.weights.append([np.array(w) for w in self.model.get_weights()])

    def on_train_end(self, logs=None):
        self.weights.append([np.array(w) for w in self.model.get_weights()])


def loop_losses(model, x, y):
    return np.array([float(model.compute_loss(x=x[i:i + 1], y=y[i:i + 1],
                                              y_pred=model(x[i:i + 1], training=False)))
                     for i in range(len(x))])


def alpha_by_definition(start, end, model, batches):
    """Cockpit's Alpha of the step from weights `start` to `end`, by weighted least
    squares written out: the losses and slopes along the step of batch 0 at `start`
    and of batch 1 at `end`."""
    observations = []
    for weights, (x, y) in zip((start, end), batches):
        model.set_weights(weights)
        losses, gradients = loop_losses(model, x, y), loop_gradients(model, x, y)
        observations.append((losses, gradients))
    d = np.concatenate([np.ravel(b - a) for a, b in zip(start, end)]).astype(np.float64)
    t = np.linalg.norm(d)
    slopes = [g @ d / t for _, g in observations]
    f = [losses.mean() for losses, _ in observations]
    df = [s.mean() for s in slopes]
    variances = [losses.var(ddof=1) for losses, _ in observations] + [s.var(ddof=1)
                                                                       for s in slopes]
    phi = np.array([[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]])
    root = 1 / np.sqrt(variances)
    mu = np.linalg.lstsq(phi * root[:, None], np.array(f + df) * root, rcond=None)[0]
    return -1.0 if mu[2] < 0 else 2 * t / (-mu[1] / mu[2]) - 1


@pytest.mark.parametrize("every,optimizer,preset,own_pass", [
    (1, "sgd", "full", False), (3, "adam", "full", True), (1, "sgd", "economy", False),
    (1, "sgd", "business", True),
])
def test_recorded_instruments_equal_their_definition_at_each_step(tmp_path, every, optimizer,
                                                                 preset, own_pass):
    """Dense layers only: from the training pass itself (the TIC on its tape); with a
    LayerNormalization: from a pass of the tracker's own at w_t."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, 64)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu")]
                             + [keras.layers.LayerNormalization()] * own_pass
                             + [keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(0.2) if optimizer == "sgd"
                  else keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    seen = WeightsBeforeEachStep()
    callback = oi.OptimizationInsightCallback(tmp_path, instruments=preset,
                                              instrument_freq=every)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
              callbacks=[seen, callback])
    tracker = callback.recorder.instrument_tracker
    assert (tracker.training_pass_layers() is None) == own_pass
    with open(os.path.join(tmp_path, "instruments.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(every, 9, every))
    batch = lambda step: (x[(step - 1) % 4 * 16:][:16], y[(step - 1) % 4 * 16:][:16])  # noqa
    initial = seen.weights[0]
    names = [v.path for v in model.trainable_variables]
    for record in records:
        step = record["step"]
        assert (record["epoch"], record["batch"]) == ((step - 1) // 4, (step - 1) % 4)
        weights = seen.weights[step - 1]
        model.set_weights(weights)
        expected = instruments.compute(model, *batch(step))
        got = record["instruments"]
        for name in [n for n in instruments.NAMES if n in got]:
            if expected[name] is None:
                assert got[name] is None, name
            else:
                assert got[name] == pytest.approx(expected[name], rel=1e-5), name
        distances = {n: np.linalg.norm(w - w0) for n, w, w0 in zip(names, weights, initial)}
        assert record["distance"] == pytest.approx(distances, rel=1e-5)
        assert got["distance"] == pytest.approx(
            np.sqrt(sum(v**2 for v in distances.values())), rel=1e-5)
        if preset == "full":  # GradHist2d: every g_nj against w_j, binned as by numpy
            gradients = loop_gradients(model, *batch(step))
            values = np.concatenate([np.ravel(w) for w in weights])
            (g_lo, g_hi), (w_lo, w_hi) = (-1, 1), (-2, 2)
            g = np.clip(gradients, g_lo + 1 / 40, g_hi - 1 / 40).ravel()
            w = np.tile(np.clip(values, w_lo + 2 / 50, w_hi - 2 / 50), len(gradients))
            expected, _, _ = np.histogram2d(g, w, bins=(40, 50),
                                            range=((g_lo, g_hi), (w_lo, w_hi)))
            counts = np.zeros((40, 50))
            for i, j, count in record["grad_hist_2d"]["cells"]:
                counts[i, j] = count
            # entries within round-off of a bin edge may fall on either side
            assert counts.sum() == expected.sum() == gradients.size
            assert np.abs(counts - expected).sum() <= 4  # two entries at most
        if step == 8:  # no next step: no end of its fit
            assert got["alpha"] is None
        else:
            assert got["alpha"] == pytest.approx(alpha_by_definition(
                weights, seen.weights[step], model, [batch(step), batch(step + 1)]),
                rel=1e-4, abs=1e-6), step
    run = oi.read_log(tmp_path)
    assert list(run.instruments["step"]) == [r["step"] for r in records]
    assert [s for s, _, _ in run.gradient_parameter_histograms()] == (
        [r["step"] for r in records] if preset == "full" else [])
    assert run.instruments["norm_test"].tolist() == pytest.approx(
        [r["instruments"]["norm_test"] for r in records])


def small_run(tmp_path, seed=1, **options):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(48, 5)).astype("float32")
    y = rng.integers(0, 2, 48)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="relu"),
                              keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=options.pop("jit_compile", False))
    return model, x, y


@pytest.mark.parametrize("names", [["norm_test"], ["distance"], ["alpha"]])
def test_any_subset_of_instruments_records_only_those(tmp_path, names):
    model, x, y = small_run(tmp_path)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
        oi.OptimizationInsightCallback(tmp_path, instruments=names)])
    frame = oi.read_log(tmp_path).instruments
    assert list(frame["step"]) == [1, 2, 3]
    assert [c for c in frame.columns if "/" not in c] == ["step", "epoch", "batch", *names]


def test_xla_a_dataset_and_a_resume_record_the_same_as_one_plain_fit(tmp_path):
    """jit_compile=True, a tf.data pipeline of unknown length, and a run interrupted
    after its first epoch and resumed: distance still counts from the first weights."""
    import tensorflow as tf

    model, x, y = small_run(tmp_path)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False, callbacks=[
        oi.OptimizationInsightCallback(tmp_path / "plain", instruments="economy")])
    expected = oi.read_log(tmp_path / "plain").instruments

    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).filter(lambda a, b: True)
    model, _, _ = small_run(tmp_path, jit_compile=True)
    log_dir = tmp_path / "resumed"
    model.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[
        oi.OptimizationInsightCallback(log_dir, instruments="economy")])
    model, _, _ = small_run(tmp_path, seed=2, jit_compile=True)  # weights from the checkpoint
    model.fit(data, epochs=2, initial_epoch=1, verbose=0, shuffle=False, callbacks=[
        oi.OptimizationInsightCallback(log_dir, instruments="economy", resume=True)])
    got = oi.read_log(log_dir).instruments
    assert list(got["step"]) == list(expected["step"]) == list(range(1, 7))
    assert len(got.columns) == len(expected.columns)  # variables named by each model
    for column, (_, ours), (_, theirs) in zip(expected.columns, got.items(), expected.items()):
        if column == "alpha":  # the last step before the interruption waited for its end
            assert np.isnan(ours[2]) and not np.isnan(theirs[2])
            keep = [0, 1, 3, 4, 5]
            np.testing.assert_allclose(ours[keep], theirs[keep], rtol=1e-4)
        else:
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7, err_msg=column)


def test_a_custom_loop_passes_the_batch_or_hears_why(tmp_path):
    import tensorflow as tf

    model, x, y = small_run(tmp_path)
    optimizer = model.optimizer
    with oi.InsightRecorder(tmp_path, model, optimizer, instruments=["norm_test"]) as rec:
        @tf.function
        def step(xb, yb, with_targets):
            with tf.GradientTape() as tape:
                loss = model.compute_loss(x=xb, y=yb, y_pred=model(xb, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            rec.apply_gradients(zip(grads, model.trainable_variables), loss=loss,
                                inputs=xb, targets=yb if with_targets else None)

        for i in range(3):
            step(x[16 * i:16 * i + 16], y[16 * i:16 * i + 16], True)
            rec.batch_end()
        rec.epoch_end()
        with pytest.raises(ValueError, match="pass inputs= and targets="):
            step(x[:16], y[:16], False)
    frame = oi.read_log(tmp_path).instruments
    assert list(frame["step"]) == [1, 2, 3] and frame["norm_test"].notna().all()


def test_a_custom_loop_gives_its_own_pass_with_its_tape_for_the_tic(tmp_path):
    import tensorflow as tf

    from optinsight import per_example

    model, x, y = small_run(tmp_path)
    with oi.InsightRecorder(tmp_path, model, model.optimizer,
                            instruments=["tic_trace", "norm_test"]) as rec:
        layers = rec.training_pass_layers()
        assert layers is not None

        @tf.function
        def step(xb, yb, give_tape):
            with tf.GradientTape(persistent=True) as tape, \
                    per_example.recording(layers) as records:
                outputs = model(xb, training=True)
                loss = model.compute_loss(x=xb, y=yb, y_pred=outputs)
            zs = [z for layer in layers for _, z in records[layer]]
            grads = tape.gradient(loss, model.trainable_variables + zs)
            n = len(model.trainable_variables)
            rec.apply_gradients(zip(grads[:n], model.trainable_variables), loss=loss,
                                inputs=xb, targets=yb, training_pass=(
                                    records, grads[n:], outputs, *[tape] * give_tape))

        weights = model.get_weights()
        step(x[:16], y[:16], True)
        rec.batch_end()
        with pytest.raises(ValueError, match="needs its tape"):
            step(x[:16], y[:16], False)
    got = oi.read_log(tmp_path).instruments
    model.set_weights(weights)
    expected = instruments.compute(model, x[:16], y[:16], names=["tic_trace", "norm_test"])
    assert got["tic_trace"].iloc[0] == pytest.approx(expected["tic_trace"], rel=1e-5)
    assert got["norm_test"].iloc[0] == pytest.approx(expected["norm_test"], rel=1e-5)


@pytest.mark.parametrize("at_minimum", [True, False])
def test_the_batch_size_and_stopping_findings(tmp_path, at_minimum):
    """A linear regression at its least-squares minimum (every batch gradient is noise)
    is told its batch is too small and that its gradients hold no more information;
    the same far from its minimum is told neither. Half of the inputs are always zero
    (as an image's border): their weights' gradients are zero, as in Cockpit's EB."""
    rng = np.random.default_rng(3)
    n = 1280
    x = np.concatenate([rng.normal(size=(n, 10)), np.zeros((n, 10))], 1).astype("float32")
    y = (x[:, :10] @ rng.normal(3, 1, 10) + rng.normal(size=n)).astype("float32")
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(1e-4), loss="mse")
    if at_minimum:
        solution = np.linalg.lstsq(np.c_[x, np.ones(n)], y, rcond=None)[0]
        model.set_weights([solution[:-1, None], solution[-1:]])
    else:
        model.set_weights([np.zeros((20, 1)), np.zeros(1)])
    model.fit(x, y[:, None], batch_size=32, epochs=1, verbose=0, callbacks=[
        oi.OptimizationInsightCallback(tmp_path, instruments="full", diagnosis=False)])
    codes = {f.code for f in oi.diagnose(tmp_path)}
    found = {"batch_too_small", "no_information_left"} & codes
    assert found == ({"batch_too_small", "no_information_left"} if at_minimum else set())


def test_instruments_switched_on_at_a_resume_count_distance_from_there(tmp_path):
    model, x, y = small_run(tmp_path)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False,
              callbacks=[oi.OptimizationInsightCallback(tmp_path)])
    model, _, _ = small_run(tmp_path, seed=2)
    model.fit(x, y, batch_size=16, epochs=2, initial_epoch=1, verbose=0, shuffle=False,
              callbacks=[oi.OptimizationInsightCallback(tmp_path, resume=True,
                                                        instruments=["distance"])])
    frame = oi.read_log(tmp_path).instruments
    assert list(frame["step"]) == [4, 5, 6] and frame["distance"].iloc[0] == 0
    assert (frame["distance"].iloc[1:] > 0).all()


@pytest.mark.parametrize("preset,pooled", [("economy", False), ("full", False),
                                           ("business", True)])
def test_recording_the_instruments_changes_nothing_in_training(tmp_path, preset, pooled):
    """Batch normalisation takes the instruments' own pass at the step's starting
    weights (put back, then restored); a CNN's training pass goes through the TIC's
    max pooling (its first backward pass TensorFlow's own): the trained weights are
    those of a fit without them, bit for bit."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, size=(96, 6, 6, 1)).astype("float32")  # ties in the pools
    y = rng.integers(0, 3, 96)
    if pooled:
        layers = [keras.layers.Conv2D(3, 2), keras.layers.MaxPooling2D(2),
                  keras.layers.Flatten(), keras.layers.Dense(3)]
    else:
        layers = [keras.layers.Flatten(), keras.layers.Dense(8),
                  keras.layers.BatchNormalization(), keras.layers.Activation("relu"),
                  keras.layers.Dense(3)]

    def trained(**options):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6, 6, 1)), *[layer.from_config(
            layer.get_config()) for layer in layers]])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.
                      SparseCategoricalCrossentropy(from_logits=True))
        callback = oi.OptimizationInsightCallback(tmp_path / str(len(options)), **options)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
                  callbacks=[callback])
        if options:
            routed = callback.recorder.training_pass_layers() or []
            assert (model.layers[1] in routed) == pooled
        return model.get_weights()

    for plain, recorded in zip(trained(), trained(instruments=preset, instrument_freq=3)):
        np.testing.assert_array_equal(plain, recorded)


def test_under_mixed_precision_the_instruments_are_those_of_the_float32_model(tmp_path):
    """mixed_float16 (float16 layers, the loss scaled by the optimizer): the instruments
    of the first step equal `instruments.compute` on a float32 copy at the same weights,
    to float16's precision; the loss scale (2**15) must not reach them (cabs and the
    TIC would carry it)."""
    rng = np.random.default_rng(0)
    x = rng.random((16, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 3, 16)

    def cnn(policy):
        keras.config.set_dtype_policy(policy)
        try:
            keras.utils.set_random_seed(1)
            model = keras.Sequential([
                keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                keras.layers.MaxPooling2D(2), keras.layers.Flatten(),
                keras.layers.Dense(3, dtype="float32")])
        finally:
            keras.config.set_dtype_policy("float32")
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.
                      SparseCategoricalCrossentropy(from_logits=True))
        return model

    mixed, exact = cnn("mixed_float16"), cnn("float32")
    exact.set_weights(mixed.get_weights())
    want = instruments.compute(exact, x, y)
    mixed.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
        oi.OptimizationInsightCallback(tmp_path, instruments="full")])
    assert type(mixed.optimizer).__name__ == "LossScaleOptimizer"
    recorded = oi.read_log(tmp_path).instruments.iloc[0]
    assert recorded["step"] == 1
    for name, value in want.items():
        assert recorded[name] == pytest.approx(value, rel=2e-3), name


def test_under_xla_a_pooled_cnn_records_what_compute_gives(tmp_path):
    """jit_compile=True: the TIC's backward passes route through max pooling by the
    mask (XLA has no MaxPoolGradWithArgmax), take the second convolution's input
    gradient as a forward convolution, and its square sums without the native op; the
    first step's instruments equal `instruments.compute` (native, outside XLA) at the
    same weights."""
    rng = np.random.default_rng(0)
    x = rng.random((16, 10, 10, 1), dtype=np.float32)
    y = rng.integers(0, 3, 16)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((10, 10, 1)), keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.MaxPooling2D(2), keras.layers.Conv2D(4, 2, activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    want = instruments.compute(model, x, y)
    callback = oi.OptimizationInsightCallback(tmp_path, instruments="full")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    assert callback.recorder.jit_compile
    assert model.layers[1] in callback.recorder.training_pass_layers()  # the pool, routed
    recorded = oi.read_log(tmp_path).instruments.iloc[0]
    for name, value in want.items():
        assert recorded[name] == pytest.approx(value, rel=1e-5), name
