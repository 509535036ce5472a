"""A new user's first hour (issue 31): another Keras backend, bad probe data, a failing
probe, a run recorded with other thresholds or without moving averages."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import tiny_data, tiny_relu_model

import optinsight as oi
from optinsight.cli import main as cli


@pytest.mark.parametrize("make", ["oi.OptimizationInsightCallback(log_dir)",
                                  "oi.InsightRecorder(log_dir, None, None)"])
def test_another_keras_backend_is_refused_in_one_line(tmp_path, make):
    """KERAS_BACKEND=jax: one line at construction naming the fix, nothing written (fit
    failed with 'guarded() takes 1 positional argument', or a deep traceback when jax
    is not installed)."""
    log_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", f"import optinsight as oi\nlog_dir = {str(log_dir)!r}\n{make}"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "KERAS_BACKEND": "jax"})
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1
    assert last.startswith("ValueError: optinsight needs Keras's TensorFlow backend, but "
                           "Keras is set to 'jax': set KERAS_BACKEND=tensorflow")
    assert not log_dir.exists()


@pytest.mark.parametrize("options", [{"thresholds": (1e-6,)}, {"ema_decay": None},
                                     {"thresholds": (1e-8, 1e-6, 1e-4), "ema_decay": 0.5}])
def test_commands_and_figures_read_the_runs_own_thresholds(tmp_path, capsys, options):
    """`summary` on a run with thresholds=(1e-6,) crashed with KeyError
    'no_zero_e5_grad2'; the report dropped its zero-gradient, released and flip
    figures, and with ema_decay=None the released and flip figures."""
    x, y = tiny_data(n=64)
    model = tiny_relu_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[oi.OptimizationInsightCallback(tmp_path, **options)])
    assert cli(["summary", str(tmp_path)]) == 0
    widest = f"{max(options.get('thresholds', (1e-5,))):.0e}".replace("1e-0", "e")
    assert f"zero_grads_{widest}" in capsys.readouterr().out
    assert cli(["report", str(tmp_path)]) == 0
    for name in ("zero_gradients", "released_fraction", "sign_flips"):
        assert (tmp_path / "report" / f"{name}.png").exists(), name
    page = (tmp_path / "report" / "index.html").read_text()
    assert "the run has no" not in page
    if options.get("ema_decay", 0.9) is not None:
        suffix = "_05avg" if options.get("ema_decay") == 0.5 else "_09avg"
        run = oi.read_log(tmp_path)
        assert any(c.endswith(suffix) for c in run.steps.columns)


def test_every_main_flag_has_help_and_its_default():
    """main.py --help: every flag says what it does and its default (most had
    neither)."""
    import config

    parser = config.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.option_strings
        assert "%(default)s" in parser._get_formatter()._get_help_string(action), action.dest
    assert "(default: 1024)" in text and "(default: 0.9)" in text


@pytest.mark.parametrize("probe_data, match", [
    (np.zeros((8, 6)), "must be a pair \\(x, y\\) of arrays.*got ndarray"),
    ((np.zeros((8, 6)), np.array(["cat"] * 8)), "y must be a numeric array.*encode them"),
    ((np.zeros((8, 6)), np.zeros((7, 3))), "x has 8 examples but y has 7"),
])
def test_bad_probe_data_is_refused_when_the_callback_is_built(tmp_path, probe_data, match):
    """Labels as strings, x without y, unequal lengths: one line at construction (they
    failed later, quietly, or with 'too many values to unpack')."""
    from optinsight import probes

    with pytest.raises(ValueError, match=match):
        oi.OptimizationInsightCallback(tmp_path, probes=[probes.NTKProbe()],
                                       probe_data=probe_data)


def test_probe_data_of_another_shape_is_refused_before_the_first_step(tmp_path):
    """Images of the wrong size: one line at train begin naming both shapes, before any
    training step (every probe failed at every epoch with Keras's first line)."""
    from optinsight import probes

    x, y = tiny_data(n=32)
    model = tiny_relu_model()
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    weights = [w.copy() for w in model.get_weights()]
    cb = oi.OptimizationInsightCallback(tmp_path, probes=[probes.NTKProbe()],
                                        probe_data=(np.zeros((8, 7), "float32"), y[:8]))
    with pytest.raises(ValueError, match=r"x has examples of shape \(7,\), but model .* "
                                         r"takes inputs of shape \(6,\)"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_failing_probe_says_why_and_the_diagnosis_reports_it(tmp_path, capsys):
    """Labels of 5 classes for a 3-class model: the probe's one line names the real
    error (it printed Keras's wrapper line), probes.jsonl records it, and the
    diagnosis reports it instead of 'no problems found'."""
    from optinsight import probes

    x, y = tiny_data(n=32)
    model = tiny_relu_model()
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    wrong = keras.utils.to_categorical(np.arange(16) % 5, 5)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[oi.OptimizationInsightCallback(
        tmp_path, probes=[probes.HessianProbe()], probe_data=(x[:16], wrong),
        diagnosis=False)])
    err = capsys.readouterr().err
    assert "probe 'hessian' failed at step 0: ValueError: Arguments `target` and `output` " \
           "must have the same shape" in err
    assert oi.read_log(tmp_path).probes["error"].notna().all()
    finding = oi.diagnose(tmp_path)[0]
    assert finding.code == "probe_failed" and "must have the same shape" in finding.evidence
    assert cli(["diagnose", str(tmp_path)]) == 0  # a warning
    assert "probe_failed" in capsys.readouterr().out
