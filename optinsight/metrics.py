"""Every per-step metric, defined once (numpy only: no TensorFlow, no package import).

The device (`dynamics.DynamicsTracker`, the fused kernel of `native/`) reduces a
step's gradients and weights to a statistics matrix [n_vars, n_stats] whose columns
`stat_columns` names. `METRICS` says how each metric follows from those columns, and
everything else derives from it: the keys and their order in the logs
(`metric_names`), which are counts (`count_keys`), which need step t−1, the
tables the writers write (`metric_table`), the diagnosis' keys and the families a
reader finds in a run (`run_families`). Adding a metric is one entry here plus, if it
needs a new statistic, its column in the tracker.
"""

import math
import typing
from typing import Callable

import numpy as np

#: Statistics kept per variable regardless of threshold (the first columns).
GLOBAL_STATS = ("grad_sq", "weight_sq", "prev_weight_sq", "wdiff_sq", "nonfinite")
#: Statistics kept per (family, threshold) block, in column order.
BAND_STATS = ("grad1", "grad2", "retained", "flipped", "min", "max", "wdiff_sum", "wdiff_max")
#: Statistics after the blocks, computed outside the fused kernel: the squared norm of
#: the gradient before the optimizer clipped it, and the units whose gradient is
#: entirely in the smallest zero band.
EXTRA_STATS = ("raw_grad_sq", "zero_units")
#: Band statistics that add up over variables as maxima, not sums.
MAXIMA = ("wdiff_max",)


class Row(typing.NamedTuple):
    """One recorded step as read from the device."""

    step: int
    loss: float  # the batch's loss (NaN: not recorded)
    skipped: float  # 1.0 when the optimizer applied nothing (a loss-scale overflow)
    has_prev: bool  # a previous step exists (metrics against step t-1 are defined)
    stats: np.ndarray  # float64 [n_vars, n_stats]


def _ratio(num, den):
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _update_ratio(s):  # undefined for a variable whose previous weights are all zero
    prev = s["prev_weight_sq"]
    return np.where(prev > 0, np.sqrt(s["wdiff_sq"]) / np.sqrt(np.where(prev > 0, prev, 1)),
                    np.nan)


class Metric(typing.NamedTuple):
    """One per-step metric of each variable and of the whole model.

    key: its name in the logs; per-band metrics have `{tag}` (the threshold's, e.g.
        e7) and `{suffix}` (the family's: "" raw, "_09avg" moving average).
    compute: values from the statistics, by name (global and extra ones, or, for a
        per-band metric, its block's BAND_STATS).
    count: an integer count (int in JSON, int64 in layers/).
    needs_previous: undefined at a run's first step (it compares with step t−1).
    per_band: one per threshold and family.
    """

    key: str
    compute: Callable
    count: bool = False
    needs_previous: bool = False
    per_band: bool = False


def _band(key, compute, count=True):
    return Metric(key, compute, count=count, needs_previous=True, per_band=True)


#: Every per-variable metric, in the logs' column order (per-band ones: for each
#: family, for each threshold, these in this order).
METRICS = (
    Metric("grad_norm", lambda s: np.sqrt(s["grad_sq"])),
    Metric("raw_grad_norm", lambda s: np.sqrt(s["raw_grad_sq"])),
    Metric("weight_norm", lambda s: np.sqrt(s["weight_sq"])),
    Metric("wdiff", lambda s: np.sqrt(s["wdiff_sq"])),
    Metric("update_ratio", _update_ratio),
    Metric("nonfinite_grads", lambda s: s["nonfinite"], count=True),
    Metric("zero_units", lambda s: s["zero_units"], count=True),
    _band("no_zero_{tag}_grad1{suffix}", lambda b: b["grad1"]),
    Metric("no_zero_{tag}_grad2{suffix}", lambda b: b["grad2"], count=True, per_band=True),
    _band("no_zero_{tag}_grad_retained{suffix}", lambda b: b["retained"]),
    _band("no_zero_{tag}_grad_released{suffix}", lambda b: b["grad1"] - b["retained"]),
    _band("fraction_zeros_{tag}_released{suffix}",
          lambda b: _ratio(b["grad1"] - b["retained"], b["grad1"]), count=False),
    _band("no_grad_flipped_{tag}{suffix}", lambda b: b["flipped"]),
    _band("fraction_grad_flipped_{tag}{suffix}", lambda b: _ratio(b["flipped"], b["retained"]),
          count=False),
    _band("no_min_{tag}{suffix}", lambda b: b["min"]),
    _band("no_max_{tag}{suffix}", lambda b: b["max"]),
    _band("w_diff_0_0_{tag}_mean{suffix}", lambda b: _ratio(b["wdiff_sum"], b["retained"]),
          count=False),
    _band("w_diff_0_0_{tag}_max{suffix}", lambda b: b["wdiff_max"], count=False),
)
#: Whole-model keys after the per-variable metrics: the batch loss and whether the
#: optimizer skipped the step (counts among them: `skipped`).
MODEL_KEYS = ("train_loss", "skipped")
_MODEL_COUNTS = {"skipped"}


# ------------------------------------------------------------------ names
def threshold_tag(threshold):
    """Short name of a zero-band threshold: `e7` for 1e-7, else e.g. `3e-06`."""
    exponent = round(-math.log10(threshold))
    if exponent > 0 and math.isclose(threshold, 10.0**-exponent, rel_tol=1e-12):
        return f"e{exponent}"
    return f"{threshold:g}"


def ema_suffix(ema_decay):
    """Key suffix of the moving-average family: `_09avg` for a decay of 0.9."""
    return "_" + f"{ema_decay:g}".replace(".", "") + "avg"


def family_suffixes(ema_decay):
    """Key suffixes of the metric families: "" (raw values), then the moving
    average's unless `ema_decay` is None."""
    return [""] + ([] if ema_decay is None else [ema_suffix(ema_decay)])


def run_thresholds(meta):
    """The zero-band thresholds of a run from its insight.json meta; the defaults
    (1e-7, 1e-5) for a run without them."""
    return meta.get("thresholds") or (1e-7, 1e-5)


def run_families(meta):
    """(threshold tags, moving-average suffixes) of a run from its insight.json meta:
    e.g. (["e7", "e5"], ["", "_09avg"]); the defaults for a run without them."""
    thresholds = run_thresholds(meta)
    decay = meta.get("ema_decay", 0.9) if "thresholds" in meta else 0.9
    return [threshold_tag(t) for t in thresholds], family_suffixes(decay)


def _expanded(thresholds, ema_decay):
    """[(key, metric, family suffix or None, threshold index or None)] in column order."""
    out = [(m.key, m, None, None) for m in METRICS if not m.per_band]
    for suffix in family_suffixes(ema_decay):
        for i, threshold in enumerate(thresholds):
            tag = threshold_tag(threshold)
            out += [(m.key.format(tag=tag, suffix=suffix), m, suffix, i)
                    for m in METRICS if m.per_band]
    return out


def metric_names(thresholds, ema_decay):
    """Every per-variable metric key, in output order (whole model adds MODEL_KEYS)."""
    return [key for key, *_ in _expanded(thresholds, ema_decay)]


def model_metric_names(thresholds, ema_decay):
    """Every whole-model key, in output order: `metric_names`, then MODEL_KEYS."""
    return metric_names(thresholds, ema_decay) + list(MODEL_KEYS)


def count_keys(thresholds, ema_decay):
    """The keys of `model_metric_names` whose values are counts (ints)."""
    return {key for key, m, *_ in _expanded(thresholds, ema_decay) if m.count} | _MODEL_COUNTS


def zero_key(thresholds):
    """The key of zero-gradient counts at the smallest threshold (what dead layers and
    vanishing gradients are read from)."""
    return f"no_zero_{threshold_tag(min(thresholds))}_grad2"


def diagnosis_keys(thresholds):
    """The per-variable keys the diagnosis reads (the recorder keeps these in memory)."""
    return ("grad_norm", "weight_norm", "update_ratio", "nonfinite_grads",
            zero_key(thresholds))


def stat_columns(n_thresholds, families):
    """Names of the statistics matrix's columns: GLOBAL_STATS, then for each family
    (0 raw, 1 moving average) and threshold index the BAND_STATS as
    "<family>/<threshold>/<stat>", then EXTRA_STATS."""
    return (list(GLOBAL_STATS)
            + [f"{f}/{t}/{s}" for f in range(families) for t in range(n_thresholds)
               for s in BAND_STATS]
            + list(EXTRA_STATS))


# ------------------------------------------------------------------ values
def metric_table(stats, has_prev, thresholds, ema_decay):
    """Metrics of steps from their statistics matrices, as tables.

    Args:
        stats: float64 [..., n_vars, n_stats] from `DynamicsTracker` (any leading
            dimensions, e.g. one per step); an all-NaN row is a variable that was not
            trained at that step: its metrics are NaN and the whole model leaves it out.
        has_prev: bool [...]: whether a previous step exists (False on a run's first
            step: metrics with `needs_previous` are undefined).
    Returns:
        float64 [..., n_vars + 1, n_keys]: a row per variable, then the whole model
        (sums of counts and squares, maxima of maxima, fractions and norms
        recomputed); columns in `metric_names` order; NaN where undefined.
    """
    stats = np.asarray(stats, dtype=np.float64)
    names = stat_columns(len(thresholds), len(family_suffixes(ema_decay)))
    if stats.shape[-1] != len(names):
        raise ValueError(f"statistics of {stats.shape[-1]} columns, expected {len(names)}")
    column = {name: i for i, name in enumerate(names)}
    absent = np.isnan(stats[..., 0])  # variables not trained at a step: NaN rows
    total = np.nansum(stats, axis=-2)
    maxima = [i for name, i in column.items() if name.rsplit("/", 1)[-1] in MAXIMA]
    total[..., maxima] = np.fmax.reduce(stats[..., maxima], axis=-2)
    rows = np.concatenate([stats, total[..., None, :]], axis=-2)
    by_name = {name: rows[..., i] for name, i in column.items()}
    first = np.asarray(has_prev, bool)[..., None]  # False: needs_previous is undefined
    families = {suffix: f for f, suffix in enumerate(family_suffixes(ema_decay))}
    values = []
    for _, metric, suffix, t in _expanded(thresholds, ema_decay):
        if metric.per_band:
            prefix = f"{families[suffix]}/{t}/"
            value = metric.compute({s: by_name[prefix + s] for s in BAND_STATS})
        else:
            value = metric.compute(by_name)
        values.append(np.where(first, value, np.nan) if metric.needs_previous else value)
    table = np.stack(values, axis=-1)
    table[~np.isfinite(table)] = np.nan
    table[..., :-1, :][absent] = np.nan
    return table


def table_row_dict(row, keys, counts):
    """{key: int | float | None} of one table row (NaN -> None, counts -> int)."""
    return {k: None if v != v else (int(v) if k in counts else v)
            for k, v in zip(keys, row.tolist())}


def summarize(stats, has_prev, names, thresholds, ema_decay):
    """Metrics of one step as dicts: (model {key: value}, layers {name: {key: value}}).

    See `metric_table`; counts are int, everything else float or None.
    """
    table = metric_table(stats, has_prev, thresholds, ema_decay)
    keys, counts = metric_names(thresholds, ema_decay), count_keys(thresholds, ema_decay)
    layers = {name: table_row_dict(table[r], keys, counts) for r, name in enumerate(names)}
    return table_row_dict(table[-1], keys, counts), layers


# ------------------------------------------------------------------ instruments
#: Cockpit's instruments that `fit` records on the training batch (issue 30;
#: `optinsight.instruments` gives their formulas), in log order: Alpha, the distance
#: from the initial weights, then those of one batch (`instruments.compute`).
BATCH_INSTRUMENTS = ("mean_gsnr", "norm_test", "inner_test", "ortho_test", "cabs",
                     "early_stopping", "tic_diag", "tic_trace")
INSTRUMENTS = ("alpha", "distance") + BATCH_INSTRUMENTS + ("grad_hist_2d",)
#: GradHist2d: bins and ranges of (per-example gradient entry, parameter value), as
#: Cockpit's defaults.
GRAD_HIST_2D_BINS = (40, 50)
GRAD_HIST_2D_RANGE = ((-1.0, 1.0), (-2.0, 2.0))
#: Cockpit's configurations by these names. Cockpit's HessTrace and HessMaxEV are the
#: Hessian probe's here; GradHist1d, GradNorm, UpdateSize and Loss are always
#: recorded; "full" adds GradHist2d and the instruments no Cockpit configuration has.
INSTRUMENT_PRESETS = {"economy": ("alpha", "distance", "norm_test", "inner_test",
                                  "ortho_test")}
INSTRUMENT_PRESETS["business"] = INSTRUMENT_PRESETS["economy"] + ("tic_diag", "tic_trace")
INSTRUMENT_PRESETS["full"] = INSTRUMENT_PRESETS["business"] + (
    "mean_gsnr", "cabs", "early_stopping", "grad_hist_2d")


def instrument_names(instruments):
    """The instruments an `instruments=` option asks for, in log order: None (none), a
    preset of INSTRUMENT_PRESETS, or names of INSTRUMENTS; ValueError naming what is
    wrong."""
    if instruments is None:
        return ()
    if isinstance(instruments, str):
        if instruments not in INSTRUMENT_PRESETS:
            raise ValueError(
                f"instruments={instruments!r} is not a preset; the presets are "
                f"{', '.join(INSTRUMENT_PRESETS)}, or pass a list of {', '.join(INSTRUMENTS)}")
        return INSTRUMENT_PRESETS[instruments]
    names = tuple(instruments)
    unknown = [n for n in names if n not in INSTRUMENTS]
    if unknown or not names:
        problem = f"unknown instrument {unknown[0]!r}" if unknown else "instruments is empty"
        raise ValueError(f"{problem}; the instruments are {', '.join(INSTRUMENTS)}")
    return tuple(n for n in INSTRUMENTS if n in names)
