"""InsightRecorder in custom training loops: the same numbers as the callback, two
recorders side by side (a GAN), close on an exception, resume, and the gradient the
optimizer really applies (loss scaling removed before the scale moves, clipping)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import step_records, tiny_data, tiny_relu_model

import optinsight as oi


def custom_loop(log_dir, model, optimizer, x, y, epochs, batch_size=16, resume=False,
                **options):
    """The README's custom loop; returns the recorder."""
    loss_fn = keras.losses.CategoricalCrossentropy()
    rec = oi.InsightRecorder(log_dir, model, optimizer, resume=resume, **options)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        rec.apply_gradients(zip(grads, model.trainable_variables), loss=loss)
        return loss

    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    with rec:
        for epoch in range(rec.initial_epoch, epochs):
            losses = []
            for xb, yb in data:
                losses.append(float(train_step(xb, yb)))
                rec.batch_end()
            rec.epoch_end(epoch, {"loss": float(np.mean(losses))})
    return rec


def assert_same_records(a, b, rtol=1e-5):
    """Same steps, epochs and nulls; numbers equal within rtol (counts exactly)."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]

    def numbers(record):
        values = list(record["model"].items()) + [
            (f"{name}/{k}", v) for name, layer in record["layers"].items()
            for k, v in layer.items()]
        return [(k, np.nan if v is None else v) for k, v in values]

    for ra, rb in zip(a, b):
        (ka, va), (kb, vb) = zip(*numbers(ra)), zip(*numbers(rb))
        assert ka == kb
        np.testing.assert_allclose(va, vb, rtol=rtol, atol=1e-7, equal_nan=True,
                                   err_msg=f"step {ra['step']}")


def test_custom_loop_records_what_fit_records(tmp_path):
    x, y = tiny_data(n=64)
    fitted = tiny_relu_model()
    fitted.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                   loss="categorical_crossentropy")
    fitted.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
               callbacks=[oi.OptimizationInsightCallback(tmp_path / "fit", histogram_freq=3)])
    looped = tiny_relu_model()
    custom_loop(tmp_path / "loop", looped, keras.optimizers.SGD(0.1, momentum=0.9), x, y,
                epochs=2, histogram_freq=3)
    a, b = step_records(tmp_path / "loop"), step_records(tmp_path / "fit")
    assert len(a) == 8 and a[0]["model"]["train_loss"] > 0
    assert_same_records(a, b)
    for w1, w2 in zip(looped.get_weights(), fitted.get_weights()):
        np.testing.assert_allclose(w1, w2, rtol=1e-5, atol=1e-7)
    ha, hb = oi.read_log(tmp_path / "loop"), oi.read_log(tmp_path / "fit")
    assert [h["step"] for h in ha.histograms()] == [3, 6]
    assert ha.histograms() == hb.histograms()
    assert ha.epochs["train_mean_loss"].notna().all()
    assert (tmp_path / "loop" / "signs" / "epoch_0001.npz").exists()


def test_histograms_wait_on_the_device_for_the_rows_read(tmp_path, monkeypatch):
    """Every step's histograms are written, read from the device with the rows (not
    at each histogram step, which would wait for that step to finish), and the same
    as read one at a time when the ring buffer of histograms may not grow that far."""
    from optinsight import recorder
    from optinsight.dynamics import DynamicsTracker

    monkeypatch.setattr(recorder, "READ_EVERY_SECONDS", 1e9)  # reads every 32 steps only
    reads = []
    read_histograms = DynamicsTracker.read_histograms
    monkeypatch.setattr(DynamicsTracker, "read_histograms",
                        lambda self, after: reads.append(after) or read_histograms(self, after))
    x, y = tiny_data(n=160)
    logs = []
    for budget in (recorder.HISTOGRAM_BUFFER_BYTES, 0):
        monkeypatch.setattr(recorder, "HISTOGRAM_BUFFER_BYTES", budget)
        reads.clear()
        model = tiny_relu_model()
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[
            oi.OptimizationInsightCallback(tmp_path / str(budget), histogram_freq=1)])
        logs.append(oi.read_log(tmp_path / str(budget)).histograms())
        assert [h["step"] for h in logs[-1]] == list(range(1, 41))
        assert len(reads) <= 3 if budget else len(reads) >= 40
    assert logs[0] == logs[1]


def test_two_recorders_side_by_side_record_their_own_gradients(tmp_path):
    """A GAN: generator and discriminator, each with its optimizer and log dir. Each
    recorder's grad_norm and wdiff equal the gradients and weight changes computed
    here, step by step."""
    keras.utils.set_random_seed(3)
    gen = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                            keras.layers.Dense(6)], name="generator")
    disc = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(1)], name="discriminator")
    g_opt, d_opt = keras.optimizers.Adam(1e-2), keras.optimizers.SGD(0.05)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    real = np.random.default_rng(0).normal(1.0, 0.5, size=(64, 6)).astype("float32")
    noise = np.random.default_rng(1).normal(size=(64, 4)).astype("float32")
    g_rec = oi.InsightRecorder(tmp_path / "gen", gen, g_opt, histogram_freq=0)
    d_rec = oi.InsightRecorder(tmp_path / "disc", disc, d_opt, histogram_freq=0)
    seen = {"gen": [], "disc": []}  # per step: {path: (|g|, |Δw|)}

    def step(xr, z):  # eager, so that the gradients can be kept for the check
        with tf.GradientTape() as tape:
            fake = gen(z, training=True)
            d_loss = bce(tf.ones((len(xr), 1)), disc(xr)) + bce(tf.zeros((len(z), 1)),
                                                                 disc(fake))
        d_grads = tape.gradient(d_loss, disc.trainable_variables)
        before = [v.numpy() for v in disc.trainable_variables]
        d_rec.apply_gradients(zip(d_grads, disc.trainable_variables), loss=d_loss)
        seen["disc"].append({v.path: (np.linalg.norm(g), np.linalg.norm(v.numpy() - b))
                             for g, v, b in zip(d_grads, disc.trainable_variables, before)})
        with tf.GradientTape() as tape:
            g_loss = bce(tf.ones((len(z), 1)), disc(gen(z, training=True)))
        g_grads = tape.gradient(g_loss, gen.trainable_variables)
        before = [v.numpy() for v in gen.trainable_variables]
        g_rec.apply_gradients(zip(g_grads, gen.trainable_variables), loss=g_loss)
        seen["gen"].append({v.path: (np.linalg.norm(g), np.linalg.norm(v.numpy() - b))
                            for g, v, b in zip(g_grads, gen.trainable_variables, before)})

    with g_rec, d_rec:
        for epoch in range(2):
            for i in range(0, 64, 16):
                step(real[i:i + 16], noise[i:i + 16])
                g_rec.batch_end()
                d_rec.batch_end()
            g_rec.epoch_end(epoch)
            d_rec.epoch_end(epoch)
    for name, model in (("gen", gen), ("disc", disc)):
        run = oi.read_log(tmp_path / name)
        assert run.variables == [v.path for v in model.trainable_variables]
        assert run.steps["step"].tolist() == list(range(1, 9))
        for path in run.variables:
            layer = run.layer(path)
            np.testing.assert_allclose(layer["grad_norm"], [s[path][0] for s in seen[name]],
                                       rtol=1e-5)
            np.testing.assert_allclose(layer["wdiff"], [s[path][1] for s in seen[name]],
                                       rtol=1e-4, atol=1e-9)


def test_an_exception_in_the_loop_keeps_every_step_trained(tmp_path):
    x, y = tiny_data(n=64)
    model = tiny_relu_model()
    rec = oi.InsightRecorder(tmp_path, model, keras.optimizers.SGD(0.1))
    loss_fn = keras.losses.CategoricalCrossentropy()
    with pytest.raises(KeyboardInterrupt):
        with rec:
            for i in range(0, 64, 8):
                with tf.GradientTape() as tape:
                    loss = loss_fn(y[i:i + 8], model(x[i:i + 8]))
                rec.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                        model.trainable_variables), loss=loss)
                rec.batch_end()
                if i == 40:
                    raise KeyboardInterrupt
    assert [r["step"] for r in step_records(tmp_path)] == list(range(1, 7))


def test_resumed_custom_loop_continues_like_an_uninterrupted_one(tmp_path):
    """Adam's state is not the model's (a custom loop's optimizer): the checkpoint
    holds it, so the resumed run's steps equal the uninterrupted run's."""
    x, y = tiny_data(n=64)
    custom_loop(tmp_path / "whole", tiny_relu_model(), keras.optimizers.Adam(1e-2), x, y,
                epochs=4)
    custom_loop(tmp_path / "split", tiny_relu_model(), keras.optimizers.Adam(1e-2), x, y,
                epochs=2)
    rec = custom_loop(tmp_path / "split", tiny_relu_model(), keras.optimizers.Adam(1e-2),
                      x, y, epochs=4, resume=True)
    assert rec.initial_epoch == 2 and rec.step == 16
    assert_same_records(step_records(tmp_path / "split"), step_records(tmp_path / "whole"))
    with pytest.raises(ValueError, match="count epochs from recorder.initial_epoch"):
        oi.InsightRecorder(tmp_path / "split", tiny_relu_model(), keras.optimizers.Adam(1e-2),
                           resume=True).epoch_end(0)


def test_a_variable_the_recorder_does_not_know_is_refused(tmp_path):
    model = tiny_relu_model()
    rec = oi.InsightRecorder(tmp_path, model, keras.optimizers.SGD(0.1))
    stranger = keras.Variable(np.ones(3, "float32"), name="stranger")
    with pytest.raises(ValueError, match="stranger"):
        rec.apply_gradients([(tf.ones(3), stranger)])
    with pytest.raises(ValueError, match="unknown option 'histogram_frequency'"):
        oi.InsightRecorder(tmp_path / "b", model, keras.optimizers.SGD(0.1),
                           histogram_frequency=3)


def _true_gradient_norms(model, x, y):
    loss_fn = keras.losses.CategoricalCrossentropy()
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x))
    return loss_fn, [np.linalg.norm(g) for g in tape.gradient(loss,
                                                               model.trainable_variables)]


@pytest.mark.parametrize("growth_steps", [1, 2])
def test_loss_scaling_is_removed_with_the_scale_the_gradients_carry(tmp_path, growth_steps):
    """LossScaleOptimizer doubles its scale after `growth_steps` finite steps, inside
    apply_gradients: the recorded gradient is the true one at every step."""
    x, y = tiny_data(n=64)
    model = tiny_relu_model()
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=4.0, dynamic_growth_steps=growth_steps)
    rec = oi.InsightRecorder(tmp_path / str(growth_steps), model, optimizer)
    expected = []
    with rec:
        for i in range(0, 64, 16):
            loss_fn, norms = _true_gradient_norms(model, x[i:i + 16], y[i:i + 16])
            expected.append(norms)
            with tf.GradientTape() as tape:
                loss = loss_fn(y[i:i + 16], model(x[i:i + 16]))
                scaled = optimizer.scale_loss(loss)
            rec.apply_gradients(zip(tape.gradient(scaled, model.trainable_variables),
                                    model.trainable_variables), loss=loss)
            rec.batch_end()
        rec.epoch_end()
    assert float(optimizer.dynamic_scale) == 4.0 * 2 ** (4 // growth_steps)
    run = oi.read_log(tmp_path / str(growth_steps))
    for v, name in enumerate(run.variables):
        np.testing.assert_allclose(run.layer(name)["grad_norm"], [n[v] for n in expected],
                                   rtol=1e-5)


@pytest.mark.parametrize("clip", [{"global_clipnorm": 0.05}, {"clipnorm": 0.02},
                                  {"clipvalue": 0.01}])
def test_the_clipped_gradient_is_recorded(tmp_path, clip):
    """With clipping, the recorded gradient is the one SGD applied: Δw = -lr·g; and
    raw_grad_norm is the norm before clipping, computed here from the weights."""
    x, y = tiny_data(n=32)
    model = tiny_relu_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1, **clip), loss="categorical_crossentropy")
    reference, cb = tiny_relu_model(), oi.OptimizationInsightCallback(tmp_path)
    raw = []
    for i in (0, 16):  # the raw gradients of the two steps, from the weights of each
        reference.set_weights(model.get_weights())
        raw.append(_true_gradient_norms(reference, x[i:i + 16], y[i:i + 16])[1])
        model.fit(x[i:i + 16], y[i:i + 16], batch_size=16, epochs=1, shuffle=False,
                  verbose=0, callbacks=[cb])
    steps = step_records(tmp_path)
    for s, norms in zip(steps, raw):
        for name, norm in zip(s["layers"], norms):
            assert s["layers"][name]["raw_grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert s["model"]["raw_grad_norm"] == pytest.approx(np.linalg.norm(norms), rel=1e-5)
        assert s["model"]["raw_grad_norm"] > s["model"]["grad_norm"]
    for s in steps:
        if "global_clipnorm" in clip:
            assert s["model"]["grad_norm"] == pytest.approx(0.05, rel=1e-5)
        for name, layer in s["layers"].items():
            assert layer["wdiff"] == pytest.approx(0.1 * layer["grad_norm"], rel=1e-4), name
            if "clipnorm" in clip:
                assert layer["grad_norm"] <= 0.02 * (1 + 1e-5)
