"""The report: every figure from a real run, one self-contained page that renders in
headless Chromium, and clear errors for bad log dirs."""

import html
import os
import re
import shutil
import subprocess

import keras
import numpy as np
import pytest

import main
import optinsight as oi
from optinsight.cli import main as cli
from optinsight.report import plots

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two epochs of the reference CNN on 18×18 images with the main job's probes."""
    log_dir = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    x = rng.random((192, 18, 18, 1), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, 192), 10).astype("float32")
    keras.utils.set_random_seed(0)
    model = main.build_model(x.shape[1:])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    cb = oi.OptimizationInsightCallback(log_dir, histogram_freq=2, histogram_bins=30,
                                        probes=main.build_probes(every=3),
                                        probe_data=(x[:64], y[:64]), instruments="full",
                                        instrument_freq=2)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[cb], validation_split=0.2)
    return log_dir


def test_every_figure_is_drawn_from_a_full_run(run_dir):
    run = oi.read_log(run_dir)
    for spec in plots.FIGURES:
        figure = spec.draw(run)
        assert figure.axes, spec.name
        figure.clf()


def softmax_regression_run(log_dir, optimizer, **options):
    """One epoch of a softmax regression on 32 examples recorded in `log_dir` with the
    callback's `options` (probe_data: its first 16 examples); returns the run."""
    x = np.random.default_rng(0).random((32, 6)).astype("float32")
    y = keras.utils.to_categorical(np.arange(32) % 3, 3)
    x_in = keras.Input((6,))
    model = keras.Model(x_in, keras.layers.Dense(3, activation="softmax")(x_in))
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    if "probes" in options:
        options["probe_data"] = (x[:16], y[:16])
    model.fit(x, y, epochs=1, verbose=0,
              callbacks=[oi.OptimizationInsightCallback(log_dir, **options)])
    return oi.read_log(log_dir)


def test_missing_data_gives_a_note_not_a_crash(tmp_path):
    run = softmax_regression_run(tmp_path, "adam", histogram_freq=0, sign_map_freq=0)
    with pytest.raises(plots.MissingData, match="no 'hessian' probe"):
        plots.sharpness(run)
    with pytest.raises(plots.MissingData, match="no gradient histograms"):
        plots.gradient_histograms(run)
    assert cli(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "sign map: no gradient sign maps" in page
    # probes that did not run are named once, with their figures, not figure by figure
    assert page.count("Not in this run") == 1 and "hessian (sharpness, hessian density)" \
        in page and "recorded no" not in page
    assert "(step size, batch size tests, gradient noise, gradient parameter histogram, "\
        "distance). Pass instruments=" in html.unescape(page)


def test_report_page_is_self_contained_and_renders(run_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli(["report", str(run_dir), "-o", str(out)]) == 0
    assert f"report: {out / 'index.html'}" in capsys.readouterr().out
    names = [spec.name for spec in plots.FIGURES]
    assert sorted(p[:-4] for p in os.listdir(out) if p.endswith(".png")) == sorted(names)
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(names)
    assert not re.search(r"""(src|href)=['"]?(https?:|//)""", page)  # nothing from a network
    assert "No problems found" in page or "class='finding" in page
    for spec in plots.FIGURES:  # each figure says what it shows and what healthy is
        assert f"<b>{spec.name.replace('_', ' ')}</b>: {html.escape(spec.caption)}" \
            "</figcaption>" in page
        assert spec.caption.endswith(".") and spec.caption.count(". ") == 0
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    profile = tmp_path / "profile"
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                          "--virtual-time-budget=10000", "--dump-dom",
                          (out / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert f'data-figures-rendered="{len(names)}/{len(names)}"' in dom
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                    "--window-size=1400,4000", f"--screenshot={shot}",
                    (out / "index.html").as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 50_000  # a page with pictures, not a blank one


def test_report_bad_log_dirs(tmp_path, capsys):
    assert cli(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert cli(["report", str(tmp_path / "a_file")]) == 2
    assert "is a file: give the run's log directory" in capsys.readouterr().err
    assert cli(["report", str(tmp_path)]) == 2
    assert "holds no optinsight run" in capsys.readouterr().err


def test_summary_table(run_dir, capsys):
    assert cli(["summary", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 epochs" in out and "train_mean_loss" in out and "grad_norm" in out


def test_figures_label_what_they_draw(run_dir):
    """Epochs numbered from 0 as in `summary`; a formula axis label rendered as maths,
    not a literal w_{t−1}; one histogram titled by its step, not "steps 30…30"."""
    run = oi.read_log(run_dir)
    accuracy = plots.loss_and_accuracy(run).axes[1]
    assert list(accuracy.lines[0].get_xdata()) == list(run.epochs["epoch"]) == [0, 1]
    assert all(float(t).is_integer() for t in accuracy.get_xticks())
    label = plots.weight_difference(run).axes[0].get_ylabel()
    assert label.startswith("$") and label.endswith("$")
    first = run.histograms()[:1]
    run.histograms = lambda *args, **kwargs: first  # a run with one histogram
    title = plots.gradient_histograms(run).texts[0].get_text()
    step = first[0]["step"]
    assert title.endswith(f"step {step}") and "…" not in title


@pytest.mark.parametrize("lr, axes", [(1e-3, 2), (0.5, 1)])
def test_sharpness_far_below_its_limit_gets_a_second_axis(run_dir, lr, axes):
    """SGD's limit 2/lr far above λmax would flatten the sharpness to a line on one
    axis, so it gets its own; near it, they share one. The title gives the ratio."""
    run = oi.read_log(run_dir)
    rows = run.probes[run.probes["probe"] == "hessian"].copy()
    rows = rows.drop(columns=["stability_limit", "sharpness"])
    rows["lambda_1"] = [1.0, 2.0, 3.0, 3.5]
    rows["lr_times_lambda_max"] = lr * rows["lambda_1"]
    run.probes = rows
    figure = plots.sharpness(run)
    assert len(figure.axes) == axes
    assert f"{3.5 * lr / 2:.2g}× the stability limit" in figure.axes[0].get_title()
    limit = figure.axes[-1].lines[-1]
    np.testing.assert_allclose(limit.get_ydata(), 2 / lr)


def test_probes_are_found_by_kind_not_by_name(tmp_path):
    """A HessianProbe named "curvature" is drawn like any Hessian probe (the report
    looked for the name "hessian"), probes.jsonl records its kind, and the diagnosis
    reads an activation probe's zero fractions whatever its name."""
    import dataclasses
    from importlib import import_module

    import pandas as pd

    from optinsight import probes

    run = softmax_regression_run(
        tmp_path, "sgd", probes=[probes.HessianProbe(name="curvature", per_layer=False)],
        diagnosis=False)
    assert set(run.probes["probe"]) == {"curvature"} and set(run.probes["kind"]) == {
        "hessian"}
    assert plots.sharpness(run).axes
    diagnose_run = import_module("optinsight.diagnose").diagnose_run
    rows = pd.DataFrame({"step": [2], "epoch": [0], "probe": ["acts"],
                         "kind": ["activations"], "dense/zero_fraction": [1.0]})
    dead = diagnose_run(dataclasses.replace(run, probes=rows))
    assert [(f.code, f.layer) for f in dead if f.code == "dead_layer"] == [
        ("dead_layer", "dense")]
    other = diagnose_run(dataclasses.replace(run, probes=rows.assign(kind="mine")))
    assert "dead_layer" not in [f.code for f in other]
