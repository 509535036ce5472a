"""The diagnosis names the cause a run really has (issue 27): each case is a real short
training run with the problem, or a healthy one that must raise no error."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mixed_precision_regression, tiny_data, tiny_relu_model

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
    model, x, y = mixed_precision_regression(keras.optimizers.Adam(1e-2))
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


def _separable(scale=1.0, n=1024, seed=0):
    """Three well-separated Gaussian blobs in 20 dimensions, inputs times `scale`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    centres = rng.normal(size=(3, 20)) * 2
    x = ((centres[labels] + rng.normal(size=(n, 20))) * scale).astype("float32")
    return x, keras.utils.to_categorical(labels, 3)


def _relu_net(output="softmax", loss="categorical_crossentropy", optimizer=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(3, activation=output)])
    model.compile(optimizer or keras.optimizers.SGD(0.01, momentum=0.9), loss)
    return model


def test_loss_spikes_are_named_before_the_layer_they_kill(tmp_path):
    """Unnormalised inputs (x20), momentum 0.9, batch 4: a step with a gradient 184x
    the weights jumps them, the loss spikes, then the first layer dies. The first
    finding is that jump (exploding_gradients), unstable_loss follows, and dead_layer
    says what caused it (only dead_layer was named). Normalised: no finding."""
    findings = _diagnosed(_relu_net(), tmp_path / "spiky", *_separable(20.0), epochs=4,
                          batch_size=4)
    codes = [f.code for f in findings]
    assert codes[:2] == ["exploding_gradients", "unstable_loss"]
    assert findings[1].caused_by == "exploding_gradients"
    dead = [f for f in findings if f.code == "dead_layer"]
    assert dead and dead[0].caused_by == "exploding_gradients"
    assert dead[0].since > findings[0].since
    assert _diagnosed(_relu_net(), tmp_path / "twin", *_separable(1.0), epochs=4,
                      batch_size=4) == []


def test_labels_that_carry_nothing_are_not_converging(tmp_path):
    """Shuffled labels: the loss stays at ln 3, guessing. The real labels: no finding."""
    x, y = _separable()
    shuffled = y[np.random.default_rng(1).permutation(len(y))]
    findings = _diagnosed(_relu_net(optimizer=keras.optimizers.Adam(1e-3)),
                          tmp_path / "noise", x, shuffled)
    assert [f.code for f in findings] == ["not_converging"]
    assert findings[0].numbers["trivial"] == np.log(3)
    assert _diagnosed(_relu_net(optimizer=keras.optimizers.Adam(1e-3)), tmp_path / "twin",
                      x, y) == []


def test_a_relu_output_under_cross_entropy_is_named_first(tmp_path):
    """Dense(3, activation='relu') as the output under categorical cross-entropy: the
    first finding is improper_output, at step 0, and what follows from it names it as
    its cause (the run ended in nonfinite, with nothing saying why)."""
    x, y = _separable()
    findings = _diagnosed(_relu_net(output="relu"), tmp_path / "relu", x, y)
    assert findings[0].code == "improper_output" and findings[0].severity == "error"
    assert "relu" in findings[0].evidence and "from_logits=True" in findings[0].advice
    assert all(f.caused_by == "improper_output" for f in findings[1:]
               if f.code in ("nonfinite", "not_converging", "dead_layer"))
    logits = _relu_net(output=None, loss=keras.losses.CategoricalCrossentropy(
        from_logits=True))
    assert _diagnosed(logits, tmp_path / "logits", x, y) == []
    again = _relu_net(output="softmax", loss=keras.losses.CategoricalCrossentropy(
        from_logits=True))
    assert [f.code for f in _diagnosed(again, tmp_path / "twice", x, y)] == ["improper_output"]


def test_dying_relus_in_most_layers_are_one_finding(tmp_path):
    """A 34-layer ReLU MLP with dying units in most layers: one dead_units finding
    that says in how many of the 34 layers (there were 34 separate ones)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((20,))]
        + [keras.layers.Dense(128, activation="relu") for _ in range(33)]
        + [keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy")
    findings = _diagnosed(model, tmp_path, *_separable(n=512), epochs=3)
    units = [f for f in findings if f.code == "dead_units"]
    assert len(units) == 1
    assert units[0].numbers["of"] == 34 and units[0].numbers["layers"] >= 3
    assert "of 34 layers" in units[0].evidence


def test_diagnose_json_for_ci_and_notebooks(tmp_path, capsys):
    """`optinsight diagnose --format json`: one object per finding, with the cause
    and the numbers; the exit status as in text."""
    import json

    from optinsight.cli import main as cli

    _diagnosed(_relu_net(), tmp_path, *_separable(20.0), epochs=4, batch_size=4)
    assert cli(["diagnose", str(tmp_path), "--format", "json"]) == 1
    findings = json.loads(capsys.readouterr().out)
    assert [f["code"] for f in findings] == [f.code for f in oi.diagnose(tmp_path)]
    assert set(findings[0]) == {"code", "severity", "layer", "step", "since", "caused_by",
                                "evidence", "advice", "numbers"}
    dead = next(f for f in findings if f["code"] == "dead_layer")
    assert dead["caused_by"] == "exploding_gradients" and dead["numbers"]["fraction"] >= 0.99


def _exponential_stack():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,))] + [
        layer for _ in range(5) for layer in (keras.layers.Dense(16),
                                              keras.layers.Activation("exponential"))]
        + [keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.01), "categorical_crossentropy")
    return model


def test_stop_on_error_stops_at_the_nonfinite_step(tmp_path, capsys):
    """Activation('exponential') layers overflow in the first batch: with
    stop_on='error' training stops at that step, its logs complete (it ran 3 epochs of
    NaN before); without it, it runs on."""
    x, y = _separable(5.0, n=256)
    model = _exponential_stack()
    model.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[
        oi.OptimizationInsightCallback(tmp_path / "stop", stop_on="error",
                                       diagnosis=False)])
    run = oi.read_log(tmp_path / "stop")
    assert int(model.optimizer.iterations.numpy()) == len(run.steps) == 1
    assert run.summary["meta"]["epochs"] == 1
    err = capsys.readouterr().err  # the NaN loss, or the NaN gradients if read first
    assert re.search(r"stopping training: (the loss is nan|NaN/Inf gradients) at step 1\n",
                     err), err
    assert oi.diagnose(tmp_path / "stop")[0].code == "nonfinite"
    model = _exponential_stack()
    model.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[
        oi.OptimizationInsightCallback(tmp_path / "on", diagnosis=False)])
    assert len(oi.read_log(tmp_path / "on").steps) == 24


def test_stop_on_error_stops_at_the_epoch_end_that_shows_it(tmp_path):
    """A softmax over one unit under binary cross-entropy (its output is always 1, the
    loss finite): improper_output is an error from the first epoch end, where training
    stops (5 epochs asked)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.01), "binary_crossentropy")
    x, y = _separable(n=256)
    y = y[:, :1]
    model.fit(x, y, batch_size=32, epochs=5, verbose=0, callbacks=[
        oi.OptimizationInsightCallback(tmp_path, stop_on="error", diagnosis=False)])
    run = oi.read_log(tmp_path)
    assert run.summary["meta"]["epochs"] == 1 and len(run.steps) == 8
    with pytest.raises(ValueError, match="stop_on must be None or 'error'"):
        oi.OptimizationInsightCallback(tmp_path / "x", stop_on="warning")


def test_depth_rules_use_the_model_order_after_unfreezing(tmp_path):
    """Fine-tuning: the head trained first, then the sigmoid body unfrozen. The first
    kernel is the model's first layer (meta.positions), not the head trained first,
    so vanishing gradients through the body are still found in its first layer."""
    model = _mlp(12, "sigmoid")
    for layer in model.layers[:-1]:
        layer.trainable = False
    model.compile(keras.optimizers.SGD(0.05), "categorical_crossentropy")
    x, y = _blobs()
    cb = oi.OptimizationInsightCallback(tmp_path, diagnosis=False, histogram_freq=0)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[cb])
    for layer in model.layers:
        layer.trainable = True
    model.compile(keras.optimizers.SGD(0.05), "categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[cb])
    run = oi.read_log(tmp_path)
    assert run.variables[0] == model.layers[-1].kernel.path  # trained first
    findings = oi.diagnose(tmp_path)
    assert findings[0].code == "vanishing_gradients"
    assert findings[0].layer == model.layers[0].kernel.path


def test_adams_stability_ratio_is_judged_once_its_second_moment_settled(tmp_path):
    """Adam's preconditioned sharpness swings while v settles (about 1/(1 − β2) =
    1,000 steps): a ratio above 1 before then is not a finding, after it is."""
    import dataclasses

    import pandas as pd

    model = _relu_net(optimizer=keras.optimizers.Adam(1e-3))
    _diagnosed(model, tmp_path, *_separable(n=256))
    run = oi.read_log(tmp_path)
    assert run.summary["meta"]["optimizer"] == {"class": "Adam", "beta_2": 0.999}
    probes = pd.DataFrame({"step": [2, 500], "epoch": [0, 0], "probe": ["hessian"] * 2,
                           "kind": ["hessian"] * 2,
                           "stability_ratio": [40.0, 3.0], "sharpness": [4e3, 3e2],
                           "stability_limit": [1e2, 1e2]})
    from importlib import import_module

    diagnose_run = import_module("optinsight.diagnose").diagnose_run
    early = diagnose_run(dataclasses.replace(run, probes=probes))
    assert "lr_too_high" not in [f.code for f in early]
    late = diagnose_run(dataclasses.replace(run, probes=probes.assign(step=[2, 1000])))
    assert [f.step for f in late if f.code == "lr_too_high"] == [1000]


def test_nonfinite_names_the_layer_where_nan_first_appears(tmp_path):
    """Activation('exponential') layers overflow in the forward pass of the first
    batch: the nonfinite finding names the first layer whose output is not finite, as
    a layer-by-layer replay of that batch by hand finds it (it named the first kernel)."""
    x, y = _separable(5.0, n=256)
    index = None
    value = x[:32]
    for i, layer in enumerate(_exponential_stack().layers):  # the same weights, eagerly
        value = layer(value)
        if not np.all(np.isfinite(np.asarray(value))):
            index = i
            break
    model = _exponential_stack()
    assert index is not None and index > 0
    expected = model.layers[index].name
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[
        oi.OptimizationInsightCallback(tmp_path, diagnosis=False)])
    finding = oi.diagnose(tmp_path)[0]
    assert (finding.code, finding.layer, finding.since) == ("nonfinite", expected, 1)
    assert f"first appeared in the output of layer {expected}" in finding.evidence
    assert oi.read_log(tmp_path).summary["meta"]["nonfinite_origin"] == {
        "step": 1, "layer": expected}


def test_nonfinite_from_the_loss_says_the_forward_pass_was_finite(tmp_path):
    """log(0) in a hand-written loss: the forward pass is finite, the finding says so and
    names the first variable (in the model's order) with a NaN gradient."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(3, activation="softmax",
                                                 kernel_initializer=keras.initializers
                                                 .RandomNormal(stddev=10.0, seed=0))])

    def loss(y_true, y_pred):
        return -keras.ops.sum(y_true * keras.ops.log(y_pred), axis=-1)

    model.compile(keras.optimizers.SGD(0.01), loss)
    x, y = _separable(3.0, n=256)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[
        oi.OptimizationInsightCallback(tmp_path, diagnosis=False)])
    finding = oi.diagnose(tmp_path)[0]
    assert finding.code == "nonfinite" and "forward pass was finite" in finding.evidence
    assert finding.layer == model.layers[0].kernel.path
    assert oi.read_log(tmp_path).summary["meta"]["nonfinite_origin"]["layer"] is None


def test_the_package_and_its_diagnosis_import_without_tensorflow():
    """The `optinsight` command's readers and the diagnosis start without TensorFlow
    (main.py hides TensorFlow's start-up lines only where it imports it)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import sys, optinsight, optinsight.diagnose, "
         "optinsight.architecture; print('tensorflow' in sys.modules, 'keras' in sys.modules)"],
        capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "False"], done.stderr[-2000:]
