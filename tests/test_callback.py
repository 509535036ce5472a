"""The callback on plain Keras models: installation, errors, resume, non-finite values."""

import json
import os

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import step_records, tiny_data, tiny_relu_model

import optinsight as oi
from optinsight.logs.jsonlog import read_jsonl


def compiled(model):
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def test_plain_sequential_is_instrumented_and_restored(tmp_path):
    model = compiled(keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu"),
                                       keras.layers.Dense(3, activation="softmax")]))
    x, y = tiny_data(n=48)
    cb = oi.OptimizationInsightCallback(tmp_path / "run", histogram_freq=0)
    history = model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb], verbose=0,
                        validation_data=(x, y))
    run = oi.read_log(tmp_path / "run")
    assert run.steps["step"].tolist() == list(range(1, 7))
    assert run.steps["epoch"].tolist() == [0, 0, 0, 1, 1, 1]
    assert run.steps["batch"].tolist() == [0, 1, 2, 0, 1, 2]
    assert run.epochs["train_mean_loss"].tolist() == pytest.approx(history.history["loss"])
    assert run.epochs["val_mean_acc"].tolist() == pytest.approx(history.history["val_accuracy"])
    assert "train_step" not in model.__dict__  # the model's own train step is back
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # and plain fit still works
    assert len(read_jsonl(tmp_path / "run" / "steps.jsonl")) == 6


def test_insight_model_trains_plainly_without_callback():
    model = compiled(tiny_relu_model(oi.InsightModel))
    x, y = tiny_data(n=32)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("kwargs, match", [
    ({"thresholds": (1e-5, 1e-7)}, "strictly increasing"),
    ({"thresholds": (0.0,)}, "positive"),
    ({"thresholds": "abc"}, "positive numbers"),
    ({"ema_decay": 1.0}, r"\[0, 1\)"),
    ({"ema_decay": -0.1}, r"got -0.1"),
    ({"histogram_freq": -1}, "histogram_freq"),
    ({"histogram_freq": 2.5}, "got 2.5"),
    ({"sign_map_freq": "weekly"}, "sign_map_freq"),
    ({"update_freq": 0}, "update_freq"),
    ({"histogram_bins": 0}, "histogram_bins"),
    ({"probes": [object()]}, "needs a name"),
])
def test_bad_arguments_raise_clear_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        oi.OptimizationInsightCallback(tmp_path, **kwargs)


def test_unwritable_or_file_log_dir(tmp_path):
    model = compiled(tiny_relu_model())
    x, y = tiny_data(n=16)
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[oi.OptimizationInsightCallback(target)])
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            model.fit(x, y, epochs=1, verbose=0,
                      callbacks=[oi.OptimizationInsightCallback(locked / "run")])


def test_model_without_trainable_variables(tmp_path):
    model = compiled(keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)]))
    model.layers[0].trainable = False
    model = compiled(model)
    x, y = tiny_data(n=16)
    with pytest.raises(ValueError, match="no trainable variables"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[oi.OptimizationInsightCallback(tmp_path)])


def test_existing_run_needs_resume(tmp_path):
    x, y = tiny_data(n=16)
    model = compiled(tiny_relu_model())
    model.fit(x, y, epochs=1, verbose=0, callbacks=[oi.OptimizationInsightCallback(tmp_path)])
    with pytest.raises(ValueError, match="already holds a run"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[oi.OptimizationInsightCallback(tmp_path)])


def test_resume_continues_steps_epochs_and_state(tmp_path):
    """Two epochs, then a fresh model and callback resume from the checkpoint: same logs
    as an uninterrupted run of four epochs."""
    x, y = tiny_data(n=48)

    def fit(log_dir, epochs, resume=False):
        model = compiled(tiny_relu_model())
        cb = oi.OptimizationInsightCallback(log_dir, resume=resume, histogram_freq=2,
                                            histogram_bins=8)
        model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=[cb])
        return model, cb

    whole, _ = fit(tmp_path / "whole", 4)
    fit(tmp_path / "split", 2)
    resumed, cb = fit(tmp_path / "split", 4, resume=True)
    a, b = oi.read_log(tmp_path / "whole"), oi.read_log(tmp_path / "split")
    # What the epoch-end diagnosis sees, from memory, is what read_log reads back.
    in_memory = cb.recorder.run_so_far(cb.recorder.summary())
    pd.testing.assert_frame_equal(in_memory.steps, b.steps, check_dtype=False)
    pd.testing.assert_frame_equal(in_memory.epochs, b.epochs)
    for key in in_memory.variable_data.keys:  # every step kept: a short run
        np.testing.assert_allclose(in_memory.key(key).to_numpy(float),
                                   b.key(key).to_numpy(float), rtol=1e-6, equal_nan=True)
    # insight.json (its finished epochs encoded once, across the resume) holds every
    # step's whole-model metrics and each variable's epoch means, epoch by epoch, and
    # counts its NaN written as null.
    document = json.load(open(tmp_path / "split" / "insight.json"))
    records = step_records(tmp_path / "split")
    by_epoch = [[r for r in records if r["epoch"] == e] for e in range(4)]
    nulls = 0
    for key, lists in document["batch_wise"].items():
        assert lists == [[r["model"][key] for r in rs] for rs in by_epoch], key
        nulls += sum(v is None for values in lists for v in values)
    for name, layer in document["layers"].items():
        assert set(layer) == {"epoch_wise"}
        for key, means in layer["epoch_wise"].items():
            values = [[r["layers"][name][key] for r in rs] for rs in by_epoch]
            want = [None if all(v is None for v in vs) else
                    float(np.mean([v for v in vs if v is not None])) for vs in values]
            assert means == pytest.approx(want, rel=1e-6, nan_ok=True), (name, key)
            nulls += sum(v is None for v in means)
    assert nulls > 0 and document["meta"]["null_values"] == nulls  # val_* absent: None
    assert b.steps["step"].tolist() == list(range(1, 13))
    assert b.steps["epoch"].tolist() == a.steps["epoch"].tolist()
    numeric = a.steps.select_dtypes("number").columns
    np.testing.assert_allclose(b.steps[numeric].to_numpy(float), a.steps[numeric].to_numpy(float),
                               rtol=1e-5, atol=1e-9, equal_nan=True)
    assert len(b.epochs) == 4
    for wa, wb in zip(whole.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-7)
    assert [h["step"] for h in b.histograms()] == [2, 4, 6, 8, 10, 12]
    for ha, hb in zip(a.histograms(), b.histograms()):
        assert ha["weights"].keys() == hb["weights"].keys()


def test_resume_drops_logs_after_the_checkpoint(tmp_path):
    """Steps logged after the last checkpoint (a crash mid-epoch) are trained again,
    not duplicated."""
    x, y = tiny_data(n=48)
    model = compiled(tiny_relu_model())
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=[oi.OptimizationInsightCallback(tmp_path)])
    with open(tmp_path / "steps.jsonl", "a") as f:  # two later steps and a torn line
        f.write(json.dumps({"step": 4, "epoch": 1, "batch": 0, "model": {}, "layers": {}}) + "\n")
        f.write('{"step": 5, "epo')
    model = compiled(tiny_relu_model())
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[oi.OptimizationInsightCallback(tmp_path, resume=True)])
    assert [r["step"] for r in read_jsonl(tmp_path / "steps.jsonl")] == list(range(1, 7))


def test_nonfinite_gradients_are_counted_not_fatal(tmp_path):
    x, y = tiny_data(n=48)
    x[20, 3] = np.nan  # poisons the second batch
    model = compiled(tiny_relu_model())
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[oi.OptimizationInsightCallback(tmp_path)])
    steps = step_records(tmp_path)
    assert [s["step"] for s in steps] == [1, 2, 3]  # training went on
    assert steps[0]["model"]["nonfinite_grads"] == 0
    assert steps[1]["model"]["nonfinite_grads"] > 0
    assert steps[1]["layers"]["hidden/kernel"]["nonfinite_grads"] > 0
    json.load(open(tmp_path / "insight.json"))  # still valid JSON


def test_nonfinite_values_are_written_as_counted_nulls(tmp_path):
    from optinsight.logs.jsonlog import JsonlWriter

    writer = JsonlWriter(tmp_path / "x.jsonl")
    writer.write({"step": 1, "a": float("nan"), "b": [1.0, float("inf")], "c": np.int64(3)})
    writer.close()
    assert read_jsonl(tmp_path / "x.jsonl") == [{"step": 1, "a": None, "b": [1.0, None], "c": 3}]
    assert writer.null_count == 2


@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_every_step_is_logged_once_in_order(tmp_path, steps_per_execution):
    """Epochs of 100 batches: rows are read in bursts mid-epoch (the ring buffer wraps
    around several times) and at epoch end, with several steps per call."""
    model = tiny_relu_model()
    model.compile(optimizer="adam", loss="categorical_crossentropy",
                  steps_per_execution=steps_per_execution)
    x, y = tiny_data(n=400)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0,
              callbacks=[oi.OptimizationInsightCallback(tmp_path, histogram_freq=7)])
    steps = step_records(tmp_path)
    assert [s["step"] for s in steps] == list(range(1, 201))
    assert [s["batch"] for s in steps] == list(range(100)) * 2
    assert [s["epoch"] for s in steps] == [0] * 100 + [1] * 100
    # Each row belongs to its own step: zero-band counts carry over from one step to the next.
    for before, after in zip(steps, steps[1:]):
        for name, layer in after["layers"].items():
            assert layer["no_zero_e5_grad1"] == before["layers"][name]["no_zero_e5_grad2"]
    assert sum(s["model"]["no_zero_e5_grad2"] for s in steps) > 0
    histograms = oi.read_log(tmp_path).histograms()
    assert [h["step"] for h in histograms] == list(range(7, 201, 7))


def test_xla_compiled_train_step(tmp_path):
    """With jit_compile=True the train step runs under XLA, where the native kernel
    cannot: the tracker uses its XLA version, and the figures match a non-XLA run."""
    x, y = tiny_data(n=48)
    runs = {}
    for jit in (False, True):
        model = tiny_relu_model()
        model.compile(optimizer="adam", loss="categorical_crossentropy", jit_compile=jit)
        model.fit(x, y, batch_size=12, epochs=1, verbose=0, shuffle=False,
                  callbacks=[oi.OptimizationInsightCallback(tmp_path / str(jit))])
        runs[jit] = read_jsonl(tmp_path / str(jit) / "steps.jsonl")
    assert [s["step"] for s in runs[True]] == [1, 2, 3, 4]
    for plain, xla in zip(runs[False], runs[True]):
        assert xla["model"]["grad_norm"] == pytest.approx(plain["model"]["grad_norm"], rel=1e-4)
        assert xla["model"]["wdiff"] == pytest.approx(plain["model"]["wdiff"], rel=1e-4)


def test_sparse_embedding_gradients(tmp_path):
    """An Embedding's gradient arrives as IndexedSlices; rows no example uses have an
    exact-zero gradient, so they are all in the zero band."""
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(50, 4),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    ids = np.array([[1, 2, 3], [2, 3, 4], [7, 8, 9], [1, 1, 1]], np.int32)
    model.fit(ids, np.ones((4, 2), np.float32), batch_size=2, epochs=1, verbose=0,
              shuffle=False, callbacks=[oi.OptimizationInsightCallback(tmp_path)])
    steps = step_records(tmp_path)
    name = model.layers[0].embeddings.path
    for step, batch in zip(steps, (ids[:2], ids[2:])):
        unused_rows = 50 - len(np.unique(batch))
        assert step["layers"][name]["no_zero_e7_grad2"] == 4 * unused_rows


def test_probes_are_scheduled_and_logged(tmp_path):
    class MeanOutput:
        name = "mean_output"
        every = 2

        def __call__(self, model, x, y):
            p = np.asarray(model(x))
            return {"mean": float(p.mean()), "per_class": p.mean(axis=0)}

    x, y = tiny_data(n=64)
    model = compiled(tiny_relu_model())
    cb = oi.OptimizationInsightCallback(tmp_path, probes=[MeanOutput()], probe_data=(x[:8], y[:8]))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    run = oi.read_log(tmp_path)
    assert run.probes["step"].tolist() == [0, 2, 4]
    final = np.asarray(model(x[:8]))
    assert run.probes["mean"].iloc[-1] == pytest.approx(final.mean(), rel=1e-5)
    with np.load(tmp_path / run.probes["arrays"].iloc[-1]) as arrays:
        np.testing.assert_allclose(arrays["per_class"], final.mean(axis=0), rtol=1e-5)
    with pytest.raises(ValueError, match="probe_data"):
        oi.OptimizationInsightCallback(tmp_path, probes=[MeanOutput()])


def test_read_log_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        oi.read_log(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds no optinsight run"):
        oi.read_log(tmp_path)
    (tmp_path / "insight.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        oi.read_log(tmp_path)


def test_a_failing_probe_is_reported_not_fatal(tmp_path, capsys):
    class Broken:
        name, every = "broken", 1

        def __call__(self, model, x, y):
            raise ArithmeticError("no luck")

    x, y = tiny_data(n=32)
    model = compiled(tiny_relu_model())
    cb = oi.OptimizationInsightCallback(tmp_path, probes=[Broken()], probe_data=(x, y))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    assert "probe 'broken' failed at step 0: ArithmeticError: no luck" in capsys.readouterr().err
    records = read_jsonl(tmp_path / "probes.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0]["error"] == "ArithmeticError: no luck"
    assert len(read_jsonl(tmp_path / "steps.jsonl")) == 2


def test_sign_maps_are_capped_by_a_fixed_stride(tmp_path):
    x, y = tiny_data(n=32)
    model = compiled(tiny_relu_model())
    cb = oi.OptimizationInsightCallback(tmp_path, sign_map_freq=2, sign_map_max_params=5)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    assert sorted(os.listdir(tmp_path / "signs")) == ["step_00000002.npz"]
    with np.load(tmp_path / "signs" / "step_00000002.npz") as maps:
        meta = json.loads(str(maps["_meta"]))
        for v in model.trainable_variables:
            size = int(np.prod(v.shape))
            stride = -(-size // 5)
            assert meta["strides"][v.path] == stride
            assert len(maps[v.path]) == len(range(0, size, stride)) <= 5
            assert set(np.unique(maps[v.path])) <= {-1, 0, 1, 2}


def test_resume_writes_each_tensorboard_step_once(tmp_path):
    """Three epochs with a checkpoint after the second, then resumed to four: the third
    epoch's steps are trained again, and TensorBoard (read by tbparse) has every step
    once, with the values of the resumed run."""
    from tbparse import SummaryReader

    x, y = tiny_data(n=48)
    for epochs, resume in ((3, False), (4, True)):
        model = compiled(tiny_relu_model())
        model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=[
            oi.OptimizationInsightCallback(tmp_path, resume=resume, checkpoint_freq=2,
                                           histogram_freq=2, variable_update_freq=1)])
    scalars = SummaryReader(str(tmp_path / "tensorboard")).scalars
    for tag in ("insight/grad_norm", "insight/hidden/kernel/wdiff"):
        steps = scalars[scalars.tag == tag]["step"].tolist()
        assert sorted(steps) == list(range(1, 13)), tag
    logged = scalars[scalars.tag == "insight/grad_norm"].sort_values("step")
    run = oi.read_log(tmp_path)
    assert logged["value"].tolist() == pytest.approx(run.steps["grad_norm"].tolist(), rel=1e-6)
    tensors = SummaryReader(str(tmp_path / "tensorboard"), pivot=False).tensors
    histogram_steps = tensors[tensors.tag == "gradients/hidden/kernel"]["step"].tolist()
    assert sorted(histogram_steps) == list(range(2, 13, 2))


def test_predict_and_evaluate_inside_fit_leave_the_recording_on(tmp_path):
    """A callback (or a probe) calling predict and evaluate in the middle of fit: every
    step is still recorded (Keras before 3.4 puts their History on model.history)."""
    x, y = tiny_data(n=64)
    model = compiled(tiny_relu_model())

    class Peek(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                self.model.predict(x[:8], verbose=0)
                self.model.evaluate(x[:8], y[:8], verbose=0)

    cb = oi.OptimizationInsightCallback(tmp_path, histogram_freq=0)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[cb, Peek()])
    assert [s["step"] for s in step_records(tmp_path)] == list(range(1, 9))
    assert oi.read_log(tmp_path).epochs["epoch"].tolist() == [0, 1]
    assert "make_train_function" not in model.__dict__


def test_a_further_fit_reuses_the_traced_insight_step_until_recompiled(tmp_path):
    """Fitting again with the same callback continues the run without tracing the
    insight train step again; after compile() it is traced anew (new loss/optimizer)."""
    x, y = tiny_data(n=32)
    model = compiled(tiny_relu_model())
    cb = oi.OptimizationInsightCallback(tmp_path, histogram_freq=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    first = cb._traced[1]
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # plain fit in between
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    assert cb._traced[1] is first
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    assert cb._traced[1] is not first
    steps = step_records(tmp_path)
    assert [s["step"] for s in steps] == list(range(1, 7))  # the plain fit not recorded
    assert "train_step" not in model.__dict__ and "make_train_function" not in model.__dict__
    # the SGD steps were recorded with the new step: Δw = -0.1·g for every variable
    for name, g_norm, wdiff in [(n, s["layers"][n]["grad_norm"], s["layers"][n]["wdiff"])
                                for s in steps[4:] for n in s["layers"]]:
        assert wdiff == pytest.approx(0.1 * g_norm, rel=1e-4), name
