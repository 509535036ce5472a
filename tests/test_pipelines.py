"""Recording in the input pipelines and interruptions of real use (issue 28): datasets
of unknown length, generators, a fit interrupted and fitted again."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mixed_precision_regression, step_records, tiny_data, tiny_relu_model

import optinsight as oi


def compiled(model, steps_per_execution=1):
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy",
                  steps_per_execution=steps_per_execution)
    return model


def recorded(log_dir, data, epochs=2, **fit_kwargs):
    """step_records of a fresh tiny model fitted on `data`, and its optimizer's count."""
    model = compiled(tiny_relu_model())
    model.fit(data, epochs=epochs, verbose=0, callbacks=[
        oi.OptimizationInsightCallback(log_dir, histogram_freq=3)], **fit_kwargs)
    return step_records(log_dir), model


@pytest.mark.parametrize("pipeline", ["filter", "repeat", "generator"])
def test_unknown_length_records_what_a_known_length_records(tmp_path, pipeline):
    """A dataset whose cardinality is unknown ends inside the compiled step: Keras's
    end-of-data signal neither ends the recording (epoch 2 crashed) nor leaves a fake
    step of zeros (9 steps were logged for 8 batches)."""
    x, y = tiny_data(n=64)
    known = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    expected, _ = recorded(tmp_path / "known", known)
    if pipeline == "filter":
        data, kwargs = known.unbatch().filter(lambda a, b: True).batch(8), {}
        assert data.cardinality() == tf.data.UNKNOWN_CARDINALITY
    elif pipeline == "repeat":
        data, kwargs = known.repeat(), {"steps_per_epoch": 8}
    else:
        def batches():
            for i in range(0, 64, 8):
                yield x[i:i + 8], y[i:i + 8]
        data = tf.data.Dataset.from_generator(batches, output_signature=(
            tf.TensorSpec((None, 6), tf.float32), tf.TensorSpec((None, 3), tf.float32)))
        kwargs = {}
    got, model = recorded(tmp_path / pipeline, data, **kwargs)
    assert [(r["step"], r["epoch"], r["batch"]) for r in got] == [
        (r["step"], r["epoch"], r["batch"]) for r in expected]
    keys = sorted(expected[0]["model"])
    np.testing.assert_allclose(
        [[np.nan if r["model"][k] is None else r["model"][k] for k in keys] for r in got],
        [[np.nan if r["model"][k] is None else r["model"][k] for k in keys]
         for r in expected], rtol=1e-6)
    state = json.load(open(tmp_path / pipeline / "checkpoint" / "state.json"))
    assert (state["epoch"], state["step"]) == (2, 16)
    assert oi.read_log(tmp_path / pipeline).summary["meta"]["steps"] == 16


class RaiseAt(keras.callbacks.Callback):
    """Raises at its `calls`-th on_train_batch_end (batch numbers under
    steps_per_execution differ between Keras versions)."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def on_train_batch_end(self, batch, logs=None):
        self.calls -= 1
        if self.calls == 0:
            raise RuntimeError("stopped by another callback")


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_a_fit_interrupted_then_fitted_again_counts_the_optimizer_steps(
        tmp_path, steps_per_execution):
    """Steps equal the optimizer's iterations after an interrupted fit and a second fit;
    the interrupted epoch is closed as partial, the next fit's first epoch is the next
    number, and resume from its checkpoint loses no step (it lagged by 5 steps, epoch 0
    held 13 batches, and resume reported steps 17 to 21 as not recorded)."""
    x, y = tiny_data(n=64)
    model = compiled(tiny_relu_model(), steps_per_execution)
    cb = oi.OptimizationInsightCallback(tmp_path, histogram_freq=0)
    with pytest.raises(RuntimeError, match="another callback"):
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                  callbacks=[cb, RaiseAt(3 if steps_per_execution == 1 else 1)])
    interrupted = int(model.optimizer.iterations.numpy())
    assert 0 < interrupted < 8
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[cb])
    total = int(model.optimizer.iterations.numpy())
    records = step_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, total + 1))
    assert [r["epoch"] for r in records] == [0] * interrupted + [1] * 8 + [2] * 8
    assert [r["batch"] for r in records] == list(range(interrupted)) + list(range(8)) * 2
    document = json.load(open(tmp_path / "insight.json"))
    assert document["meta"]["partial_epochs"] == [0]
    assert document["meta"]["steps"] == total
    assert [len(e) for e in document["batch_wise"]["grad_norm"]] == [interrupted, 8, 8]
    state = json.load(open(tmp_path / "checkpoint" / "state.json"))
    assert (state["epoch"], state["step"]) == (3, total)
    resumed = compiled(tiny_relu_model(), steps_per_execution)
    resumed.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
                callbacks=[oi.OptimizationInsightCallback(tmp_path, resume=True)])
    records = step_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, total + 9))
    assert int(resumed.optimizer.iterations.numpy()) == total + 8
    assert oi.read_log(tmp_path).summary["meta"]["partial_epochs"] == [0]


_XLA_FIT = """
import numpy as np, keras, optinsight as oi
x = np.random.rand(64, 6).astype("float32")
y = keras.utils.to_categorical(np.random.randint(0, 3, 64), 3)
model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                          keras.layers.Dense(3, activation="softmax")])
model.compile("sgd", "categorical_crossentropy", jit_compile=True)
model.fit(x, y, batch_size=4, epochs=1, verbose=0,
          callbacks=[oi.OptimizationInsightCallback({log_dir!r}, histogram_freq=3)])
"""


def test_an_xla_train_step_is_compiled_once_with_histograms_on(tmp_path):
    """With `jit_compile=True` and histograms every 3 steps, XLA compiles the train step
    once for 16 steps (it compiled it at every step: the histogram slot was a slice
    bound, which XLA takes as a compile-time constant). Counted from XLA's own log."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "device_compiler=1"}
    done = subprocess.run([sys.executable, "-c", _XLA_FIT.format(log_dir=str(tmp_path))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    compilations = done.stderr.count("Compilation of XLA executable")
    assert 1 <= compilations <= 2, compilations  # the step (and the histograms' function)
    assert len(oi.read_log(tmp_path).histograms()) == 5


def test_a_live_read_has_every_line_of_steps_jsonl(tmp_path, monkeypatch):
    """model/ is flushed every 32 rows, steps.jsonl at every burst: a read during the
    run (or after a kill) has every whole line of steps.jsonl (it had 66 of 78)."""
    from optinsight import recorder

    monkeypatch.setattr(recorder, "READ_EVERY_STEPS", 1)
    x, y = tiny_data(n=160)
    seen = []

    class ReadLive(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):  # after cb's (it hears first)
            if batch == 37:
                cb.recorder.log.flush()
                lines = open(tmp_path / "steps.jsonl").read().splitlines()
                seen.append((len(lines), oi.read_log(tmp_path).steps["step"].tolist()))

    cb = oi.OptimizationInsightCallback(tmp_path, histogram_freq=0)
    compiled(tiny_relu_model()).fit(x, y, batch_size=4, epochs=1, verbose=0,
                                    callbacks=[cb, ReadLive()])
    (lines, steps), = seen
    assert lines == 37 and steps == list(range(1, 38))


def _unfinish(path):
    """Write the finished part `path` back as its live twin, as if the process died
    between writing the one and removing the other."""
    import pyarrow as pa

    table = pa.ipc.open_file(str(path)).read_all()
    with open(str(path) + "s", "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)


def test_a_kill_between_finishing_and_removing_a_part_duplicates_nothing(tmp_path):
    """Both part-X.arrow and part-X.arrows on disk: every step is read once (24 rows for
    16 steps before), and resume continues."""
    x, y = tiny_data(n=64)
    compiled(tiny_relu_model()).fit(
        x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
        callbacks=[oi.OptimizationInsightCallback(tmp_path, histogram_freq=0)])
    expected = step_records(tmp_path)
    for store in ("model", "layers"):
        _unfinish(sorted((tmp_path / store).glob("part-*.arrow"))[0])
    run = oi.read_log(tmp_path)
    assert run.steps["step"].tolist() == list(range(1, 17))
    assert run.key("grad_norm")["step"].tolist() == list(range(1, 17))
    assert step_records(tmp_path) == expected
    compiled(tiny_relu_model()).fit(
        x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
        callbacks=[oi.OptimizationInsightCallback(tmp_path, resume=True)])
    assert oi.read_log(tmp_path).steps["step"].tolist() == list(range(1, 25))
    assert not list((tmp_path / "layers").glob("part-000000001.arrows"))


def test_a_schema_1_log_has_its_per_variable_data(tmp_path):
    """Logs written before the layers/ store kept per-variable values in steps.jsonl:
    read_log reads them there (layer() had only step/epoch/batch, key() no row)."""
    lines = [{"step": s, "epoch": 0, "batch": s - 1, "model": {"grad_norm": 0.5 * s},
              "layers": {"dense/kernel": {"grad_norm": 0.1 * s, "no_zero_e7_grad2": s},
                         "dense/bias": {"grad_norm": 0.2 * s, "no_zero_e7_grad2": None}}}
             for s in (1, 2, 3)]
    with open(tmp_path / "steps.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    run = oi.read_log(tmp_path)
    assert run.variables == ["dense/kernel", "dense/bias"]
    assert run.layer("dense/kernel")["grad_norm"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    key = run.key("no_zero_e7_grad2")
    assert key["dense/kernel"].tolist() == [1, 2, 3] and key["dense/bias"].isna().all()


def test_loss_scale_skips_are_recorded_as_skipped(tmp_path):
    """mixed_float16 with Keras's dynamic loss scale skips every step whose scaled
    gradient overflows (and halves the scale). Such a step has skipped = 1 and no
    weight change; every applied one has skipped = 0 (they were indistinguishable)."""
    model, x, y = mixed_precision_regression(keras.optimizers.SGD(1e-4), n=64)
    scales = []

    class Scale(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            scales.append(float(model.optimizer.dynamic_scale.numpy()))

    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
              callbacks=[oi.OptimizationInsightCallback(tmp_path), Scale()])
    steps = oi.read_log(tmp_path).steps
    before = [2.0 ** 15] + scales[:-1]
    halved = [s < b for s, b in zip(scales, before)]
    assert 0 < sum(halved) < len(halved)
    assert steps["skipped"].tolist() == [int(h) for h in halved]
    assert (steps.loc[steps["skipped"] == 1, "wdiff"] == 0).all()
    assert (steps.loc[steps["skipped"] == 0, "wdiff"] > 0).all()
