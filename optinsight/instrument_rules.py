"""Diagnosis rules over Cockpit's instruments (`Run.instruments`; README, "Cockpit's
instruments"). They judge the last epoch with recorded instruments: a batch-size test
or a stopping criterion speaks of where training is now, not of how it began."""

from optinsight.findings import Finding

#: Recorded steps the last epoch needs before a rule judges it.
MIN_RECORDED = 10
#: The norm test's θ is √(the batch gradient's estimated variance) / ‖batch gradient‖.
#: Its expectation stays below 1 (‖g‖² carries the noise too) and reaches about 1 where
#: the gradient is all noise; a median at or above NOISY_THETA over the last epoch
#: means the batch is too small for its gradient to mean more than its noise (the
#: norm test of Byrd et al. 2012 with θ = 0.9).
NOISY_THETA = 0.9


def _last_epoch(run, name):
    """The instrument `name` on the last epoch that recorded it (NaN dropped), with the
    steps as index; None when it is not recorded or has fewer than MIN_RECORDED
    values there."""
    frame = run.instruments
    if frame.empty or name not in frame:
        return None
    frame = frame[frame[name].notna()]
    if frame.empty:
        return None
    last = frame[frame["epoch"] == frame["epoch"].max()]
    return last.set_index("step")[name] if len(last) >= MIN_RECORDED else None


def _batch_too_small(run):
    theta = _last_epoch(run, "norm_test")
    if theta is None or theta.median() < NOISY_THETA:
        return []
    median = float(theta.median())
    return [Finding(
        "batch_too_small", "info", None, int(theta.index[-1]),
        f"the norm test's θ has a median of {median:.2f} over the last epoch's recorded "
        f"steps (≥ {NOISY_THETA}): the batch gradient's noise is about as large as the "
        "gradient or larger, so its direction is mostly noise (Byrd et al. 2012)",
        f"Raise the batch size about {(median / NOISY_THETA) ** 2:.1f}× (the norm test's "
        f"rule: the batch times (θ / {NOISY_THETA})²), or lower the learning rate: "
        "training is probably near where this batch size lets it go",
        numbers={"median_theta": median})]


def _no_information_left(run):
    criterion = _last_epoch(run, "early_stopping")
    if criterion is None or criterion.mean() <= 0:
        return []
    mean = float(criterion.mean())
    return [Finding(
        "no_information_left", "info", None, int(criterion.index[-1]),
        f"the EB criterion averages {mean:.2f} (above 0) over the last epoch's recorded "
        "steps: the batch gradients hold no more information than their noise "
        "(Mahsereci et al. 2017), so further SGD steps at this learning rate mostly "
        "follow noise",
        "Stop training here (early stopping without a validation set), or lower the "
        "learning rate to go on", numbers={"mean_criterion": mean})]


INSTRUMENT_RULES = (_batch_too_small, _no_information_left)
