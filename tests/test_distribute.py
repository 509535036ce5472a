"""tf.distribute: MirroredStrategy over two logical CPU devices records the same
metrics as one device on the same global batches (run in a fresh process, since
logical devices must be set before TensorFlow starts)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from conftest import step_records
from test_recorder import assert_same_records

import optinsight as oi

LOOP = os.path.join(os.path.dirname(__file__), "distributed_loop.py")

SCRIPT = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
import optinsight as oi

rng = np.random.default_rng(0)
x = rng.normal(size=(128, 6)).astype("float32")
x[:, 0] *= 1e-6
y = keras.utils.to_categorical(rng.integers(0, 3, 128), 3)

def build():
    keras.utils.set_random_seed(0)
    x_in = keras.Input((6,))
    dead_two = keras.initializers.Constant([-3.0] * 2 + [0.1] * 6)
    h = keras.layers.Dense(8, activation="relu", name="h", bias_initializer=dead_two)(x_in)
    model = keras.Model(x_in, keras.layers.Dense(3, activation="softmax", name="out")(h))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="categorical_crossentropy")
    return model

def fit(model, log_dir):
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
              callbacks=[oi.OptimizationInsightCallback(log_dir, histogram_freq=4)])

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
with strategy.scope():
    mirrored = build()
fit(mirrored, sys.argv[1] + "/mirrored")
fit(build(), sys.argv[1] + "/single")
print("ok")
"""


def test_mirrored_strategy_matches_one_device(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    mirrored, single = oi.read_log(tmp_path / "mirrored"), oi.read_log(tmp_path / "single")
    assert mirrored.steps["step"].tolist() == list(range(1, 17))
    numeric = [c for c in single.steps.columns if c not in ("step", "epoch", "batch")]
    assert len(numeric) > 40
    np.testing.assert_allclose(mirrored.steps[numeric].to_numpy(float),
                               single.steps[numeric].to_numpy(float),
                               rtol=1e-4, atol=1e-6, equal_nan=True)
    for name in single.variables:
        a, b = mirrored.layer(name), single.layer(name)
        np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float),
                                   rtol=1e-4, atol=1e-6, equal_nan=True)
    assert mirrored.steps["no_zero_e7_grad_retained"].iloc[1:].sum() > 0
    assert mirrored.histograms()


def test_a_non_chief_worker_writes_nothing_into_log_dir(tmp_path, monkeypatch):
    """Under a multi-worker strategy only the chief writes (workers whose strategy
    says should_checkpoint=False write to a scratch dir). Keras 3's fit does not run
    under MultiWorkerMirroredStrategy (keras-team/keras#20585), so the worker role is
    set on the default strategy here."""
    import keras
    import tensorflow as tf

    extended = type(tf.distribute.get_strategy().extended)
    monkeypatch.setattr(extended, "should_checkpoint", property(lambda self: False),
                        raising=False)
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    y = keras.utils.to_categorical(np.arange(32) % 3, 3)
    x_in = keras.Input((6,))
    model = keras.Model(x_in, keras.layers.Dense(3, activation="softmax")(x_in))
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                        callbacks=[oi.OptimizationInsightCallback(tmp_path / "run")])
    assert len(history.history["loss"]) == 2
    assert not (tmp_path / "run").exists()


def _run_loop(kind, log_dir, env=None):
    return subprocess.Popen([sys.executable, LOOP, kind, str(log_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0 and out.strip().endswith("ok"), err[-3000:]


def test_custom_loop_under_mirrored_strategy_records_what_the_callback_does(tmp_path):
    """Two logical CPU devices: the recorder in a custom loop (strategy.run) and the
    callback in fit record the same numbers, histograms and probe values."""
    _finish(_run_loop("mirrored", tmp_path))
    loop, fit = step_records(tmp_path / "loop"), step_records(tmp_path / "fit")
    assert len(loop) == 16
    assert_same_records(loop, fit, rtol=1e-4)
    a, b = oi.read_log(tmp_path / "loop"), oi.read_log(tmp_path / "fit")
    assert a.histograms() == b.histograms() and len(a.histograms()) == 4
    np.testing.assert_allclose(a.probes.filter(like="weight").to_numpy(float),
                               b.probes.filter(like="weight").to_numpy(float), rtol=1e-5)


def assert_close_histograms(a, b):
    """Same steps; per histogram, ranges within float rounding and the same counts but
    for entries that rounding moved to a neighbouring bin."""
    assert [h["step"] for h in a] == [h["step"] for h in b] and a
    for ha, hb in zip(a, b):
        for kind in ("gradients", "weights"):
            for name, ea in ha[kind].items():
                eb = hb[kind][name]
                np.testing.assert_allclose(ea["range"], eb["range"], rtol=1e-4, atol=1e-7)
                assert sum(ea["counts"]) == sum(eb["counts"])
                assert np.abs(np.subtract(ea["counts"], eb["counts"])).sum() <= 4


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_write_one_set_of_logs_equal_to_one_process(tmp_path):
    """MultiWorkerMirroredStrategy, two worker processes on 127.0.0.1, each replica
    half of every global batch: the chief's logs equal a one-process run on the same
    global batches; the other worker writes nothing into log_dir."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index, log_dir in enumerate([tmp_path / "chief", tmp_path / "worker"]):
        env = {**os.environ, "TF_CONFIG": json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})}
        processes.append(_run_loop("multiworker", log_dir, env))
    reference = _run_loop("single", tmp_path / "single")
    for process in processes + [reference]:
        _finish(process)
    assert not (tmp_path / "worker").exists()
    chief, single = step_records(tmp_path / "chief"), step_records(tmp_path / "single")
    assert len(chief) == 16 and chief[5]["model"]["no_zero_e7_grad_retained"] > 0
    assert_same_records(chief, single, rtol=1e-4)
    a, b = oi.read_log(tmp_path / "chief"), oi.read_log(tmp_path / "single")
    assert_close_histograms(a.histograms(), b.histograms())
    np.testing.assert_allclose(a.epochs["train_mean_loss"], b.epochs["train_mean_loss"],
                               rtol=1e-6)
    assert (tmp_path / "chief" / "checkpoint" / "state.json").exists()
