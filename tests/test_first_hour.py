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


class KernelSum:
    """A probe: the sum of the model's first kernel at the weights it runs on."""

    name, kind = "kernel_sum", "test"

    def __init__(self, every):
        self.every = every

    def __call__(self, model, x, y):
        return {"sum": float(np.sum(model.trainable_variables[0].numpy()))}


class ThreadOfBatchEnd(keras.callbacks.Callback):
    """Notes the threads Keras runs on_train_batch_end on (async-safe itself, so it
    leaves Keras's dispatch as the other callbacks make it)."""

    async_safe = True

    def __init__(self):
        super().__init__()
        self.threads = set()

    def on_train_batch_end(self, batch, logs=None):
        import threading

        self.threads.add(threading.current_thread())


class Synchronous(keras.callbacks.Callback):
    """A callback that is not async-safe: Keras dispatches batch ends in order."""

    def on_train_batch_end(self, batch, logs=None):
        pass


def test_keras_asynchronous_dispatch_stays_on_and_records_the_same(tmp_path, monkeypatch):
    """The callback lets Keras dispatch batch ends on its thread pool (verbose=0), and
    what it records then equals what it records with synchronous dispatch: probes at
    the weights of the step they were due at, histograms and sign maps at theirs.
    Keras dispatches asynchronously on thread-safe backends only; since Keras 3.7 the
    TensorFlow backend says it is not (3.6 dispatched), so the test says it is."""
    import threading

    from keras.src import backend

    if not hasattr(backend, "IS_THREAD_SAFE"):
        pytest.skip("this Keras has no asynchronous dispatch (before 3.6)")
    monkeypatch.setattr(backend, "IS_THREAD_SAFE", True)

    x, y = tiny_data(n=96)
    runs = {}
    for mode, extra in (("async", ThreadOfBatchEnd()), ("sync", Synchronous())):
        keras.utils.set_random_seed(0)
        model = tiny_relu_model()
        model.compile(optimizer="adam", loss="categorical_crossentropy")
        threads = ThreadOfBatchEnd()
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[
            oi.OptimizationInsightCallback(tmp_path / mode, histogram_freq=4,
                                           sign_map_freq=5, probes=[KernelSum(every=3)],
                                           probe_data=(x[:8], y[:8])), extra, threads])
        runs[mode] = (oi.read_log(tmp_path / mode), threads.threads)
    (run, threads), (sync, sync_threads) = runs["async"], runs["sync"]
    assert threading.current_thread() not in threads  # dispatched on Keras's pool
    assert sync_threads == {threading.current_thread()}
    assert run.probes["step"].tolist() == list(range(0, 25, 3))
    np.testing.assert_array_equal(run.probes["sum"], sync.probes["sum"])
    assert [h["step"] for h in run.histograms()] == list(range(4, 25, 4))
    assert [h["step"] for h in run.histograms()] == [h["step"] for h in sync.histograms()]
    assert [label for label, _, _ in run.sign_maps()] == \
        [label for label, _, _ in sync.sign_maps()]
    for (_, a, _), (_, b, _) in zip(run.sign_maps(), sync.sign_maps()):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    assert run.steps.equals(sync.steps)
    assert not oi.OptimizationInsightCallback(tmp_path / "s", stop_on="error").async_safe


NOTEBOOK = """
import json, sys
import matplotlib
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()  # as in a Jupyter kernel: a shell, then the import
backend = matplotlib.get_backend()
import optinsight as oi
run = oi.read_log(sys.argv[1])
shown, _ = shell.display_formatter.format(run)
findings, _ = shell.display_formatter.format(oi.diagnose(sys.argv[1]))
one, _ = shell.display_formatter.format(oi.diagnose(sys.argv[1])[0])
print(json.dumps({"run": shown.get("text/html"), "plain": shown["text/plain"],
                  "findings": findings.get("text/html"), "one": one.get("text/html"),
                  "backend": [backend, matplotlib.get_backend()]}))
"""


def test_a_run_and_its_findings_show_as_html_in_a_notebook(tmp_path):
    """In IPython a Run shows its size, sparklines, epochs table and findings, and the
    findings show as a table, without touching the notebook's plotting backend."""
    import json

    x, y = tiny_data(n=96)
    keras.utils.set_random_seed(0)
    model = tiny_relu_model()
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[oi.OptimizationInsightCallback(tmp_path, diagnosis=False)])
    findings = oi.diagnose(tmp_path)
    assert findings  # the tiny ReLU net has dead units
    out = subprocess.run([sys.executable, "-c", NOTEBOOK, str(tmp_path)], capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    shown = json.loads(out.stdout.strip().splitlines()[-1])
    assert shown["plain"] == f"Run({str(tmp_path)!r}: 24 steps, 2 epochs, 4 variables)"
    page = shown["run"]
    assert "24 steps, 2 epochs, 4 variables" in page
    assert page.count("data:image/png;base64,") == 4  # loss, gradient norm, update, wdiff
    assert "<th>train_mean_loss</th>" in page and page.count("<tr>") >= 3
    for finding in findings:
        assert f"<b>{finding.code}</b>" in page and f"<b>{finding.code}</b>" in \
            shown["findings"]
    assert shown["one"].count("<tr>") == 2  # a header and the finding
    assert shown["backend"][0] == shown["backend"][1]
