"""Settings of the main job as frozen dataclasses, built from argv and validated.

`parse_args(argv) -> Config` raises ValueError with a one-line message naming the
value received and what was expected, for a bad flag as for a bad value.
"""

import argparse
import dataclasses
import datetime
import os

from data_loader import DATASETS
from optinsight.metrics import INSTRUMENT_PRESETS, instrument_names
from optinsight.options import validate_ema_decay, validate_thresholds
from optinsight.schedule import Every


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to train on: dataset name, where its files are, batching."""

    dataset: str = "cifar10"
    data_dir: str | None = None
    batch_size: int = 1024
    validation_split: float = 0.1
    limit: int | None = None  # use only the first `limit` training examples

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise FileNotFoundError(f"data dir {self.data_dir!r} does not exist")
        _positive_int("batch_size", self.batch_size)
        if not 0 <= self.validation_split < 1:
            raise ValueError(
                f"validation_split must be in [0, 1), got {self.validation_split!r}")
        if self.limit is not None:
            _positive_int("limit", self.limit)


STRATEGIES = ("none", "mirrored", "multiworker")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: epochs, learning rate, seed, logs and checkpoints."""

    epochs: int = 10
    lr: float = 1e-3
    seed: int = 0
    log_dir: str | None = None
    resume: bool = False
    checkpoint_every: int = 1
    strategy: str = "none"  # tf.distribute: none, mirrored (local devices), multiworker
    verbose: bool = False  # show TensorFlow's start-up lines (CUDA probing, CPU notices)

    def __post_init__(self):
        _positive_int("epochs", self.epochs)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not (isinstance(self.lr, float) and 0 < self.lr < float("inf")):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        Every.parse("checkpoint_every", self.checkpoint_every, ())
        if self.resume and self.log_dir is None:
            raise ValueError("--resume needs --log-dir, the run to continue")

    def run_dir(self, dataset):
        """The log dir: as given, else runs/<dataset>-<timestamp>."""
        if self.log_dir is not None:
            return self.log_dir
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return os.path.join("runs", f"{dataset}-{stamp}")


@dataclasses.dataclass(frozen=True)
class InsightConfig:
    """OptimizationInsightCallback settings (see its docstring)."""

    thresholds: tuple = (1e-7, 1e-5)
    ema_decay: float | None = 0.9
    histogram_freq: int = 30
    histogram_bins: int = 1000
    sign_map_freq: int | str = "epoch"
    update_freq: int | str = "batch"
    variable_update_freq: int | str = 200
    probes: bool = True  # the probe set of main.py, on `probe_examples` held-out examples
    probe_examples: int = 128
    # Cockpit's instruments on the training batch: a due step of the reference CNN at
    # batch 1024 costs about 2.7 steps, so every 50 steps adds about 4 %
    instruments: str | None = "economy"
    instrument_freq: int = 50

    def __post_init__(self):
        validate_thresholds(self.thresholds)
        validate_ema_decay(self.ema_decay)
        Every.parse("histogram_freq", self.histogram_freq, ())
        _positive_int("histogram_bins", self.histogram_bins)
        Every.parse("sign_map_freq", self.sign_map_freq)
        Every.parse("update_freq", self.update_freq, ("batch", "epoch"), positive=True)
        Every.parse("variable_update_freq", self.variable_update_freq)
        _positive_int("probe_examples", self.probe_examples)
        instrument_names(self.instruments)
        Every.parse("instrument_freq", self.instrument_freq, (), positive=True)

    def callback_kwargs(self):
        """The OptimizationInsightCallback arguments among these settings."""
        kwargs = dataclasses.asdict(self)
        del kwargs["probes"], kwargs["probe_examples"]
        return kwargs


@dataclasses.dataclass(frozen=True)
class Config:
    data: DataConfig
    train: TrainConfig
    insight: InsightConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def _number_list(text):
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers like 1e-7,1e-5, got {text!r}") from None


def _freq(words):
    def parse(text):
        if text in words:
            return text
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer or one of {words}, got {text!r}") from None
    return parse


def _decay(text):
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def build_parser():
    p = _Parser(prog="main.py", description="Train the reference CNN with optimization "
                "insight switched on.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = DataConfig()
    t = TrainConfig()
    i = InsightConfig()
    p.add_argument("--dataset", default=d.dataset, help=f"one of {DATASETS}")
    p.add_argument("--data-dir", default=None, help="directory holding the dataset's files")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per batch")
    p.add_argument("--validation-split", type=float, default=d.validation_split,
                   help="fraction of the training examples held out for validation")
    p.add_argument("--limit", type=int, default=None,
                   help="train on the first N examples only (quick runs)")
    p.add_argument("--epochs", type=int, default=t.epochs, help="epochs to train")
    p.add_argument("--lr", type=float, default=t.lr, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=t.seed,
                   help="seed of weights, shuffling and probes")
    p.add_argument("--log-dir", default=None,
                   help="where the run's logs go; runs/<dataset>-<timestamp> when not given")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --log-dir from its last checkpoint")
    p.add_argument("--strategy", default=t.strategy,
                   help=f"tf.distribute strategy, one of {STRATEGIES} (multiworker reads "
                   "TF_CONFIG and trains in a custom loop with InsightRecorder; only the "
                   "chief writes logs)")
    p.add_argument("--verbose", action="store_true",
                   help="show TensorFlow's start-up lines (CUDA probing, CPU notices)")
    p.add_argument("--checkpoint-every", type=int, default=t.checkpoint_every,
                   help="epochs between checkpoints (0: none)")
    p.add_argument("--thresholds", type=_number_list, default=i.thresholds,
                   help="zero-band thresholds, e.g. 1e-7,1e-5")
    p.add_argument("--ema-decay", type=_decay, default=i.ema_decay,
                   help="decay of the gradient/weight moving averages, or 'none'")
    p.add_argument("--histogram-freq", type=int, default=i.histogram_freq,
                   help="batches between gradient/weight histograms (0: none)")
    p.add_argument("--histogram-bins", type=int, default=i.histogram_bins,
                   help="bins per histogram")
    p.add_argument("--sign-map-freq", type=_freq(("epoch",)), default=i.sign_map_freq,
                   help="gradient sign maps every epoch, or every N batches (0: none)")
    p.add_argument("--update-freq", type=_freq(("batch", "epoch")), default=i.update_freq,
                   help="whole-model TensorBoard scalars: 'batch', 'epoch' or every N batches")
    p.add_argument("--variable-update-freq", type=_freq(("epoch",)),
                   default=i.variable_update_freq,
                   help="batches between per-variable TensorBoard scalars, 'epoch' or 0")
    p.add_argument("--no-probes", dest="probes", action="store_false",
                   help="per-batch dynamics only: no Hessian, NTK, spectra, ... probes")
    p.add_argument("--probe-examples", type=int, default=i.probe_examples,
                   help="held-out examples the probes run on")
    p.add_argument("--instruments", default=i.instruments,
                   type=lambda text: None if text == "none" else text,
                   help=f"Cockpit's instruments on the training batch: one of "
                        f"{', '.join(INSTRUMENT_PRESETS)}, or 'none'")
    p.add_argument("--instrument-freq", type=int, default=i.instrument_freq,
                   help="steps between two steps the instruments are recorded at")
    return p


def parse_args(argv=None):
    """Config from command-line arguments (sys.argv[1:] when None)."""
    a = build_parser().parse_args(argv)
    return Config(
        data=DataConfig(a.dataset, a.data_dir, a.batch_size, a.validation_split, a.limit),
        train=TrainConfig(a.epochs, a.lr, a.seed, a.log_dir, a.resume, a.checkpoint_every,
                          a.strategy, a.verbose),
        insight=InsightConfig(a.thresholds, a.ema_decay, a.histogram_freq, a.histogram_bins,
                              a.sign_map_freq, a.update_freq, a.variable_update_freq, a.probes,
                              a.probe_examples, a.instruments, a.instrument_freq),
    )
