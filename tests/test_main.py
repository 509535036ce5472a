"""`main.py` end to end on a generated CIFAR-10 directory."""

import json
import os
import re

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
    out, err = capsys.readouterr()
    assert "final:" in out and "val_accuracy=" in out and "macro_f1=" in out
    # progress while the step-0 probes run (it was silent for about 24 s)
    assert re.search(r"optinsight: probe 'hessian' at step 0: \d+\.\d s", err)
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


def test_multiworker_trains_in_a_custom_loop_and_only_the_chief_logs(cifar_dir, tmp_path):
    """`--strategy multiworker`, two workers on 127.0.0.1 (TF_CONFIG), probes on: both
    finish, the chief's log dir holds the run, the other worker's holds nothing."""
    import subprocess
    import sys

    from test_distribute import _free_ports

    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})}
        processes.append(subprocess.Popen(
            [sys.executable, main.__file__, "--dataset", "cifar10", "--data-dir",
             str(cifar_dir), "--epochs", "1", "--batch-size", "32", "--log-dir",
             str(tmp_path / f"worker{index}"), "--strategy", "multiworker",
             "--probe-examples", "32"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "epoch 1/1" in outputs[0][0] and "logs:" in outputs[0][0]
    assert "logs:" not in outputs[1][0]
    assert not (tmp_path / "worker1").exists()
    run = oi.read_log(tmp_path / "worker0")
    assert run.steps["step"].tolist() == [1, 2, 3]  # 90 training examples / 32
    assert run.epochs["val_mean_acc"].notna().all()
    probes = read_jsonl(tmp_path / "worker0" / "probes.jsonl")
    assert {p["probe"] for p in probes} >= {"hessian", "ntk", "neural_collapse"}
    assert not [p for p in probes if "error" in p]


def test_tensorflow_start_up_lines_are_hidden_unless_verbose(cifar_dir, tmp_path):
    """What TensorFlow prints while it starts (here: CUDA probing on a CPU-only
    machine) is left out of main.py's output; --verbose shows it. A default run, probes
    included, shows no TensorFlow warning (three tf.function retracing warnings got
    through)."""
    import subprocess
    import sys

    plain = subprocess.run([sys.executable, "-c", "import tensorflow as tf; tf.zeros(())"],
                           capture_output=True, text=True, env={**os.environ,
                                                                "TF_CPP_MIN_LOG_LEVEL": "2"})
    start_up = [line for line in plain.stderr.splitlines() if line.strip()]
    outputs = {}
    for flags in ([], ["--verbose", "--no-probes"]):
        done = subprocess.run(
            [sys.executable, main.__file__, "--dataset", "cifar10", "--data-dir",
             str(cifar_dir), "--epochs", "1", "--batch-size", "32",
             "--log-dir", str(tmp_path / f"run{len(flags)}"), *flags],
            capture_output=True, text=True, timeout=600,
            env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[bool(flags)] = done.stderr
    assert "probe 'hessian' at step 0" in outputs[False]
    assert not re.search(r"^(WARNING:tensorflow|W\d{4} )", outputs[False], re.MULTILINE)
    assert "retracing" not in outputs[False]  # TensorFlow's, not the diagnosis' warnings
    for line in start_up:  # e.g. "I0000 ... cudart_stub.cc:31] Could not find cuda drivers"
        tail = line.split("]", 1)[-1].strip()
        assert tail not in outputs[False]
        assert tail in outputs[True]
