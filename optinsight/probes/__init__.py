"""Probes of the loss landscape and the network (README, five-minute tour; each
function and probe class documents what it computes).

`hessian`, `ntk` and `stability` are used as modules (`probes.hessian.top_eigenvalues`), as
are `hvp` (the Hessian operator) and `krylov` (the matvec-only solvers); every other
function and every probe class is available here directly. A probe object has
`name`, `every` (steps or "epoch") and `__call__(model, x, y) -> dict` of scalars and
arrays, for `OptimizationInsightCallback(probes=..., probe_data=(x, y))`.
"""

from optinsight.probes import hessian, hvp, krylov, ntk, stability
from optinsight.probes.collapse import NeuralCollapseProbe, neural_collapse
from optinsight.probes.gradients import (
    GradientNoiseProbe,
    covariance_spectrum,
    noise_scale,
    per_example_gradients,
)
from optinsight.probes.hessian import HessianProbe
from optinsight.probes.norms import WeightNormProbe, weight_norms
from optinsight.probes.ntk import NTKProbe
from optinsight.probes.representations import (
    ActivationProbe,
    AugmentationProbe,
    RepresentationProbe,
    activation_histograms,
    augmentation_variance,
    cka,
    default_augmentation,
    export_projector,
    feature_spectrum,
    intra_layer_correlation,
    layer_correlations,
    linear_cka,
)
from optinsight.probes.spectra import (
    WeightSpectrumProbe,
    matrix_spectrum,
    power_law_alpha,
    weight_spectrum,
)

__all__ = [
    "hessian", "hvp", "krylov", "ntk", "stability",
    "ActivationProbe", "AugmentationProbe", "GradientNoiseProbe", "HessianProbe",
    "NTKProbe", "NeuralCollapseProbe", "RepresentationProbe", "WeightNormProbe",
    "WeightSpectrumProbe",
    "activation_histograms", "augmentation_variance", "cka", "covariance_spectrum",
    "default_augmentation", "export_projector", "feature_spectrum",
    "intra_layer_correlation", "layer_correlations", "linear_cka", "matrix_spectrum",
    "neural_collapse", "noise_scale", "per_example_gradients", "power_law_alpha",
    "weight_norms", "weight_spectrum",
]
