"""The recording options shared by `InsightRecorder` and `OptimizationInsightCallback`,
validated once: a bad value raises ValueError with one line naming it."""

import dataclasses
import math
import os

import numpy as np

from optinsight.metrics import instrument_names
from optinsight.probes.base import check_probe, probe_kind
from optinsight.schedule import Every


def validate_thresholds(thresholds):
    """Tuple of floats, each positive and strictly increasing; else ValueError."""
    try:
        values = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError):
        raise ValueError(
            f"thresholds must be a sequence of positive numbers, got {thresholds!r}") from None
    if not values or any(not (math.isfinite(t) and t > 0) for t in values):
        raise ValueError(f"thresholds must be positive and finite, got {thresholds!r}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"thresholds must be strictly increasing, got {thresholds!r}")
    return values


def validate_ema_decay(ema_decay):
    """None or a float in [0, 1); else ValueError."""
    if ema_decay is None:
        return None
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) \
            or not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be None or a number in [0, 1), got {ema_decay!r}")
    return float(ema_decay)


def validate_probe_data(probe_data):
    """(x, y) as numpy arrays: a pair of numeric array-likes with one row per example;
    else ValueError naming what is wrong."""
    if not isinstance(probe_data, (tuple, list)) or len(probe_data) != 2:
        raise ValueError("probe_data must be a pair (x, y) of arrays, one row per example; "
                         f"got {type(probe_data).__name__}"
                         + (f" of length {len(probe_data)}"
                            if isinstance(probe_data, (tuple, list)) else ""))
    arrays = []
    for name, value in zip(("x", "y"), probe_data):
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"probe_data's {name} is not an array ({e})") from None
        if array.ndim == 0 or not (np.issubdtype(array.dtype, np.number)
                                   or array.dtype == bool):
            raise ValueError(f"probe_data's {name} must be a numeric array with one row per "
                             f"example, got dtype {array.dtype} and shape {array.shape}"
                             + (" (labels as strings? encode them as integers or one-hot)"
                                if name == "y" and array.dtype.kind in "USO" else ""))
        arrays.append(array)
    if len(arrays[0]) != len(arrays[1]):
        raise ValueError(f"probe_data's x has {len(arrays[0])} examples but y has "
                         f"{len(arrays[1])}")
    return tuple(arrays)


def validate_log_dir(log_dir):
    """`log_dir` as a str path; ValueError if it is not a path."""
    if not isinstance(log_dir, (str, os.PathLike)):
        raise ValueError(f"log_dir must be a path, got {log_dir!r}")
    return os.fspath(log_dir)


def prepare_log_dir(log_dir):
    """Create `log_dir` if missing and check it is a writable directory."""
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise ValueError(f"log_dir {log_dir!r} is a file; expected a directory")
    try:
        os.makedirs(log_dir, exist_ok=True)
        probe = os.path.join(log_dir, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"log_dir {log_dir!r} is not writable ({e.strerror})") from None
    return log_dir


def _count(name, value, minimum=0):
    """An int of at least `minimum`; else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class InsightOptions:
    """What is recorded and how often (the arguments of `OptimizationInsightCallback`,
    which documents each)."""

    thresholds: tuple = (1e-7, 1e-5)
    ema_decay: float | None = 0.9
    histogram_freq: Every = 30
    histogram_bins: int = 1000
    sign_map_freq: Every = "epoch"
    sign_map_max_params: int = 65536
    probes: tuple = ()
    probe_data: object = None
    tensorboard: bool = True
    update_freq: Every = "batch"
    variable_update_freq: Every = 200
    resume: bool = False
    checkpoint_freq: Every = 1
    diagnosis: bool = True
    stop_on: str | None = None
    verbose: int = 0
    instruments: tuple = ()
    instrument_freq: Every = 1

    def __post_init__(self):
        def set_(name, value):
            object.__setattr__(self, name, value)

        set_("thresholds", validate_thresholds(self.thresholds))
        set_("ema_decay", validate_ema_decay(self.ema_decay))
        set_("histogram_freq", Every.parse("histogram_freq", self.histogram_freq, ()))
        set_("histogram_bins", _count("histogram_bins", self.histogram_bins, minimum=1))
        set_("sign_map_freq", Every.parse("sign_map_freq", self.sign_map_freq))
        set_("sign_map_max_params", _count("sign_map_max_params", self.sign_map_max_params))
        set_("update_freq", Every.parse("update_freq", self.update_freq, ("batch", "epoch"),
                                        positive=True))
        set_("variable_update_freq", Every.parse("variable_update_freq",
                                                 self.variable_update_freq))
        set_("probes", tuple(self.probes))
        for probe in self.probes:
            check_probe(probe)
        if self.probes and self.probe_data is None:
            raise ValueError("probes need probe_data=(x, y), the batch they run on")
        if self.probe_data is not None:
            set_("probe_data", validate_probe_data(self.probe_data))
        set_("tensorboard", bool(self.tensorboard))
        set_("resume", bool(self.resume))
        set_("checkpoint_freq", Every.parse("checkpoint_freq", self.checkpoint_freq, ()))
        set_("diagnosis", bool(self.diagnosis))
        set_("instruments", instrument_names(self.instruments or None))
        set_("instrument_freq", Every.parse("instrument_freq", self.instrument_freq, (),
                                            positive=True))
        if self.stop_on not in (None, "error"):
            raise ValueError(f"stop_on must be None or 'error', got {self.stop_on!r}")

    @classmethod
    def of(cls, options):
        """InsightOptions from a dict of keyword options; ValueError naming an unknown
        one."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r}; the options are "
                             f"{', '.join(sorted(known))}")
        return cls(**options)

    def probe_schedules(self):
        """[(probe, its kind, its `every` as a schedule)]."""
        return [(p, probe_kind(p), Every.parse("every", p.every)) for p in self.probes]

    def schedules(self):
        """The schedule options' values as the logs' meta records them."""
        return {name: getattr(self, name).value for name in (
            "histogram_freq", "sign_map_freq", "update_freq", "variable_update_freq",
            "instrument_freq")} | {"instruments": list(self.instruments)}

    def as_kwargs(self):
        """The options as keyword arguments (the same objects, not copies)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
