"""Neural collapse (Papyan, Han & Donoho 2020) of the last-layer features.

Features h_i are a layer's outputs (default: the input of the last Dense layer, the
penultimate features); classes come from y. With μ_c the class means, μ_G the global
mean, M the [C, d] matrix of centred class means μ_c − μ_G, W the last Dense
layer's [C, d] classifier (its kernel transposed):

* nc1: tr(Σ_W Σ_B⁺) / C, within-class covariance against between-class covariance
  (→ 0 as each class collapses to its mean);
* nc2_equinorm: coefficient of variation of ‖μ_c − μ_G‖ (→ 0: equal norms);
* nc2_equiangular: mean over c ≠ c' of |cos(μ_c − μ_G, μ_c' − μ_G) + 1/(C − 1)|
  (→ 0: the maximally separated simplex);
* nc3: ‖W/‖W‖_F − M/‖M‖_F‖_F² (→ 0: classifier aligned with the means); only for
  the classifier's own input features (NaN for another layer);
* nc4: fraction of examples where the model's prediction differs from the nearest
  class mean's (→ 0).
"""

import keras
import numpy as np
import tensorflow as tf

from optinsight.probes.common import class_labels, layer_extractor, layer_features


def _last_dense(model):
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if not dense:
        raise ValueError(f"model {model.name!r} has no Dense layer to act as classifier")
    return dense[-1]


def _penultimate_features(model, x, classifier):
    extractor = layer_extractor(model, "input", [classifier])
    features = tf.nest.flatten(extractor.predict(np.asarray(x), verbose=0))[0]
    return np.asarray(features, np.float64).reshape(len(x), -1)


def _within_over_between(within, centred):
    """tr(Σ_W Σ_B⁺) / C without forming d×d matrices (d can be tens of thousands).

    Σ_B = MᵀM / C for the centred means M [C, d] = U S Vᵀ, so Σ_B⁺ = C·V S⁻² Vᵀ and
    tr(Σ_W Σ_B⁺) = C Σ_k v_kᵀ Σ_W v_k / s_k², with v_kᵀ Σ_W v_k the mean over examples
    of ((h_i − μ_{y_i})·v_k)². Singular values below 3e-8 of the largest are dropped,
    as numpy's pinv does for Σ_B (eigenvalues below 1e-15 of the largest).
    """
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    keep = s > 3e-8 * s.max() if s.size and s.max() > 0 else np.zeros_like(s, bool)
    spread = ((within @ vt[keep].T) ** 2).mean(axis=0)
    return float(np.sum(spread / s[keep] ** 2))  # C·Σ_k … / C


def collapse_metrics(features, labels, classifier_weights, predictions):
    """The NC quantities from features [n, d], int labels [n], classifier [C, d'] and
    the model's predicted classes [n]; nc3 is NaN unless d' = d."""
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError("neural collapse needs examples of at least two classes")
    global_mean = features.mean(axis=0)
    means = np.array([features[labels == c].mean(axis=0) for c in classes])
    centred = means - global_mean
    within = features - means[np.searchsorted(classes, labels)]  # h_i − μ_{y_i}
    nc1 = _within_over_between(within, centred)
    norms = np.linalg.norm(centred, axis=1)
    unit = centred / np.where(norms > 0, norms, 1)[:, None]
    cosines = unit @ unit.T
    off = ~np.eye(len(classes), dtype=bool)
    w = np.asarray(classifier_weights, np.float64)[classes]
    # squared distances to the class means, ‖h‖² − 2h·μ + ‖μ‖², without an [n, C, d] array
    distances = (features ** 2).sum(1)[:, None] - 2 * features @ means.T + (means ** 2).sum(1)
    nearest = classes[np.argmin(distances, axis=1)]
    return {
        "nc1": nc1,
        "nc2_equinorm": float(norms.std() / norms.mean()) if norms.mean() > 0 else np.nan,
        "nc2_equiangular": float(np.abs(cosines[off] + 1 / (len(classes) - 1)).mean()),
        "nc3": float(np.linalg.norm(w / np.linalg.norm(w) - centred / np.linalg.norm(centred))
                     ** 2) if w.shape == centred.shape else np.nan,
        "nc4": float(np.mean(nearest != np.asarray(predictions))),
    }


def neural_collapse(model, x, y, layer=None):
    """{"nc1", "nc2_equinorm", "nc2_equiangular", "nc3", "nc4"} on (x, y); y integer
    labels or one-hot. `layer`: a layer name whose outputs are the features
    (default: the input of the last Dense layer). nc3 compares the classifier with
    the features it reads: it is NaN for a layer whose outputs are not its input."""
    labels = class_labels(y)
    if len(labels) != len(x):
        raise ValueError(f"x has {len(x)} examples but y has {len(labels)}")
    classifier = _last_dense(model)
    features = (layer_features(model, x, [layer])[layer] if layer is not None
                else _penultimate_features(model, x, classifier))
    predictions = np.asarray(model.predict(np.asarray(x), verbose=0)).argmax(axis=1)
    out = collapse_metrics(features, labels, np.asarray(classifier.kernel).T, predictions)
    if layer is not None and model.get_layer(layer).output is not classifier.input:
        out["nc3"] = np.nan
    return out


class NeuralCollapseProbe:
    """Writes nc1, nc2_equinorm, nc2_equiangular, nc3, nc4 (see neural_collapse)."""

    kind = "neural_collapse"

    def __init__(self, every="epoch", layer=None, name="neural_collapse"):
        self.every, self.layer, self.name = every, layer, name

    def __call__(self, model, x, y):
        return neural_collapse(model, x, y, self.layer)
