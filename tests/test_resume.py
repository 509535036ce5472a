"""Resume as users do it (issue 28): a lowered learning rate, changed options, an
older log, a fine-tuning step that unfreezes layers between sessions."""

import json
import os

import keras
import numpy as np
import pytest
from conftest import step_records, tiny_data

import optinsight as oi


def build(learning_rate=1e-2, freeze_base=False):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)),
                              keras.layers.Dense(8, activation="relu", name="base"),
                              keras.layers.Dense(3, activation="softmax", name="head")])
    model.layers[0].trainable = not freeze_base
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="categorical_crossentropy")
    return model


def fit(model, log_dir, epochs, **options):
    x, y = tiny_data(n=64)
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[oi.OptimizationInsightCallback(log_dir, histogram_freq=2, **options)])


def test_resume_keeps_the_compiled_learning_rate(tmp_path, capsys):
    """Lowering the learning rate and resuming is a common fine-tuning step: the
    optimizer's iterations and slots come from the checkpoint, the learning rate is the
    one compiled now (the checkpoint's 1e-2 overwrote it)."""
    first = build(1e-2)
    fit(first, tmp_path, 2)
    saved = [np.array(v) for v in first.optimizer.variables]
    again = build(1e-4)
    recorder = oi.InsightRecorder(tmp_path, again, again.optimizer, resume=True)
    for variable, value in zip(again.optimizer.variables, saved):
        if variable.path.endswith("learning_rate"):
            assert float(variable.numpy()) == pytest.approx(1e-4)
        else:
            np.testing.assert_array_equal(variable.numpy(), value)
    assert int(again.optimizer.iterations.numpy()) == 8
    assert recorder.step == 8
    assert "learning rate 0.0001 as compiled (the checkpoint's was 0.01)" \
        in capsys.readouterr().err
    recorder.close()
    resumed = build(1e-4)
    fit(resumed, tmp_path, 3, resume=True)
    assert float(resumed.optimizer.learning_rate.numpy()) == pytest.approx(1e-4)
    assert int(resumed.optimizer.iterations.numpy()) == 12


@pytest.mark.parametrize("option, value", [("thresholds", (1e-6,)), ("ema_decay", 0.99),
                                           ("histogram_bins", 10)])
def test_resume_with_another_option_is_refused_before_anything_changes(
        tmp_path, option, value):
    """A changed threshold, decay or bin count is refused in one line naming the option
    and both values, before a weight is loaded or a log truncated (KeyError after both
    before; another bin count made Run.histograms unreadable)."""
    fit(build(), tmp_path, 2, checkpoint_freq=1)
    fit_more = build()
    fit_more.fit(*tiny_data(n=64), batch_size=16, epochs=1, verbose=0)  # other weights
    weights = [w.copy() for w in fit_more.get_weights()]
    files = {name: os.path.getsize(tmp_path / name) for name in ("steps.jsonl", "insight.json")}
    with pytest.raises(ValueError, match=f"resume with {option}=.*recorded with {option}="):
        fit(fit_more, tmp_path, 3, resume=True, **{option: value})
    for a, b in zip(weights, fit_more.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert files == {name: os.path.getsize(tmp_path / name) for name in files}
    assert len(oi.read_log(tmp_path).histograms()) == 4


@pytest.mark.parametrize("age", ["schema 1", "before raw_grad_norm"])
def test_resume_of_an_older_log_is_refused_in_one_line(tmp_path, age):
    fit(build(), tmp_path, 2)
    path = tmp_path / "insight.json"
    document = json.load(open(path))
    if age == "schema 1":
        document["schema_version"] = 1
        expected = "log schema 1, written by an older optinsight"
    else:
        del document["batch_wise"]["raw_grad_norm"]
        expected = "older optinsight without 'raw_grad_norm'"
    json.dump(document, open(path, "w"))
    with pytest.raises(ValueError, match=expected):
        fit(build(), tmp_path, 3, resume=True)


def test_resume_after_unfreezing_layers_continues_the_run(tmp_path, capsys):
    """A head trained with the base frozen; a later session unfreezes the base and
    resumes the same run (refused before: 'resume needs the same model'). The head's
    Adam slots and the iterations are restored, the base's start fresh, and the change
    is in meta.variable_changes as within one session."""
    frozen = build(freeze_base=True)
    fit(frozen, tmp_path, 2)
    def slot(variable):  # (layer, kernel or bias, momentum or velocity)
        return tuple(variable.path.split("_")[-3:])

    head_slots = {slot(v): np.array(v) for v in frozen.optimizer.variables if "head" in v.path}
    unfrozen = build(freeze_base=False)
    recorder = oi.InsightRecorder(tmp_path, unfrozen, unfrozen.optimizer, resume=True)
    assert int(unfrozen.optimizer.iterations.numpy()) == 8
    for variable in unfrozen.optimizer.variables:
        if "head" in variable.path:
            np.testing.assert_array_equal(variable.numpy(), head_slots[slot(variable)])
        elif "base" in variable.path:
            assert not np.any(variable.numpy())
    assert "2 added, 0 removed" in capsys.readouterr().err
    recorder.close()
    unfrozen = build(freeze_base=False)
    fit(unfrozen, tmp_path, 4, resume=True)
    run = oi.read_log(tmp_path)
    base = [n for n in run.variables if "base" in n]
    assert len(base) == 2 and len(run.variables) == 4
    assert run.summary["meta"]["variable_changes"] == [
        {"step": 8, "added": base, "removed": []}]
    assert [r["step"] for r in step_records(tmp_path)] == list(range(1, 17))
    grad_norm = run.layer(base[0])["grad_norm"]
    assert grad_norm[:8].isna().all() and (grad_norm[8:] > 0).all()


class Failing:
    """A probe that fails at its second evaluation."""

    name, kind, every = "flaky", "test", "epoch"

    def __init__(self):
        self.calls = 0

    def __call__(self, model, x, y):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("second call")
        return {"calls": float(self.calls)}


def test_the_run_so_far_is_the_run_on_disk_also_after_resume(tmp_path):
    """RunLog.run (what the epoch-end diagnosis reads) is built from memory; its steps,
    epochs and probes (a failure among them) equal read_log's of the files, before and
    after a resume truncated the logs to the checkpoint."""
    x, y = tiny_data(n=64)
    probe_data = (x[:8], y[:8])

    def recorded(model, epochs, **options):
        cb = oi.OptimizationInsightCallback(tmp_path, probes=[Failing()],
                                            probe_data=probe_data, diagnosis=False, **options)
        model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
                  callbacks=[cb])
        recorder = cb.recorder
        return recorder.run_so_far(recorder.summary()), oi.read_log(tmp_path)

    def assert_same(memory, disk):
        assert memory.probes.columns.tolist() == disk.probes.columns.tolist()
        for column in memory.probes:
            assert memory.probes[column].tolist() == pytest.approx(
                disk.probes[column].tolist(), nan_ok=True) if memory.probes[column].dtype \
                != object else memory.probes[column].tolist() == disk.probes[column].tolist()
        assert memory.steps["step"].tolist() == disk.steps["step"].tolist()
        assert memory.epochs.equals(disk.epochs)

    memory, disk = recorded(build(), 3)
    assert disk.probes["error"].notna().sum() == 1 and set(disk.probes["kind"]) == {"test"}
    assert_same(memory, disk)
    with open(tmp_path / "checkpoint" / "state.json") as f:
        assert json.load(f)["epoch"] == 3
    memory, disk = recorded(build(), 4, resume=True)
    assert disk.probes["step"].tolist() == [0, 4, 8, 12, 16]
    assert_same(memory, disk)
