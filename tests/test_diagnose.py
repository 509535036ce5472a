"""Each diagnosis rule on a real short training run that has the problem, and a
healthy run of the reference model that has none."""

import os

import keras
import numpy as np
import pytest

import data_loader
import main
import optinsight as oi
from optinsight import probes
from optinsight.cli import main as cli


def blobs(n=256, d=20, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d)) * 2
    x = (centres[labels] + rng.normal(size=(n, d))).astype("float32")
    return x, keras.utils.to_categorical(labels, classes).astype("float32")


def mlp(hidden=(32,), activation="relu", d=20, classes=3, **dense_kwargs):
    keras.utils.set_random_seed(0)
    x_in = keras.Input((d,))
    h = x_in
    for i, units in enumerate(hidden):
        h = keras.layers.Dense(units, activation=activation, name=f"h{i}", **dense_kwargs)(h)
    return keras.Model(x_in, keras.layers.Dense(classes, activation="softmax", name="out")(h))


def train(model, log_dir, optimizer, data=None, epochs=2, batch=32, loss="categorical_crossentropy",
          probe_list=(), diagnosis=False, **options):
    x, y = data if data is not None else blobs()
    model.compile(optimizer=optimizer, loss=loss)
    cb = oi.OptimizationInsightCallback(log_dir, probes=probe_list, diagnosis=diagnosis,
                                        probe_data=(x[:64], y[:64]) if probe_list else None,
                                        **options)
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[cb])
    return oi.diagnose(log_dir)


def codes(findings):
    return {(f.code, f.severity) for f in findings}


def diverging_regression(tmp_path, **options):
    """Linear regression stepped past its stability limit (lr·λmax ≈ 1.3 × 2.5): the
    error, and with it the gradient, grows by |1 − lr·λ| > 1 each step, whatever the
    initialisation and the batch order."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    keras.utils.set_random_seed(0)
    x_in = keras.Input((8,))
    model = keras.Model(x_in, keras.layers.Dense(1, name="lin")(x_in))
    return train(model, tmp_path, keras.optimizers.SGD(1.3), data=(x, y), loss="mse",
                 batch=64, epochs=4, **options)


def test_learning_rate_far_too_high(tmp_path):
    findings = diverging_regression(
        tmp_path, probe_list=[probes.HessianProbe(every=4, per_layer=False)])
    assert ("lr_too_high", "error") in codes(findings) or ("nonfinite", "error") in codes(findings)
    assert ("lr_too_high", "warning") in codes(findings)  # SGD: lr·λmax > 2
    edge = [f for f in findings if f.code == "lr_too_high" and f.severity == "warning"][0]
    assert "its stability limit" in edge.evidence


def test_dead_layer(tmp_path, capsys):
    model = mlp(bias_initializer=keras.initializers.Constant(-100.0))
    findings = train(model, tmp_path, keras.optimizers.Adam(1e-3),
                     probe_list=[probes.ActivationProbe(every=4)], diagnosis=True)
    dead = [f for f in findings if f.code == "dead_layer"]
    assert [(f.layer, f.severity) for f in dead] == [("h0/kernel", "error")]
    assert "100.0 % of its gradients are zero" in dead[0].evidence
    printed = capsys.readouterr().err
    assert printed.count("optinsight: ERROR dead_layer [h0/kernel]") == 1  # once, not per epoch


def test_dead_layer_with_thresholds_that_leave_out_1e_7(tmp_path, capsys):
    """The rule reads the smallest zero band there is, at epoch end as afterwards."""
    model = mlp(bias_initializer=keras.initializers.Constant(-100.0))
    findings = train(model, tmp_path, keras.optimizers.Adam(1e-3), diagnosis=True,
                     thresholds=(1e-5, 1e-3), ema_decay=None)
    dead = [f for f in findings if f.code == "dead_layer"]
    assert [(f.layer, f.severity) for f in dead] == [("h0/kernel", "error")]
    assert "(|g| <= 1e-05)" in dead[0].evidence
    assert "ERROR dead_layer [h0/kernel]" in capsys.readouterr().err


def test_vanishing_gradients_in_a_deep_sigmoid_network(tmp_path):
    findings = train(mlp(hidden=(16,) * 10, activation="sigmoid"), tmp_path,
                     keras.optimizers.SGD(0.1))
    vanishing = [f for f in findings if f.code == "vanishing_gradients"]
    assert vanishing and vanishing[0].layer == "h0/kernel"
    healthy = train(mlp(hidden=(16,) * 2, activation="relu"), tmp_path / "ok",
                    keras.optimizers.SGD(0.1))
    assert "vanishing_gradients" not in {f.code for f in healthy}


class ScaledDense(keras.layers.Layer):
    """x @ (scale · W): W's gradient is `scale` times smaller and, initialised
    1/scale times larger, its SGD update ratio scale² smaller — a discriminative
    learning rate of 1e-6 gone wrong."""

    def __init__(self, units, scale, **kwargs):
        super().__init__(**kwargs)
        self.units, self.scale = units, scale

    def build(self, shape):
        init = keras.initializers.GlorotUniform(seed=1)
        self.kernel = self.add_weight(
            shape=(shape[-1], self.units), name="kernel",
            initializer=lambda s, dtype=None: init(s, dtype) / self.scale)

    def call(self, x):
        return keras.ops.relu(x @ (self.kernel * self.scale))


def test_stalled_layer(tmp_path):
    keras.utils.set_random_seed(0)
    x_in = keras.Input((20,))
    h = keras.layers.Dense(32, activation="relu", name="h0")(x_in)
    h = ScaledDense(32, 1e-3, name="slow")(h)
    h = keras.layers.Dense(32, activation="relu", name="h2")(h)
    model = keras.Model(x_in, keras.layers.Dense(3, activation="softmax", name="out")(h))
    findings = train(model, tmp_path, keras.optimizers.SGD(0.05))
    stalled = [f for f in findings if f.code == "stalled_layer"]
    assert [f.layer for f in stalled] == ["slow/kernel"]


def test_exploding_gradients(tmp_path):
    findings = diverging_regression(tmp_path)
    assert ("exploding_gradients", "error") in codes(findings)


def test_nonfinite_values(tmp_path):
    x, y = blobs()
    x[40] = np.inf
    findings = train(mlp(), tmp_path, keras.optimizers.Adam(1e-3), data=(x, y))
    nonfinite = [f for f in findings if f.code == "nonfinite"]
    assert nonfinite and nonfinite[0].step == 2 and nonfinite[0].severity == "error"
    assert findings[0].severity == "error"  # errors first


def test_activation_saturation_and_rank_collapse(tmp_path):
    keras.utils.set_random_seed(0)
    x_in = keras.Input((20,))
    big = keras.initializers.RandomNormal(stddev=5.0, seed=0)
    h = keras.layers.Dense(16, activation="tanh", kernel_initializer=big, name="sat")(x_in)
    rank_one = np.outer(np.linspace(1, 2, 16), np.linspace(-1, 1, 16)).astype("float32")
    h = keras.layers.Dense(16, activation="relu", name="low",
                           kernel_initializer=keras.initializers.Constant(rank_one))(h)
    model = keras.Model(x_in, keras.layers.Dense(3, activation="softmax", name="out")(h))
    findings = train(model, tmp_path, keras.optimizers.SGD(1e-5), epochs=1,
                     probe_list=[probes.ActivationProbe(every=4),
                                 probes.WeightSpectrumProbe(every=4)])
    found = {(f.code, f.layer) for f in findings}
    assert ("activation_saturation", "sat") in found
    assert ("rank_collapse", "low/kernel") in found
    assert ("rank_collapse", "sat/kernel") not in found


@pytest.mark.skipif(not os.path.exists(data_loader.DEBIAN_FASHION_DIR),
                    reason="needs Debian's dataset-fashion-mnist (make test installs it)")
def reference_run(log_dir, activation):
    """The reference CNN (main.py) on 3,072 Fashion-MNIST images, 2 epochs, Adam, with
    main.py's probes: its findings."""
    (x, y), _ = data_loader.load_fashion_mnist()
    x = x[:3072].astype("float32") / 255
    y = keras.utils.to_categorical(y[:3072], 10).astype("float32")
    keras.utils.set_random_seed(0)
    model = main.build_model(x.shape[1:], activation=activation)
    return train(model, log_dir, keras.optimizers.Adam(1e-3), data=(x, y), batch=128,
                 epochs=2, probe_list=main.build_probes(every=12))


def test_the_reference_cnn_reports_its_dead_units(tmp_path):
    """With ReLU, some of conv3's and dense1's units never get a gradient from the
    first steps on: dead_units names them, and nothing else is reported."""
    findings = [f for f in reference_run(tmp_path, "relu") if f.severity != "info"]
    assert {(f.code, f.layer) for f in findings} == {("dead_units", "conv3/kernel"),
                                                     ("dead_units", "dense1/kernel")}
    run = oi.read_log(tmp_path)
    since, start = run.zero_since(), run.steps["step"].iloc[36]  # the last quarter's first
    for f in findings:
        count = int(f.evidence.split(" of ")[0])
        assert count == int(((since[f.layer] > 0) & (since[f.layer] <= start)).sum()) >= 2


def test_healthy_reference_run_has_no_warning(tmp_path):
    """The reference CNN with LeakyReLU: no unit can die, and nothing is reported."""
    findings = reference_run(tmp_path, "leaky_relu")
    assert [str(f) for f in findings if f.severity != "info"] == []
    assert cli(["diagnose", str(tmp_path)]) == 0


def test_cli_diagnose_exit_codes(tmp_path, capsys):
    model = mlp(bias_initializer=keras.initializers.Constant(-100.0))
    train(model, tmp_path, keras.optimizers.Adam(1e-3))
    assert cli(["diagnose", str(tmp_path)]) == 1
    assert "ERROR dead_layer [h0/kernel]" in capsys.readouterr().out
    assert cli(["diagnose", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: log dir") and "\n" not in err
    (tmp_path / "insight.json").write_text('{"broken')
    assert cli(["summary", str(tmp_path)]) == 2
    assert "insight.json is not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("dead, severity", [(2, "warning"), (5, "error")])
def test_dead_units_found_exactly(tmp_path, dead, severity):
    """`dead` of 8 ReLU units start with a bias of -5 and never fire: exactly those
    units have zero gradients since step 1, and the finding names how many."""
    from conftest import tiny_data

    keras.utils.set_random_seed(1)
    x_in = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="hidden", bias_initializer=(
        keras.initializers.Constant([-5.0] * dead + [0.1] * (8 - dead))))(x_in)
    model = keras.Model(x_in, keras.layers.Dense(3, activation="softmax", name="out")(h))
    x, y = tiny_data(n=96)
    findings = train(model, tmp_path, keras.optimizers.Adam(1e-2), data=(x, y), batch=16,
                     epochs=2)
    since = oi.read_log(tmp_path).zero_since()
    assert since["hidden/kernel"].tolist() == [1] * dead + [0] * (8 - dead)
    assert since["hidden/bias"].tolist() == [1] * dead + [0] * (8 - dead)
    assert since["out/kernel"].tolist() == [0, 0, 0]
    found = [f for f in findings if f.code == "dead_units"]
    assert [(f.layer, f.severity) for f in found] == [("hidden/kernel", severity)]
    assert f"{dead} of 8 units" in found[0].evidence and "since step 1" in found[0].evidence


def test_leaky_relu_has_no_dead_units(tmp_path):
    model = mlp(activation=keras.layers.LeakyReLU(0.1),
                bias_initializer=keras.initializers.Constant(-5.0))
    findings = train(model, tmp_path, keras.optimizers.Adam(1e-3))
    assert "dead_units" not in {f.code for f in findings}
    assert not any(s.any() for s in oi.read_log(tmp_path).zero_since().values())
