"""Config parsing and validation: every field, wrong type, range and combination."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import Config, DataConfig, InsightConfig, TrainConfig, parse_args


def test_defaults():
    c = parse_args([])
    assert isinstance(c, Config)
    assert c.data == DataConfig() and c.train == TrainConfig() and c.insight == InsightConfig()
    assert c.data.batch_size == 1024 and c.data.dataset == "cifar10"
    assert c.insight.thresholds == (1e-7, 1e-5)


def test_flags(tmp_path):
    c = parse_args(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--epochs", "3",
                    "--batch-size", "64", "--lr", "0.01", "--log-dir", "x", "--resume",
                    "--checkpoint-every", "2", "--thresholds", "1e-6,1e-4", "--ema-decay", "none",
                    "--sign-map-freq", "50", "--update-freq", "epoch", "--limit", "100",
                    "--variable-update-freq", "epoch", "--instruments", "full",
                    "--instrument-freq", "5"])
    assert c.data == DataConfig("fashion-mnist", str(tmp_path), 64, 0.1, 100)
    assert c.train == TrainConfig(3, 0.01, 0, "x", True, 2, "none")
    assert c.insight.thresholds == (1e-6, 1e-4) and c.insight.ema_decay is None
    assert c.insight.sign_map_freq == 50 and c.insight.update_freq == "epoch"
    assert c.insight.variable_update_freq == "epoch"
    assert (c.insight.instruments, c.insight.instrument_freq) == ("full", 5)
    assert parse_args(["--instruments", "none"]).insight.instruments is None


@pytest.mark.parametrize("argv, match", [
    (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    (["--batch-size", "ten"], "invalid int value: 'ten'"),
    (["--epochs", "-1"], "epochs must be a positive integer, got -1"),
    (["--lr", "0"], "lr must be a positive number, got 0.0"),
    (["--lr", "inf"], "lr must be a positive number"),
    (["--dataset", "mnist"], "dataset must be one of"),
    (["--thresholds", "1e-5,1e-7"], "strictly increasing"),
    (["--thresholds=-1e-5"], "positive"),
    (["--thresholds", "a,b"], "comma-separated numbers"),
    (["--ema-decay", "1.5"], r"ema_decay must be None or a number in \[0, 1\), got 1.5"),
    (["--histogram-freq", "-2"], "histogram_freq must be a non-negative integer"),
    (["--update-freq", "0"], "update_freq"),
    (["--update-freq", "often"], "expected an integer or one of"),
    (["--variable-update-freq", "-3"], "variable_update_freq"),
    (["--validation-split", "1"], r"validation_split must be in \[0, 1\)"),
    (["--resume"], "--resume needs --log-dir"),
    (["--checkpoint-every", "-1"], "checkpoint_every"),
    (["--limit", "0"], "limit must be a positive integer"),
    (["--strategy", "tpu"], "strategy must be one of"),
    (["--instruments", "first"], "instruments='first' is not a preset"),
    (["--instrument-freq", "0"], "instrument_freq must be a positive integer"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_values_name_what_was_received(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


def test_missing_data_dir():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_args(["--data-dir", "/no/such/dir"])


def test_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().epochs = 3


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["--batch-size", "--epochs", "--lr", "--thresholds",
                                 "--ema-decay", "--update-freq", "--sign-map-freq", "x", "-1",
                                 "0", "1e-5", "none", "epoch", "3", "", "1e-7,1e-5"]),
                max_size=6))
def test_parsing_never_fails_other_than_with_value_error(argv):
    """Whatever the arguments, parse_args gives a Config or a one-line ValueError."""
    try:
        parse_args(argv)
    except ValueError as e:
        assert "\n" not in str(e) and str(e)
