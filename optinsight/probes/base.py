"""What a probe is, and the names of what optinsight's probes write (no TensorFlow:
the report and the diagnosis read these names too).

A probe is an object with
    name: this instance's name: probes.jsonl's `probe`, TensorBoard's probes/<name>/;
    kind: what it measures: probes.jsonl's `kind`. The report and the diagnosis find a
        probe's data by its kind and the keys below, never by its name, so
        `HessianProbe(name="curvature")` is drawn and read like any Hessian probe;
    every: steps between evaluations, or "epoch";
    __call__(model, x, y) -> {key: scalar or array}.
A probe of your own needs a name, every and __call__; its kind defaults to its name.
"""

from typing import Protocol

from optinsight.schedule import Every


class Probe(Protocol):
    """The probe protocol (see the module's docstring)."""

    name: str
    kind: str
    every: int | str

    def __call__(self, model, x, y) -> dict: ...


def probe_kind(probe):
    """The probe's kind: its `kind`, else its name (a probe of your own)."""
    return getattr(probe, "kind", None) or probe.name


def check_probe(probe):
    """ValueError naming what `probe` lacks of the protocol, or its bad `every`."""
    missing = [a for a in ("name", "every") if not hasattr(probe, a)]
    if not callable(probe):
        missing.append("__call__(model, x, y)")
    if missing:
        raise ValueError(f"probe {probe!r} needs a name, an every and __call__(model, x, "
                         f"y) -> dict; it lacks {', '.join(missing)} (optinsight.probes.base)")
    if not isinstance(probe.name, str) or not probe.name:
        raise ValueError(f"probe {probe!r} needs a non-empty string name, got {probe.name!r}")
    Every.parse(f"probe {probe.name!r} every", probe.every)


# Kinds of optinsight's probes, and the keys of theirs that the report and the
# diagnosis read. Per-layer keys are "<layer>/<key>" (or "<prefix><layer>").
HESSIAN = "hessian"
LAMBDA_1 = "lambda_1"  # the top Hessian eigenvalue
SHARPNESS = "sharpness"  # the optimizer's own (preconditioned) sharpness
STABILITY_LIMIT = "stability_limit"  # the sharpness above which it is unstable
STABILITY_RATIO = "stability_ratio"  # sharpness / stability_limit
LR_TIMES_LAMBDA_MAX = "lr_times_lambda_max"  # older logs: lr · λmax
LAYER_LAMBDA_MAX = "lambda_max/"  # prefix of each layer's top eigenvalue
DENSITY, DENSITY_GRID = "density", "density_grid"  # arrays

NTK = "ntk"
NTK_SAME, NTK_DIFFERENT = "same", "different"  # mean kernel entries within/across classes
KERNEL_CHANGE = "kernel_change"  # ‖K_t − K_0‖ / ‖K_0‖

ACTIVATIONS = "activations"
ACTIVATION_HISTOGRAM = "hist/"  # prefix of each layer's histogram (an array)
ZERO_FRACTION = "zero_fraction"  # outputs exactly 0 (dead ReLUs)
SATURATED_FRACTION = "saturated_fraction"  # tanh/sigmoid outputs at their bounds

WEIGHT_SPECTRUM = "weight_spectrum"
EIGENVALUES = "eigenvalues"  # each kernel's eigenvalues of W Wᵀ (an array)
NEAR_ZERO_FRACTION = "near_zero_fraction"
STABLE_RANK = "stable_rank"
