"""A new user's first hour (issue 31): another Keras backend, a run recorded with other
thresholds or without moving averages read by every command and figure."""

import os
import subprocess
import sys

import keras
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
