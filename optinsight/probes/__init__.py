"""Probes of the loss landscape and the network (README, five-minute tour; each
function and probe class documents what it computes).

`hessian`, `ntk` and `stability` are used as modules (`probes.hessian.top_eigenvalues`), as
are `hvp` (the Hessian operator) and `krylov` (the matvec-only solvers); every other
function and every probe class is available here directly. What a probe is (`name`,
`kind`, `every`, `__call__(model, x, y) -> dict`) and the names of what probes write
are in `probes.base`, which the report and the diagnosis read without TensorFlow: the
names here are imported on first use.
"""

import importlib

_MODULES = ("base", "hessian", "hvp", "krylov", "ntk", "stability")
_EXPORTS = {
    "collapse": ("NeuralCollapseProbe", "neural_collapse"),
    "gradients": ("GradientNoiseProbe", "covariance_spectrum", "noise_scale",
                  "per_example_gradients"),
    "hessian": ("HessianProbe",),
    "norms": ("WeightNormProbe", "weight_norms"),
    "ntk": ("NTKProbe",),
    "representations": (
        "ActivationProbe", "AugmentationProbe", "RepresentationProbe",
        "activation_histograms", "augmentation_variance", "cka", "default_augmentation",
        "export_projector", "feature_spectrum", "intra_layer_correlation",
        "layer_correlations", "linear_cka"),
    "spectra": ("WeightSpectrumProbe", "matrix_spectrum", "power_law_alpha",
                "weight_spectrum"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [*_MODULES, *sorted(_WHERE)]


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
