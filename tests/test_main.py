"""`main.py` end to end on a generated CIFAR-10 directory."""

import json
import os

import pytest
from datafiles import write_cifar_dir

import main
import optinsight as oi
from optinsight.logs.jsonlog import read_jsonl


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar_dir(root, per_batch=20)
    return root


def test_trains_and_writes_every_promised_log(cifar_dir, tmp_path, capsys):
    log_dir = tmp_path / "run"
    argv = ["--dataset", "cifar10", "--data-dir", str(cifar_dir), "--epochs", "1",
            "--batch-size", "32", "--log-dir", str(log_dir), "--histogram-freq", "2"]
    assert main.main(argv) == 0
    out = capsys.readouterr().out
    assert "final:" in out and "val_accuracy=" in out and "macro_f1=" in out
    assert f"tensorboard --logdir {log_dir / 'tensorboard'}" in out
    steps = read_jsonl(log_dir / "steps.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3]  # 90 training examples / 32
    assert set(oi.read_log(log_dir).variables) == {
        f"{layer}/{kind}" for layer in ("conv1", "conv2", "conv3", "dense1", "output")
        for kind in ("kernel", "bias")}
    summary = json.load(open(log_dir / "insight.json"))
    assert len(summary["batch_wise"]["grad_norm"][0]) == 3
    assert summary["epoch_wise"]["val_mean_acc"][0] is not None
    assert os.listdir(log_dir / "tensorboard" / "train")
    assert (log_dir / "signs" / "epoch_0000.npz").exists()
    assert json.load(open(log_dir / "checkpoint" / "state.json"))["step"] == 3
    probes = read_jsonl(log_dir / "probes.jsonl")
    assert {p["probe"] for p in probes} >= {"hessian", "ntk", "weight_spectrum",
                                            "gradient_noise", "neural_collapse"}
    assert not [p for p in probes if "error" in p]
    assert {p["step"] for p in probes if p["probe"] == "hessian"} == {0, 3}

    assert main.main(argv[:5] + ["2"] + argv[6:] + ["--resume", "--strategy", "mirrored"]) == 0
    assert [s["step"] for s in read_jsonl(log_dir / "steps.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [s["epoch"] for s in read_jsonl(log_dir / "steps.jsonl")] == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("argv, match", [
    (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    (["--dataset", "cifar10", "--data-dir", "{empty}"], "no CIFAR-10 data in"),
    (["--nonsense"], "unrecognized arguments"),
])
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, argv, match):
    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    assert main.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err
