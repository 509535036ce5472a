"""Short names in metric keys (no TensorFlow: the log readers use them too)."""

import math


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


def run_families(meta):
    """(threshold tags, moving-average suffixes) of a run from its insight.json meta:
    e.g. (["e7", "e5"], ["", "_09avg"]); the defaults for a run without them."""
    thresholds = meta.get("thresholds") or (1e-7, 1e-5)
    decay = meta.get("ema_decay", 0.9) if "thresholds" in meta else 0.9
    return [threshold_tag(t) for t in thresholds], family_suffixes(decay)
