"""Normalised weight norms: how large each kernel is, comparable across layer sizes."""

import numpy as np

from optinsight.probes.common import kernels, variable_name


def weight_norms(model):
    """{kernel path: ‖W‖_F / sqrt(numel)} — the root-mean-square weight of each kernel."""
    return {variable_name(v): float(np.sqrt(np.mean(np.square(np.asarray(v, np.float64)))))
            for v in kernels(model)}


class WeightNormProbe:
    """Writes `<kernel path>`: its normalised norm (see weight_norms)."""

    kind = "weight_norms"

    def __init__(self, every="epoch", name="weight_norms"):
        self.every, self.name = every, name

    def __call__(self, model, x, y):
        return weight_norms(model)
