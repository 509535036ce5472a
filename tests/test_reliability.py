"""Crash safety, resume after SIGKILL, a full disk, mixed precision, and a fuzzed log
reader."""

import builtins
import errno
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
from conftest import tiny_data, tiny_relu_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optinsight as oi
from optinsight.logs.jsonlog import read_jsonl

CHILD = """
import os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, numpy as np
import optinsight as oi
log_dir, epochs = sys.argv[1], int(sys.argv[2])
resume, delay = sys.argv[3] == "1", float(sys.argv[4])
rng = np.random.default_rng(0)
x = rng.normal(size=(160, 6)).astype("float32")
y = keras.utils.to_categorical(rng.integers(0, 3, 160), 3)
keras.utils.set_random_seed(0)
x_in = keras.Input((6,))
h = keras.layers.Dense(8, activation="relu")(x_in)
model = keras.Model(x_in, keras.layers.Dense(3, activation="softmax")(h))
model.compile(optimizer="adam", loss="categorical_crossentropy")

class Slow(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(delay)

cb = oi.OptimizationInsightCallback(log_dir, resume=resume, histogram_freq=3, diagnosis=False)
model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=[cb, Slow()])
print("done")
"""


def child(log_dir, epochs, resume, delay):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(log_dir), str(epochs),
                             "1" if resume else "0", str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_epoch_then_resume(tmp_path):
    """Killed with SIGKILL in its third epoch (10 steps of >= 0.1 s an epoch), the run
    keeps contiguous steps (at least the two finished epochs; later lines come in
    bursts) and a valid insight.json; resumed, it continues from the last checkpoint
    with no gap and no duplicate."""
    proc = child(tmp_path, 6, False, 0.1)
    steps_file, state_file = tmp_path / "steps.jsonl", tmp_path / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if state_file.exists() and json.load(open(state_file))["step"] == 20:
            break
        time.sleep(0.02)
    time.sleep(0.3)  # into the third epoch, which lasts at least a second
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = [r["step"] for r in read_jsonl(steps_file)]
    assert len(steps) >= 20 and steps == list(range(1, len(steps) + 1))
    # The per-variable store holds every flushed step (at least the finished epochs),
    # each step with all variables, and read_log reads it past a torn last batch.
    killed = oi.read_log(tmp_path)
    layer = killed.layer("dense/kernel")
    assert len(layer) >= 20 and layer["step"].tolist() == list(range(1, len(layer) + 1))
    assert killed.key("grad_norm").notna().all().all()
    summary = json.load(open(tmp_path / "insight.json"))
    assert summary["meta"]["epochs"] == 2  # the last finished epoch
    assert json.load(open(tmp_path / "checkpoint" / "state.json"))["step"] == 20

    resumed = child(tmp_path, 4, True, 0.0)
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err
    records = read_jsonl(steps_file)
    assert [r["step"] for r in records] == list(range(1, 41))
    assert [r["epoch"] for r in records] == [e for e in range(4) for _ in range(10)]
    summary = json.load(open(tmp_path / "insight.json"))
    assert summary["meta"]["epochs"] == 4 and summary["meta"]["steps"] == 40
    run = oi.read_log(tmp_path)
    assert [h["step"] for h in run.histograms()] == list(range(3, 41, 3))
    assert run.steps["step"].is_unique
    for name in run.variables:
        layer = run.layer(name)
        assert layer["step"].tolist() == list(range(1, 41)), name
        assert layer["epoch"].tolist() == [e for e in range(4) for _ in range(10)]


def test_mixed_precision_metrics_use_unscaled_gradients(tmp_path):
    """Under mixed_float16 the optimizer scales the loss by 2**15; the recorded
    gradients are the unscaled ones, so the zero band means the same as in float32."""
    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    y = keras.utils.to_categorical(np.arange(64) % 3, 3)

    def fit(policy, log_dir):
        keras.mixed_precision.set_global_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            x_in = keras.Input((6,))
            h = keras.layers.Dense(8, activation="relu")(x_in)
            out = keras.layers.Dense(3, activation="softmax", dtype="float32")(h)
            model = keras.Model(x_in, out)
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
            model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                      callbacks=[oi.OptimizationInsightCallback(log_dir)])
            return model, oi.read_log(log_dir).steps
        finally:
            keras.mixed_precision.set_global_policy("float32")

    mixed_model, mixed = fit("mixed_float16", tmp_path / "mixed")
    assert type(mixed_model.optimizer).__name__ == "LossScaleOptimizer"
    assert float(mixed_model.optimizer.dynamic_scale) >= 2 ** 10
    _, full = fit("float32", tmp_path / "full")
    np.testing.assert_allclose(mixed["grad_norm"], full["grad_norm"], rtol=2e-2)
    np.testing.assert_allclose(mixed["no_zero_e5_grad2"], full["no_zero_e5_grad2"], atol=3)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(
    JSON_VALUES.map(json.dumps),
    st.fixed_dictionaries({"step": st.integers(), "epoch": st.integers(), "batch": st.integers(),
                           "model": st.dictionaries(st.text(max_size=4), st.floats() | st.none(),
                                                    max_size=3),
                           "layers": st.just({})}).map(json.dumps),
    st.text(max_size=30)), max_size=5),
    summary=st.one_of(st.none(), JSON_VALUES.map(json.dumps), st.text(max_size=20)))
def test_read_log_gives_a_run_or_one_clear_error(tmp_path_factory, lines, summary):
    """Whatever the files hold, read_log returns a Run or raises ValueError /
    FileNotFoundError with a one-line message: never another exception."""
    log_dir = tmp_path_factory.mktemp("fuzz")
    (log_dir / "steps.jsonl").write_text("\n".join(lines))
    if summary is not None:
        (log_dir / "insight.json").write_text(summary)
    try:
        run = oi.read_log(log_dir)
    except (ValueError, FileNotFoundError) as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(run, oi.Run)


class FullDisk:
    """Files opened for writing through `open` share `budget` bytes; the write that
    passes it writes what fits, then raises ENOSPC, as a full disk does."""

    def __init__(self, budget):
        self.left = budget

    def open(self, path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        return file if mode.startswith("r") else _Limited(file, self)

    def check(self):
        if self.left <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _Limited:
    def __init__(self, file, disk):
        self._file, self._disk = file, disk

    def write(self, data):
        if len(data) > self._disk.left:
            self._file.write(data[:max(self._disk.left, 0)])
            self._file.flush()
            self._disk.left = 0
            self._disk.check()
        self._disk.left -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def test_a_full_disk_never_stops_training(tmp_path, monkeypatch, capsys):
    """The disk fills up in the second of three epochs: training goes on, each file
    that fails is named once with its error, and everything written before stays
    readable (steps.jsonl and layers/ up to their last whole record, insight.json as
    its last whole version)."""
    from optinsight.logs import jsonlog, store
    from optinsight.logs.tensorboard import TensorBoardWriter

    x, y = tiny_data(n=96)
    model = tiny_relu_model()
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    disk = FullDisk(budget=float("inf"))

    class FillDisk(keras.callbacks.Callback):  # a few KB left once epoch 2 begins
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                disk.left = 3000

    monkeypatch.setattr(jsonlog, "open", disk.open, raising=False)
    monkeypatch.setattr(store, "open", disk.open, raising=False)
    write = TensorBoardWriter._write
    monkeypatch.setattr(TensorBoardWriter, "_write",
                        lambda self, *a: disk.check() or write(self, *a))
    history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                        callbacks=[FillDisk(),
                                   oi.OptimizationInsightCallback(tmp_path, histogram_freq=5)])
    assert len(history.history["loss"]) == 3  # all epochs trained
    lines = capsys.readouterr().err.strip().splitlines()
    failed = [line for line in lines if "No space left on device" in line]
    named = [line.split("cannot write ")[1].split(" (")[0] for line in failed]
    assert len(named) == len(set(named)) >= 3, lines  # each file once
    assert f"{tmp_path}/steps.jsonl" in named and f"{tmp_path}/layers/" in named
    run = oi.read_log(tmp_path)
    steps = run.steps["step"].tolist()
    assert 12 <= len(steps) < 24 and steps == list(range(1, len(steps) + 1))
    layer = run.layer("hidden/kernel")
    assert 12 <= len(layer) < 24 and layer["step"].tolist() == list(range(1, len(layer) + 1))
    json.load(open(tmp_path / "insight.json"))  # the last whole version
    assert not list(tmp_path.glob("*.tmp"))
